"""skip_backward: which samples it drops, the gradient-error bound of its adaptive threshold, state, errors."""

import copy

import pytest
import torch
from torch import nn

from lowmem_train import StrategyError, get_strategy_class
from lowmem_train.recipe import StepOutput
from lowmem_train.strategies.skip_backward import confidence_and_grad_norm


def make(**options):
    return get_strategy_class("skip_backward")(options)


def batch(n=64, classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * torch.linspace(0.1, 6, n).unsqueeze(1)
    labels = logits.argmax(1)  # mostly right, like a model in training: every fourth label is random
    labels[::4] = torch.randint(0, classes, (len(labels[::4]),), generator=generator)
    return logits.requires_grad_(), labels


def per_sample_loss(logits, labels):
    return nn.functional.cross_entropy(logits, labels, reduction="none")


def scored(loss, logits):
    """A classification recipe's scoring output."""
    return StepOutput(loss, torch.ones_like(loss), len(loss), logits=logits)


def adapted(strategy, seed=0):
    """One batch through the strategy (warm-up off), then the callback's bookkeeping and adaptation."""
    logits, labels = batch(seed=seed)
    strategy.select_samples(scored(per_sample_loss(logits, labels), logits))
    strategy.state.record(strategy.state.pending)
    return strategy


def test_grad_norm_from_loss_equals_the_logit_gradient():
    logits, labels = batch()
    loss = per_sample_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    _, norm = confidence_and_grad_norm(loss, logits, "margin")
    torch.testing.assert_close(norm.float(), grad.norm(dim=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("criterion", ["margin", "top1"])
@pytest.mark.parametrize("bound, max_skip", [(0.05, 0.9), (0.3, 0.9), (0.3, 0.2)])
def test_adapted_threshold_keeps_the_gradient_error_and_skip_share_bounds(criterion, bound, max_skip):
    strategy = adapted(make(criterion=criterion, max_grad_error=bound, max_skip=max_skip, warmup_steps=0))
    logits, labels = batch()  # the same samples the window holds
    loss = per_sample_loss(logits, labels)
    confidence, norm = confidence_and_grad_norm(loss, logits, criterion)
    skipped = confidence > strategy.state.threshold
    assert 0 < skipped.sum() <= max_skip * len(skipped)
    assert norm[skipped].sum() / norm.sum() <= bound
    # The lowest such threshold: skipping one more sample (the next most confident) breaks a bound.
    more = skipped | (confidence >= confidence[~skipped].max())
    assert norm[more].sum() / norm.sum() > bound or more.sum() > max_skip * len(more)


def test_keeps_exactly_the_samples_at_or_below_the_threshold():
    strategy = adapted(make(warmup_steps=0))
    logits, labels = batch(seed=1)
    loss = per_sample_loss(logits, labels)
    keep = strategy.select_samples(scored(loss, logits))
    skipped = confidence_and_grad_norm(loss, logits, "margin")[0] > strategy.state.threshold
    assert 0 < skipped.sum() < len(skipped)
    assert torch.equal(keep, ~skipped)
    figures = strategy.state.record(strategy.state.pending)
    assert figures["skip_rate"] == float(skipped.float().mean())
    assert strategy.state.skipped == int(skipped.sum()) and strategy.state.seen == 2 * len(loss)


def test_never_skips_more_than_max_skip_of_a_batch():
    strategy = adapted(make(warmup_steps=0, max_skip=0.5))
    strategy.state.threshold = -1.0  # every sample is confident enough
    logits, labels = batch(seed=1)
    keep = strategy.select_samples(scored(per_sample_loss(logits, labels), logits))
    assert int((~keep).sum()) == len(keep) // 2


def test_warm_up_skips_nothing():
    strategy = adapted(make(warmup_steps=0))
    strategy.state.warming_up = True
    logits, labels = batch(seed=1)
    assert strategy.select_samples(scored(per_sample_loss(logits, labels), logits)).all()


def test_random_selection_skips_as_many_other_samples_with_its_own_generator():
    confident, random = adapted(make(warmup_steps=0)), adapted(make(warmup_steps=0, selection="random", seed=3))
    logits, labels = batch(seed=1)
    loss = per_sample_loss(logits, labels)
    global_state = torch.random.get_rng_state()
    masks = [strategy.select_samples(scored(loss, logits)) for strategy in (confident, random)]
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert (~masks[0]).sum() == (~masks[1]).sum() > 0 and not torch.equal(masks[0], masks[1])


def test_state_survives_a_checkpoint():
    strategy = adapted(make(warmup_steps=0, selection="random"))
    (callback,) = strategy.callbacks()
    saved = copy.deepcopy(callback.state_dict())
    resumed = make(warmup_steps=0, selection="random")
    resumed.callbacks()[0].load_state_dict(saved)
    assert resumed.state.threshold == strategy.state.threshold < 1.0
    logits, labels = batch(seed=2)
    loss = per_sample_loss(logits, labels)
    assert torch.equal(strategy.select_samples(scored(loss, logits)), resumed.select_samples(scored(loss, logits)))


def test_non_classification_logits_are_refused():
    logits = torch.randn(2, 8, 96)
    with pytest.raises(StrategyError, match="needs logits of shape batch x classes"):
        make().select_samples(scored(torch.rand(2), logits))


@pytest.mark.parametrize("options, message", [
    ({"max_grad_error": 1.5}, "max_grad_error=1.5 is outside \\(0, 1\\)"),
    ({"max_skip": 1.0}, "max_skip=1.0 is outside \\[0, 1\\)"),
    ({"criterion": "entropy"}, "criterion=entropy; valid: margin, top1"),
    ({"selection": "loss"}, "selection=loss; valid: confidence, random"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(StrategyError, match=message):
        make(**options)


def test_training_logs_skip_rate_and_threshold_per_step(tmp_path):
    import csv

    from conftest import compose_config
    from lowmem_train.training import train

    cfg = compose_config("strategy=skip_backward", "strategy.skip_backward.warmup_steps=1", "trainer=debug", "trainer.max_steps=3",
                         "data.image_size=8", "data.batch_size=16", "model.arch=resnet18", run_dir=tmp_path)
    train(cfg)
    (metrics,) = tmp_path.glob("csv/*/metrics.csv")
    rows = [r for r in csv.DictReader(open(metrics)) if r.get("skip_backward/threshold")]
    assert len(rows) == 3
    assert all(0.0 <= float(r["skip_backward/threshold"]) <= 1.0 for r in rows)
    assert float(rows[0]["skip_backward/skip_rate"]) == 0.0  # warm-up


def test_only_the_kept_samples_are_forwarded_with_a_graph_and_back_propagated():
    from tiny_models import cnn_batch, tiny_cnn

    from lowmem_train.recipe import ImageClassification
    from lowmem_train.training import TrainingModule

    model = tiny_cnn()
    model.dropout.p = 0.0
    images, labels = cnn_batch(16)
    reference, statistics = copy.deepcopy(model), copy.deepcopy(model)
    strategy = make(warmup_steps=0, max_skip=0.5)
    strategy.state.warming_up = False
    strategy.state.threshold = -1.0  # every sample is confident enough: the 8 most confident are skipped
    module = TrainingModule(object.__new__(ImageClassification), model, [strategy], None)
    forwarded = []
    model.register_forward_hook(lambda m, args, out: forwarded.append((len(args[0]), torch.is_grad_enabled())))

    module.training_step((images, labels), 0).backward()

    keep = strategy.state.pending[:, 2] == 0
    assert forwarded == [(16, False), (8, True)]  # scoring pass, then the kept samples only
    loss = nn.functional.cross_entropy(reference(images[keep]), labels[keep], reduction="sum") / len(labels)
    loss.backward()
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, expected.grad, msg=name)
    with torch.no_grad():
        statistics(images)  # batch-norm statistics follow the whole batch, updated once
    for buffer, expected in zip(model.buffers(), statistics.buffers()):
        torch.testing.assert_close(buffer, expected)


def test_activation_memory_falls_with_the_skipped_samples_under_gradient_accumulation(tmp_path):
    import csv

    from conftest import compose_config
    from lowmem_train.training import train

    cfg = compose_config("strategy=skip_backward", "strategy.skip_backward.warmup_steps=2", "trainer=debug",
                         "trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "data.image_size=8",
                         "data.batch_size=32", "model.arch=resnet18", "optimizer.lr=0.2", run_dir=tmp_path)
    report = train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "memory.csv")))
    assert len(rows) == 8  # one row per micro-batch
    (metrics,) = tmp_path.glob("csv/*/metrics.csv")
    # Lightning logs once per optimizer step: the last micro-batch's rate (micro-batches 1, 3, 5, 7).
    rates = [float(r["skip_backward/skip_rate"]) for r in csv.DictReader(open(metrics)) if r.get("skip_backward/skip_rate")]
    assert rates[:2] == [0.0, 0.0] and max(rates[2:]) > 0  # warm-up counts optimizer steps, not micro-batches
    full = [int(row["activation_bytes"]) for row in rows]
    assert full[:4] == [full[0]] * 4
    for micro_batch, rate in ((5, rates[2]), (7, rates[3])):
        assert full[micro_batch] == pytest.approx(full[0] * (1 - rate), rel=0.05)
    share = report["strategy_report"]["skip_backward"]["skipped_share"]
    assert 0 < share == pytest.approx(1 - sum(full) / (8 * full[0]), abs=0.02)


def test_ddp_ranks_share_one_threshold_from_every_rank_samples(tmp_path):
    """Two CPU processes (gloo): each back-propagates its own kept samples; the window holds both ranks'."""
    import csv

    from conftest import read_report, run_cli

    result = run_cli("strategy=skip_backward", "strategy.skip_backward.warmup_steps=1", "trainer=debug",
                     "trainer.max_steps=3", "trainer.accelerator=cpu", "trainer.devices=2", "+trainer.strategy=ddp",
                     "data.image_size=8", "data.batch_size=16", "model.arch=resnet18", f"run_dir={tmp_path}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("memory report") == 1  # rank 0 reports
    figures = read_report(tmp_path)["strategy_report"]["skip_backward"]
    assert figures["samples_scored"] == 3 * 16 * 2 and figures["skipped_share"] > 0
    rows = list(csv.DictReader(open(tmp_path / "memory.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]

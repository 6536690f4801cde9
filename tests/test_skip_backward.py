"""skip_backward: which samples it drops, the gradient-error bound of its adaptive threshold, state, errors."""

import copy

import pytest
import torch
from torch import nn

from lowmem_train import StrategyError, get_strategy_class
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


def adapted(strategy, seed=0):
    """One batch through the strategy (warm-up off), then the callback's adaptation."""
    logits, labels = batch(seed=seed)
    strategy.reduce_loss(per_sample_loss(logits, labels), logits)
    strategy.state.adapt()
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


def test_loss_drops_exactly_the_skipped_samples():
    strategy = adapted(make(warmup_steps=0))
    logits, labels = batch(seed=1)
    loss = per_sample_loss(logits, labels)
    reduced = strategy.reduce_loss(loss, logits)
    skipped = confidence_and_grad_norm(loss, logits, "margin")[0] > strategy.state.threshold
    assert 0 < skipped.sum() < len(skipped)
    (grad,) = torch.autograd.grad(reduced, logits)
    assert torch.all(grad[skipped] == 0) and torch.all(grad[~skipped].abs().sum(1) > 0)
    torch.testing.assert_close(reduced, loss[~skipped].sum() / len(loss))
    assert strategy.state.skipped == int(skipped.sum()) and strategy.state.seen == 2 * len(loss)


def test_warm_up_skips_nothing():
    strategy = adapted(make(warmup_steps=0))
    strategy.state.warming_up = True
    logits, labels = batch(seed=1)
    loss = per_sample_loss(logits, labels)
    torch.testing.assert_close(strategy.reduce_loss(loss, logits), loss.mean())


def test_random_selection_skips_as_many_other_samples_with_its_own_generator():
    confident, random = adapted(make(warmup_steps=0)), adapted(make(warmup_steps=0, selection="random", seed=3))
    logits, labels = batch(seed=1)
    loss = per_sample_loss(logits, labels)
    global_state = torch.random.get_rng_state()
    masks = []
    for strategy in (confident, random):
        (grad,) = torch.autograd.grad(strategy.reduce_loss(loss, logits), logits, retain_graph=True)
        masks.append(grad.abs().sum(1) == 0)
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert masks[0].sum() == masks[1].sum() > 0 and not torch.equal(masks[0], masks[1])


def test_state_survives_a_checkpoint():
    strategy = adapted(make(warmup_steps=0, selection="random"))
    (callback,) = strategy.callbacks()
    saved = copy.deepcopy(callback.state_dict())
    resumed = make(warmup_steps=0, selection="random")
    resumed.callbacks()[0].load_state_dict(saved)
    assert resumed.state.threshold == strategy.state.threshold < 1.0
    logits, labels = batch(seed=2)
    loss = per_sample_loss(logits, labels)
    assert torch.equal(strategy.reduce_loss(loss, logits), resumed.reduce_loss(loss, logits))


def test_non_classification_logits_are_refused():
    logits = torch.randn(2, 8, 96)
    with pytest.raises(StrategyError, match="needs a classification recipe"):
        make().reduce_loss(torch.rand(2), logits)


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

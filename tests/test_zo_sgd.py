"""Forward-only training (strategies/zo_sgd.py): exact perturb-and-restore, the SPSA estimator's direction,
no saved activations, the model's own random stream untouched, loss falling through the CLI, refusals."""

from __future__ import annotations

import csv
import re

import pytest
import torch
from torch import nn

from conftest import compose_config, read_report, run_cli
from lowmem_train.optimizers import PerParameterOptimizer
from lowmem_train.recipe import StepOutput
from lowmem_train.strategies.zo_sgd import SPSA
from tiny_models import tiny_llama_config


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.0), nn.Linear(8, 4))


def batch():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator)


def step_output(loss: torch.Tensor) -> StepOutput:
    return StepOutput(loss.reshape(1), torch.ones(1), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_forwards_leave_the_parameters_bit_identical(dtype):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config()).to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    spsa = SPSA(model, eps=1e-3)
    with torch.no_grad():
        plain = model(input_ids=tokens).logits
        for sign in (1.0, -1.0, 1.0):
            with spsa.perturbed(sign, seed=7):
                perturbed = model(input_ids=tokens).logits
            assert not torch.equal(perturbed, plain)  # the forward did see other weights
    for name, param in model.named_parameters():
        assert param.dtype == dtype and torch.equal(param, before[name]), name
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, plain)


def test_a_forward_that_raises_leaves_the_parameters_in_place():
    model = mlp()
    weight = model[3].weight
    spsa = SPSA(model)
    with pytest.raises(RuntimeError), torch.no_grad(), spsa.perturbed(1.0, seed=1):
        model(torch.randn(2, 5))  # wrong width: the first Linear's forward raises after its pre-hook
    assert model[0].weight is spsa.parameters[0] and model[3].weight is weight


def test_estimate_averaged_over_seeds_points_along_the_gradient():
    model, (x, y) = mlp(), batch()
    nn.functional.cross_entropy(model(x), y).backward()
    exact = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    spsa = SPSA(model, eps=1e-3, n_perturbations=3000)  # d = 108 values: cosine ~ sqrt(n / (n + d))
    with torch.no_grad():
        seeds, projected, _ = spsa.projected_gradients(lambda: step_output(nn.functional.cross_entropy(model(x), y)), 0)
    estimate = torch.cat([sum(g * spsa.z(i, s) for g, s in zip(projected, seeds)).flatten() / len(seeds)
                          for i in range(len(spsa.parameters))])
    assert torch.nn.functional.cosine_similarity(estimate, exact, dim=0) >= 0.9


def test_the_normalized_estimate_has_the_gradient_norm_on_average():
    """E|g z|^2 = (d + 2) |grad|^2 for one Gaussian perturbation: scaled by sqrt(n / (d + n + 1)), the estimate the
    optimizer steps on is as long as a gradient, so the recipe's learning rate means a step of a gradient's size."""
    model, (x, y) = mlp(), batch()
    nn.functional.cross_entropy(model(x), y).backward()
    exact = sum(float(p.grad.square().sum()) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    raw, normalized = SPSA(model, normalize=False), SPSA(model)
    assert raw.scale == 1.0 and normalized.scale == pytest.approx((1 / (108 + 2)) ** 0.5)  # d = 108 values
    raw.remove()
    with torch.no_grad():
        seeds, projected, _ = normalized.projected_gradients(
            lambda: step_output(nn.functional.cross_entropy(model(x), y)), 0)
        squared = [sum(float((normalized.scale * g * normalized.z(i, s)).square().sum())
                       for i in range(len(normalized.parameters)))
                   for step in range(400)
                   for s, g in zip(*normalized.projected_gradients(
                       lambda: step_output(nn.functional.cross_entropy(model(x), y)), step)[:2])]
    assert sum(squared) / len(squared) == pytest.approx(exact, rel=0.25)


def test_a_step_draws_the_model_random_stream_as_one_forward_and_updates_on_the_estimate():
    model, (x, y) = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4)), batch()
    spsa = SPSA(model, eps=1e-3, n_perturbations=2)
    optimizer = PerParameterOptimizer(spsa.parameters, lambda p: torch.optim.SGD(p, lr=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(5)
    with torch.no_grad():  # a plain loop's scalar loss
        loss = spsa.step(lambda: nn.functional.cross_entropy(model(x), y), optimizer, step=0)
    after_step = torch.rand(1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.manual_seed(5)
    with torch.no_grad():
        model(x)  # what one training forward draws (the dropout mask)
    assert torch.equal(torch.rand(1), after_step)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind


def test_parameters_filter_perturbs_only_the_chosen_ones():
    model = mlp()
    spsa = SPSA(model, parameters=["3.*"])
    assert [p.shape for p in spsa.parameters] == [torch.Size([4, 8]), torch.Size([4])]
    with pytest.raises(ValueError, match="parameters pattern 'head.*' matches no trainable parameter"):
        SPSA(model, parameters=["head.*"])


@pytest.mark.filterwarnings("ignore:strategy 'lora' also acts on the training loop")
def test_with_lora_only_the_adapters_are_perturbed():
    from transformers import LlamaForCausalLM

    from lowmem_train import apply_strategies

    model = apply_strategies(LlamaForCausalLM(tiny_llama_config()), {"lora": {"r": 4}})
    names = SPSA(model).names
    assert names and all("lora_" in name for name in names)


def run_losses(run_dir) -> list[float]:
    with open(run_dir / "memory.csv") as file:
        return [float(row["loss"]) for row in csv.DictReader(file)]


TINY_LLAMA = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=4",
              "data.num_samples=64", "trainer.max_steps=2", "optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false")


@pytest.mark.parametrize("layers", [2, 6])
def test_no_activation_is_saved_whatever_the_depth(layers, tmp_path):
    from lowmem_train.training import train

    depth = f"model.config.num_hidden_layers={layers}"
    zo = train(compose_config(*TINY_LLAMA, depth, "strategy=zo_sgd", run_dir=tmp_path / "zo"))
    plain = train(compose_config(*TINY_LLAMA, depth, "strategy=none", run_dir=tmp_path / "plain"))
    assert zo["activation_bytes"] == 0 < plain["activation_bytes"]
    assert zo["grad_bytes"] == 0 and zo["optimizer_state_bytes"] == plain["optimizer_state_bytes"] == 0
    figures = zo["strategy_report"]["zo_sgd"]
    assert figures["forwards"] == 4 and figures["forwards_per_step"] == 2 and figures["forwards_per_s"] > 0


def falls(losses: list[float], window: int, ratio: float) -> bool:
    return sum(losses[-window:]) / window < ratio * sum(losses[:window]) / window


@pytest.mark.slow  # 45 s; the causal-LM run below shows the loss falling through the CLI in CI
def test_loss_falls_on_digits_through_the_cli(tmp_path):
    """The classifier's head trained forward-only on top of the random ResNet-18 (5,130 values: zeroth order
    moves d / n_perturbations times slower than backprop, so a few dozen steps move a small set)."""
    result = run_cli("strategy=zo_sgd", "strategy.zo_sgd.n_perturbations=8", "strategy.zo_sgd.parameters=[fc.*]",
                     "strategy.zo_sgd.normalize=false",
                     "optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false", "optimizer.lr=2e-3",
                     "model.arch=resnet18", "data.image_size=8", "data.batch_size=32", "trainer.max_steps=60",
                     "trainer.max_epochs=-1", "trainer.enable_checkpointing=false", "trainer.limit_val_batches=2",
                     f"run_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = run_losses(tmp_path)  # measured: 2.50 over the first 10 steps, 2.23 over the last 10
    assert falls(losses, 10, 0.95), losses
    assert read_report(tmp_path)["activation_bytes"] == 0


@pytest.mark.slow  # CI time: over 30 s on 2 cores
def test_causal_lm_fine_tune_loss_falls_through_the_cli(tmp_path, tiny_pretrained_llm):
    """Every parameter of the tiny instruction model (~100k values), responses only (prompt tokens masked)."""
    result = run_cli("recipe=llama_finetune", f"model.name_or_path={tiny_pretrained_llm.model_dir}",
                     "model.dtype=float32", "data=instruct", "data.path=json",
                     f"data.data_files={tiny_pretrained_llm.instruct_jsonl}", "data.seq_len=48", "data.batch_size=8",
                     "data.val_fraction=0.1", "strategy=zo_sgd", "strategy.zo_sgd.n_perturbations=8",
                     "strategy.zo_sgd.normalize=false",
                     "optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false", "optimizer.lr=3e-3",
                     "trainer.max_steps=40", "trainer.max_epochs=-1", "trainer.enable_checkpointing=false",
                     f"run_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = run_losses(tmp_path)  # measured: 4.73 over the first 10 steps, 4.09 over steps 31-40
    assert falls(losses, 10, 0.92), losses


def test_the_divergence_hint_names_the_learning_rate():
    from lowmem_train.strategy import get_strategy_class

    strategy = get_strategy_class("zo_sgd")({"normalize": False})
    model = mlp()
    strategy.apply(model, strategy.plan(model))
    strategy.configure_optimizer(model, lambda p: torch.optim.SGD(p, lr=0.05))
    assert strategy.nonfinite_hint() == ("zo_sgd diverged at optimizer.lr=0.05: a zeroth-order estimate is far "
                                         "noisier than a gradient, try optimizer.lr=0.005 or "
                                         "strategy.zo_sgd.normalize=true")


@pytest.mark.slow  # ~60 s: ResNet-18 forwards until the loss overflows
def test_a_diverging_run_names_the_learning_rate_and_one_to_try(tmp_path):
    """MeZO's raw estimate at the recipe's backprop learning rate (SGD 0.05) blows up within a few dozen steps; the
    stop line says which learning rate did it and what to try."""
    result = run_cli("strategy=zo_sgd", "strategy.zo_sgd.normalize=false", "trainer.max_steps=30",
                     "trainer.limit_val_batches=0",
                     f"run_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert re.search(r"non-finite loss at step \d+ \(strategy=zo_sgd; zo_sgd diverged at optimizer.lr=0.05: .*try "
                     r"optimizer.lr=0.005 or strategy.zo_sgd.normalize=true; on_nonfinite=skip", line), line


def test_a_strategy_that_changes_backward_is_refused_in_one_line(tmp_path):
    result = run_cli(*TINY_LLAMA, "strategy=[zo_sgd,checkpoint]", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lowmem-train: error:") and "cannot be combined with 'checkpoint'" in last


@pytest.mark.parametrize("extra, message", [
    (["trainer.accumulate_grad_batches=2"], "set trainer.accumulate_grad_batches=1"),
    (["strategy.zo_sgd.eps=0"], "eps must be > 0"),
    (["strategy.zo_sgd.parameters=[nothing.*]"], "matches no trainable parameter"),
])
def test_what_zo_sgd_cannot_honour_is_refused_before_training(extra, message, tmp_path):
    """In this process (the CLI prints such a LowmemError as the one line above)."""
    from lowmem_train.errors import LowmemError
    from lowmem_train.training import train

    with pytest.raises(LowmemError, match=re.escape(message)):
        train(compose_config(*TINY_LLAMA, "strategy=zo_sgd", *extra, run_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "memory.csv").exists()

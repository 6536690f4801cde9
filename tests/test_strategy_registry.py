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

# Failures measured on this branch, left to the owners of strategies/compress.py and strategies/approx_bp.py
# (issue 16): the expectation stays the declared bound; strict, so a fix shows up as XPASS until removed here.
KNOWN_FAILURES = {
    ("compress", "resnet"): "compress 4-bit: layer1.0.bn2.weight grad cosine -0.23 < 0.85",
    ("compress", "mobilenet_v3"): "compress 4-bit: features.3.block.0.1.weight grad cosine 0.29 < 0.85",
    ("compress", "efficientnet"): "compress 4-bit: a zero gradient (bias before batch norm) becomes 8.6",
    ("compress", "densenet"): "compress 4-bit: features.norm0.weight grad cosine 0.07 < 0.85",
    ("compress", "qwen2"): "compress 4-bit: layers.1.self_attn.k_proj.bias grad cosine 0.84 < 0.85",
    ("compress", "mistral"): "compress 4-bit: non-finite gradients",
    ("compress", "hf_vit"): "compress 4-bit: vit.layernorm.weight grad cosine 0.28 < 0.85",
    ("compress", "t5"): "compress 4-bit: encoder.block.0.layer.1.layer_norm.weight grad cosine 0.82 < 0.85",
    ("approx_bp", "efficientnet"): "approx_bp: squeeze-excitation fc1.bias grad cosine -1.00 < 0.6",
    ("approx_bp", "gpt2"): "approx_bp: transformer.h.0.ln_2.weight grad cosine 0.58 < 0.6",
}


def cases():
    for names in [(name,) for name in available_strategies()] + PAIRS:
        for arch in ZOO:
            marks = []
            if arch not in (CI_ARCHS if len(names) == 1 else CI_PAIR_ARCHS):
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

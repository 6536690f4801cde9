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
from strategy_settings import STRATEGY_SETTINGS
from zoo import ZOO

# One of each family: batch norm and dropout, list arguments, weights read by the parent module, a Llama
# and GPT-2 with a key/value cache, an encoder-decoder.
CI_ARCHS = ("cnn", "densenet", "swin", "llama", "gpt2", "t5")
CI_PAIR_ARCHS = ("cnn", "llama")
TRACED_FOR_LONG = {("compile", "swin"), ("compile", "t5")}  # 20-50 s of Dynamo tracing each: slow only

# Open failures (compress at 4 bits, approx_bp), all a batch norm weight of a tiny CNN whose gradient, a sum
# of g * x_hat over the batch and the image that nearly cancels, loses its direction while the whole gradient
# keeps it: the expectation stays the declared bound; strict, so a fix shows up as XPASS until its entry goes.
KNOWN_FAILURES = {
    ("approx_bp", "efficientnet"): "features.0.1.weight grad cosine 0.51 < 0.6 (whole gradient 0.91)",
    ("compress", "mobilenet_v3"): "features.3.block.0.1.weight grad cosine 0.35 < 0.85 (whole gradient 0.99)",
    ("compress", "efficientnet"): "features.3.0.block.0.1.weight grad cosine 0.59 < 0.85 (whole gradient 0.96)",
    ("compress", "densenet"): "features.norm0.weight grad cosine -0.09 < 0.85 (whole gradient 1.00)",
    ("checkpoint + compress", "efficientnet"):
        "features.3.0.block.0.1.weight grad cosine 0.57 < 0.85 (whole gradient 0.98)",
    ("checkpoint + compress", "densenet"): "features.norm0.weight grad cosine -0.01 < 0.85 (whole gradient 1.00)",
    ("compress + offload", "mobilenet_v3"): "features.3.block.0.1.weight grad cosine 0.35 < 0.85 (whole gradient 0.99)",
    ("compress + offload", "efficientnet"):
        "features.3.0.block.0.1.weight grad cosine 0.59 < 0.85 (whole gradient 0.96)",
    ("compress + offload", "densenet"): "features.norm0.weight grad cosine -0.09 < 0.85 (whole gradient 1.00)",
    ("approx_bp + compress", "efficientnet"):
        "features.2.0.block.0.1.weight grad cosine 0.28 < 0.6 (whole gradient 0.89)",
    ("approx_bp + checkpoint", "efficientnet"): "features.0.1.weight grad cosine 0.51 < 0.6 (whole gradient 0.91)",
    ("compile + approx_bp", "efficientnet"): "features.0.1.weight grad cosine 0.51 < 0.6 (whole gradient 0.91)",
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
    cfg = compose_config(f"strategy={name}")  # its Options dataclass, from the ConfigStore
    assert list(cfg.strategy) == [name]
    strategy = get_strategy_class(name)(cfg.strategy[name])  # the shipped options are valid
    assert strategy.options == get_strategy_class(name).Options()  # the config's defaults are the dataclass's


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


# compress's input-gradient cosine (issue 16: >= 0.5 at 2 bits, >= 0.9 at 4 bits on every zoo model), measured:
# 2 bits 0.31 on MobileNetV3 and 0.36 on EfficientNet (squeeze-excitation nets: batch norm and activation
# backwards at 4 levels), 0.69-0.98 elsewhere; 4 bits >= 0.96 everywhere.
INPUT_COSINE_SHORTFALLS = {("mobilenet_v3", 2): "input-gradient cosine 0.31 < 0.5",
                           ("efficientnet", 2): "input-gradient cosine 0.36 < 0.5"}


def input_cosine_cases():
    for bits, bound in ((2, 0.5), (4, 0.9)):
        for arch in ZOO:
            marks = [] if arch in CI_ARCHS else [pytest.mark.slow]
            if (arch, bits) in INPUT_COSINE_SHORTFALLS:
                marks.append(pytest.mark.xfail(reason=INPUT_COSINE_SHORTFALLS[arch, bits], strict=True))
            yield pytest.param(arch, bits, bound, id=f"{arch}-{bits}bit", marks=marks)


@pytest.mark.parametrize("arch, bits, bound", input_cosine_cases())
def test_compress_keeps_the_input_gradient_direction(arch, bits, bound):
    spec = {"compress": {**STRATEGY_SETTINGS["compress"]["options"], "bits": bits}}
    cosine = conformance.input_gradient_cosine(spec, ZOO[arch])
    assert cosine >= bound, cosine


# Through the trainer, loop hooks included (configure_optimizer, callbacks, select_samples): options under
# which each strategy acts within the few steps, and what it must show for it besides the loss.
TRAIN = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=8",
         "data.num_samples=64", "trainer.max_steps=3", "optimizer=adamw", "optimizer.lr=0.003")
TRAIN_OPTIONS = {"skip_backward": {"warmup_steps": 1, "max_grad_error": 0.5}}
LOOP_EFFECTS = {
    "step_in_backward": lambda report, plain: report["grad_bytes"] == 0 < plain["grad_bytes"],
    "skip_backward": lambda report, plain: report["strategy_report"]["skip_backward"]["skipped_share"] > 0,
    "zo_sgd": lambda report, plain: report["activation_bytes"] == report["grad_bytes"] == 0,
}


def trained(name: str, run_dir) -> tuple[list[float], dict]:
    import csv

    from lowmem_train.training import train

    options = {**STRATEGY_SETTINGS[name]["options"], **TRAIN_OPTIONS.get(name, {})}
    report = train(compose_config(*TRAIN, f"strategy={name}", *(f"strategy.{name}.{k}={v}" for k, v in options.items()),
                                  run_dir=run_dir))
    with open(run_dir / "memory.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)], report


@pytest.fixture(scope="module")
def plain_training(tmp_path_factory):
    return trained("none", tmp_path_factory.mktemp("none"))


@pytest.mark.parametrize("name", [n for n in available_strategies() if n != "none"])
def test_every_strategy_trains_through_the_trainer(name, plain_training, tmp_path):
    losses, report = trained(name, tmp_path)
    plain_losses, plain = plain_training
    settings, strategy = STRATEGY_SETTINGS[name], get_strategy_class(name)
    assert len(losses) == len(plain_losses) and all(map(torch.isfinite, torch.tensor(losses)))
    if strategy.exact and not settings.get("adapter"):
        assert losses == pytest.approx(plain_losses, rel=1e-4)
    elif settings.get("min_grad_cosine"):
        assert losses[-1] == pytest.approx(plain_losses[-1], rel=0.05)
    if settings.get("saves_activations"):
        assert report["activation_bytes"] < plain["activation_bytes"]
    if name in LOOP_EFFECTS:
        assert LOOP_EFFECTS[name](report, plain), report

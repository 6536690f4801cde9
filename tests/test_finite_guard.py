"""The NaN/inf guard: a lossy strategy whose backward makes gradients non-finite is named in one line, with the
module and parameter where the NaN entered backward, in the trainer, the CLI and a plain PyTorch loop."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import compose_config, read_report
from lowmem_train import NonFiniteError, Strategy, Touch, apply_strategies, check_finite_gradients
from lowmem_train import run_control
from lowmem_train.strategy import _registry
from lowmem_train.training import train
from tiny_models import cnn_batch, tiny_cnn

RESNET_TARGET = "layer3.0.conv1"  # in the default recipe's ResNet-18


@dataclass
class PoisonOptions:
    module: str = RESNET_TARGET


class PoisonBackward(Strategy):
    """A broken lossy strategy: the gradient reaching ``module``'s output becomes NaN in backward."""

    exact = False
    Options = PoisonOptions

    def plan(self, model):
        return [Touch(self.options.module, type(model.get_submodule(self.options.module)).__name__, "NaN gradient")]

    def apply(self, model, plan):
        model.get_submodule(self.options.module).register_full_backward_pre_hook(
            lambda module, grad_output: tuple(g * float("nan") for g in grad_output))


class PoisonForward(PoisonBackward):
    """A broken lossy strategy whose forward output is NaN: the loss is, so its backward is not to blame."""

    def apply(self, model, plan):
        model.get_submodule(self.options.module).register_forward_hook(
            lambda module, args, output: output * float("nan"))


class HarmlessLossy(Strategy):
    """Declared lossy, changes nothing: the guard runs and passes."""

    exact = False


def register():
    for name, cls in (("poison_backward", PoisonBackward), ("poison_forward", PoisonForward),
                      ("harmless_lossy", HarmlessLossy)):
        cls.name = name
        _registry()[name] = cls


@pytest.fixture
def test_strategies(monkeypatch):
    for name in ("poison_backward", "poison_forward", "harmless_lossy"):
        monkeypatch.delitem(_registry(), name, raising=False)
    register()


# Runs the CLI in a fresh interpreter that knows the test-only strategies (the registry holds entry points).
CLI_WITH_TEST_STRATEGIES = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_finite_guard import register
register()
from lowmem_train.cli import main
main()
"""


def test_cli_names_the_lossy_strategy_module_and_parameter_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", CLI_WITH_TEST_STRATEGIES, "trainer=debug",
                             "+strategy.poison_backward={}", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    line = result.stderr.splitlines()[-1]
    assert line.startswith("lowmem-train: stopped: lossy strategy poison_backward made the gradients non-finite at "
                           f"step 1 (the loss is finite): NaN entered backward at module '{RESNET_TARGET}' (Conv2d), "
                           "parameter weight ("), line
    report = read_report(run_dir)
    assert report["stopped"]["step"] == report["steps"] == 1
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())  # no step on NaN


def test_a_lossy_strategy_stops_also_with_on_nonfinite_skip(tmp_path, test_strategies):
    """Skipping would skip every step: a broken backward stops the run whatever ``on_nonfinite`` says."""
    cfg = compose_config("trainer=debug", "on_nonfinite=skip", run_dir=tmp_path)
    cfg.strategy = {"poison_backward": {}}
    report = train(cfg)
    assert report["stopped"]["reason"].startswith(
        "lossy strategy poison_backward made the gradients non-finite at step 1")
    assert report["nonfinite_skipped_steps"] == 0


def test_a_nonfinite_loss_is_not_blamed_on_the_strategy(tmp_path, test_strategies):
    cfg = compose_config("trainer=debug", "on_nonfinite=off", run_dir=tmp_path)
    cfg.strategy = {"poison_forward": {"module": "fc"}}
    report = train(cfg)
    assert report["stopped"]["reason"] == ("non-finite loss at step 1: the forward pass made it, not the backward of "
                                           "lossy strategy poison_forward")


@pytest.mark.parametrize("strategy, checks", [("checkpoint", 0), ("harmless_lossy", 2)])
def test_with_on_nonfinite_off_only_a_lossy_run_pays_the_check(tmp_path, test_strategies, monkeypatch, strategy,
                                                                checks):
    """One fused check (``torch._foreach_norm`` of all gradients, one host sync) per optimizer step: exact runs
    make it only for ``on_nonfinite`` stop/skip; under a lossy strategy it is always made."""
    calls = []
    monkeypatch.setattr(run_control, "all_finite", lambda tensors: calls.append(len(tensors)) or True)
    cfg = compose_config("trainer=debug", "on_nonfinite=off", run_dir=tmp_path)
    cfg.strategy = {strategy: {}}
    report = train(cfg)
    assert report["stopped"] is None and report["steps"] == 2
    assert len(calls) == checks and all(n > 1 for n in calls)


def test_check_finite_gradients_in_a_plain_loop(test_strategies):
    torch.manual_seed(0)
    x, y = cnn_batch()
    model = tiny_cnn()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    check_finite_gradients(model, loss, step=1)  # finite: nothing happens

    poisoned = apply_strategies(tiny_cnn(), {"poison_backward": {"module": "blocks.1.conv2"}})
    loss = nn.functional.cross_entropy(poisoned(x), y)
    loss.backward()
    with pytest.raises(NonFiniteError) as error:
        check_finite_gradients(poisoned, loss, step=7)
    affected = [n for n, p in poisoned.named_parameters() if not p.grad.isfinite().all()]
    total = len(list(poisoned.parameters()))
    assert affected[-1] == "blocks.1.conv2.weight"  # blocks.1.bn2 and the head lie after it: finite
    assert str(error.value) == (
        "lossy strategy poison_backward made the gradients non-finite at step 7 (the loss is finite): NaN "
        f"entered backward at module 'blocks.1.conv2' (Conv2d), parameter weight ({len(affected)} of {total} "
        "parameter gradients non-finite); train without it, or keep that module out of it")

    with pytest.raises(NonFiniteError, match=r"^non-finite loss: the forward pass made it, not a strategy's backward$"):
        check_finite_gradients(poisoned, loss * float("inf"))

    exact = tiny_cnn()
    exact.head.bias.register_hook(lambda grad: grad * float("inf"))
    nn.functional.cross_entropy(exact(x), y).backward()
    expected = (r"^non-finite gradients from a finite loss \(no lossy strategy applied\): inf entered backward at "
                r"module 'head' \(Linear\), parameter bias \(1 of")
    with pytest.raises(NonFiniteError, match=expected):
        check_finite_gradients(exact)


def test_a_finite_gradient_whose_norm_overflows_passes():
    model = nn.Linear(4, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e30)  # finite, but its float32 norm is inf
    check_finite_gradients(model)

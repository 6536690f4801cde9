"""The stable Python API: apply_strategies, available_strategies, StrategyError, third-party plugins."""

import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

import lowmem_train
from lowmem_train import StrategyError, apply_strategies, available_strategies
from lowmem_train.forward_wrap import Phase, wrapper_owner
from lowmem_train.strategy import _registry, build_strategies
from tiny_models import cnn_batch, loss_of, tiny_cnn


def test_available_strategies_lists_first_party_ones():
    assert {"none", "checkpoint"} <= set(available_strategies())
    assert available_strategies() == sorted(available_strategies())


@pytest.mark.parametrize("spec", [
    "checkpoint", ["checkpoint"], {"checkpoint": {}}, {"checkpoint": {"targets": ["BasicBlock"]}},
    OmegaConf.create({"checkpoint": {"targets": None, "exclude": []}}), ["none", "checkpoint"],
])
def test_apply_strategies_accepts_every_spec_form(spec):
    model = tiny_cnn()
    assert apply_strategies(model, spec) is model
    assert model._lowmem_applied.keys() == {"checkpoint"}  # 'none' beside others means nothing
    loss_of("cnn", model, cnn_batch()).backward()


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown strategy 'nope'; available: "),
    ({"checkpoint": {"bogus": 1}}, "strategy 'checkpoint': unknown option 'bogus'; valid options: targets, exclude"),
    ({"checkpoint": {"targets": 3}}, "strategy 'checkpoint': option 'targets' must be list or null, got 3"),
    ({"checkpoint": {"targets": ["Nothing"]}}, "strategy 'checkpoint': targets pattern 'Nothing' matches no module of TinyResNet"),
    ({"checkpoint": {"exclude": ["blocks.*"]}}, "minus exclude ['blocks.*'] match no module"),
    ({"checkpoint": {"targets": ["(unclosed"]}}, "is not a valid regular expression"),
])
def test_bad_input_raises_strategy_error_naming_the_problem(spec, message):
    with pytest.raises(StrategyError) as info:
        apply_strategies(tiny_cnn(), spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_model_without_repeated_blocks_needs_explicit_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(StrategyError, match="its default repeated blocks match no module of Sequential"):
        apply_strategies(model, "checkpoint")
    apply_strategies(model, {"checkpoint": {"targets": ["0"]}})
    assert wrapper_owner(model[0], Phase.REBUILD) == "checkpoint"


def test_reapplying_with_other_options_is_refused():
    model = apply_strategies(tiny_cnn(), "checkpoint")
    with pytest.raises(StrategyError, match="already applied"):
        apply_strategies(model, {"checkpoint": {"targets": ["blocks.0"]}})


@pytest.fixture
def third_party_plugin(tmp_path, monkeypatch):
    """A separately installed package that registers a strategy through the entry-point group."""
    (tmp_path / "halfsave.py").write_text(textwrap.dedent('''
        import torch
        from lowmem_train import Strategy

        class HalfStage:
            def pack(self, tensor):
                return tensor.to(torch.float16) if tensor.is_floating_point() else tensor
            def unpack(self, tensor):
                return tensor.to(torch.float32) if tensor.dtype == torch.float16 else tensor

        class HalfSave(Strategy):
            exact = False
            incompatible_with = frozenset({"checkpoint"})
            def saved_tensor_stage(self):
                return HalfStage()
    '''))
    dist = tmp_path / "halfsave-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: halfsave\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lowmem_train.strategies]\nhalfsave = halfsave:HalfSave\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _registry.cache_clear()
    yield "halfsave"
    _registry.cache_clear()
    sys.modules.pop("halfsave", None)


def test_third_party_strategy_is_discovered_and_its_stage_runs(third_party_plugin):
    assert third_party_plugin in available_strategies()
    x = torch.randn(64, 32)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with lowmem_train.SavedBytesMeter(model) as plain:
        model(x).sum()
    apply_strategies(model, third_party_plugin)
    with lowmem_train.SavedBytesMeter(model) as half:
        model(x).sum().backward()
    assert half.bytes == plain.bytes // 2  # every saved activation stored in fp16 by the plugin's stage, once


def test_declared_incompatibility_is_refused(third_party_plugin):
    with pytest.raises(StrategyError, match="strategy 'halfsave' cannot be combined with 'checkpoint'"):
        build_strategies([third_party_plugin, "checkpoint"])


def test_strategies_are_ordered_for_surgery():
    assert [s.name for s in build_strategies(["checkpoint", "none"])] == ["checkpoint"]
    assert build_strategies(None) == []


def test_plain_loop_is_warned_about_loop_hooks_it_must_call_itself(monkeypatch):
    class KeepAll(lowmem_train.Strategy):
        name = "keep_all"

        def select_samples(self, scored):
            return torch.ones_like(scored.per_sample_loss, dtype=torch.bool)

    monkeypatch.setitem(_registry(), "keep_all", KeepAll)
    with pytest.warns(UserWarning, match="strategy 'keep_all' also acts on the training loop \\(select_samples\\)"):
        apply_strategies(tiny_cnn(), "keep_all")


def test_checkpoint_keeps_only_the_outermost_matching_modules():
    model = tiny_cnn()
    plan = lowmem_train.get_strategy_class("checkpoint")({"targets": ["blocks.*"]}).plan(model)
    assert [t.module for t in plan] == ["blocks"]  # 'blocks.*' also matches 'blocks' itself and all inside it
    apply_strategies(model, {"checkpoint": {"targets": ["BasicBlock"], "exclude": ["blocks.0"]}})
    assert wrapper_owner(model.blocks[1], Phase.REBUILD) == "checkpoint"
    assert wrapper_owner(model.blocks[0], Phase.REBUILD) is None

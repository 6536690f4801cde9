"""``lowmem-train`` end to end, in a subprocess: the default run, a strategy run, a multirun, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_report, run_cli

REPORT_KEYS = {"strategies", "peak_bytes", "activation_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes",
               "samples_per_s", "final_train_loss", "validation_metric", "validation_metric_value"}


def test_default_run_trains_on_digits_offline_and_reports_memory(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    report = read_report(run_dir)
    assert REPORT_KEYS <= report.keys()
    assert report["strategies"] == ["none"] and report["recipe"] == "cifar_resnet"
    assert report["validation_metric"] == "val/acc" and report["validation_metric_value"] > 0.8
    for name in ("memory.csv", "memory_report.json", "memory_curve.png", "strategies.json"):
        assert (run_dir / name).stat().st_size > 0
    assert "memory report" in result.stdout and "GiB" in result.stdout and str(run_dir) in result.stdout
    assert (run_dir / "memory.csv").read_text().count("\n") == report["steps"] + 1


def test_strategy_run_applies_checkpoint_and_saves_less(tmp_path):
    results = {}
    for strategy in ("none", "checkpoint"):
        out = tmp_path / strategy
        result = run_cli(f"strategy={strategy}", "trainer=debug", f"hydra.run.dir={out}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        results[strategy] = read_report(out)
    assert results["checkpoint"]["modules_touched"] == {"checkpoint": 8}
    assert results["checkpoint"]["activation_bytes"] * 2 < results["none"]["activation_bytes"]
    assert json.loads((tmp_path / "checkpoint" / "strategies.json").read_text())["checkpoint"][0]["module"] == "layer1.0"


def test_multirun_writes_one_directory_and_one_wandb_run_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "strategy=none,checkpoint", "trainer=debug", "logger=wandb", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [read_report(sweep / str(i)) for i in range(2)]
    assert [r["strategies"] for r in runs] == [["none"], ["checkpoint"]]
    wandb_runs = [list((sweep / str(i) / "wandb").glob("offline-run-*/run-*.wandb")) for i in range(2)]
    assert all(len(files) == 1 for files in wandb_runs)
    assert wandb_runs[0][0].name != wandb_runs[1][0].name  # finished separately, not merged
    summary = (sweep / "sweep_summary.md").read_text()
    assert "| strategy=none |" in summary and "| strategy=checkpoint |" in summary
    assert summary.startswith("shared overrides: trainer=debug logger=wandb")


@pytest.mark.parametrize("args, message", [
    (["strategy=foo"], "unknown strategy 'foo'; valid choices: "),
    (["recipe=bar"], "unknown recipe 'bar'; valid choices: cifar_resnet, imagenet_resnet, llama_finetune"),
    (["strategy=checkpoint", "strategy.checkpoint.bogus=1"], "unknown option 'strategy.checkpoint.bogus'; valid keys under strategy.checkpoint: targets, exclude"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs must be int or null, got 'abc'"),
    (["strategy=compress", "strategy.compress.bits=abc"], "strategy.compress.bits must be int, got 'abc'"),
    (["+data.anything=1"], "unknown option 'data.anything'; valid keys under data: name, image_size, batch_size"),
    (["recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "model.dtype=bf16"],
     "model.dtype must be one of float32, bfloat16, float16, got 'bf16'"),
    (["recipe=imagenet_resnet"], "data.root is required"),
    (["-m", "strategy=none,nope"], "unknown strategy 'nope'"),
    (["data=cifar10", "data.root=/nonexistent", "data.download=false"], "data.root=/nonexistent has no cifar-10-batches-py"),
    (["strategy=checkpoint", "strategy.checkpoint.targets=[Nope]"], "targets pattern 'Nope' matches no module of ResNet"),
])
def test_bad_input_exits_nonzero_with_one_line_and_no_output(tmp_path, args, message):
    run_dir = tmp_path / "run"
    result = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("lowmem-train: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_dry_run_lists_touched_modules_without_training(tmp_path):
    result = run_cli("strategy=checkpoint", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "strategy checkpoint: 8 module(s)" in result.stdout and "layer4.1 (BasicBlock)" in result.stdout
    assert not (tmp_path / "run" / "memory.csv").exists()


def test_llama_finetune_from_a_local_model_directory_and_json_files(tmp_path, tiny_llama_dir, corpus_file):
    out = tmp_path / "run"
    result = run_cli("recipe=llama_finetune", f"model.name_or_path={tiny_llama_dir}", "data=text", "data.path=json",
                     f"data.data_files={corpus_file}", "data.seq_len=16", "data.val_fraction=0.2",
                     "strategy=checkpoint", "trainer=debug", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(out)
    assert report["validation_metric"] == "val/loss" and report["validation_metric_value"] > 0
    assert report["tokens_per_s"] > 0 and report["modules_touched"] == {"checkpoint": 2}


def test_imagenet_resnet_on_an_image_folder(tmp_path, image_folder):
    out = tmp_path / "run"
    result = run_cli("recipe=imagenet_resnet", f"data.root={image_folder}", "model.num_classes=2", "data.image_size=32",
                     "data.batch_size=4", "data.num_workers=0", "trainer=debug", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_report(out)["model"] == "ResNet"


def test_installed_wheel_finds_its_configs_and_strategies(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(repo)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("lowmem_train-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    code = ("import sys; sys.argv = ['lowmem-train', 'strategy=checkpoint', 'dry_run=true', "
            f"'hydra.run.dir={tmp_path / 'run'}']; import lowmem_train, lowmem_train.cli as cli; "
            "print('PACKAGE', lowmem_train.__file__); cli.main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"PACKAGE {target}" in result.stdout
    assert "strategy checkpoint: 8 module(s)" in result.stdout
    assert (target / "lowmem_train" / "configs" / "train.yaml").exists()
    assert (target / "lowmem_train" / "configs" / "groups.py").exists()  # the group schemas (ConfigStore)
    assert (target / "bin" / "lowmem-train").exists()

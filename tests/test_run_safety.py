"""What a user's run folder and terminal get from bad input, failures, non-finite values and interruption.

Every bad input: exit status 2, exactly one line on stderr, and no run folder left behind (or, for a folder
that held an earlier run, nothing in it changed).
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import compose_config, read_report, run_cli
from lowmem_train import StrategyError, apply_strategies
from lowmem_train.training import train
from tiny_models import tiny_cnn

TINY_LLAMA = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.seq_len=32", "data.batch_size=4",
              "data.num_samples=32")


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in sorted(folder.rglob("*"))}


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowmem-train: error: ") and message in lines[0], result.stderr[-2000:]


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resnet_run")
    train(compose_config("trainer=debug", "trainer.max_steps=1", "trainer.enable_checkpointing=true", run_dir=run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, resnet_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("bad_files")
    (root / "truncated.ckpt").write_bytes(resnet_checkpoint.read_bytes()[:50_000])
    torch.save({"weights": torch.zeros(2)}, root / "not_lightning.ckpt")
    (root / "empty.txt").write_text("")
    (root / "no_classes" / "train").mkdir(parents=True)
    (root / "no_images" / "train" / "cat").mkdir(parents=True)
    return root


@pytest.mark.parametrize("args, message", [
    (["optimizer.lr=-1"], "optimizer: Invalid learning rate: -1"),
    (["optimizer.lr=nan"], "optimizer.lr must be a finite number, got nan"),
    (["data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
    (["trainer.max_steps=-5"], "`max_steps` must be a non-negative integer or -1"),
    ([*TINY_LLAMA, "model.dtype=float17"], "model.dtype must be one of float32, bfloat16, float16, got 'float17'"),
    (["+data.anything=1"], "unknown option 'data.anything'; valid keys under data: name, image_size, batch_size"),
    (["data=synthetic", "data.seq_len=64"], "unknown option 'data.seq_len'; valid keys under data: name, image_size,"),
    (["strategy=compress", "strategy.compress.bits=abc"], "strategy.compress.bits must be int, got 'abc'"),
    (["strategy=compress", "+strategy.compress.bogus=1"], "unknown option 'strategy.compress.bogus'; valid keys under "
                                                          "strategy.compress: bits, group_size"),
    (["strategy=compress", "strategy.compress.bits=3"], "strategy 'compress': option 'bits' must be one of [2, 4, 8]"),
    (["optimizer=adamw", "optimizer.betas=[a,b]"], "optimizer.betas[0]"),
    (["seed=abc"], "seed must be int, got 'abc'"),
    (["data.image_size=0"], "data.image_size must be an integer >= 1, got 0"),
    (["model.num_classes=5"], "model.num_classes=5 is fewer than the 10 classes of data=digits"),
    (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt does not exist"),
    (["ckpt_path={bad}/truncated.ckpt"], "truncated.ckpt is not a readable checkpoint"),
    (["ckpt_path={bad}/not_lightning.ckpt"], "not_lightning.ckpt is not a Lightning training checkpoint"),
    ([*TINY_LLAMA, "ckpt_path={ckpt}"], "was written by recipe=cifar_resnet; resume it with recipe=cifar_resnet"),
    (["strategy=reversible", "ckpt_path={ckpt}"], "trained with architecture-changing strategies [], this run has "
                                                  "[reversible]"),
    (["recipe=llama_finetune", "model.name_or_path={llama}", "data.path=text", "data.data_files={bad}/empty.txt"],
     "data.data_files: {bad}/empty.txt is empty"),
    ([*TINY_LLAMA, "model.name_or_path={bad}"], "model.name_or_path={bad}: cannot load it"),
    (["recipe=imagenet_resnet", "data.root={bad}/no_classes"], "no_classes/train is not an ImageFolder tree"),
    (["recipe=imagenet_resnet", "data.root={bad}/no_images"], "no_images/train is not an ImageFolder tree"),
    (["optimizer=[sgd,adamw]"], "optimizer takes one choice, got [sgd, adamw]; valid choices: adafactor"),
    (["strategy=[checkpoint,checkpoint]"], "strategy 'checkpoint' is listed twice"),
    (["recipe=llama_finetune", "model=llama_tiny"], "a random-init model trains offline on data=synthetic"),
    (["trainer.bogus=1"], "unknown option 'trainer.bogus'; valid keys under trainer: accelerator, strategy, devices"),
])
def test_bad_input_is_one_line_and_leaves_no_folder(tmp_path, args, message, bad_files, resnet_checkpoint,
                                                     tiny_llama_dir, monkeypatch, capfd):
    """``lowmem_train.cli.main`` in this process (what the console script calls), to keep the suite fast."""
    from lowmem_train import cli

    args = [a.format(bad=bad_files, ckpt=resnet_checkpoint, llama=tiny_llama_dir) for a in args]
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lowmem-train", *args, f"hydra.run.dir={run_dir}"])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    stderr = capfd.readouterr().err
    message = message.format(bad=bad_files)
    assert_one_line_error(subprocess.CompletedProcess([], exit_info.value.code, "", stderr), message)
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_gpu_accelerator_without_a_gpu_is_one_line(tmp_path):
    result = run_cli("trainer.accelerator=gpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(result, "trainer.accelerator=gpu: no CUDA GPU is visible here; use trainer.accelerator=cpu")


def test_headline_llm_command_offline_fails_at_once_naming_the_offline_command(tmp_path):
    started = time.monotonic()
    result = run_cli("recipe=llama_finetune", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, "model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct: cannot load it (the hub cannot be "
                                  "reached")
    assert "lowmem-train recipe=llama_finetune model=llama_tiny data=synthetic" in result.stderr
    assert time.monotonic() - started < 40  # no minute of hub retries


def test_wandb_without_key_or_offline_mode_is_one_line(tmp_path):
    result = run_cli("logger=wandb", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                     env={"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": ""})
    assert_one_line_error(result, "logger=wandb needs a W&B API key (WANDB_API_KEY or `wandb login`), or offline mode")


def test_a_run_never_writes_into_an_earlier_runs_folder_and_a_late_failure_removes_only_its_own(tmp_path):
    first = tmp_path / "first"
    assert run_cli(*TINY_LLAMA, "trainer=debug", f"hydra.run.dir={first}", cwd=tmp_path).returncode == 0
    before = snapshot(first)
    again = run_cli("trainer=debug", f"hydra.run.dir={first}", cwd=tmp_path)
    assert_one_line_error(again, f"hydra.run.dir={first} is not empty")
    late = run_cli("strategy=step_in_backward", "trainer.accumulate_grad_batches=2", "trainer=debug",
                   f"hydra.run.dir={tmp_path / 'late'}", cwd=tmp_path)  # fails in trainer.fit, after the run dir exists
    assert_one_line_error(late, "strategy 'step_in_backward' steps in every backward, so it cannot accumulate")
    assert not (tmp_path / "late").exists()
    assert snapshot(first) == before and (first / "memory_report.json").exists() and (first / ".hydra").is_dir()


def test_default_run_dirs_are_unique_when_started_together(tmp_path):
    runs = [subprocess.Popen([str(Path(sys.executable).with_name("lowmem-train")), "dry_run=true"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    assert [r.wait(timeout=120) for r in runs] == [0, 0]
    dirs = sorted(tmp_path.glob("outputs/*/*"))
    assert len(dirs) == 2 and all((d / ".hydra" / "config.yaml").exists() for d in dirs)


def test_claiming_a_taken_default_dir_adds_a_suffix(tmp_path, monkeypatch):
    from lowmem_train import cli

    monkeypatch.chdir(tmp_path)
    claimed = [cli.claim_output_dir(["hydra.run.dir=outputs/same-second", "seed=1"])[-1]]
    monkeypatch.setattr(cli, "default_output_dir", lambda key: Path("outputs/same-second"))
    claimed += [cli.claim_output_dir([])[-1], cli.claim_output_dir([])[-1]]
    assert claimed == ["hydra.run.dir='outputs/same-second'", "hydra.run.dir='outputs/same-second-1'",
                       "hydra.run.dir='outputs/same-second-2'"]


def test_unexpected_exception_is_one_line_pointing_at_the_log(tmp_path):
    code = ("import sys, lowmem_train.recipe as r\n"
            "def broken(self, model, batch): raise RuntimeError('boom in forward')\n"
            "r.ImageClassification.forward = broken\n"
            f"sys.argv = ['lowmem-train', 'trainer=debug', 'hydra.run.dir={tmp_path / 'run'}']\n"
            "import lowmem_train.cli as cli; cli.main()\n")
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("LOWMEM_DEBUG", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("lowmem-train: error: RuntimeError: boom in forward (traceback in ")
    log = Path(line.split("traceback in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "boom in forward" in log.read_text()


def test_trainer_keywords_need_no_plus_and_wandb_records_the_config(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*TINY_LLAMA, "trainer=debug", "trainer.gradient_clip_val=1.0", "strategy=checkpoint",
                     "logger=wandb", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["trainer"]["gradient_clip_val"] == 1.0
    (record,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = record.read_bytes()
    for expected in (b"llama_finetune-checkpoint", b"gradient_clip_val", b"on_nonfinite", b"memory/tokens_per_s"):
        assert expected in data  # the run's name, the resolved config and the per-step memory


def test_apply_strategies_takes_a_list_of_names_and_mappings_and_refuses_repeats():
    model = apply_strategies(tiny_cnn(), ["checkpoint", {"compress": {"bits": 4, "min_numel": 256}}])
    assert model._lowmem_applied.keys() == {"checkpoint", "compress"}
    with pytest.raises(StrategyError, match="strategy 'checkpoint' is listed twice"):
        apply_strategies(tiny_cnn(), ["checkpoint", {"checkpoint": {}}])
    with pytest.raises(StrategyError, match="a strategy list holds names or mappings"):
        apply_strategies(tiny_cnn(), ["checkpoint", 3])


def test_nonfinite_loss_stops_with_a_report_and_checkpoint_or_is_skipped(tmp_path):
    diverging = (*TINY_LLAMA, "optimizer=sgd", "optimizer.lr=1e12", "trainer.max_steps=6", "trainer.max_epochs=-1")
    stopped = run_cli(*diverging, f"hydra.run.dir={tmp_path / 'stop'}", cwd=tmp_path)
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    assert stopped.stderr.splitlines()[-1].startswith("lowmem-train: stopped: non-finite loss at step ")
    report = read_report(tmp_path / "stop")
    assert report["stopped"]["exit_code"] == 3 and (tmp_path / "stop" / "checkpoints" / "last.ckpt").exists()
    assert report["steps"] == report["stopped"]["step"] < 6
    report = train(compose_config(*diverging, "on_nonfinite=skip", run_dir=tmp_path / "skip"))
    assert report["steps"] == 6 and report["nonfinite_skipped_steps"] >= 1 and report["stopped"] is None


def test_nonfinite_gradient_names_the_parameter(tmp_path):
    """A gradient that goes non-finite while the loss is finite (as a lossy strategy can make it) is caught
    before the optimizer step: the weights stay finite."""
    cfg = compose_config("trainer=debug", "trainer.max_steps=3", run_dir=tmp_path)
    from lowmem_train import recipe as recipe_module

    original = recipe_module.ImageClassification.forward

    def poisoned(self, model, batch):
        output = original(self, model, batch)
        model.fc.weight.register_hook(lambda grad: grad * float("nan"))
        return output

    recipe_module.ImageClassification.forward = poisoned
    try:
        report = train(cfg)
    finally:
        recipe_module.ImageClassification.forward = original
    assert report["stopped"]["reason"].startswith("non-finite gradient of fc.weight at step 1 (strategy=none")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "memory.csv") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


def interrupted_run(tmp_path: Path, args: list[str], signum: int) -> tuple[Path, subprocess.Popen, str]:
    """``lowmem-train ARGS`` sent ``signum`` once its third step is in memory.csv."""
    run_dir = tmp_path / "stopped"
    process = subprocess.Popen([str(Path(sys.executable).with_name("lowmem-train")), *args, "trainer.max_steps=200",
                                f"hydra.run.dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    deadline = time.monotonic() + 120
    while not ((run_dir / "memory.csv").exists() and (run_dir / "memory.csv").read_text().count("\n") > 3):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return run_dir, process, stderr


INTERRUPTIBLE = [*TINY_LLAMA, "+model.config.attention_dropout=0.2", "trainer.max_epochs=-1",
                 "trainer.enable_progress_bar=false"]


@pytest.mark.slow  # CI time: over 30 s on 2 cores
def test_ctrl_c_writes_report_and_checkpoint_and_resume_continues_the_loss_curve_exactly(tmp_path):
    """Dropout on, 8 batches per epoch: the resumed run sees the batches and dropout masks of the uninterrupted one."""
    stopped_dir, process, stderr = interrupted_run(tmp_path, INTERRUPTIBLE, signal.SIGINT)
    assert process.returncode == 130, stderr[-2000:]
    report = read_report(stopped_dir)
    stop_step = report["stopped"]["step"]
    assert report["steps"] == stop_step and 3 <= stop_step < 200
    assert (stopped_dir / "memory_curve.png").exists() and (stopped_dir / "strategies.json").exists()
    assert stderr.splitlines()[-1].startswith(f"lowmem-train: stopped: interrupted by SIGINT after step {stop_step}")
    end = stop_step + 10  # crosses an epoch boundary
    for name, extra in (("resumed", [f"ckpt_path={stopped_dir / 'checkpoints' / 'last.ckpt'}"]), ("whole", [])):
        result = run_cli(*INTERRUPTIBLE, f"trainer.max_steps={end}", *extra, f"hydra.run.dir={tmp_path / name}",
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert list(resumed) == list(range(stop_step + 1, end + 1))
    assert [resumed[s] for s in resumed] == [whole[s] for s in resumed]
    assert losses(stopped_dir) == {s: whole[s] for s in range(1, stop_step + 1)}
    assert read_report(tmp_path / "resumed")["stopped"] is None


def test_sigterm_stops_after_the_step_with_a_resumable_checkpoint(tmp_path):
    stopped_dir, process, stderr = interrupted_run(tmp_path, INTERRUPTIBLE, signal.SIGTERM)
    assert process.returncode == 143, stderr[-2000:]
    report = read_report(stopped_dir)
    assert report["stopped"]["reason"] == f"interrupted by SIGTERM after step {report['steps']}"
    checkpoint = torch.load(stopped_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == report["steps"] and checkpoint["lowmem_train"]["recipe"] == "llama_finetune"

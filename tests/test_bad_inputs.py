"""Inputs that used to get past the checks (a traceback, or a run that failed once started and left a folder),
and sweeps that go on past one bad job.

Each bad input: exit status 2, one line on stderr naming the key and what is valid, nothing written (not even
Hydra's default ``outputs/<date>/<time>``), nothing trained. Values are checked in this process where they can
be (``cli.main`` and ``cli.check_overrides``); one subprocess per behaviour runs the installed command.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_config, run_cli
from lowmem_train import cli
from lowmem_train.errors import LowmemError
from lowmem_train.sweep import record_failure, sweep_table
from lowmem_train.training import train

TINY_LLAMA = ("recipe=llama_finetune", "model=llama_tiny", "data=synthetic", "data.batch_size=4", "data.num_samples=16")
TINY_RUN = (*TINY_LLAMA, "data.seq_len=16")


def assert_refused(returncode: int, stderr: str, message: str, cwd: Path) -> None:
    """Exit 2, exactly one line naming the problem, and nothing written under ``cwd``."""
    lines = stderr.splitlines()
    assert returncode == 2 and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("lowmem-train: error: ") and message in lines[0], lines[0]
    assert not (cwd / "outputs").exists() and not (cwd / "multirun").exists()


def main_in_process(args: list[str], cwd: Path, monkeypatch, capfd) -> tuple[int, str]:
    """``lowmem_train.cli.main`` (what the console script calls) run in ``cwd``: (exit status, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["lowmem-train", *args])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capfd.readouterr().err


def run_patched_cli(patch: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``lowmem-train ARGS`` in a subprocess after ``patch`` ran: a failure only a started run meets."""
    code = f"import sys\n{patch}\nsys.argv = ['lowmem-train', *sys.argv[1:]]\nimport lowmem_train.cli as cli\ncli.main()\n"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("LOWMEM_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["optimizer=adamw", "optimizer.betas=[0.9]"], "optimizer.betas must hold 2 values (default [0.9, 0.95]), got [0.9]"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be an integer >= 1, got 0"),
    (["seed=-1"], "seed must be an integer in [0, 4294967295], got -1"),
    (["logger=wandb", "logger.project='a/b?c'"], "logger.project: Invalid project name 'a/b?c': cannot contain "
                                                 "characters"),
    (["-m", *TINY_LLAMA, "trainer.max_steps=2", "data.seq_len=64,1,48"], "data.seq_len must be an integer >= 2, got 1"),
    ([*TINY_RUN, "model.config.num_attention_heads=3"], ""),  # the wording is the recipe's; one line is ours
])
def test_values_found_only_at_run_time_before_are_refused_before_anything_is_written(tmp_path, args, message,
                                                                                    monkeypatch, capfd):
    code, stderr = main_in_process(args, tmp_path, monkeypatch, capfd)
    assert_refused(code, stderr, message, tmp_path)


@pytest.mark.parametrize("args, message", [
    (["optimizer=adafactor", "optimizer.eps=[0.001]"], "optimizer.eps must hold 2 values (default [None, 0.001])"),
    (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch must be an integer >= 1 or null, got 0"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval must be > 0"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be a number >= 0 or null, got -1"),
    (["seed=4294967296"], "seed must be an integer in [0, 4294967295], got 4294967296"),
    (["logger=wandb", f"logger.project={'p' * 129}"], "logger.project: Invalid project name"),
])
def test_more_values_are_refused_by_check_overrides(args, message):
    with pytest.raises(LowmemError) as refused:
        cli.check_overrides(cli.with_trainer_keywords(args))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_betas_of_one_value_is_one_line_from_the_installed_command(tmp_path):
    result = run_cli("optimizer=adamw", "optimizer.betas=[0.9]", cwd=tmp_path)
    assert_refused(result.returncode, result.stderr, "optimizer.betas must hold 2 values", tmp_path)


def test_empty_strategy_list_means_no_strategy(tmp_path):
    """Hydra's ``group=[]`` selects no config of the group: the config has no ``strategy`` key at all."""
    cli.check_overrides(["strategy=[]"])
    report = train(compose_config(*TINY_RUN, "trainer=debug", "strategy=[]", run_dir=tmp_path))
    assert report["strategies"] == ["none"] and report["steps"] == 2


def test_an_output_dir_under_a_file_or_on_a_file_is_one_line(tmp_path, monkeypatch, capfd):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    result = run_cli("dry_run=true", f"hydra.run.dir={a_file}/run", cwd=tmp_path)  # fails for root too
    assert_refused(result.returncode, result.stderr, f"hydra.run.dir={a_file}/run cannot be written (Not a directory",
                   tmp_path)
    code, stderr = main_in_process([f"hydra.run.dir={a_file}"], tmp_path, monkeypatch, capfd)
    assert_refused(code, stderr, f"hydra.run.dir={a_file} is a file, not a directory; choose a new directory", tmp_path)
    code, stderr = main_in_process(["-m", "seed=1,2", f"hydra.sweep.dir={a_file}/a/b"], tmp_path, monkeypatch, capfd)
    assert_refused(code, stderr, f"hydra.sweep.dir={a_file}/a/b cannot be written", tmp_path)
    assert a_file.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_read_only_parent_is_one_line(tmp_path):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("this user (root) writes into a read-only directory")
        with pytest.raises(LowmemError, match="cannot be written \\(Permission denied"):
            cli.claim_output_dir([f"hydra.run.dir={parent}/new/run"])
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_a_failed_run_removes_the_default_folder_and_the_parents_it_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "default_output_dir", lambda key: Path("outputs/day/time"))
    (tmp_path / "kept").mkdir()
    cli.claim_output_dir([])
    assert (tmp_path / "outputs" / "day" / "time").is_dir()
    cli.remove_own_output(Path("outputs/day/time"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    cli.claim_output_dir([])
    (tmp_path / "outputs" / "day" / "other-run").mkdir()  # another run's, started the same day
    cli.remove_own_output(Path("outputs/day/time"))
    assert [p.name for p in (tmp_path / "outputs" / "day").iterdir()] == ["other-run"]


def test_a_model_that_fails_to_load_leaves_no_outputs_folder(tmp_path):
    patch = ("import lowmem_train.recipes.llama_finetune as recipe\n"
             "from lowmem_train.errors import ConfigError\n"
             "def cannot_load(self): raise ConfigError('model.name_or_path=/models/x: cannot load it (simulated)')\n"
             "recipe.LlamaFinetune.build_model = cannot_load\n")
    result = run_patched_cli(patch, *TINY_RUN, cwd=tmp_path)
    assert_refused(result.returncode, result.stderr, "model.name_or_path=/models/x: cannot load it", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_runs_every_job_past_one_that_fails_and_reports_it(tmp_path):
    """Job 0 fails once running (a bad row, say, found while loading data): job 1 still runs, the summary has a
    row for each, and the sweep's exit status says a job failed."""
    patch = ("import lowmem_train.training as training\n"
             "from lowmem_train.errors import ConfigError\n"
             "real_fit = training.fit\n"
             "def fit(trainer, module, *args):\n"
             "    if module.recipe.data_cfg.seq_len == 24: raise ConfigError('data: row 3 cannot be read (simulated)')\n"
             "    return real_fit(trainer, module, *args)\n"
             "training.fit = fit\n")
    sweep = tmp_path / "sweep"
    result = run_patched_cli(patch, "-m", *TINY_LLAMA, "trainer=debug", "data.seq_len=24,16",
                             f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("lowmem-train:")]
    assert errors[0].startswith("lowmem-train: error: job 0 (") and errors[0].endswith(
        "data.seq_len=24): data: row 3 cannot be read (simulated)")
    assert errors[1] == f"lowmem-train: error: sweep job(s) 0 failed; see {sweep / 'sweep_summary.md'}"
    assert [p.name for p in (sweep / "0").iterdir()] == ["failed.json"]  # bad input: nothing else of the job kept
    assert (sweep / "1" / "memory_report.json").exists()
    rows = (sweep / "sweep_summary.md").read_text().splitlines()
    assert "| train loss (mean of last 10 steps) |" in rows[2]
    assert rows[4].startswith("| data.seq_len=24 |  |") and rows[4].endswith(
        "| error (exit 2): data: row 3 cannot be read (simulated) |")
    assert rows[5].startswith("| data.seq_len=16 | ") and rows[5].endswith("| ok |")
    assert "train loss           " in result.stdout and "(mean of the last 2 steps)" in result.stdout


def test_sweep_table_and_exit_status_of_failed_and_stopped_jobs(tmp_path, capsys):
    report = {"peak_bytes": 2**30, "activation_bytes": 2**29, "samples_per_s": 10.0, "final_train_loss": 1.5,
              "validation_metric": None}
    for job in range(3):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={job}\n")
    for job in (1, 2):
        (tmp_path / str(job) / "memory_report.json").write_text(json.dumps(report))
    record_failure(tmp_path / "0", job=0, overrides=["optimizer.lr=0"], status="error", exit_code=1,
                   message="RuntimeError: a | b (traceback in 0/lowmem-train.log)")
    record_failure(tmp_path / "2", job=2, overrides=["optimizer.lr=2"], status="stopped", exit_code=3,
                   message="non-finite loss at step 4")
    rows = sweep_table(tmp_path).splitlines()
    assert rows[2] == "| optimizer.lr=0 |  |  |  |  |  | error (exit 1): RuntimeError: a \\| b (traceback in " \
                      "0/lowmem-train.log) |"
    assert rows[3] == "| optimizer.lr=1 | 1.0000 | 0.5000 | 10.0 | 1.5000 |  | ok |"
    assert rows[4] == "| optimizer.lr=2 | 1.0000 | 0.5000 | 10.0 | 1.5000 |  | stopped (exit 3): non-finite loss at step 4 |"
    with pytest.raises(SystemExit) as exit_info:
        cli.exit_if_jobs_failed(tmp_path)
    assert exit_info.value.code == 1  # the failed jobs' statuses differ
    assert capsys.readouterr().err == f"lowmem-train: error: sweep job(s) 0, 2 failed; see {tmp_path}/sweep_summary.md\n"

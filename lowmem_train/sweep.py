"""Summarise a Hydra multirun as a table: one row per job, read from each job's memory_report.json, or from the
failed.json a job that failed or stopped early leaves in its folder (the sweep went on without it)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from .memory import GIB

SUMMARY_FILE = "sweep_summary.md"
FAILED_FILE = "failed.json"
REPORT_FILE = "memory_report.json"


def record_failure(job_dir: Path, *, job: int, overrides: list[str], status: str, exit_code: int, message: str) -> None:
    """``failed.json`` in a sweep job's folder: which job, its overrides (its ``.hydra`` may be gone with the
    rest of a bad-input job's files), ``status`` (error or stopped), the exit code and the one-line message."""
    job_dir.mkdir(parents=True, exist_ok=True)
    record = {"job": job, "overrides": overrides, "status": status, "exit_code": exit_code, "message": message}
    (job_dir / FAILED_FILE).write_text(json.dumps(record, indent=2) + "\n")


def failed_jobs(sweep_dir: str | Path) -> list[dict]:
    """The failure records of a sweep's jobs, in job order."""
    paths = sorted(Path(sweep_dir).glob(f"*/{FAILED_FILE}"), key=lambda p: _job_number(p.parent))
    return [json.loads(p.read_text()) for p in paths]


def sweep_table(sweep_dir: str | Path) -> str:
    """A Markdown table of every job under ``sweep_dir`` (GiB for memory, as in the run reports), with its
    status: ``ok``, or ``error``/``stopped`` with the exit code and the job's one-line message.

    Overrides shared by every job are listed once above the table; each row shows only what differs.
    """
    jobs = []
    job_dirs = {p.parent for name in (REPORT_FILE, FAILED_FILE) for p in Path(sweep_dir).glob(f"*/{name}")}
    for job_dir in sorted(job_dirs, key=_job_number):
        report = _read_json(job_dir / REPORT_FILE)
        failure = _read_json(job_dir / FAILED_FILE)
        if failure:
            overrides = failure["overrides"]
        else:
            overrides_path = job_dir / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.exists() else []
        jobs.append((job_dir.name, overrides or [], report, failure))
    shared = [o for o in jobs[0][1] if all(o in overrides for _, overrides, _, _ in jobs)] if jobs else []
    header = ["job", "peak GiB", "activations GiB", "samples/s", "train loss (mean of last 10 steps)", "validation",
              "status"]
    lines = [f"shared overrides: {' '.join(shared)}", ""] if shared else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, overrides, report, failure in jobs:
        figures = _figures(report) if report else [""] * 5
        status = f"{failure['status']} (exit {failure['exit_code']}): {failure['message']}" if failure else "ok"
        row = [" ".join(o for o in overrides if o not in shared) or name, *figures, status.replace("|", "\\|")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _figures(report: dict) -> list[str]:
    metric, value = report.get("validation_metric"), report.get("validation_metric_value")
    return [
        f"{report['peak_bytes'] / GIB:.4f}",
        f"{report['activation_bytes'] / GIB:.4f}",
        f"{report['samples_per_s']:.1f}" if report.get("samples_per_s") else "",
        f"{report['final_train_loss']:.4f}",
        f"{metric}={value:.4f}" if metric and value is not None else "",
    ]


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _job_number(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write and print ``sweep_summary.md`` in the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = sweep_table(sweep_dir)
        (sweep_dir / SUMMARY_FILE).write_text(table)
        print(f"sweep summary ({sweep_dir / SUMMARY_FILE}):\n{table}")

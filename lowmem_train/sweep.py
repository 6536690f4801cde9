"""Summarise a Hydra multirun as a table: one row per job, read from each job's memory_report.json."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from .memory import GIB


def sweep_table(sweep_dir: str | Path) -> str:
    """A Markdown table of every job under ``sweep_dir`` (GiB for memory, as in the run reports).

    Overrides shared by every job are listed once above the table; each row shows only what differs.
    """
    jobs = []
    for report_path in sorted(Path(sweep_dir).glob("*/memory_report.json"), key=lambda p: _job_number(p.parent)):
        overrides_path = report_path.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.exists() else []
        jobs.append((report_path.parent.name, overrides or [], json.loads(report_path.read_text())))
    shared = [o for o in jobs[0][1] if all(o in overrides for _, overrides, _ in jobs)] if jobs else []
    header = ["job", "peak GiB", "activations GiB", "samples/s", "final train loss", "validation"]
    lines = [f"shared overrides: {' '.join(shared)}", ""] if shared else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, overrides, report in jobs:
        metric, value = report.get("validation_metric"), report.get("validation_metric_value")
        row = [
            " ".join(o for o in overrides if o not in shared) or name,
            f"{report['peak_bytes'] / GIB:.4f}",
            f"{report['activation_bytes'] / GIB:.4f}",
            f"{report['samples_per_s']:.1f}" if report.get("samples_per_s") else "",
            f"{report['final_train_loss']:.4f}",
            f"{metric}={value:.4f}" if metric and value is not None else "",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _job_number(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write and print ``sweep_summary.md`` in the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = sweep_table(sweep_dir)
        (sweep_dir / "sweep_summary.md").write_text(table)
        print(f"sweep summary ({sweep_dir / 'sweep_summary.md'}):\n{table}")

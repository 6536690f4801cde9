"""scripts/bench_auto.py on a tiny shape: every configuration is measured, each auto point meets its budget, and
the CSV, table and plot are written."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_auto.py"


@pytest.mark.slow  # CI time: over 30 s on 2 cores
def test_sweep_measures_every_configuration_and_auto_meets_its_budgets(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_auto", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    budgets = ["0.15", "0.3", "0.7"]
    rows = bench.main(["--model", "llama", "--batch", "2", "--size", "32", "--rounds", "1", "--budgets", *budgets,
                       "--out", str(tmp_path)])
    by_config = {row["config"]: row for row in rows}
    assert set(bench.HAND_PICKED) <= set(by_config)
    plain = by_config["none"]["saved_bytes"]
    autos = [row for row in rows if row["family"].startswith("auto")]
    assert len(autos) >= len(budgets)  # the small budgets may be refused, most are met
    for row in autos:
        budget = float(row["config"].split()[1])
        assert row["saved_bytes"] <= 1.05 * budget * plain, row
    assert {p.name for p in tmp_path.iterdir()} == {"bench_auto.csv", "bench_auto.md", "bench_auto.png"}

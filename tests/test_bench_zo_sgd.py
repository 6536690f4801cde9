"""scripts/bench_zo_sgd.py runs end to end on tiny settings (CI keeps it from rotting)."""

import csv
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_zo_sgd.py"


def test_bench_writes_the_table_the_csv_and_the_plot(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_zo_sgd", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.main(["--steps", "2", "--zo-steps", "3", "--n-perturbations", "1", "--out", str(tmp_path)])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    assert set(rows) == {"none", "checkpoint", "zo_sgd"}
    assert float(rows["zo_sgd"][1]) == 0 < float(rows["checkpoint"][1]) < float(rows["none"][1])  # saved MiB
    assert rows["zo_sgd"][3] == "3" and rows["zo_sgd"][4] == "6" and rows["checkpoint"][4] == "4"  # forward passes
    with open(tmp_path / "zo_vs_backprop.csv") as file:
        assert len(list(csv.DictReader(file))) == 2 + 2 + 3
    assert (tmp_path / "zo_vs_backprop.png").stat().st_size > 0

"""scripts/bench_gpu.py: its CPU smoke version runs every configuration (CI keeps the GPU benchmark from rotting),
the time budget stops it cleanly, and a wrong kernel stops it before anything is timed."""

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def read_csv(path: Path) -> dict[str, dict]:
    with open(path) as file:
        return {row["config"]: row for row in csv.DictReader(file)}


@pytest.mark.slow  # CI time: over 30 s on 2 cores
def test_smoke_runs_every_configuration_and_writes_csv_table_and_plot(bench, tmp_path):
    rows = bench.main(["--smoke", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)])
    assert len(rows) == len(bench.CONFIGS)
    assert [r.status for r in rows] == ["ok"] * len(rows), [(r.config.name, r.status) for r in rows if r.status != "ok"]
    saved = read_csv(tmp_path / "bench_gpu.csv")
    assert list(saved) == [r.config.name for r in rows]
    for name, row in saved.items():
        assert int(row["peak_allocated_bytes"]) > 0 and float(row["throughput"]) > 0, name
        assert math.isfinite(float(row["loss"])) and row["steps"] == "2", name
    activations = {name: int(row["activation_bytes"]) for name, row in saved.items()}
    # each configuration really ran its strategies: they save less than plain backprop of the same shape
    for less in ("llama b4 checkpoint", "llama b4 chunked_ce", "llama b4 compress+chunked_ce compress.bits=4",
                 "llama b4 approx_bp+chunked_ce", "llama b4 lora+checkpoint+chunked_ce"):
        assert activations[less] < activations["llama b4 none"], less
    for less in ("resnet b4 checkpoint", "resnet b4 compress compress.bits=2", "resnet b4 reversible"):
        assert activations[less] < activations["resnet b4 none"], less
    assert (activations["llama b4 compress+chunked_ce compress.bits=2"]
            < activations["llama b4 compress+chunked_ce compress.bits=4"])
    # the predicted column: within 5% of the measured (live-tensor) peak wherever the estimate can predict
    predicted = {name: row for name, row in saved.items() if row["predicted_peak_bytes"]}
    assert {"llama b4 none", "llama b4 checkpoint+chunked_ce", "llama b4 lora+checkpoint+chunked_ce",
            "resnet b4 none", "resnet b4 checkpoint"} <= set(predicted)
    for name, row in predicted.items():
        assert abs(int(row["predicted_peak_bytes"]) / int(row["peak_allocated_bytes"]) - 1) <= 0.05, name
    assert all(row["predicted_problem"] for name, row in saved.items() if name not in predicted)
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "| configuration | peak allocated GiB | predicted GiB |" in table and "Kernel checks:" in table
    assert table.count("| ok |") == len(rows)
    assert (tmp_path / "bench_gpu.png").stat().st_size > 0
    assert len(list((tmp_path / "logs").glob("*.log"))) == len(rows)


def test_the_budget_stops_the_run_cleanly_and_keeps_what_it_measured(bench, tmp_path):
    # 17 s of budget less the 15 s kept for the output: the first configuration starts, the rest do not
    rows = bench.main(["--smoke", "--warmup", "1", "--steps", "1", "--budget-min", str(17 / 60),
                       "--only", "llama b1", "--out", str(tmp_path)])
    assert rows[0].status in ("ok", "cut by the budget") and rows[0].steps >= 1
    assert any(r.status.startswith("not run: budget") for r in rows[1:])
    saved = read_csv(tmp_path / "bench_gpu.csv")
    assert list(saved) == [r.config.name for r in rows]
    assert saved[rows[-1].config.name]["status"].startswith("not run: budget")
    assert (tmp_path / "bench_gpu.png").exists()


def test_a_kernel_that_differs_from_its_reference_stops_the_run_before_timing(bench, tmp_path, monkeypatch):
    def mismatch(device):
        raise AssertionError("compress quantize bits=4 n=1024: group min/step differ")

    monkeypatch.setattr(bench, "kernel_checks", mismatch)
    with pytest.raises(SystemExit, match="a Triton kernel differs from its reference, nothing timed: compress"):
        bench.main(["--smoke", "--out", str(tmp_path)])
    assert not (tmp_path / "bench_gpu.csv").exists()


def test_without_cuda_or_the_interpreter_the_kernel_checks_say_they_did_not_run(bench, monkeypatch):
    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lines = bench.kernel_checks(torch.device("cpu"))
    assert len(lines) == 2 and all("not run" in line for line in lines)


def test_a_configuration_that_cannot_run_is_a_row_saying_why(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CONFIGS", [bench.Config("llama", 1, ("forward_gradient",)),
                                           bench.Config("llama", 1, ("lora", "checkpoint"),
                                                        ("strategy.lora.quantize=int3",))])
    rows = bench.main(["--smoke", "--warmup", "1", "--steps", "1", "--out", str(tmp_path)])
    assert rows[0].status == "skipped: strategy forward_gradient not built yet"
    assert rows[1].status.startswith("skipped: ") and "quantize" in rows[1].status
    assert "| skipped: strategy forward_gradient not built yet |" in (tmp_path / "bench_gpu.md").read_text()


def test_list_prints_the_configurations_in_run_order(bench, capsys):
    assert bench.main(["--list"]) == []
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-len(bench.CONFIGS):][0].endswith("llama b4 none") and len(bench.CONFIGS) >= 20

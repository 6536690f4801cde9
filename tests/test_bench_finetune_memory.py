"""scripts/bench_finetune_memory.py on a tiny shape: every configuration runs, and the analytic model agrees
with lowmem-train's own accounting."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_finetune_memory.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_finetune_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_every_configuration_is_measured_and_matches_the_analytic_model(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "table.md"
    rows = bench.main(["--model", "llama_tiny", "--layers", "1", "--seq-len", "16", "--steps", "1",
                       "--out", str(out)])
    assert [row["config"] for row in rows] == list(bench.CONFIGS)
    for row in rows:
        assert "error" not in row, f"{row['config']}: {row.get('error')}"
        predicted, measured = bench.state(row, "pred"), bench.state(row, "meas")
        assert abs(measured - predicted) <= 0.05 * predicted, (row["config"], predicted, measured)
        activations = row["pred"]["activations"], row["meas"]["activations"]
        assert abs(activations[1] - activations[0]) <= 0.05 * activations[0], (row["config"], activations)
    table = out.read_text()
    assert all(f"| {name} |" in table for name in bench.CONFIGS) and "EXTRAPOLATED" in table
    assert "EXTRAPOLATED" in capsys.readouterr().out

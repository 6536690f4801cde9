"""strategy=auto against hand-picked strategies: saved-activation bytes vs step time, and a Pareto plot.

For one model and batch, every hand-picked strategy and combination and ``auto`` at a sweep of budgets (exact
menu, and with ``allow_lossy``) are applied to a fresh copy of the model; each runs one step under
``SavedBytesMeter`` and ``--rounds`` timed training steps (forward + backward; all configurations round-robin,
the fastest step counts). A point is *dominated* when another configuration is both smaller and faster. Writes ``bench_auto.csv``, ``bench_auto.md`` and
``bench_auto.png`` into ``--out``; also times the planner's solver on a synthetic 32-block cost table.

    python scripts/bench_auto.py --model llama --out bench_auto
    python scripts/bench_auto.py --model resnet --size 64 --rounds 3 --out bench_auto_resnet
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
import warnings
from pathlib import Path

import torch
import torchvision.models as tv
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_train import ExampleBatch, SavedBytesMeter, StrategyError, apply_strategies
from lowmem_train.strategies.auto import CHOICES, CostTable, Measured, Unit, UnitBytes, choose, AutoOptions

HAND_PICKED = {
    "none": "none",
    "checkpoint": "checkpoint",
    "selective 0.5": {"selective_checkpoint": {"memory_budget": 0.5}},
    "selective 0.25": {"selective_checkpoint": {"memory_budget": 0.25}},
    "compress 8": {"compress": {"bits": 8}},
    "compress 4": {"compress": {"bits": 4}},
    "compress 2": {"compress": {"bits": 2}},
    "approx_bp": "approx_bp",
    "checkpoint + compress 4": ["checkpoint", {"compress": {"bits": 4}}],
    "checkpoint + approx_bp": ["checkpoint", "approx_bp"],
}
BUDGETS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def llama_case(batch_size: int, seq_len: int):
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len)
    tokens = torch.randint(0, 512, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    return LlamaForCausalLM(config), lambda m: m(input_ids=tokens, labels=tokens, use_cache=False).loss


def resnet_case(batch_size: int, image_size: int):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    return tv.resnet18(num_classes=10), lambda m: nn.functional.cross_entropy(m(images), labels)


def saved_bytes(model: nn.Module, loss_fn) -> int:
    """Saved-activation bytes of the second training step (a first one lets selective checkpointing decide)."""
    step_seconds(model, loss_fn)
    model.zero_grad(set_to_none=True)
    with SavedBytesMeter(model) as meter:
        loss = loss_fn(model)
    loss.backward()
    return meter.bytes


def step_seconds(model: nn.Module, loss_fn) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss_fn(model).backward()
    return time.perf_counter() - start


def configurations(base: nn.Module, loss_fn, budgets=BUDGETS):
    example = ExampleBatch(loss=loss_fn, build_optimizer=torch.optim.AdamW, device=torch.device("cpu"))
    for name, spec in HAND_PICKED.items():
        yield name, "hand-picked", lambda spec=spec: apply_strategies(copy.deepcopy(base), spec)
    for lossy in (False, True):
        for budget in budgets:
            spec = {"auto": {"memory_budget": str(budget), "allow_lossy": lossy}}
            label = f"auto {budget}{' lossy' if lossy else ''}"
            yield label, "auto lossy" if lossy else "auto", \
                lambda spec=spec: apply_strategies(copy.deepcopy(base), spec, example=example)


def run(base: nn.Module, loss_fn, rounds: int, budgets=BUDGETS) -> list[dict]:
    """Every configuration built first, then timed round-robin (one step each per round, the fastest of
    ``rounds`` counts), so a machine that drifts slower or faster over the run treats them all alike."""
    built = []
    for name, family, build in configurations(base, loss_fn, budgets):
        try:
            model = build()
        except StrategyError as exc:
            print(f"{name}: refused: {exc}")
            continue
        built.append(({"config": name, "family": family, "saved_bytes": saved_bytes(model, loss_fn)}, model))
    times = {row["config"]: [] for row, _ in built}
    for _ in range(rounds):
        for row, model in built:
            times[row["config"]].append(step_seconds(model, loss_fn))
    rows = [{**row, "step_s": min(times[row["config"]])} for row, _ in built]
    for row in rows:
        better = [o["config"] for o in rows if o["saved_bytes"] < row["saved_bytes"] and o["step_s"] < row["step_s"]]
        row["dominated_by"] = ", ".join(better)
        print(f"{row['config']:<26} {row['saved_bytes'] / 2**20:9.2f} MiB  {row['step_s'] * 1e3:8.1f} ms"
              f"{'  dominated by ' + row['dominated_by'] if row['dominated_by'] else ''}")
    return rows


def solver_seconds(blocks: int = 32) -> dict[str, float]:
    """Wall time of choose() on a synthetic table: ``blocks`` blocks + stem + head + top, 7 mechanisms."""
    units = [Unit(f"b{i}", "Block", [f"b{i}"], [f"b{i}"]) for i in range(blocks + 3)]
    generator = torch.Generator().manual_seed(0)
    share = {"keep": 1.0, "selective": 0.5, "checkpoint": 0.05, "compress8": 0.3, "compress4": 0.18, "compress2": 0.12,
             "approx_bp": 0.7}  # of a block's plain bytes, roughly as measured on a Llama
    menu = {}
    for label, fraction in share.items():
        own = [int(fraction * x) for x in torch.randint(1 << 23, 1 << 24, (len(units),), generator=generator)]
        saves = UnitBytes(own, [1 << 20] * len(units), [1 << 20] * len(units), 0)
        menu[label] = Measured(label, [True] * len(units), saves, 1.0, grad_cosine=0.99)
    extra = {label: [0.0 if label == "keep" else float(torch.rand(1, generator=generator)) for _ in units]
             for label in menu}
    recompute = {label: menu["keep"].saves.own if CHOICES[label].recomputes else [0] * len(units) for label in menu}
    table = CostTable(units, menu, extra, recompute, 0, 0)
    table.plain_bytes = table.saved_bytes(["keep"] * len(units))
    menu["keep"].fixed = {"weights": 1 << 30}
    seconds = {}
    for mode, budget in (("fraction", "0.3"), ("absolute", f"{(1 << 30) + 0.3 * table.plain_bytes:.0f}B")):
        start = time.perf_counter()
        choose(table, menu["keep"], AutoOptions(memory_budget=budget, allow_lossy=True), torch.device("cpu"))
        seconds[mode] = time.perf_counter() - start
    return seconds


def write(rows: list[dict], out: Path, title: str, solver_s: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_auto.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", "| config | saved MiB | step ms | dominated by |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['saved_bytes'] / 2**20:.2f} | {r['step_s'] * 1e3:.1f} | {r['dominated_by']} |"
              for r in rows]
    lines += ["", "solver on a synthetic table (32 blocks + stem/head/top, 7 mechanisms): "
              + ", ".join(f"{mode} budget {s:.2f} s" for mode, s in solver_s.items())]
    (out / "bench_auto.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 5))
    for family, marker in (("hand-picked", "o"), ("auto", "s"), ("auto lossy", "^")):
        points = [r for r in rows if r["family"] == family]
        ax.scatter([r["saved_bytes"] / 2**20 for r in points], [r["step_s"] * 1e3 for r in points], marker=marker,
                   label=family)
        for r in points if family == "hand-picked" else ():
            ax.annotate(r["config"], (r["saved_bytes"] / 2**20, r["step_s"] * 1e3), fontsize=7)
    ax.set_xlabel("saved activations (MiB)")
    ax.set_ylabel("step time (ms)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_auto.png", dpi=100)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama", "resnet"), default="llama")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="sequence length (llama) or image size (resnet)")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per configuration, round-robin")
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS, help="auto's memory_budget values")
    parser.add_argument("--out", type=Path, default=Path("bench_auto"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base, loss_fn = (llama_case if args.model == "llama" else resnet_case)(args.batch, args.size)
    rows = run(base, loss_fn, args.rounds, args.budgets)
    solver_s = solver_seconds()
    title = f"{args.model}, batch {args.batch}, size {args.size}, CPU ({torch.get_num_threads()} threads)"
    write(rows, args.out, title, solver_s)
    print(f"solver (32 blocks): {solver_s}; wrote {args.out}/bench_auto.csv, .md, .png")
    return rows


if __name__ == "__main__":
    main()

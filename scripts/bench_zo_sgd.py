"""The forward-only trade: memory and loss against forward passes, zo_sgd against backprop (+ checkpoint).

    python scripts/bench_zo_sgd.py                                  # digits classifier (ResNet-18, 8 px), CPU
    python scripts/bench_zo_sgd.py --steps 50 --zo-steps 400 --zo-parameters all --zo-lr 1e-5
    python scripts/bench_zo_sgd.py --override recipe=llama_finetune --override model=llama_tiny \\
        --override data=synthetic --zo-parameters all

The same model, data and seed are trained through the trainer with ``strategy=none`` and ``checkpoint``
(AdamW) and ``zo_sgd`` (SGD without momentum on the raw estimate, MeZO's update), on the parameters ``--zo-parameters`` names: by
default the digits classifier's head (``fc.*``), since zeroth order on all 11M values of a random-init ResNet-18
barely moves in hundreds of steps (MeZO fine-tunes pretrained models); ``all`` for every parameter. Writes ``zo_vs_backprop.csv`` (one row per step:
run, step, forward passes so far, loss), ``zo_vs_backprop.md`` (saved activation bytes, the accounted step peak,
steps, forward passes, final loss, seconds) and ``zo_vs_backprop.png`` (loss against forward passes). Forward
passes: 1 per backprop step, 2 with checkpoint (the recompute), 2 x n_perturbations per zo_sgd step; a backward
costs about two forwards more.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from lowmem_train.cli import CONFIG_DIR, CONFIG_NAME, with_trainer_keywords
from lowmem_train.training import train

MIB = 2**20
DIGITS = ["model.arch=resnet18", "data.image_size=8", "data.batch_size=64", "trainer.max_epochs=-1",
          "trainer.limit_val_batches=2", "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false"]


def run(name: str, overrides: list[str], steps: int, run_dir: Path) -> dict:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=with_trainer_keywords([*overrides, f"trainer.max_steps={steps}"]))
    cfg.run_dir = str(run_dir)
    start = time.perf_counter()
    report = train(cfg)
    seconds = time.perf_counter() - start
    with open(run_dir / "memory.csv") as file:
        losses = [float(row["loss"]) for row in csv.DictReader(file)]
    per_step = {"none": 1, "checkpoint": 2}.get(name) or report["strategy_report"]["zo_sgd"]["forwards_per_step"]
    return {"run": name, "losses": losses, "forwards_per_step": per_step, "seconds": seconds,
            "activation_bytes": report["activation_bytes"], "peak_bytes": report["peak_bytes"]}


def write(results: list[dict], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "zo_vs_backprop.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["run", "step", "forwards", "loss"])
        for r in results:
            writer.writerows([r["run"], step, step * r["forwards_per_step"], loss]
                             for step, loss in enumerate(r["losses"], start=1))
    lines = ["| run | saved activations MiB | accounted peak MiB | steps | forward passes | first loss | final loss | "
             "seconds |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['activation_bytes'] / MIB:.2f} | {r['peak_bytes'] / MIB:.2f} | {len(r['losses'])} | "
              f"{len(r['losses']) * r['forwards_per_step']} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | "
              f"{r['seconds']:.1f} |" for r in results]
    table = "\n".join(lines) + "\n"
    (out / "zo_vs_backprop.md").write_text(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for r in results:
        axis.plot([s * r["forwards_per_step"] for s in range(1, len(r["losses"]) + 1)], r["losses"], label=r["run"])
    axis.set_xlabel("forward passes")
    axis.set_ylabel("train loss")
    axis.set_xscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "zo_vs_backprop.png", dpi=120)
    plt.close(figure)
    return table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="backprop steps (none, checkpoint)")
    parser.add_argument("--zo-steps", type=int, default=150, help="zo_sgd steps")
    parser.add_argument("--n-perturbations", type=int, default=8)
    parser.add_argument("--backprop-lr", type=float, default=1e-3)
    parser.add_argument("--zo-lr", type=float, default=2e-3)
    parser.add_argument("--zo-parameters", default="fc.*", help="glob of the parameters zo_sgd trains, or 'all'")
    parser.add_argument("--override", action="append", default=None,
                        help="a config override for every run (default: the digits classifier)")
    parser.add_argument("--out", type=Path, default=Path("bench_zo_sgd"))
    args = parser.parse_args(argv)
    overrides = args.override if args.override is not None else DIGITS
    backprop = ["optimizer=adamw", f"optimizer.lr={args.backprop_lr}"]
    zo = ["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=false", f"optimizer.lr={args.zo_lr}",
          "strategy.zo_sgd.normalize=false",
          f"strategy.zo_sgd.n_perturbations={args.n_perturbations}"]
    if args.zo_parameters != "all":
        zo.append(f"strategy.zo_sgd.parameters=[{args.zo_parameters}]")
    runs = [("none", backprop, args.steps), ("checkpoint", backprop, args.steps), ("zo_sgd", zo, args.zo_steps)]
    with tempfile.TemporaryDirectory() as scratch:
        results = [run(name, [*overrides, f"strategy={name}", *extra], steps, Path(scratch) / name)
                   for name, extra, steps in runs]
    table = write(results, args.out)
    print(table)
    return table


if __name__ == "__main__":
    main()

"""One prepared GPU benchmark: the CUDA peak memory and throughput of every strategy, in one command, on a time
budget.

    python scripts/bench_gpu.py --out bench_gpu              # CUDA: Llama-3.2-1B shape and ResNet-50, <= 8 minutes
    python scripts/bench_gpu.py --list                       # the configurations, in the order they run
    python scripts/bench_gpu.py --smoke --out /tmp/smoke     # CPU: tiny shapes, a few steps (what CI runs)

First the Triton kernels (compress, approx_bp) are checked against their PyTorch reference on the GPU; a
mismatch stops the run before anything is timed. Then every configuration trains in this process through the
real trainer (``lowmem_train.training.train``: the recipe, the strategies, the optimizer group), for
``--warmup`` steps and ``--steps`` timed steps, and its row records, from the run's ``memory.csv``:
the largest per-step ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the timed steps (the
monitor resets the peak at each step start), the median tokens/s (LLM, target tokens) or images/s (ResNet), the
median step time, the saved activations the trainer accounts, and the loss of the last step.

Configurations run in the order of ``CONFIGS`` (most informative first). The run keeps ``--budget-min``
(default 8): before a configuration starts, it is skipped when the time left is less than the last similar
configuration took; a running one gets the time left as Lightning's ``max_time`` and stops cleanly. After every
configuration ``bench_gpu.csv`` (bytes) and ``bench_gpu.md`` (GiB) are rewritten, so an interrupted run leaves
what it measured; ``bench_gpu.png`` (peak vs throughput, one point per configuration) is drawn at the end.
Each configuration's own output goes to ``logs/<n>.log``. Without CUDA the script runs ``--smoke``: the same
configurations on tiny shapes (``llama_tiny``, ResNet-50 at 32 px), to keep it from rotting.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from lowmem_train import available_strategies
from lowmem_train.cli import compose, with_trainer_keywords
from lowmem_train.errors import LowmemError, one_line
from lowmem_train.estimate import preset_of
from lowmem_train.training import train

GIB = 2**30
OUTPUT_RESERVE_S = 15  # kept back from the budget: the table, the plot, and a last model's build (not in max_time)


@dataclass(frozen=True)
class Config:
    model: str                       # "llama" or "resnet": which shape block of SHAPES
    batch: int
    strategies: tuple[str, ...] = ()
    options: tuple[str, ...] = ()    # strategy/optimizer overrides, e.g. strategy.compress.bits=4
    optimizer: str | None = None     # None: the recipe's own (llama: adamw, resnet: sgd)

    @property
    def name(self) -> str:
        strategies = "+".join(self.strategies) or "none"
        options = " ".join(re.sub(r"^strategy\.", "", option) for option in self.options)
        optimizer = f" {self.optimizer}" if self.optimizer else ""
        return f"{self.model} b{self.batch} {strategies}{optimizer}{' ' + options if options else ''}"


CKPT_CE = ("checkpoint", "chunked_ce")
LORA = ("lora", "checkpoint", "chunked_ce")
# Most informative first: the baseline and the big levers on both models, then combinations and variants.
CONFIGS = [
    Config("llama", 4),
    Config("llama", 4, ("checkpoint",)),
    Config("llama", 4, ("chunked_ce",)),
    Config("llama", 4, CKPT_CE),
    Config("resnet", 64),
    Config("resnet", 64, ("checkpoint",)),
    Config("llama", 4, ("compress", "chunked_ce"), ("strategy.compress.bits=4",)),
    Config("resnet", 64, ("compress",), ("strategy.compress.bits=4",)),
    Config("llama", 4, LORA),
    Config("llama", 4, LORA, ("strategy.lora.quantize=nf4",)),
    Config("llama", 4, CKPT_CE, optimizer="adamw8bit"),
    Config("llama", 4, ("approx_bp", "chunked_ce")),
    Config("llama", 4, ("selective_checkpoint",)),
    Config("llama", 4, ("checkpoint", "offload", "chunked_ce")),
    Config("llama", 4, ("auto", "chunked_ce"), ("strategy.auto.memory_budget=0.5",)),
    Config("llama", 4, ("auto", "chunked_ce"), ("strategy.auto.memory_budget=0.25",)),
    Config("llama", 4, ("compress", "chunked_ce"), ("strategy.compress.bits=2",)),
    Config("resnet", 64, ("compress",), ("strategy.compress.bits=2",)),
    Config("resnet", 64, ("reversible",)),
    Config("llama", 4, ("checkpoint", "compress", "chunked_ce"), ("strategy.compress.bits=4",)),
    Config("llama", 1),
    Config("llama", 1, CKPT_CE),
    Config("llama", 1, LORA),
    Config("llama", 1, LORA, ("strategy.lora.quantize=nf4",)),
    Config("llama", 1, CKPT_CE, optimizer="adamw8bit"),
]

# What each model block means on the GPU and in the CPU smoke run.
SHAPES = {
    "gpu": {
        "llama": ["recipe=llama_finetune", "model=llama_1b", "model.dtype=bfloat16", "data=synthetic",
                  "data.seq_len=2048"],
        "resnet": ["recipe=imagenet_resnet", "model=resnet50", "data=synthetic", "data.image_size=224",
                   "trainer.precision=bf16-mixed"],
    },
    "smoke": {
        "llama": ["recipe=llama_finetune", "model=llama_tiny", "model.dtype=bfloat16", "data=synthetic",
                  "data.seq_len=64"],
        "resnet": ["recipe=imagenet_resnet", "model=resnet50", "data=synthetic", "data.image_size=32"],
    },
}
SMOKE_BATCH = {"llama": 4, "resnet": 4}  # at most
SHAPE_WORDS = {
    "gpu": "llama: Llama-3.2-1B shape (llama_1b, random init), bf16 weights, seq 2048; "
           "resnet: ResNet-50, 224 px, bf16-mixed",
    "smoke": "smoke: llama_tiny bf16 seq 64; ResNet-50 at 32 px fp32 (bf16 autocast is slow on a CPU)",
}
KERNEL_MODULES = ("_compress_triton", "_approx_bp_triton")


@dataclass
class Row:
    config: Config
    status: str = "not run"          # ok | cut by the budget | stopped at step N: why | skipped: why | OOM | FAILED
    steps: int = 0
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    peak_source: str = ""
    predicted_peak: int | None = None
    predicted: str = ""              # why there is no prediction, if there is none
    activation_bytes: int | None = None
    step_time_s: float | None = None
    throughput: float | None = None  # tokens/s (llama) or images/s (resnet)
    loss: float | None = None
    wall_s: float = 0.0


def kernel_checks(device: torch.device) -> list[str]:
    """The Triton kernels against their PyTorch reference on ``device``; raises AssertionError on a mismatch.
    Returns one line per kernel module. On CPU they run only under TRITON_INTERPRET=1."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return [f"{name}: not run (no CUDA; TRITON_INTERPRET=1 runs them on the CPU)" for name in KERNEL_MODULES]
    lines = []
    for name in KERNEL_MODULES:
        try:
            module = importlib.import_module(f"lowmem_train.strategies.{name}")
        except ImportError as exc:
            lines.append(f"{name}: not run ({one_line(exc)})")
            continue
        start = time.perf_counter()
        module.check_against_reference(device)
        lines.append(f"{name}: match the reference ({time.perf_counter() - start:.1f} s)")
    return lines


def overrides(config: Config, shape: str, steps: int, max_time_s: float) -> list[str]:
    out = [*SHAPES[shape][config.model], f"data.batch_size={config.batch}",
           f"data.num_samples={config.batch * steps}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
           "trainer.limit_val_batches=0", "trainer.enable_checkpointing=false",
           "trainer.enable_progress_bar=false", "logger=csv",
           f"strategy=[{','.join(config.strategies)}]" if config.strategies else "strategy=none", *config.options]
    if config.optimizer:
        out.append(f"optimizer={config.optimizer}")
    if shape == "smoke":
        out.append("trainer.accelerator=cpu")
    seconds = max(int(max_time_s), 1)
    out.append(f"trainer.max_time='00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'")
    return out


def measure(config: Config, args, run_dir: Path, log_path: Path, max_time_s: float) -> Row:
    """One configuration, trained in this process; its row from the run's memory.csv."""
    row = Row(config)
    missing = [s for s in config.strategies if s not in available_strategies()]
    if missing:
        row.status = f"skipped: strategy {', '.join(missing)} not built yet"
        return row
    steps = args.warmup + args.steps
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            settings = with_trainer_keywords(overrides(config, args.shape, steps, max_time_s))
            predict(row, settings, run_dir.with_name(run_dir.name + "-estimate"))
            cfg = compose(settings)
            cfg.run_dir = str(run_dir)
            report = train(cfg)
    except torch.cuda.OutOfMemoryError:
        row.status = "OOM"
    except LowmemError as exc:  # the configuration cannot run here (a missing package, a refusal): say why
        row.status = f"skipped: {one_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - a crash is a result of the benchmark, written in its row
        row.status = f"FAILED: {type(exc).__name__}: {one_line(exc)}"
    else:
        read_run(row, run_dir / "memory.csv", args.warmup)
        if report["stopped"]:
            row.status = f"stopped at step {report['stopped']['step']}: {report['stopped']['reason']}"
        elif row.steps < steps:
            row.status = "cut by the budget" + ("" if row.steps > args.warmup else " before the timed steps")
        else:
            row.status = "ok"
        reversible = report["strategy_report"].get("reversible")
        if reversible and reversible["stacks_storing_activations"]:
            row.status += (f" (reversible: {len(reversible['stacks_storing_activations'])} of {reversible['stacks']} "
                           f"stacks store activations, rebuild error {reversible['max_rebuild_error']:.1e})")
    row.wall_s = time.perf_counter() - start
    release_memory()
    return row


def predict(row: Row, settings: list[str], run_dir: Path) -> None:
    """The configuration's estimated peak of a step after the first (``estimate=true`` on this device's preset;
    the first step also holds what strategies measure before deciding) into ``row``."""
    if torch.cuda.is_available():
        preset = preset_of(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory)
    else:
        preset = "cpu"
    if preset is None:
        row.predicted = f"no device preset for {torch.cuda.get_device_name()}"
        return
    try:
        cfg = compose([*settings, "estimate.enabled=true", f"estimate.device={preset}", "estimate.compare=[]"])
        cfg.run_dir = str(run_dir)
        row.predicted_peak = train(cfg)["estimate"]["steady_peak_bytes"]  # the timed steps are past the first
    except LowmemError as exc:
        row.predicted = one_line(exc)
    except Exception as exc:  # noqa: BLE001 - the benchmark's measurement still runs
        row.predicted = f"{type(exc).__name__}: {one_line(exc)}"


def read_run(row: Row, path: Path, warmup: int) -> None:
    with open(path) as file:
        rows = list(csv.DictReader(file))
    row.steps = len(rows)
    timed = rows[warmup:]
    if not timed:
        return
    cuda = timed[0]["cuda_allocated_peak_bytes"] != ""
    row.peak_source = "cuda" if cuda else "live tensors"
    row.peak_allocated = max(int(float(r["cuda_allocated_peak_bytes" if cuda else "peak_bytes"])) for r in timed)
    row.peak_reserved = max(int(float(r["cuda_reserved_peak_bytes"])) for r in timed) if cuda else None
    row.activation_bytes = max(int(float(r["activation_bytes"])) for r in timed)
    row.step_time_s = statistics.median(float(r["step_time_s"]) for r in timed)
    key = "tokens_per_s" if row.config.model == "llama" else "samples_per_s"
    row.throughput = statistics.median(float(r[key]) for r in timed)
    row.loss = float(timed[-1]["loss"])


def release_memory() -> None:
    """What a finished configuration left behind, freed, so the next one's peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def leftover_bytes() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


CSV_COLUMNS = ["config", "model", "batch", "strategies", "options", "optimizer", "status", "steps",
               "peak_allocated_bytes", "peak_reserved_bytes", "peak_source", "predicted_peak_bytes",
               "predicted_problem", "activation_bytes", "step_time_s",
               "throughput", "throughput_unit", "loss", "wall_s"]


def unit(config: Config) -> str:
    return "tokens/s" if config.model == "llama" else "images/s"


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            c = r.config
            writer.writerow([c.name, c.model, c.batch, "+".join(c.strategies) or "none", " ".join(c.options),
                             c.optimizer or "", r.status, r.steps, r.peak_allocated, r.peak_reserved, r.peak_source,
                             r.predicted_peak, r.predicted, r.activation_bytes, r.step_time_s, r.throughput, unit(c), r.loss, round(r.wall_s, 1)])


def gib(value: int | None) -> str:
    return "" if value is None else f"{value / GIB:.2f}"


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = [*header, "",
             "| configuration | peak allocated GiB | predicted GiB | peak reserved GiB | saved activations GiB | "
             "throughput | step ms | loss | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "" if r.throughput is None else f"{r.throughput:,.0f} {unit(r.config)}"
        step = "" if r.step_time_s is None else f"{r.step_time_s * 1000:.0f}"
        loss = "" if r.loss is None else f"{r.loss:.4f}"
        predicted = gib(r.predicted_peak) if r.predicted_peak is not None else "-"
        if r.predicted_peak is not None and r.peak_allocated:
            predicted += f" ({r.predicted_peak / r.peak_allocated - 1:+.1%})"
        lines.append(f"| {r.config.name} | {gib(r.peak_allocated)} | {predicted} | {gib(r.peak_reserved)} | "
                     f"{gib(r.activation_bytes)} | {speed} | {step} | {loss} | {r.status} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("llama", "resnet") if any(r.config.model == m and r.throughput for r in rows)]
    figure, axes = plt.subplots(1, max(len(models), 1), figsize=(7 * max(len(models), 1), 5), squeeze=False)
    for axis, model in zip(axes[0], models):
        measured = [r for r in rows if r.config.model == model and r.throughput]
        for r in measured:
            axis.scatter(r.throughput, r.peak_allocated / GIB)
            axis.annotate(r.config.name.split(" ", 1)[1], (r.throughput, r.peak_allocated / GIB), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel(unit(measured[0].config))
        axis.set_ylabel("peak GiB (" + ("CUDA allocated" if measured[0].peak_source == "cuda" else "live tensors") + ")")
        axis.set_title(model)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def device_words(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_gpu"), help="directory for the csv, md, png, logs")
    parser.add_argument("--budget-min", type=float, default=8.0, help="wall-clock budget of the whole run")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (allocator, autotune)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run the configurations whose name contains one of these (e.g. 'resnet' 'llama b4')")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the default without CUDA)")
    parser.add_argument("--ignore-kernel-checks", action="store_true",
                        help="time even when a Triton kernel differs from its reference (to diagnose it)")
    parser.add_argument("--list", action="store_true", help="print the configurations in run order and exit")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here: running the CPU smoke version (--smoke)")
        args.smoke = True
    args.shape = "smoke" if args.smoke else "gpu"
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_min * 60 - OUTPUT_RESERVE_S
    configs = [c for c in CONFIGS if not args.only or any(part in c.name for part in args.only)]
    if args.shape == "smoke":
        configs = [replace(c, batch=min(c.batch, SMOKE_BATCH[c.model])) for c in configs]
    if args.list:
        print("\n".join(f"{i:2d}. {c.name}" for i, c in enumerate(configs, 1)))
        return []
    device = torch.device("cuda" if args.shape == "gpu" else "cpu")
    command = "python scripts/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [f"# bench_gpu: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {device_words(device)}", "",
              f"`{command.strip()}`; {SHAPE_WORDS[args.shape]}; {args.warmup} warm-up + {args.steps} timed steps "
              f"(medians), peak = the largest timed step's; budget {args.budget_min:g} min"]
    try:
        checks = kernel_checks(device)
    except Exception as exc:  # a mismatch (AssertionError) or a kernel that does not build or run
        problem = one_line(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {one_line(exc)}"
        if not args.ignore_kernel_checks:
            raise SystemExit(f"bench_gpu: a Triton kernel differs from its reference, nothing timed: {problem}")
        checks = [f"KERNEL MISMATCH (timed anyway): {problem}"]
    header += ["", "Kernel checks: " + "; ".join(checks)]
    print("\n".join(header[2:]), flush=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # not its device lines for every configuration
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    rows = [Row(c) for c in configs]
    last_took: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as runs:
        for index, row in enumerate(rows):
            config = row.config
            left = deadline - time.perf_counter()
            expected = last_took.get((config.model, config.batch), 0.0)
            if left <= max(expected, 1.0):
                row.status = f"not run: budget ({left:.0f} s left, a similar configuration took {expected:.0f} s)"
                continue
            before = leftover_bytes()
            rows[index] = row = measure(config, args, Path(runs) / f"run{index}", args.out / "logs" / f"{index}.log",
                                        max_time_s=left)
            if before > 64 * 2**20:
                row.status += f" (started with {before / GIB:.2f} GiB still allocated)"
            last_took[(config.model, config.batch)] = row.wall_s
            print(f"{index + 1:2d}/{len(rows)} {config.name}: {row.status}, peak {gib(row.peak_allocated)} GiB, "
                  f"{row.throughput or 0:,.0f} {unit(config)}, {row.wall_s:.0f} s", flush=True)
            write_csv(rows, args.out / "bench_gpu.csv")
            (args.out / "bench_gpu.md").write_text(markdown(rows, header))
    write_csv(rows, args.out / "bench_gpu.csv")
    (args.out / "bench_gpu.md").write_text(markdown(rows, header))
    plot(rows, args.out / "bench_gpu.png", header[0].lstrip("# "))
    print(f"wrote {args.out}/bench_gpu.csv (bytes), bench_gpu.md (GiB), bench_gpu.png in "
          f"{time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()

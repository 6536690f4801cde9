"""Per-step memory and speed accounting: ``memory.csv``, the logger, ``memory_report.json`` and a plot.

All values in files are bytes; human-facing output is GiB. Column meanings are documented in the README
("Memory accounting").
"""

from __future__ import annotations

import csv
import json
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from .live_memory import LiveTensorBytes
from .saved_tensors import iter_tensors, storage_key, storages

GIB = 2**30

COLUMNS = [
    "step", "loss", "peak_bytes", "accounted_bytes", "cuda_allocated_peak_bytes", "cuda_reserved_peak_bytes", "activation_bytes",
    "param_bytes", "grad_bytes", "optimizer_state_bytes", "frozen_param_bytes", "frozen_grad_bytes",
    "frozen_optimizer_state_bytes", "step_time_s", "samples_per_s", "tokens_per_s",
]


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (a tensor and its views count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        for storage in storages(tensor):
            if storage_key(storage) not in seen:
                seen.add(storage_key(storage))
                total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params=None) -> int:
    """Every tensor in the optimizer's state (of ``params`` only, if given), whatever its dtype or nesting
    (quantized states included)."""
    states = optimizer.state.values() if params is None else [optimizer.state[p] for p in params if p in optimizer.state]
    return tensor_bytes(t for state in states for t in iter_tensors(state))


def peak_source(pl_module, optimizers) -> str:
    """How a step's peak is measured: the CUDA allocator's peak; on CPU the live-tensor tracker, unless code is
    torch.compile'd (a compiled graph's buffers never pass the tracker, and compiling under it falls back to
    eager or fails), where only the accounted sum remains."""
    if pl_module.device.type == "cuda":
        return "cuda_max_allocated"
    compiled = any(getattr(s, "compiles", False) for s in getattr(pl_module, "strategies", ())) or any(
        compiled_step(o) for o in optimizers)
    return "accounted" if compiled else "live_tensors"


def compiled_step(optimizer) -> bool:
    """Whether ``optimizer`` (or one it wraps: ``inner``) runs a torch.compile'd step (``compiled_step = True``)."""
    inner = getattr(optimizer, "inner", None)
    inner = inner if isinstance(inner, list) else [inner] if inner is not None else []
    return getattr(optimizer, "compiled_step", False) or any(compiled_step(o) for o in inner)


def gradient_bytes(module: torch.nn.Module) -> dict[str, int]:
    """The gradients alive at the optimizer step (those of frozen parameters apart: 0 unless something is wrong)."""
    return {"grad_bytes": tensor_bytes(p.grad for p in module.parameters() if p.grad is not None),
            "frozen_grad_bytes": tensor_bytes(p.grad for p in module.parameters()
                                              if p.grad is not None and not p.requires_grad)}


def held_bytes(module: torch.nn.Module, optimizers, frozen_param_bytes: int) -> dict[str, int]:
    """Weights and optimizer state, trainable and frozen (``frozen_param_bytes``: ``frozen_weight_bytes``)."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    return {"param_bytes": tensor_bytes(p for p in module.parameters() if p.requires_grad) + frozen_param_bytes,
            "optimizer_state_bytes": sum(optimizer_state_bytes(o) for o in optimizers),
            "frozen_param_bytes": frozen_param_bytes,
            "frozen_optimizer_state_bytes": sum(optimizer_state_bytes(o, frozen) for o in optimizers)}


def accounted_bytes(row: dict) -> int:
    return row["param_bytes"] + row["grad_bytes"] + row["optimizer_state_bytes"] + row["activation_bytes"]


def resident_tensors(pl_module, optimizers, batch) -> list[torch.Tensor]:
    """What a training step starts with: weights, buffers, gradients, optimizer state and the batch."""
    module_tensors = [*pl_module.parameters(), *pl_module.buffers()]
    grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
    states = [t for o in optimizers for state in o.state.values() for t in iter_tensors(state)]
    return [*module_tensors, *grads, *states, *iter_tensors(batch)]


def frozen_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights that do not train: every state-dict entry that is neither a trainable parameter
    nor a buffer, so quantized weights count with their scales (bitsandbytes keeps those beside the codes).
    A tied weight (Llama-3.2's output head is its embedding) is one storage under two state-dict names: it
    counts where its storage does, so a trainable tied embedding is not also counted as a frozen head."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    trainable_storages = {storage_key(s) for p in model.parameters() if p.requires_grad for s in storages(p)}
    return tensor_bytes(v for k, v in model.state_dict(keep_vars=True).items()
                        if k not in trainable and k not in buffers and isinstance(v, torch.Tensor)
                        and not any(storage_key(s) in trainable_storages for s in storages(v)))


class MemoryMonitor(L.Callback):
    """Measures every training step and writes one ``memory.csv`` row per step.

    ``peak_bytes`` is the step's real peak: on CUDA the allocator's (reset at the start of every step), on
    CPU the most bytes of tensors alive at once (``LiveTensorBytes``: the weights, gradients and optimizer
    state present when the step starts, and every tensor the step creates, temporaries included).
    ``accounted_bytes`` is the sum param + grad + optimizer state + saved activations, which misses
    temporaries, recomputation and the loss head. Under DDP every rank measures itself; only rank 0 writes
    the file.
    """

    def __init__(self, run_dir: str | Path):
        self.csv_path = Path(run_dir) / "memory.csv"
        self.rows: list[dict] = []
        self.peak_source = ""
        self._file = None
        self._live: LiveTensorBytes | None = None

    def on_train_start(self, trainer, pl_module):
        self._frozen_param_bytes = frozen_weight_bytes(pl_module.model)  # frozen: the same every step
        self.peak_source = peak_source(pl_module, trainer.optimizers)
        if not trainer.is_global_zero:
            return
        self._file = open(self.csv_path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._grads = {"grad_bytes": 0, "frozen_grad_bytes": 0}
        if self.peak_source == "live_tensors":
            self._live = LiveTensorBytes()
            self._live.track(resident_tensors(pl_module, trainer.optimizers, batch))
            self._live.__enter__()
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._grads = gradient_bytes(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        step_time = time.perf_counter() - self._start
        live_peak = self._stop_live()
        output = pl_module.last_output
        row = {
            "step": trainer.global_step,
            "loss": float(output.mean_loss()),  # per target token of the whole batch, also when samples are selected
            "activation_bytes": pl_module.activation_bytes,
            **held_bytes(pl_module, trainer.optimizers, self._frozen_param_bytes),
            **self._grads,
            "cuda_allocated_peak_bytes": torch.cuda.max_memory_allocated(pl_module.device) if cuda else "",
            "cuda_reserved_peak_bytes": torch.cuda.max_memory_reserved(pl_module.device) if cuda else "",
            "step_time_s": step_time,
            "samples_per_s": output.num_samples / step_time,
            "tokens_per_s": int(output.num_tokens) / step_time if output.num_tokens is not None else "",
        }
        row["accounted_bytes"] = accounted_bytes(row)
        row["peak_bytes"] = row["cuda_allocated_peak_bytes"] if cuda else live_peak if live_peak is not None \
            else row["accounted_bytes"]
        self.rows.append(row)
        if self._file is not None:
            self._writer.writerow(row)
            self._file.flush()
        pl_module.log_dict({f"memory/{k}": float(v) for k, v in row.items() if k not in ("step", "loss") and v != ""},
                           on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module):
        self.close()

    def on_exception(self, trainer, pl_module, exception):
        self._stop_live()

    def _stop_live(self) -> int | None:
        """Leave the step's live-tensor tracker; its peak (None when none ran: not on CPU)."""
        live, self._live = self._live, None
        if live is None:
            return None
        live.__exit__(None, None, None)
        return live.peak

    def close(self):
        self._stop_live()
        if self._file is not None:
            self._file.close()
            self._file = None


def summarize(rows: list[dict], *, device: torch.device, peak_source: str | None = None) -> dict:
    """The report's measured keys from the per-step rows (the first step, a warm-up, is left out of speeds)."""
    timed = rows[1:] or rows
    last = rows[-10:]

    def median(key):
        values = [r[key] for r in timed if r[key] != ""]
        return statistics.median(values) if values else None

    return {
        "steps": len(rows),
        "device": str(device),
        "peak_source": peak_source or ("cuda_max_allocated" if device.type == "cuda" else "live_tensors"),
        "peak_bytes": max(r["peak_bytes"] for r in rows),
        "accounted_bytes": max(r["accounted_bytes"] for r in rows),
        "cuda_reserved_peak_bytes": max(r["cuda_reserved_peak_bytes"] for r in rows) if device.type == "cuda" else None,
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "activation_bytes": max(r["activation_bytes"] for r in rows),
        "param_bytes": rows[-1]["param_bytes"],
        "grad_bytes": max(r["grad_bytes"] for r in rows),
        "optimizer_state_bytes": max(r["optimizer_state_bytes"] for r in rows),
        "frozen_param_bytes": rows[-1]["frozen_param_bytes"],
        "frozen_grad_bytes": max(r["frozen_grad_bytes"] for r in rows),
        "frozen_optimizer_state_bytes": max(r["frozen_optimizer_state_bytes"] for r in rows),
        "step_time_s": median("step_time_s"),
        "samples_per_s": median("samples_per_s"),
        "tokens_per_s": median("tokens_per_s"),
        "final_train_loss": statistics.fmean(r["loss"] for r in last),
    }


RANK_KEYS = ("peak_bytes", "activation_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes",
             "cuda_reserved_peak_bytes", "process_max_rss_bytes")


def gather_ranks(summary: dict) -> list[dict]:
    """Every rank's ``RANK_KEYS`` of its own summary, in rank order (one entry without a process group).
    Each rank measures what it holds: under sharding (trainer=fsdp) its shard of weights, gradients and
    optimizer state."""
    mine = {"rank": 0, **{key: summary[key] for key in RANK_KEYS}}
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    mine["rank"] = torch.distributed.get_rank()
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def write_ranks(ranks: list[dict], run_dir: Path) -> Path:
    """memory_ranks.csv: one row per rank (bytes)."""
    path = run_dir / "memory_ranks.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["rank", *RANK_KEYS])
        writer.writeheader()
        writer.writerows(ranks)
    return path


def write_report(report: dict, run_dir: Path) -> Path:
    path = run_dir / "memory_report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def plot_curve(rows: list[dict], run_dir: Path, title: str) -> Path:
    """memory_curve.png: memory components (GiB) per step, loss on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in [("peak_bytes", "peak"), ("activation_bytes", "saved for backward"), ("param_bytes", "parameters"),
                       ("grad_bytes", "gradients"), ("optimizer_state_bytes", "optimizer state")]:
        ax.plot(steps, [r[key] / GIB for r in rows], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    loss_ax = ax.twinx()
    loss_ax.plot(steps, [r["loss"] for r in rows], color="black", alpha=0.3, linewidth=1, label="loss")
    loss_ax.set_ylabel("train loss")
    lines = ax.get_legend_handles_labels()[0] + loss_ax.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    fig.tight_layout()
    path = run_dir / "memory_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_report(report: dict) -> str:
    """The short human-facing summary printed at the end of a run (GiB)."""
    def gib(key):
        return "n/a" if report.get(key) is None else f"{report[key] / GIB:.4f} GiB"

    def split(key):
        """Trainable / frozen parts, shown where some weights are frozen (LoRA): frozen grads and state are 0."""
        frozen = report.get(f"frozen_{key}")
        if not report.get("frozen_param_bytes") or frozen is None:
            return ""
        return f"  (trainable {(report[key] - frozen) / GIB:.4f}, frozen {frozen / GIB:.4f})"

    peak_note = {"cuda_max_allocated": "CUDA max allocated", "live_tensors": "most tensor bytes alive at once",
                 "accounted": "accounted: compiled code hides its tensors from the live-tensor tracker",
                 "estimated": "estimated"}.get(report["peak_source"], report["peak_source"])
    lines = [
        f"memory report ({', '.join(report['strategies'])} on {report['recipe']}, {report['device']}, {report['steps']} steps)",
        f"  peak                 {gib('peak_bytes')}  ({peak_note})",
        f"  accounted            {gib('accounted_bytes')}  (weights + gradients + optimizer state + saved)"
        if report.get("accounted_bytes") is not None else "",
        f"  activations (saved)  {gib('activation_bytes')}",
        f"  parameters           {gib('param_bytes')}{split('param_bytes')}",
        f"  gradients            {gib('grad_bytes')}{split('grad_bytes')}",
        f"  optimizer state      {gib('optimizer_state_bytes')}{split('optimizer_state_bytes')}",
        f"  throughput           {report['samples_per_s']:.1f} samples/s" if report["samples_per_s"] else "",
        f"  train loss           {report['final_train_loss']:.4f}  (mean of the last {min(10, report['steps'])} steps)",
    ]
    if len(report.get("ranks", ())) > 1:
        lines.append("  per rank (GiB)       rank  peak    activations  parameters  gradients  optimizer")
        lines += [f"                       {r['rank']:>4}  {r['peak_bytes'] / GIB:.4f}  {r['activation_bytes'] / GIB:.4f}"
                  f"       {r['param_bytes'] / GIB:.4f}      {r['grad_bytes'] / GIB:.4f}     "
                  f"{r['optimizer_state_bytes'] / GIB:.4f}" for r in report["ranks"]]
    if report.get("data"):
        lines.append("  data                 " + ", ".join(f"{k}={v}" for k, v in report["data"].items()))
    for name, figures in report.get("strategy_report", {}).items():
        lines.append(f"  {name:<20} " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in figures.items() if not isinstance(v, (dict, list))))
    rounding = report.get("low_precision_updates")
    if rounding and rounding["below_half_ulp_share"] is not None:
        lines.append(low_precision_line(rounding))
    if report.get("nonfinite_skipped_steps"):
        lines.append(f"  non-finite steps     {report['nonfinite_skipped_steps']} skipped (on_nonfinite=skip)")
    if report.get("stopped"):
        stopped = report["stopped"]
        lines.append(f"  stopped              {stopped['reason']}; resume with ckpt_path={stopped['checkpoint']}")
    if report.get("validation"):
        lines.append("  validation           " + ", ".join(f"{k}={v:.4f}" for k, v in report["validation"].items()))
    lines.append(f"files in {report['run_dir']}: " + ", ".join(report["files"]))
    return "\n".join(line for line in lines if line)


def low_precision_line(rounding: dict) -> str:
    """What became of the updates to bf16/fp16 weights; a warning when round-to-nearest lost most of them."""
    share = rounding["below_half_ulp_share"]
    if rounding["mode"] == "nearest":
        warning = "; most were lost: use low_precision_updates=stochastic or kahan" if share > 0.5 else ""
        return f"  bf16/fp16 updates    {share:.1%} lost to round-to-nearest (low_precision_updates=nearest){warning}"
    return (f"  bf16/fp16 updates    {share:.1%} below half an ulp, kept by low_precision_updates={rounding['mode']} "
            "(nearest would lose them)")

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

from .saved_tensors import iter_tensors, storages

GIB = 2**30

COLUMNS = [
    "step", "loss", "peak_bytes", "cuda_allocated_peak_bytes", "cuda_reserved_peak_bytes", "activation_bytes",
    "param_bytes", "grad_bytes", "optimizer_state_bytes", "frozen_param_bytes", "frozen_grad_bytes",
    "frozen_optimizer_state_bytes", "step_time_s", "samples_per_s", "tokens_per_s",
]


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (a tensor and its views count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        for storage in storages(tensor):
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params=None) -> int:
    """Every tensor in the optimizer's state (of ``params`` only, if given), whatever its dtype or nesting
    (quantized states included)."""
    states = optimizer.state.values() if params is None else [optimizer.state[p] for p in params if p in optimizer.state]
    return tensor_bytes(t for state in states for t in iter_tensors(state))


def frozen_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights that do not train: every state-dict entry that is neither a trainable parameter
    nor a buffer, so quantized weights count with their scales (bitsandbytes keeps those beside the codes).
    A tied weight (Llama-3.2's output head is its embedding) is one storage under two state-dict names: it
    counts where its storage does, so a trainable tied embedding is not also counted as a frozen head."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    trainable_storages = {s.data_ptr() for p in model.parameters() if p.requires_grad for s in storages(p)}
    return tensor_bytes(v for k, v in model.state_dict(keep_vars=True).items()
                        if k not in trainable and k not in buffers and isinstance(v, torch.Tensor)
                        and not any(s.data_ptr() in trainable_storages for s in storages(v)))


class MemoryMonitor(L.Callback):
    """Measures every training step and writes one ``memory.csv`` row per step.

    The CUDA peak is reset at the start of every step, so ``peak_bytes`` is that step's peak. On CPU there is
    no allocator peak: ``peak_bytes`` is then the accounted sum param + grad + optimizer state + activations.
    Under DDP every rank measures itself; only rank 0 writes the file.
    """

    def __init__(self, run_dir: str | Path):
        self.csv_path = Path(run_dir) / "memory.csv"
        self.rows: list[dict] = []
        self._file = None

    def on_train_start(self, trainer, pl_module):
        self._frozen_param_bytes = frozen_weight_bytes(pl_module.model)  # frozen: the same every step
        if not trainer.is_global_zero:
            return
        self._file = open(self.csv_path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._grad_bytes = self._frozen_grad_bytes = 0
        self._start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._grad_bytes = tensor_bytes(p.grad for p in pl_module.parameters() if p.grad is not None)
        self._frozen_grad_bytes = tensor_bytes(p.grad for p in pl_module.parameters()
                                               if p.grad is not None and not p.requires_grad)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cuda = pl_module.device.type == "cuda"
        frozen = [p for p in pl_module.parameters() if not p.requires_grad]
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        step_time = time.perf_counter() - self._start
        output = pl_module.last_output
        row = {
            "step": trainer.global_step,
            "loss": float(output.mean_loss()),  # per target token of the whole batch, also when samples are selected
            "activation_bytes": pl_module.activation_bytes,
            "param_bytes": tensor_bytes(p for p in pl_module.parameters() if p.requires_grad) + self._frozen_param_bytes,
            "grad_bytes": self._grad_bytes,
            "optimizer_state_bytes": sum(optimizer_state_bytes(o) for o in trainer.optimizers),
            "frozen_param_bytes": self._frozen_param_bytes,
            "frozen_grad_bytes": self._frozen_grad_bytes,
            "frozen_optimizer_state_bytes": sum(optimizer_state_bytes(o, frozen) for o in trainer.optimizers),
            "cuda_allocated_peak_bytes": torch.cuda.max_memory_allocated(pl_module.device) if cuda else "",
            "cuda_reserved_peak_bytes": torch.cuda.max_memory_reserved(pl_module.device) if cuda else "",
            "step_time_s": step_time,
            "samples_per_s": output.num_samples / step_time,
            "tokens_per_s": output.num_tokens / step_time if output.num_tokens else "",
        }
        accounted = row["param_bytes"] + row["grad_bytes"] + row["optimizer_state_bytes"] + row["activation_bytes"]
        row["peak_bytes"] = row["cuda_allocated_peak_bytes"] if cuda else accounted
        self.rows.append(row)
        if self._file is not None:
            self._writer.writerow(row)
            self._file.flush()
        pl_module.log_dict({f"memory/{k}": float(v) for k, v in row.items() if k not in ("step", "loss") and v != ""},
                           on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module):
        self.close()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def summarize(rows: list[dict], *, device: torch.device) -> dict:
    """The report's measured keys from the per-step rows (the first step, a warm-up, is left out of speeds)."""
    timed = rows[1:] or rows
    last = rows[-10:]

    def median(key):
        values = [r[key] for r in timed if r[key] != ""]
        return statistics.median(values) if values else None

    return {
        "steps": len(rows),
        "device": str(device),
        "peak_source": "cuda_max_allocated" if device.type == "cuda" else "accounted",
        "peak_bytes": max(r["peak_bytes"] for r in rows),
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

    peak_note = "CUDA max allocated" if report["peak_source"] == "cuda_max_allocated" else "accounted: no allocator peak on CPU"
    lines = [
        f"memory report ({', '.join(report['strategies'])} on {report['recipe']}, {report['device']}, {report['steps']} steps)",
        f"  peak                 {gib('peak_bytes')}  ({peak_note})",
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

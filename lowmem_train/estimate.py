"""``estimate=true``: a training step's memory and time, predicted before any weight is loaded or GPU rented.

The run's model is built on fake tensors (``FakeTensorMode``: shapes and dtypes, no memory) from its config
alone, the run's strategies are applied, and two training steps (forward, backward, optimizer step; the
second with the state the optimizer creates lazily in the first) run through the same ``TrainingModule``
code as a real run, under the same meters: saved-tensor bytes, the live-tensor tracker (the peak, temporaries
included) and torch's FLOP counter. A device preset (``estimate.device``) gives the capacity, bf16 support,
the CUDA caching allocator's 512-byte blocks and the peak FLOP/s and bandwidth of a roofline time model::

    lowmem-train recipe=llama_finetune model=llama3_1_8b data=synthetic data.seq_len=2048 data.batch_size=1 \\
        estimate=true estimate.device=4090

writes ``memory_report.json`` (a real run's keys, ``"estimated": true``) and prints the run's estimate and a
table of the usual strategy combinations (``estimate.compare``) on that device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import math
import multiprocessing
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch._subclasses.fake_tensor import (DataDependentOutputException, FakeTensor, FakeTensorMode,
                                          unset_fake_temporarily)
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .errors import ConfigError, LowmemError, one_line
from .live_memory import LiveTensorBytes
from .memory import (GIB, accounted_bytes, compiled_step, frozen_weight_bytes, gradient_bytes, held_bytes, resident_tensors,
                     write_report)
from .optimizers import compiled_steps_as_in_place_updates
from .sharding import FSDP2, shard_model
from .strategy import ExampleBatch, Strategy, apply_built, give_example

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator hands out multiples of 512 bytes


@dataclass(frozen=True)
class DevicePreset:
    """A device as the estimate sees it: ``capacity_gib`` (total memory), ``bf16`` (native bfloat16),
    ``tflops`` (dense bf16/fp16 tensor-core peak with fp32 accumulation, as torch's matmuls run) and
    ``bandwidth_gbs`` (memory bandwidth), from the vendors' data sheets."""

    name: str
    capacity_gib: float
    bf16: bool
    tflops: float
    bandwidth_gbs: float
    cuda: bool = True


DEVICES = {
    "h200": DevicePreset("NVIDIA H200 141GB", 140.4, True, 989.0, 4800.0),
    "h100": DevicePreset("NVIDIA H100 80GB SXM", 79.6, True, 989.0, 3350.0),
    "a100-80": DevicePreset("NVIDIA A100 80GB SXM", 79.2, True, 312.0, 2039.0),
    "a100-40": DevicePreset("NVIDIA A100 40GB", 39.4, True, 312.0, 1555.0),
    "l40s": DevicePreset("NVIDIA L40S 48GB", 44.4, True, 362.0, 864.0),
    "4090": DevicePreset("NVIDIA GeForce RTX 4090 24GB", 23.6, True, 165.2, 1008.0),
    "3090": DevicePreset("NVIDIA GeForce RTX 3090 24GB", 23.6, True, 71.0, 936.0),
    "l4": DevicePreset("NVIDIA L4 24GB", 22.0, True, 121.0, 300.0),
    "t4": DevicePreset("NVIDIA T4 16GB", 14.6, False, 65.0, 320.0),
    "cpu": DevicePreset("this machine's CPU", 0.0, True, 0.0, 0.0, cuda=False),
}


def preset_of(name: str, total_bytes: int) -> str | None:
    """The preset key of a CUDA device (``torch.cuda.get_device_name``, its total memory), or None."""
    name = name.lower()
    for key in ("h200", "h100", "l40s", "4090", "3090", "l4", "t4"):
        if key in name.replace(" ", "").replace("-", ""):
            return key
    if "a100" in name:
        return "a100-80" if total_bytes > 60 * GIB else "a100-40"
    return None


@dataclass(frozen=True)
class EstimateSettings:
    """``cfg.estimate``; ``reserve_gib``: what a CUDA process holds besides tensors (context, cuBLAS workspace,
    the allocator's fragmentation), kept free when saying whether a step fits; ``mfu``: the share of the
    device's peak FLOP/s a training step reaches."""

    device: DevicePreset
    device_key: str
    reserve_gib: float
    mfu: float
    compare: list[str]


def settings_of(cfg: DictConfig) -> EstimateSettings:
    node = cfg.estimate
    key = str(node.device)
    if key not in DEVICES:
        raise ConfigError(f"estimate.device={key} is not a device preset; valid: {', '.join(DEVICES)}")
    if not 0.0 < float(node.mfu) <= 1.0:
        raise ConfigError(f"estimate.mfu must be in (0, 1], got {node.mfu}")
    if float(node.reserve_gib) < 0:
        raise ConfigError(f"estimate.reserve_gib must be >= 0, got {node.reserve_gib}")
    device = DEVICES[key]
    if key == "cpu":
        device = DevicePreset(device.name, host_memory_bytes() / GIB, True, 0.0, 0.0, cuda=False)
    return EstimateSettings(device, key, float(node.reserve_gib), float(node.mfu), [str(c) for c in node.compare])


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fake_state(model: torch.nn.Module) -> None:
    """Give ``model`` (built on the meta device) fake CPU parameters and buffers of the same shapes, dtypes and
    ``requires_grad``, in place; a weight shared by two modules (a tied head) stays shared. Call inside the
    ``FakeTensorMode`` that will run it. (Building directly on fake tensors fails where a library moves a
    module to the device it is already on, as PEFT does with each adapter.)"""
    made: dict[int, torch.Tensor] = {}

    def fake_of(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in made:
            fake = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")
            made[id(tensor)] = (torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, torch.nn.Parameter) else fake)
        return made[id(tensor)]

    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is not None:
                    tensors[name] = fake_of(tensor)


@contextmanager
def eager_model_paths():
    """Let model code take the branch it takes on real tensors. transformers treats a fake tensor as a sign of
    tracing (torch.export) and then builds an explicit causal mask, which a real eager step leaves out (sdpa's
    ``is_causal``), so the fake step would save more than the real one; told otherwise, it would read the
    position ids to detect packed sequences, which a shape batch (whole unpacked rows) never has."""
    masking = sys.modules.get("transformers.masking_utils")
    import_utils = sys.modules.get("transformers.utils.import_utils")
    patches = [(import_utils, "is_fake_tensor", lambda tensor: False),
               (masking, "find_packed_sequence_indices", lambda position_ids: None)]
    patches = [(module, name, new, getattr(module, name)) for module, name, new in patches if hasattr(module, name)]
    for module, name, new, _ in patches:
        setattr(module, name, new)
    try:
        yield
    finally:
        for module, name, _, original in patches:
            setattr(module, name, original)


def estimate_problems(strategies: list[Strategy]) -> list[str]:
    return [f"strategy '{s.name}': {problem}" for s in strategies if (problem := s.estimate_problem())]


@contextmanager
def fake_process_group(world: int):
    """``world`` ranks that move no data (torch's ``fake`` backend), this process rank 0; yields their 1-D device
    mesh (None for one rank). FSDP2 then shards as it would on ``world`` processes: what rank 0 holds and runs."""
    if world == 1:
        yield None
        return
    if torch.distributed.is_initialized():
        raise ConfigError("estimate=true under trainer=fsdp runs in one process: start it without torchrun")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))  # before any fake tensor: the mesh reads its rank list
    finally:
        torch.distributed.destroy_process_group()


def sharding_of(cfg: DictConfig):
    """(the run's FSDP2 strategy or None, the number of ranks it shards over)."""
    from .training import trainer_kwargs  # training imports this module

    kwargs = trainer_kwargs(cfg)
    if not isinstance(kwargs.get("strategy"), FSDP2):
        return None, 1
    devices, nodes = kwargs.get("devices"), kwargs.get("num_nodes") or 1
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"estimate=true with trainer=fsdp needs the number of processes: trainer.devices=<N> "
                          f"(got {devices!r})")
    return kwargs["strategy"], devices * int(nodes)


def fake_steps(recipe, strategies: list[Strategy], optimizer_factory, device: DevicePreset, sharding=None,
               world: int = 1, steps: int = 2, mfu: float = 0.4):
    """Build, apply (and under ``sharding``, FSDP2, shard over ``world`` ranks) and step on fake tensors; per step a
    row of ``MemoryMonitor``'s byte columns (rank 0's), and its FLOPs and created bytes. Returns (rows, touched,
    model class name)."""
    from .training import TrainingModule  # the module a real run trains (training imports this module)

    problems = estimate_problems(strategies)
    if problems:
        raise ConfigError(f"estimate=true: {problems[0]}")
    round_to = CUDA_BLOCK_BYTES if device.cuda else 1
    measuring = next((i for i, s in enumerate(strategies) if s.needs_example), len(strategies))
    with torch.device("meta"):
        model = recipe.build_untrained_model()
        touched = apply_built(model, strategies[:measuring])
    with fake_process_group(world) as mesh, EstimateFakeMode(allow_non_fake_inputs=True), warnings.catch_warnings(), \
            eager_model_paths(), estimated_device(device, mfu), contextlib.ExitStack() as stack:
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no trainer: the module's logging is a no-op
        fake_state(model)
        if measuring < len(strategies):  # auto: it measures its menu on the fake model, timed by the device preset
            touched |= apply_measured(model, recipe, strategies[measuring:], optimizer_factory)
        if sharding is not None:
            shard_model(model, mesh, param_dtype=sharding.param_dtype, reduce_dtype=sharding.reduce_dtype,
                        reshard_after_forward=sharding.reshard_after_forward)
        module = TrainingModule(recipe, model, strategies, optimizer_factory)
        module.model.train()
        try:
            optimizer = module.configure_optimizers()
        except DataDependentOutputException:
            raise ConfigError("estimate=true: the optimizer computes from tensor values while it is built (bitsandbytes' "
                              "quantization maps), which fake tensors do not have; estimate 8-bit AdamW with "
                              "optimizer.backend=torchao (the same 8-bit states)") from None
        if compiled_step(optimizer):
            stack.enter_context(compiled_steps_as_in_place_updates(optimizer_factory))
        frozen_param_bytes = frozen_weight_bytes(model)
        batch = recipe.shape_batch()
        rows = []
        for step in range(steps):
            meter = FakeStepMeter(round_to=round_to)
            meter.track(resident_tensors(module, [optimizer], batch))
            with meter:
                grads = train_step(module, optimizer, batch, step)
            row = {"step": step, "activation_bytes": module.activation_bytes,
                   **held_bytes(module, [optimizer], frozen_param_bytes), **grads, "peak_bytes": meter.peak,
                   "created_bytes": meter.created, "flops": meter.flops, "samples": module.last_output.num_samples}
            row["accounted_bytes"] = accounted_bytes(row)
            rows.append(row)
    return rows, touched, type(model).__name__


class EstimateFakeMode(FakeTensorMode):
    """``FakeTensorMode`` that asks once whether a CUDA device exists: torch's asks for every op it cannot serve
    from its cache, and without a GPU each asking loads the NVIDIA management library again (6% of a step)."""

    @functools.cached_property
    def avoid_device_init(self) -> bool:
        return FakeTensorMode.avoid_device_init.fget(self)


def apply_measured(model, recipe, strategies: list[Strategy], optimizer_factory) -> dict:
    """Apply ``strategies`` (the first measures the model before deciding: auto) to the fake ``model``, their
    example the shape batch and their clock the estimated device's time model (``DeviceClock``)."""
    batch = recipe.shape_batch()
    with DeviceClock() as clock:
        give_example(strategies, ExampleBatch(loss=lambda m: recipe.forward(m, batch).mean_loss(),
                                              build_optimizer=optimizer_factory, device=torch.device("cpu"),
                                              clock=clock.seconds))
        return apply_built(model, strategies)


def uncounted(func, args, kwargs):
    """What a meter answers without counting, or None: ``tensor.device`` (half the calls of a step), and a value
    read off a fake tensor (``.item()``, ``bool(t)``), which stands in as 1, or True: a step's bytes do not depend
    on it (see FakeStepMeter)."""
    if func is torch.ops.prim.device.default:
        return func(*args, **(kwargs or {}))
    if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
        dtype = args[0].dtype
        return True if dtype == torch.bool else 1.0 if dtype.is_floating_point or dtype.is_complex else 1
    return None


def op_flops(func, args, kwargs, out) -> int:
    """torch's FLOP formula of ``func`` (matmuls, convolutions, attention), 0 for other ops."""
    formula = flop_registry.get(func._overloadpacket)
    return formula(*args, **(kwargs or {}), out_val=out) if formula is not None else 0


OP_LAUNCH_S = 5e-6  # what any op costs besides its work: a CUDA kernel launch, an eager CPU op's dispatch


class TimeModel:
    """The seconds a device preset would take for one op: ``OP_LAUNCH_S`` plus its FLOPs at ``mfu`` of the
    device's peak or the bytes of its inputs and outputs at the device's bandwidth, whichever is longer (views
    move nothing). The CPU preset's rates are measured on this machine (``cpu_rates``)."""

    def __init__(self, device: DevicePreset, mfu: float):
        tflops, bandwidth_gbs = (device.tflops, device.bandwidth_gbs) if device.cuda else cpu_rates()
        self.flop_rate = tflops * 1e12 * (mfu if device.cuda else 1.0)
        self.byte_rate = bandwidth_gbs * 1e9

    def op_seconds(self, func, args, kwargs, out) -> float:
        if func.is_view:
            return 0.0
        moved = sum(t.nbytes for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
        return OP_LAUNCH_S + max(op_flops(func, args, kwargs, out) / self.flop_rate, moved / self.byte_rate)


@functools.cache
def cpu_rates() -> tuple[float, float]:
    """(TFLOP/s, GB/s) of this machine's CPU, measured once: the fastest of a few 512x512 fp32 matmuls and
    16 MiB copies (about 0.1 s)."""
    with unset_fake_temporarily():
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        source, target = torch.empty(4 * 2**20), torch.empty(4 * 2**20)
        matmul = copy = math.inf
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, b)
            middle = time.perf_counter()
            target.copy_(source)
            matmul, copy = min(matmul, middle - start), min(copy, time.perf_counter() - middle)
    return 2 * 512**3 / matmul / 1e12, 2 * source.nbytes / copy / 1e9


_ESTIMATED_DEVICE: contextvars.ContextVar[TimeModel | None] = contextvars.ContextVar("estimated_device", default=None)


def modelled_op_seconds(func, args, kwargs, out) -> float | None:
    """An op's seconds on the device being estimated (``estimate=true``), for strategies that time ops to decide
    (selective_checkpoint); None in a real run, where they use a clock."""
    model = _ESTIMATED_DEVICE.get()
    return None if model is None else model.op_seconds(func, args, kwargs, out)


@contextmanager
def estimated_device(device: DevicePreset, mfu: float):
    token = _ESTIMATED_DEVICE.set(TimeModel(device, mfu))
    try:
        yield
    finally:
        _ESTIMATED_DEVICE.reset(token)


class DeviceClock(TorchDispatchMode):
    """The seconds the estimated device (``estimated_device``) would take for the ops run under it, op by op."""

    def __init__(self):
        super().__init__()
        self.elapsed = 0.0

    def seconds(self) -> float:
        return self.elapsed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        answer = uncounted(func, args, kwargs)
        if answer is not None:
            return answer
        out = func(*args, **(kwargs or {}))
        self.elapsed += modelled_op_seconds(func, args, kwargs, out)
        return out


class FakeStepMeter(LiveTensorBytes):
    """The live-tensor tracker of a step on fake tensors, which also counts the FLOPs of the ops that run
    (``flops``: torch's formulas for matmuls, convolutions, attention; not torch's ``FlopCounterMode``, whose
    per-module tracking keeps tensors alive and so changes the peak) and gives a stand-in, 1 (or True), for any
    value read off a fake tensor (``.item()``, ``bool(t)``): steps read scalars for arithmetic (Adafactor's RMS
    scale) that changes no tensor's size; a branch on a value takes the path a value of 1 takes. One dispatch
    mode for all three: each mode costs every op a Python call."""

    def __init__(self, round_to: int = 1):
        super().__init__(round_to)
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        answer = uncounted(func, args, kwargs)
        if answer is not None:
            return answer
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.flops += op_flops(func, args, kwargs, out)
        return out


def train_step(module, optimizer, batch, step: int) -> dict[str, int]:
    """One step in the order of a real one (forward, backward, optimizer step, gradients freed); the gradient
    bytes at the optimizer step."""
    loss = module.training_step(batch, step)
    if loss is not None:  # None: a forward-only strategy (zo_sgd) stepped inside training_step
        loss.backward()
    grads = gradient_bytes(module)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grads


def predicted_time(row: dict, settings: EstimateSettings) -> float | None:
    """Roofline: the FLOPs at ``mfu`` of the device's peak, or the bytes the step moves (every tensor it creates
    written once and read once, the weights read in forward and backward, the optimizer reading and writing
    weights, gradients and state) at its bandwidth, whichever takes longer. None on the CPU preset."""
    device = settings.device
    if not device.tflops:
        return None
    moved = (2 * row["created_bytes"] + 2 * row["param_bytes"]
             + 2 * (row["param_bytes"] - row["frozen_param_bytes"] + row["grad_bytes"] + row["optimizer_state_bytes"]))
    return max(row["flops"] / (device.tflops * 1e12 * settings.mfu), moved / (device.bandwidth_gbs * 1e9))


def estimate_report(cfg: DictConfig, recipe, strategies: list[Strategy], optimizer_factory,
                    settings: EstimateSettings) -> dict:
    """What a run's ``memory_report.json`` holds, predicted (``estimated: true``), plus ``estimate``: the device,
    whether the step fits and the time model's figures."""
    sharding, world = sharding_of(cfg)
    rows, touched, model_name = fake_steps(recipe, strategies, optimizer_factory, settings.device, sharding, world,
                                           mfu=settings.mfu)
    peak = max(r["peak_bytes"] for r in rows)
    steady = rows[-1]
    step_s = predicted_time(steady, settings)
    seq_len = cfg.data.get("seq_len")  # a shape batch's rows are full: every token but the last is a target
    tokens = steady["samples"] * (int(seq_len) - 1) if seq_len else None
    usable = settings.device.capacity_gib * GIB - settings.reserve_gib * GIB
    return {
        "estimated": True,
        "strategies": [s.name for s in strategies] or ["none"],
        "recipe": recipe.name,
        "model": model_name,
        "steps": len(rows),
        "device": settings.device.name,
        "peak_source": "estimated",
        "peak_bytes": peak,
        "accounted_bytes": max(r["accounted_bytes"] for r in rows),
        "cuda_reserved_peak_bytes": None,
        "process_max_rss_bytes": None,
        **{key: max(r[key] for r in rows) for key in ("activation_bytes", "grad_bytes", "optimizer_state_bytes",
                                                      "frozen_grad_bytes", "frozen_optimizer_state_bytes")},
        "param_bytes": steady["param_bytes"],
        "frozen_param_bytes": steady["frozen_param_bytes"],
        "step_time_s": step_s,
        "samples_per_s": steady["samples"] / step_s if step_s else None,
        "tokens_per_s": tokens / step_s if step_s and tokens else None,
        "final_train_loss": None,
        "validation_metric": None,
        "validation_metric_value": None,
        "validation": {},
        "modules_touched": {name: sum(t.changed for t in plan) for name, plan in touched.items()},
        "strategy_report": {},
        "data": {"batch_size": int(cfg.data.batch_size), **({"seq_len": int(cfg.data.seq_len)}
                                                           if "seq_len" in cfg.data else {})},
        "low_precision_updates": None,
        "nonfinite_skipped_steps": 0,
        "stopped": None,
        "ranks": [{"rank": rank, "peak_bytes": peak, **{k: max(r[k] for r in rows) for k in
                   ("activation_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes")},
                   "cuda_reserved_peak_bytes": None, "process_max_rss_bytes": None} for rank in range(world)],
        "estimate": {"device": settings.device_key, "processes": world, "capacity_bytes": int(settings.device.capacity_gib * GIB),
                     "reserve_bytes": int(settings.reserve_gib * GIB), "fits": peak <= usable,
                     "steady_peak_bytes": steady["peak_bytes"],
                     "flops_per_step": steady["flops"], "created_bytes_per_step": steady["created_bytes"],
                     "mfu": settings.mfu, "tflops": settings.device.tflops,
                     "bandwidth_gbs": settings.device.bandwidth_gbs},
    }


REPLACED = ("strategy", "optimizer", "memory_budget", "low_precision_updates", "estimate.compare")  # set per row


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def estimate_with_compare(settings: EstimateSettings, run_cfg: DictConfig, run_overrides: list[str] | None,
                          estimate_one) -> tuple[dict, list[dict]]:
    """The run's report (``estimate_one(run_cfg)``, in this process) and a row per ``estimate.compare`` entry
    (overrides on top of the run's; ``{budget}``: the device's usable memory), estimated meanwhile in processes
    forked first (``Rows``). A row that composes the run's own config is the run's report; one that cannot be
    estimated says why; so does every row where the run's overrides are unknown (``run_overrides`` None): composed
    from the defaults alone, a row would estimate another model."""
    from .cli import compose  # cli imports training, which imports this module

    if run_overrides is None:
        return estimate_one(run_cfg), [{"run": entry, "problem": "estimate.compare needs the run's command-line "
                                        "overrides: run lowmem-train, or set estimate.compare=[]"}
                                       for entry in settings.compare]
    budget = f"{settings.device.capacity_gib - settings.reserve_gib:.2f}GiB"
    base = [o for o in run_overrides if not any(key_of(o) == k or key_of(o).startswith(k + ".") for k in REPLACED)]
    rows, configs = [], []
    for label in (entry.replace("{budget}", budget) for entry in settings.compare):
        try:
            cfg = compose([*base, *label.split(), "estimate.compare=[]"])
        except LowmemError as exc:
            rows.append({"run": label, "problem": str(exc)})
            continue
        known = [run_cfg, *configs]
        same = next((i for i, c in enumerate(known) if without_compare(c) == without_compare(cfg)), None)
        rows.append({"run": label, "config": len(known) if same is None else same})
        configs += [cfg] if same is None else []
    # auto's rows first: measuring its menu makes them the longest, and the rows finish together
    order = sorted(range(len(configs)), key=lambda i: not plans(configs[i]))
    with Rows(functools.partial(compare_row, estimate_one), [configs[i] for i in order]) as pending:
        report = estimate_one(run_cfg)
        done = dict(zip(order, pending.results()))
        reports = [report, *(done[i] for i in range(len(configs)))]
    for row in rows:
        if "config" in row:
            row.update(reports[row.pop("config")])
    return report, rows


def plans(cfg: DictConfig) -> bool:
    """Whether the run's strategies include ``auto`` (``memory_budget=`` or ``strategy=auto``)."""
    return cfg.get("memory_budget") is not None or "auto" in str(cfg.get("strategy"))


def compare_row(estimate_one, cfg: DictConfig) -> dict:
    """``estimate_one(cfg)`` with its printing (auto's plan) held back, or the row's ``problem``."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return estimate_one(cfg)
    except LowmemError as exc:
        return {"problem": str(exc)}
    except Exception as exc:  # noqa: BLE001 -- a combination fake tensors cannot run: its row says so
        return {"problem": f"{type(exc).__name__}: {one_line(exc)}"}


class Rows:
    """``task`` over ``items`` in processes forked on entering, one per core (each estimate is single-threaded
    Python dispatch), while this process goes on; ``results()`` waits for them. They are forked before this
    process runs a backward, as torch refuses autograd in a child forked after one; where one ran here already
    (a test session), a child hands its item back and this process does it. So does this process where there
    is one core or no ``fork``."""

    def __init__(self, task, items: list):
        self.task, self.items = task, items
        self.pool = self.pending = None

    def __enter__(self) -> Rows:
        global _ROWS
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        if len(self.items) and cores > 1 and "fork" in multiprocessing.get_all_start_methods():
            _ROWS = self  # what the forked children read (nothing is pickled to them)
            self.pool = multiprocessing.get_context("fork").Pool(min(cores, len(self.items)))
            self.pending = self.pool.map_async(_forked_row, range(len(self.items)), chunksize=1)
        return self

    def results(self) -> list:
        done = self.pending.get() if self.pending is not None else [None] * len(self.items)
        return [self.task(item) if result is None else result for item, result in zip(self.items, done)]

    def __exit__(self, *exc) -> None:
        global _ROWS
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        _ROWS = None


_ROWS: Rows | None = None


def _forked_row(index: int) -> dict | None:
    row = _ROWS.task(_ROWS.items[index])
    if "autograd's threading in combination with fork" in row.get("problem", ""):
        return None  # the parent had run a backward before forking: it does this row itself
    return row


def without_compare(cfg: DictConfig) -> dict:
    config = OmegaConf.to_container(cfg, resolve=False)
    config["estimate"].pop("compare")
    return config


def run_overrides() -> list[str] | None:
    """The command line's overrides of this run; None outside a Hydra app (a config composed in Python)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def format_estimate(report: dict, rows: list[dict], settings: EstimateSettings) -> str:
    """The run's estimate and the comparison table (GiB, tokens/s) as printed."""
    device = settings.device
    where = (f"{device.name}, {device.capacity_gib:.1f} GiB, {settings.reserve_gib:g} GiB kept free for the CUDA "
             f"context and fragmentation" if device.cuda else f"{device.name}, {device.capacity_gib:.1f} GiB")
    shape = ", ".join(f"{k} {v}" for k, v in report["data"].items())
    if report["estimate"]["processes"] > 1:
        shape += f"; per process of {report['estimate']['processes']} (trainer=fsdp)"
    lines = [f"estimate ({', '.join(report['strategies'])} on {report['recipe']}, {report['model']}, {shape}; "
             f"{where}; no weights loaded)"]
    rows = [{"run": "this run", **report}, *rows]
    width = max(len(row["run"]) for row in rows)
    lines += [f"  {'run':<{width}} {'peak GiB':>9} {'weights':>8} {'grads':>7} {'optim':>7} {'saved':>7} "
              f"{'tokens/s':>9}  fits"]
    for row in rows:
        if "problem" in row:
            lines.append(f"  {row['run']:<{width}} {'-':>9}  {row['problem']}")
            continue
        tokens = f"{row['tokens_per_s']:>9.0f}" if row.get("tokens_per_s") else f"{'n/a':>9}"
        lines.append(f"  {row['run']:<{width}} {row['peak_bytes'] / GIB:>9.3g} {row['param_bytes'] / GIB:>8.3g} "
                     f"{row['grad_bytes'] / GIB:>7.3g} {row['optimizer_state_bytes'] / GIB:>7.3g} "
                     f"{row['activation_bytes'] / GIB:>7.3g} {tokens}  {fits(row)}")
    lines.append("  (peak: most tensor bytes alive at once in a step, allocator blocks rounded; tokens/s: roofline at "
                 f"{settings.mfu:g} of peak FLOP/s)" if device.cuda else "  (peak: most tensor bytes alive at once)")
    return "\n".join(lines)


def fits(row: dict) -> str:
    """yes, or by how much the step is over what the device leaves (GiB)."""
    estimate = row["estimate"]
    over = row["peak_bytes"] - (estimate["capacity_bytes"] - estimate["reserve_bytes"])
    return "yes" if estimate["fits"] else f"no, {over / GIB:.2f} GiB over"


def write_estimate(report: dict, rows: list[dict], run_dir: Path, strategy_files: list[str]) -> None:
    """memory_report.json, with the comparison rows; ``strategy_files``: the run's strategies' own files, written
    beside it (auto's plan.json, which a real run reuses with ``strategy.auto.plan=``)."""
    report["compare"] = [{k: v for k, v in row.items() if k in ("run", "problem", "peak_bytes", "tokens_per_s",
                                                                   "estimate")} for row in rows]
    report["run_dir"] = str(run_dir)
    report["files"] = ["memory_report.json", *strategy_files]
    write_report(report, run_dir)

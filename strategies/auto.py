"""``strategy=auto``: per unit of the model, the memory mechanism that fits a byte budget at the least extra
step time.

Units, in forward order: each repeated block, each run of the modules between blocks (the stem, a head, a
stage of a single block), and ``top``: the root's own operations (the loss). On the run's first batch, for
each mechanism of the menu (keep, selective recompute, full recompute, offload on CUDA; with ``allow_lossy``
compress at 8/4/2 bits and approx_bp), a copy of the model's modules (sharing its parameters and buffers, so no
second copy of the weights) gets that mechanism on every unit it applies to and runs training steps: what each
unit saves for backward (counted like ``SavedBytesMeter``, by the module that saves it), the step time, and for
lossy mechanisms the whole-gradient cosine to plain backprop. A unit's extra time is the step's extra time shared
among the units in proportion to their plain forward time (recomputing mechanisms) or to their plain saved bytes
(encoding and offloading ones). Under ``estimate=true`` the model is fake and the step time is the device
preset's time model (``ExampleBatch.clock``).

A tensor at the border of two units (block i's output is block i+1's input) is stored once if either unit
keeps it, so the solver is a dynamic program along the chain of units (state: bytes used, the previous unit's
choice) that picks one mechanism per unit with the least summed extra time and predicted bytes <= budget. An
absolute budget also holds the weights, gradients, optimizer state and, while a recomputed unit runs again in
backward, its full activations. A larger budget never gives a slower plan. The chosen mechanisms are the
registered strategies, applied with their own ``targets`` option.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from lowmem_train import SavedBytesMeter, Strategy, StrategyError, Touch, get_strategy_class, repeated_blocks
from lowmem_train.memory import GIB, frozen_weight_bytes, optimizer_state_bytes, tensor_bytes
from lowmem_train.module_scope import module_scope
from lowmem_train.saved_tensors import iter_tensors, storage_key, storages
from lowmem_train.knapsack import choose_along_chain, in_units
from lowmem_train.strategy import apply_built
from lowmem_train.targets import exact_name, is_block, under

log = logging.getLogger(__name__)
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)
_UNIT_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
TOP = "top"


@dataclass
class AutoOptions:
    """A per-block plan of memory mechanisms that fits ``memory_budget`` at the least extra step time.

    ``memory_budget``: a fraction in (0, 1] of the saved-activation bytes of plain backprop (``0.25``), or a
    size for the whole training step (``6GiB``, ``512MiB``: weights + gradients + optimizer state + saved
    activations + a recomputed block's activations). ``allow_lossy``: also compress (8/4/2 bits) and approx_bp,
    each only where its whole-gradient cosine to plain backprop on the first batch is >= ``min_grad_cosine``.
    ``plan``: the plan.json of an earlier run, applied as it is (no profiling). ``repeats``: timed steps per
    mechanism (the fastest counts)::

        lowmem-train recipe=llama_finetune strategy=auto strategy.auto.memory_budget=0.3
        lowmem-train recipe=llama_finetune strategy=auto strategy.auto.memory_budget=6GiB dry_run=true
        lowmem-train recipe=llama_finetune strategy=auto strategy.auto.plan=outputs/run1/plan.json
    """

    memory_budget: str = "0.5"
    allow_lossy: bool = False
    min_grad_cosine: float = 0.95
    plan: Optional[str] = None
    repeats: int = 2

    def validate(self, strategy: str) -> None:
        budget_bytes(self.memory_budget, strategy)
        if not -1.0 <= self.min_grad_cosine <= 1.0:
            raise StrategyError(f"strategy '{strategy}': option 'min_grad_cosine' must be in [-1, 1], "
                                f"got {self.min_grad_cosine}")
        if self.repeats < 1:
            raise StrategyError(f"strategy '{strategy}': option 'repeats' must be >= 1, got {self.repeats}")
        if self.plan is not None and not Path(self.plan).is_file():
            raise StrategyError(f"strategy '{strategy}': option 'plan' names no file: {self.plan}")


def budget_bytes(budget: str, strategy: str = "auto") -> tuple[float, bool]:
    """(value, absolute): a fraction of plain activation bytes, or a size in bytes from ``6GiB``/``512MB``/``1e9B``."""
    text = str(budget).strip()
    match = _SIZE.match(text)
    if match:
        return float(match[1]) * _UNIT_BYTES[match[2].lower()], True
    try:
        fraction = float(text)
    except ValueError:
        fraction = math.nan
    if not 0.0 < fraction <= 1.0:
        raise StrategyError(f"strategy '{strategy}': option 'memory_budget' must be a fraction in (0, 1] of plain "
                            f"activation bytes or a size such as 6GiB or 512MiB, got {budget!r}")
    return fraction, False


# ---------------------------------------------------------------- the menu


@dataclass(frozen=True)
class Choice:
    """One mechanism a unit can get: a registered strategy with options (None: keep, plain backprop)."""

    label: str
    strategy: str | None = None
    options: tuple = ()
    exact: bool = True
    recomputes: bool = False  # runs modules again in backward (only composite ones: blocks, stages)
    cuda_only: bool = False
    decides_first: bool = False  # measures the model in its first training step and decides (selective)


MENU = (
    Choice("keep"),
    Choice("selective", "selective_checkpoint", (("memory_budget", 0.5), ("per_block", True)), recomputes=True,
           decides_first=True),
    Choice("checkpoint", "checkpoint", recomputes=True),
    Choice("offload", "offload", cuda_only=True),
    Choice("compress8", "compress", (("bits", 8),), exact=False),
    Choice("compress4", "compress", (("bits", 4),), exact=False),
    Choice("compress2", "compress", (("bits", 2),), exact=False),
    Choice("approx_bp", "approx_bp", exact=False),
)
CHOICES = {choice.label: choice for choice in MENU}


@dataclass
class Unit:
    name: str  # a block's qualified name, "<first>..<last>" for a run of modules between blocks, or "top"
    kind: str
    modules: list[str]  # what a strategy's ``targets`` names for it
    composite: list[str]  # the modules worth recomputing: made of layers with parameters (blocks, stages)


def targets_of(choice: Choice, unit: Unit) -> list[str]:
    return unit.composite if choice.recomputes else unit.modules


def strategy_for(choice: Choice, modules: list[str]) -> Strategy:
    """The registered strategy of ``choice``, its ``targets`` option naming exactly ``modules``."""
    return get_strategy_class(choice.strategy)({**dict(choice.options), "targets": [exact_name(m) for m in modules]})


def find_units(model: nn.Module, example) -> list[Unit]:
    """The units in the order a forward of ``example`` first calls them, then ``top``. Modules the forward
    never calls save nothing and belong to no unit."""
    blocks = [name for name, _ in repeated_blocks(model)]
    if not blocks:
        raise StrategyError(f"strategy 'auto': {type(model).__name__} has no repeated blocks to plan over")
    outside: list[str] = []

    def collect(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = prefix + child_name
            if any(block.startswith(name + ".") for block in blocks):
                collect(child, name + ".")
            elif name not in blocks:
                outside.append(name)

    collect(model, "")
    units: list[Unit] = []
    for name in call_order(model, blocks + outside, example):
        module = model.get_submodule(name)
        if name in blocks:
            units.append(Unit(name, type(module).__name__, [name], [name]))
            continue
        if not units or units[-1].name in blocks:  # a new run of modules between blocks
            units.append(Unit("", "", [], []))
        run = units[-1]
        run.modules.append(name)
        run.composite += [name] if is_block(module) else []
        run.name = run.modules[0] if len(run.modules) == 1 else f"{run.modules[0]}..{run.modules[-1]}"
        run.kind = "+".join(dict.fromkeys(type(model.get_submodule(m)).__name__ for m in run.modules))
    return units + [Unit(TOP, "root ops, loss", [], [])]


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers: a mechanism applied to the copy
    leaves the model as it was, and measuring it holds no second copy of the weights."""
    return copy.deepcopy(model, {id(t): t for t in itertools.chain(model.parameters(), model.buffers())})


def call_order(model: nn.Module, names: list[str], example) -> list[str]:
    """``names`` in the order a no-grad forward of ``example`` (on a copy) first calls them; uncalled ones left out."""
    copied = shared_copy(model)
    called: dict[str, None] = {}
    for name in names:
        copied.get_submodule(name).register_forward_pre_hook(functools.partial(_note_call, called, name))
    with torch.no_grad():
        example.loss(copied)
    return list(called)


def _note_call(called: dict, name: str, module, args) -> None:
    called.setdefault(name)


# ---------------------------------------------------------------- measuring


class SaveRecorder(SavedBytesMeter):
    """During one forward: every (unit, storage) save on ``device`` (a storage saved by two units is one
    storage), and whether the storage is a unit's output: what the last of its modules to run returned.
    Addresses are matched while both tensors are alive, so a freed output's reused address is no output."""

    def __init__(self, model: nn.Module, units: list[Unit], device: torch.device):
        super().__init__(model)
        self.units, self.device = units, device
        self.scope = module_scope(model)
        self.saves: dict[int, list] = {}  # storage -> [bytes, units that saved it (in order), producing unit]
        self._outputs: dict[int, tuple[int, StorageWeakRef]] = {}  # storage -> (unit, its output's storage)
        self._last: dict[int, set[int]] = {}  # unit -> storages of its latest output
        self._unit_of: dict[str, int] = {}
        self._handles = []

    def unit_of(self, module: str) -> int:
        if module not in self._unit_of:
            self._unit_of[module] = next((i for i, unit in enumerate(self.units) if under(module, unit.modules)),
                                         len(self.units) - 1)
        return self._unit_of[module]

    def add(self, packed: Any) -> None:
        unit = self.unit_of(self.scope.current())
        for tensor, storage in self.kept_storages(packed):
            if tensor.device == self.device:  # not offloaded
                entry = self.saves.setdefault(storage_key(storage), [storage.nbytes(), [], self._producer(storage)])
                if unit not in entry[1]:
                    entry[1].append(unit)

    def __enter__(self) -> SaveRecorder:
        super().__enter__()
        for index, unit in enumerate(self.units):
            for name in unit.modules:
                hook = functools.partial(self._note_output, index)
                self._handles.append(self.model.get_submodule(name).register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().__exit__(*exc)

    def _producer(self, storage) -> int | None:
        found = self._outputs.get(storage_key(storage))
        return None if found is None or found[1].expired() else found[0]

    def _note_output(self, index: int, module, args, output) -> None:
        for ptr in self._last.pop(index, ()):  # an earlier module's output of the unit is inside it, not its output
            self._outputs.pop(ptr, None)
            if ptr in self.saves and self.saves[ptr][2] == index:
                self.saves[ptr][2] = None
        self._last[index] = set()
        for tensor in iter_tensors(output):
            for storage in storages(tensor):
                key = storage_key(storage)
                self._outputs[key] = (index, StorageWeakRef(storage))
                self._last[index].add(key)
                if key in self.saves:  # saved inside the unit before it returned (a ReLU's output)
                    self.saves[key][2] = index


@dataclass
class UnitBytes:
    """What one unit saves under one mechanism: its own tensors, its output (``out``), the input it gets from
    the unit before it in the chain (``inbound``); tensors several units share otherwise go to ``shared``."""

    own: list[int]
    out: list[int]
    inbound: list[int]
    shared: int


def split_saves(recorder: SaveRecorder) -> UnitBytes:
    """Each saved storage to the unit that saved it, the border between neighbours kept apart (UnitBytes)."""
    count = len(recorder.units)
    split = UnitBytes([0] * count, [0] * count, [0] * count, 0)
    for nbytes, savers, producer in recorder.saves.values():
        if producer is None or producer + 1 == count:
            split.own[savers[0]] += nbytes
            continue
        if producer in savers:
            split.out[producer] += nbytes
        if producer + 1 in savers:
            split.inbound[producer + 1] += nbytes
        if producer not in savers and producer + 1 not in savers:
            split.shared += nbytes  # a skip connection, or an input other blocks read (rotary tables, masks)
    return split


@dataclass
class Measured:
    """One mechanism on every unit it applies to, measured on the first batch."""

    choice: str
    available: list[bool]  # per unit: the mechanism changed something there
    saves: UnitBytes
    step_s: float
    grads: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    forward_s: list[float] = field(default_factory=list)  # per unit (keep only)
    fixed: dict[str, int] = field(default_factory=dict)  # weights, gradients, optimizer state (keep only)
    grad_cosine: float | None = None


def measure(model: nn.Module, units: list[Unit], choice: Choice, example, repeats: int,
            keep_grads: bool = False) -> Measured | None:
    """A copy of ``model`` (``shared_copy``) with ``choice`` on its units runs 1 + ``repeats`` training steps on
    the example batch (the first one lets a mechanism decide, e.g. selective recompute; on an example's time
    model, one step after the deciding one), each on the same random stream; ``keep_grads``: keep a CPU copy of
    the last gradient (for cosines). None when the mechanism applies to no unit. The model's gradients are None
    again afterwards."""
    copied = shared_copy(model)
    available = [True] * len(units)
    if choice.strategy is not None:
        targets = [m for unit in units for m in targets_of(choice, unit)]
        try:
            touched = apply_built(copied, [strategy_for(choice, targets)]) if targets else {}
        except StrategyError:
            return None  # e.g. approx_bp on a model without GELU/SiLU or norms read by linears
        changed = [touch.module for plan in touched.values() for touch in plan if touch.changed]
        available = [any(under(name, targets_of(choice, unit)) for name in changed) for unit in units]
        if not any(available):
            return None
    seconds, forward_s = [], None
    clocked = example.clock is not None  # a time model gives one answer, and needs no warm-up
    warmup, timed = (int(choice.decides_first), 1) if clocked else (1, repeats)
    for attempt in range(warmup + timed):
        timer = _BlockTimer(copied, units, clock_of(example)) if choice.strategy is None and attempt == 0 else None
        recorder, elapsed, peak = _step(copied, units, example, timer)
        if attempt >= warmup:
            seconds.append(elapsed)
        if timer is not None:
            forward_s = timer.seconds
    grads = {name: p.grad.detach().float().cpu() for name, p in copied.named_parameters()
             if p.grad is not None and keep_grads}
    result = Measured(choice.label, available, split_saves(recorder), min(seconds), grads, forward_s or [])
    if choice.strategy is None:
        result.fixed = _fixed_bytes(copied, example)
        saved = sum(entry[0] for entry in recorder.saves.values())
        result.fixed["step_temporaries"] = max(peak - saved - result.fixed["gradients"], 0)
    copied.zero_grad(set_to_none=True)
    del copied
    if example.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _step(model: nn.Module, units: list[Unit], example, timer) -> tuple[SaveRecorder, float, int]:
    """One forward (recorded) + backward from the same random state: the recorder, its time on the example's
    clock and, on CUDA, the peak allocated bytes above what was allocated before it (0 elsewhere: no allocator
    peak)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    cuda = example.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(example.device)
        torch.cuda.reset_peak_memory_stats(example.device)
        before = torch.cuda.memory_allocated(example.device)
    clock = clock_of(example)
    start = clock()
    with SaveRecorder(model, units, example.device) as recorder:
        if timer is not None:
            timer.start()
        loss = example.loss(model)
        if timer is not None:
            timer.stop()
    loss.backward()
    elapsed = clock() - start
    return recorder, elapsed, torch.cuda.max_memory_allocated(example.device) - before if cuda else 0


def clock_of(example) -> Callable[[], float]:
    """Seconds on the example's device: its own clock (an estimate's time model) or the wall clock after the
    device's queued work."""
    if example.clock is not None:
        return example.clock
    if example.device.type != "cuda":
        return time.perf_counter
    return lambda: (torch.cuda.synchronize(example.device), time.perf_counter())[1]


class _BlockTimer:
    """Forward wall time per unit (top: the whole forward minus the units), from hooks on the units' modules."""

    def __init__(self, model: nn.Module, units: list[Unit], clock: Callable[[], float]):
        self._now = clock
        self.modules = [(index, model.get_submodule(name)) for index, unit in enumerate(units) for name in unit.modules]
        self.seconds = [0.0] * len(units)
        self._handles, self._begin = [], {}

    def start(self) -> None:
        for index, module in self.modules:
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._begin_call, index)))
            self._handles.append(module.register_forward_hook(functools.partial(self._end_call, index)))
        self._whole = self._now()

    def stop(self) -> None:
        self.seconds[-1] = max(self._now() - self._whole - sum(self.seconds[:-1]), 0.0)
        for handle in self._handles:
            handle.remove()

    def _begin_call(self, index: int, module, args) -> None:
        # a module of a unit may call another one of it (a loss head calling the output layer): outermost counts
        start, depth = self._begin.get(index, (None, 0))
        self._begin[index] = (self._now() if depth == 0 else start, depth + 1)

    def _end_call(self, index: int, module, args, output) -> None:
        start, depth = self._begin.pop(index)
        if depth > 1:
            self._begin[index] = (start, depth - 1)
        else:
            self.seconds[index] += self._now() - start


def _fixed_bytes(model: nn.Module, example) -> dict[str, int]:
    """Bytes every plan holds besides activations, from the plain copy after its backward: weights, gradients,
    and the optimizer state after one step of the run's optimizer."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"weights": tensor_bytes(trainable) + frozen_weight_bytes(model) + tensor_bytes(model.buffers()),
            "gradients": tensor_bytes(p.grad for p in trainable if p.grad is not None),
            "optimizer_state": first_step_state_bytes(trainable, example.build_optimizer)}


def first_step_state_bytes(trainable: list[nn.Parameter], build_optimizer) -> int:
    """The state the run's optimizer creates in its first step, stepped on stand-ins of the parameters (never
    the model's own): fake tensors (no memory), or real ones where the optimizer cannot step fake tensors (a
    compiled or CUDA-kernel step)."""
    fake = detect_fake_mode(trainable)
    try:
        with fake or FakeTensorMode(allow_non_fake_inputs=True):
            return _state_bytes_after_a_step(trainable, build_optimizer)
    except Exception:  # noqa: BLE001 -- a step fake tensors cannot run: real stand-ins
        if fake is not None:
            raise
    return _state_bytes_after_a_step(trainable, build_optimizer)


def _state_bytes_after_a_step(trainable: list[nn.Parameter], build_optimizer) -> int:
    stand_ins = [nn.Parameter(torch.empty_like(p)) for p in trainable]
    for stand_in in stand_ins:
        stand_in.grad = torch.zeros_like(stand_in)
    optimizer = build_optimizer(stand_ins)
    optimizer.step()
    return optimizer_state_bytes(optimizer)


def grad_cosine(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Cosine between two whole-model gradients (the parameters both have)."""
    names = sorted(set(grads) & set(reference))
    dot = sum(float((grads[n] * reference[n]).sum()) for n in names)
    norm = math.sqrt(sum(float(grads[n].square().sum()) for n in names) *
                     sum(float(reference[n].square().sum()) for n in names))
    return dot / norm if norm > 0 else 1.0


# ---------------------------------------------------------------- solving


@dataclass
class CostTable:
    """Per unit and allowed mechanism: saved bytes (own, output, inbound border), extra seconds, and the bytes
    that exist while the unit is recomputed in backward."""

    units: list[Unit]
    menu: dict[str, Measured]  # allowed mechanisms by label
    extra_s: dict[str, list[float]]
    recompute_bytes: dict[str, list[int]]
    shared: int  # storages several units read, counted once whatever the plan
    plain_bytes: int  # what plain backprop saves (the keep run, every storage once)

    def options(self, unit: int, within_temporary: float | None, compress: str | None) -> list[str]:
        """Labels unit ``unit`` may take: available there, at most the one compress width ``compress``, and
        (absolute budgets) recomputing no more than ``within_temporary`` bytes."""
        return [label for label, measured in self.menu.items() if measured.available[unit]
                and (not label.startswith("compress") or label == compress)
                and (within_temporary is None or self.recompute_bytes[label][unit] <= within_temporary)]

    def border(self, unit: int, before: str, after: str) -> int:
        """Bytes of the tensors between unit-1 (taking ``before``) and ``unit`` (taking ``after``): kept once
        if either keeps them."""
        return max(self.menu[before].saves.out[unit - 1], self.menu[after].saves.inbound[unit])

    def saved_bytes(self, choice: list[str]) -> int:
        """Predicted saved bytes of a plan (one label per unit, in forward order)."""
        return self.shared + sum(self.menu[c].saves.own[i] + (self.border(i, choice[i - 1], c) if i else 0)
                                 for i, c in enumerate(choice))


def cost_table(units: list[Unit], measured: dict[str, Measured], *, allow_lossy: bool, min_grad_cosine: float) -> CostTable:
    """The allowed mechanisms' costs per unit (see the module docstring for how extra time is shared)."""
    keep = measured["keep"]
    menu = {label: m for label, m in measured.items()
            if CHOICES[label].exact or (allow_lossy and m.grad_cosine is not None and m.grad_cosine >= min_grad_cosine)}
    extra, recompute = {}, {}
    plain_unit = [keep.saves.own[i] + keep.saves.out[i] + keep.saves.inbound[i] for i in range(len(units))]
    for label, m in menu.items():
        # A recomputation costs what the unit's forward costs; an encoding or a copy, what the unit saves.
        scale = keep.forward_s if CHOICES[label].recomputes else plain_unit
        weights = [float(w) if available else 0.0 for w, available in zip(scale, m.available)]
        slower = max(m.step_s - keep.step_s, 0.0) if label != "keep" else 0.0
        extra[label] = [slower * w / (sum(weights) or 1.0) for w in weights]
        recompute[label] = plain_unit if CHOICES[label].recomputes else [0] * len(units)
    table = CostTable(units, menu, extra, recompute, max(m.saves.shared for m in menu.values()), 0)
    table.plain_bytes = table.saved_bytes(["keep"] * len(units))
    return table


def _penalty(label: str) -> float:
    """Ties in time go to keep, then to exact mechanisms (nanoseconds, below any measured difference)."""
    return 0.0 if label == "keep" else (1e-9 if CHOICES[label].exact else 2e-9)


def solve(table: CostTable, capacity: float, within_temporary: float | None, compress: str | None) -> list[str] | None:
    """The least-time choice per unit whose predicted saved bytes fit ``capacity``; None when none fits."""
    labels = [table.options(i, within_temporary, compress) for i in range(len(table.units))]
    if capacity < 0 or not all(labels):
        return None
    raw_costs = [[table.menu[b].saves.own[i] + (table.shared if i == 0 else 0) for b in options]
                 for i, options in enumerate(labels)]
    raw_pairs = [[[0]]] + [[[table.border(i, a, b) for b in labels[i]] for a in labels[i - 1]]
                           for i in range(1, len(labels))]
    flat = [c for item in raw_costs for c in item] + [c for item in raw_pairs for row in item for c in row]
    quantized, budget = in_units([flat], capacity)
    values = iter(quantized[0])
    costs = [[next(values) for _ in item] for item in raw_costs]
    pairs = [[[next(values) for _ in row] for row in item] for item in raw_pairs]
    losses = [[table.extra_s[b][i] + _penalty(b) for b in options] for i, options in enumerate(labels)]
    picks = choose_along_chain(costs, pairs, losses, budget)
    return None if picks is None else [options[p] for options, p in zip(labels, picks)]


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The chosen mechanism per unit and what it predicts; ``plan.json`` of a run, reusable with ``plan=``."""

    memory_budget: str
    budget_bytes: float  # the absolute size, or the fraction x plain saved-activation bytes
    absolute: bool
    device: str
    units: list[dict]  # unit, kind, modules, choice, saved_bytes, extra_s
    fixed_bytes: dict[str, int]  # weights, gradients, optimizer_state, step_temporaries (absolute budgets)
    predicted: dict[str, float]  # activation_bytes, recompute_bytes, peak_bytes, extra_s, plain_*
    menu: dict[str, dict]  # per mechanism on every unit: step_s, grad_cosine

    def choices(self) -> dict[str, list[str]]:
        """Mechanism label -> the modules it is applied to (keep left out)."""
        chosen = defaultdict(list)
        for unit in self.units:
            if unit["choice"] != "keep":
                chosen[unit["choice"]] += unit["modules"]
        return dict(chosen)


def make_plan(model: nn.Module, options: AutoOptions, example) -> Plan:
    """Measure the menu on ``example`` and solve for ``options.memory_budget``; StrategyError when it cannot fit."""
    table, keep = profile(model, options, example)
    return choose(table, keep, options, example.device if example.clock is None else "fake tensors (estimate=true)")


def choose(table: CostTable, keep: Measured, options: AutoOptions, device: torch.device | str) -> Plan:
    """The least-time plan within ``options.memory_budget`` on measured costs; StrategyError when none fits."""
    value, absolute = budget_bytes(options.memory_budget)
    fixed = keep.fixed if absolute else {}
    capacity = (value if absolute else value * table.plain_bytes) - sum(fixed.values())
    temporaries = sorted({0, *(b for bytes_ in table.recompute_bytes.values() for b in bytes_)}) if absolute else [None]
    widths = [None] + [label for label in table.menu if label.startswith("compress")]
    best, best_key = None, None
    if table.plain_bytes <= capacity:  # nothing to save: plain backprop (checked in bytes, not rounded units)
        best, widths = ["keep"] * len(table.units), []
    for compress in widths:
        for temporary in temporaries:
            choice = solve(table, capacity - (temporary or 0), temporary, compress)
            if choice is None:
                continue
            key = (sum(table.extra_s[c][i] + _penalty(c) for i, c in enumerate(choice)), table.saved_bytes(choice))
            if best_key is None or key < best_key:
                best, best_key = choice, key
    if best is None:
        raise StrategyError(cannot_fit(options, table, fixed, temporaries, widths))
    return describe(options, table, keep, best, fixed, value if absolute else value * table.plain_bytes, absolute,
                    device)


def profile(model: nn.Module, options: AutoOptions, example) -> tuple[CostTable, Measured]:
    """The units, and every allowed mechanism measured on ``example``, as a cost table (and the plain run).
    Runs on a forked random stream, with the mechanisms' own log lines about the copies silenced; moves the
    model to the example's device first (its copies share its weights there)."""
    measured = {}
    if any(t.device != example.device for t in itertools.chain(model.parameters(), model.buffers())):
        model.to(example.device)
    devices = [example.device.index or 0] if example.device.type == "cuda" else []
    quiet = logging.getLogger("lowmem_train.strategies")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=devices):
            units = find_units(model, example)
            for choice in MENU:
                if (choice.cuda_only and example.device.type != "cuda") or (not choice.exact and not options.allow_lossy):
                    continue
                cosine_needed = options.allow_lossy and (choice.strategy is None or not choice.exact)
                result = measure(model, units, choice, example, options.repeats, keep_grads=cosine_needed)
                if result is not None:
                    measured[choice.label] = result
    finally:
        quiet.setLevel(level)
    keep = measured["keep"]
    for result in measured.values():
        if not CHOICES[result.choice].exact:
            result.grad_cosine = grad_cosine(result.grads, keep.grads)
    for result in measured.values():
        result.grads = {}
    return cost_table(units, measured, allow_lossy=options.allow_lossy, min_grad_cosine=options.min_grad_cosine), keep


def least_saved_bytes(table: CostTable, temporary: float | None, compress: str | None) -> int | None:
    """The fewest bytes any plan saves with these restrictions (a shortest path along the chain)."""
    best: dict[str, int] = {}
    for i in range(len(table.units)):
        options = table.options(i, temporary, compress)
        if not options:
            return None
        best = {label: table.menu[label].saves.own[i] + (min(nbytes + table.border(i, a, label) for a, nbytes in best.items())
                                                         if i else table.shared)
                for label in options}
    return min(best.values())


def cannot_fit(options: AutoOptions, table: CostTable, fixed: dict[str, int], temporaries, widths) -> str:
    """One line: the budget, the least any plan of the menu needs, and where those bytes go (GiB)."""
    least = None
    for compress in widths:
        for temporary in temporaries:
            found = least_saved_bytes(table, temporary, compress)
            if found is not None and (least is None or found + (temporary or 0) < sum(least)):
                least = (found, temporary or 0)
    saved, temporary = least
    lossy = "" if options.allow_lossy else "; allow_lossy=true adds compress and approx_bp"
    if not fixed:
        return (f"strategy 'auto': memory_budget={options.memory_budget} cannot be met: the least any plan saves is "
                f"{saved / table.plain_bytes:.3f} of plain activations ({saved / GIB:.4g} of {table.plain_bytes / GIB:.4g} "
                f"GiB){lossy}")
    parts = {**fixed, "activations": saved, "recomputed_block": temporary}
    where = ", ".join(f"{name.replace('_', ' ')} {nbytes / GIB:.3g}" for name, nbytes in parts.items())
    return (f"strategy 'auto': memory_budget={options.memory_budget} cannot be met: minimum "
            f"{sum(parts.values()) / GIB:.3g} GiB ({where}){lossy}")


def describe(options: AutoOptions, table: CostTable, keep: Measured, choice: list[str], fixed: dict[str, int],
             budget: float, absolute: bool, device: torch.device | str) -> Plan:
    """The plan record: per unit its choice, its saved bytes (own + the border before it) and extra time."""
    units = []
    for i, (unit, label) in enumerate(zip(table.units, choice)):
        saved = table.menu[label].saves.own[i] + (table.border(i, choice[i - 1], label) if i else 0)
        units.append({"unit": unit.name, "kind": unit.kind, "modules": unit.modules, "choice": label,
                      "saved_bytes": saved, "extra_s": table.extra_s[label][i]})
    saved = table.saved_bytes(choice)
    recompute = max((table.recompute_bytes[label][i] for i, label in enumerate(choice)), default=0)
    predicted = {"activation_bytes": saved, "shared_bytes": table.shared, "recompute_bytes": recompute,
                 "extra_s": sum(unit["extra_s"] for unit in units), "plain_activation_bytes": table.plain_bytes,
                 "plain_step_s": keep.step_s}
    if absolute:
        predicted["peak_bytes"] = sum(fixed.values()) + saved + recompute
    menu = {label: {"step_s": m.step_s, "grad_cosine": m.grad_cosine} for label, m in table.menu.items()}
    return Plan(options.memory_budget, budget, absolute, str(device), units, fixed, predicted, menu)


def format_table(plan: Plan) -> str:
    """The plan as printed before training (GiB, milliseconds)."""
    budget = (f"{plan.budget_bytes / GIB:.4g} GiB for the whole step" if plan.absolute else
              f"{plan.budget_bytes / GIB:.4g} GiB of saved activations")
    width = max(len(u["unit"]) for u in plan.units)
    lines = [f"auto plan: memory_budget={plan.memory_budget} ({budget}), measured on {plan.device}",
             f"  {'unit':<{width}}  {'choice':<11} {'saved GiB':>11} {'extra ms':>9}"]
    lines += [f"  {u['unit']:<{width}}  {u['choice']:<11} {u['saved_bytes'] / GIB:>11.4g} {u['extra_s'] * 1e3:>9.2f}"
              for u in plan.units]
    p = plan.predicted
    lines.append(f"  {'total':<{width}}  {'':<11} {p['activation_bytes'] / GIB:>11.4g} {p['extra_s'] * 1e3:>9.2f}"
                 f"   (plain: {p['plain_activation_bytes'] / GIB:.4g} GiB, step {p['plain_step_s'] * 1e3:.1f} ms)")
    if plan.absolute:
        parts = {**plan.fixed_bytes, "activations": p["activation_bytes"], "recomputed_block": p["recompute_bytes"]}
        lines.append(f"  predicted peak {p['peak_bytes'] / GIB:.4g} GiB = " +
                     " + ".join(f"{name.replace('_', ' ')} {nbytes / GIB:.4g}" for name, nbytes in parts.items()))
    return "\n".join(lines)


def load_plan(path: str, model: nn.Module) -> Plan:
    """A plan.json written by an earlier run; every module it names must exist in ``model``."""
    try:
        plan = Plan(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise StrategyError(f"strategy 'auto': plan={path} is not a plan.json written by strategy=auto: {exc}") from None
    names = {name for name, _ in model.named_modules()}
    for unit in plan.units:
        if unit["choice"] not in CHOICES:
            raise StrategyError(f"strategy 'auto': plan={path} chooses '{unit['choice']}' for {unit['unit']}; "
                                f"valid: {', '.join(CHOICES)}")
        missing = [m for m in unit["modules"] if m not in names]
        if missing:
            raise StrategyError(f"strategy 'auto': plan={path} names module '{missing[0]}', which "
                                f"{type(model).__name__} does not have; plan again without plan=")
    return plan


# ---------------------------------------------------------------- the plugin


class Auto(Strategy):
    exact = True  # unless allow_lossy lets the plan compress or approximate
    order = 50  # after module swaps it does not manage (LoRA, chunked_ce); its mechanisms apply in their own order
    needs_example = True
    incompatible_with = frozenset({"checkpoint", "selective_checkpoint", "offload", "compress", "approx_bp",
                                   "reversible", "compile"})
    Options = AutoOptions
    summary = ("measures keep / recompute / offload (/ compress / approx_bp) per block on the first batch and "
               "picks the fastest mix within memory_budget")

    def __init__(self, options=None):
        super().__init__(options)
        self.result: Plan | None = None
        self.mechanisms: list[Strategy] = []
        self.measured = MeasuredActivations(self)

    def plan(self, model: nn.Module) -> list[Touch]:
        if self.result is None:
            if self.options.plan:
                self.result = load_plan(self.options.plan, model)
            elif self.example is None:
                raise StrategyError(f"strategy '{self.name}' measures the model on a batch first: pass "
                                    "example=ExampleBatch(...) to apply_strategies")
            else:
                self.result = make_plan(model, self.options, self.example)
                self.example = None  # the batch is not held on the device through training
            print(format_table(self.result))
        return [Touch(u["unit"], u["kind"], f"{u['choice']}: {u['saved_bytes'] / GIB:.4g} GiB saved for backward, "
                      f"+{u['extra_s'] * 1e3:.2f} ms", changed=u["choice"] != "keep") for u in self.result.units]

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        chosen = self.result.choices()
        self.mechanisms = sorted((strategy_for(CHOICES[label], modules) for label, modules in chosen.items()),
                                 key=lambda s: s.order)
        apply_built(model, self.mechanisms)

    def estimate_problem(self) -> str | None:
        if self.options.allow_lossy and not self.options.plan:
            return "allow_lossy=true measures gradient cosines, which need real weights and data"
        return None  # tests/test_estimate.py checks its fake step against a real one

    def callbacks(self) -> list:
        return [self.measured] + [c for m in self.mechanisms for c in m.callbacks()]

    def report(self) -> dict:
        if self.result is None:
            return {}
        return {"memory_budget": self.result.memory_budget, "choices": dict(Counter(u["choice"] for u in self.result.units)),
                "predicted": self.result.predicted, "measured_activation_bytes": self.measured.activation_bytes,
                **{m.name: figures for m in self.mechanisms if (figures := m.report())}}

    def files(self) -> dict:
        return {"plan.json": asdict(self.result)} if self.result is not None else {}


class MeasuredActivations(L.Callback):
    """The largest saved-activation bytes of a training step, next to the plan's prediction in the report; one
    line at the end of training where they missed it by more than 5%."""

    def __init__(self, strategy: Auto):
        self.strategy = strategy
        self.activation_bytes = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.activation_bytes = max(self.activation_bytes, pl_module.activation_bytes)

    def on_train_end(self, trainer, pl_module):
        plan = self.strategy.result
        predicted = plan.predicted["activation_bytes"] if plan is not None else 0
        if predicted and self.activation_bytes > 1.05 * predicted:
            log.warning("strategy 'auto': the run saved %.4g GiB of activations for backward, %.0f%% over the "
                        "%.4g GiB its plan (memory_budget=%s) predicted", self.activation_bytes / GIB,
                        100 * (self.activation_bytes / predicted - 1), predicted / GIB, plan.memory_budget)

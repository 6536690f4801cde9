"""Selective activation checkpointing: per operator, store its output or recompute it, under a memory budget.

Full checkpointing recomputes every operator of a block. Most of the bytes come from cheap operators
(activations, norms, adds, dropout) while most of the time goes into a few expensive ones (matmuls,
convolutions) whose outputs are no larger. So, on the model's first forward with gradients:

1. that forward runs as full checkpointing while profiling passes run each block twice (RNG forked,
   batch-norm statistics frozen, so training is not disturbed, one block's activations at a time) and
   measure per operator call its output bytes and wall time, and the bytes plain backprop (``none``)
   saves inside the block; a census counts what the model stores besides (other layers, block inputs);
2. one knapsack over all blocks (``lowmem_train.knapsack``) keeps the model within ``memory_budget`` x
   the bytes of ``none``: it picks the operator outputs to store so that the recomputed time is least;
3. every later forward runs ``torch.utils.checkpoint`` (``use_reentrant=False``) with
   ``create_selective_checkpoint_contexts``: stored calls are ``MUST_SAVE``, the rest ``PREFER_RECOMPUTE``.

Stored outputs go through the model's saved-tensor pipeline (``respect_saved_tensors_hooks``), so
``SavedBytesMeter`` counts them and offload/compress stages see them. Gradients equal plain backprop:
recomputation replays RNG and does not update batch-norm statistics twice. The decisions are kept in
Lightning checkpoints, so a resumed run stores what the original run stored, without profiling again.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Optional

import lightning as L
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import (
    SAC_IGNORED_OPS,
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from lowmem_train import Strategy, StrategyError, Touch, repeated_blocks, select_modules
from lowmem_train.estimate import modelled_op_seconds
from lowmem_train.forward_wrap import Phase, wrap_forward
from lowmem_train.knapsack import choose_one_each, in_units
from lowmem_train.recompute import checkpointed_call, frozen_norm_statistics, without_kv_cache
from lowmem_train.saved_tensors import SavedBytesMeter, install_pipeline, model_state_storages, storage_key
from lowmem_train.undisturbed import cuda_devices, undisturbed

log = logging.getLogger(__name__)


@dataclass
class SelectiveCheckpointOptions:
    """Selective activation checkpointing: per operator, store or recompute, under a memory budget.

    ``targets``: null, every block that repeats in a ModuleList/Sequential (ResNet blocks, transformer
    layers); otherwise a list of class names (BasicBlock, LlamaDecoderLayer) or regexes on module names.
    ``exclude``: same pattern syntax; removed from the targets. ``memory_budget``: what the model stores
    (block inputs + chosen operator outputs + everything outside the blocks) stays within this fraction of the
    bytes plain backprop saves; in (0, 1]. Smaller: less memory, more recompute. ``per_block``: the fraction
    holds for each block on its own (its inputs + stored outputs), so a block's bytes do not depend on what the
    rest of the model does (the ``auto`` planner mixes it with other choices)::

        lowmem-train strategy=selective_checkpoint strategy.selective_checkpoint.memory_budget=0.3
    """

    targets: Optional[list[str]] = None  # class names / name regexes; None: every repeated block
    exclude: list[str] = field(default_factory=list)
    memory_budget: float = 0.5  # the model stores <= this fraction of the activation bytes of `none`
    per_block: bool = False  # the fraction holds per block instead of for the whole model

    def validate(self, strategy_name: str) -> None:
        if not 0.0 < self.memory_budget <= 1.0:
            raise StrategyError(
                f"strategy '{strategy_name}': option 'memory_budget' must be in (0, 1], got {self.memory_budget}"
            )


class SelectiveCheckpoint(Strategy):
    exact = True
    order = 90  # wraps forwards, like checkpoint
    Options = SelectiveCheckpointOptions
    summary = ("stores the op outputs costliest to recompute per byte within a budget of `none`'s bytes, "
               "recomputes the rest (less recompute than checkpoint)")

    def plan(self, model: nn.Module) -> list[Touch]:
        if "respect_saved_tensors_hooks" not in inspect.signature(checkpoint).parameters:
            raise StrategyError(f"strategy '{self.name}' needs torch.utils.checkpoint(respect_saved_tensors_hooks=...) "
                                f"(torch 2.14 has it; this is torch {torch.__version__})")
        blocks = select_modules(
            model, strategy=self.name, targets=self.options.targets, exclude=self.options.exclude,
            default=repeated_blocks, what="repeated blocks",
        )
        action = (f"selective checkpoint: model stores <= {self.options.memory_budget:.0%} of `none`'s bytes, "
                  "per-op choice measured on the first forward")
        return [Touch(name, type(module).__name__, action, phase=Phase.REBUILD) for name, module in blocks]

    planner: _Planner | None = None

    def estimate_problem(self) -> str | None:
        return None  # tests/test_estimate.py checks its fake step against a real one

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        self.planner = apply_selective_checkpoint(model, [touch.module for touch in plan],
                                                  memory_budget=self.options.memory_budget,
                                                  per_block=self.options.per_block)

    def callbacks(self) -> list:
        return [KeepDecisions(self)]

    def report(self) -> dict:
        decisions = self.planner.decisions.values() if self.planner else ()
        if not decisions:
            return {}
        return {
            "stored_bytes": sum(d.stored_bytes for d in decisions),
            "none_bytes": sum(d.none_bytes for d in decisions),
            "recompute_s": sum(d.recompute_seconds for d in decisions),
            "full_checkpoint_recompute_s": sum(d.full_recompute_seconds for d in decisions),
            "blocks": {d.name: {"stored_bytes": d.stored_bytes, "none_bytes": d.none_bytes,
                                "recompute_s": d.recompute_seconds, "full_checkpoint_recompute_s": d.full_recompute_seconds}
                       for d in decisions},
        }


class KeepDecisions(L.Callback):
    """Puts the per-block decisions in Lightning checkpoints; a resumed run uses them instead of profiling."""

    def __init__(self, strategy: SelectiveCheckpoint):
        self.strategy = strategy  # its planner is the applied model's

    def state_dict(self):
        return {name: {**asdict(d), "stored_keys": sorted(d.stored_keys)}
                for name, d in self.strategy.planner.decisions.items()}

    def load_state_dict(self, state_dict):
        self.strategy.planner.decisions = {
            name: BlockDecision(**{**d, "stored_keys": frozenset(tuple(key) for key in d["stored_keys"])})
            for name, d in state_dict.items()}


@dataclass
class OpCall:
    """One operator call of a block's forward, as profiled."""

    key: tuple[str, int]  # (operator name, index among calls of that operator): how SAC counts calls too
    nbytes: int  # bytes of fresh outputs; 0 when the output aliases an input (views, in-place ops)
    seconds: float


@dataclass
class BlockProfile:
    calls: list[OpCall]
    none_bytes: int  # what plain backprop saves inside the block, its inputs and outputs excluded
    input_bytes: int  # what full checkpointing keeps


@dataclass
class BlockDecision:
    """What one block stores, and the estimate behind it (the per-block report)."""

    name: str
    none_bytes: int  # what plain backprop saves for the block (inputs included)
    stored_keys: frozenset  # operator calls whose outputs are stored instead of recomputed
    stored_bytes: int  # inputs + stored outputs
    recompute_seconds: float  # estimated extra forward time in backward
    full_recompute_seconds: float  # the same for full checkpointing

    def describe(self) -> str:
        return (f"{self.name}: stores {self.stored_bytes / 2**20:.2f} of {self.none_bytes / 2**20:.2f} MiB "
                f"(saves {(self.none_bytes - self.stored_bytes) / 2**20:.2f} MiB), recompute "
                f"~{self.recompute_seconds * 1e3:.2f} ms vs {self.full_recompute_seconds * 1e3:.2f} ms "
                f"for full checkpoint ({len(self.stored_keys)} op outputs stored)")


class _Planner:
    """Takes the model-wide decision on the first training forward.

    That forward runs as full checkpointing while each block is profiled and a census counts what the
    model stores outside the blocks' insides (other layers, block inputs). Then one knapsack over all
    blocks' operator calls keeps the total within ``budget`` x the bytes ``none`` would save.
    """

    def __init__(self, budget: float, per_block: bool = False):
        self.budget = budget
        self.per_block = per_block
        self.profiles: dict[str, BlockProfile] = {}
        self.decisions: dict[str, BlockDecision] = {}
        self.census: SavedBytesMeter | None = None  # counts during the first training forward

    def start_census(self, model, args):
        if self.decisions or not torch.is_grad_enabled():
            return
        self.census = SavedBytesMeter(model, listen_only=True).__enter__()  # what the model's pipeline stores

    def decide(self, model, args, output):
        if self.census is None:
            return
        census_bytes = self.census.bytes
        self.census.__exit__(None, None, None)
        self.census = None
        if self.per_block:
            stored = {}
            for name, profile in self.profiles.items():
                capacity = self.budget * (profile.none_bytes + profile.input_bytes) - profile.input_bytes
                stored.update(_store_within(capacity, {name: profile}))
        else:
            profiled = sum(p.none_bytes for p in self.profiles.values())
            stored = _store_within(self.budget * (census_bytes + profiled) - census_bytes, self.profiles)
        for name, profile in self.profiles.items():
            full = sum(c.seconds for c in profile.calls)
            kept = [c for c in profile.calls if c.key in stored[name]]
            self.decisions[name] = BlockDecision(
                name=name, none_bytes=profile.none_bytes + profile.input_bytes, stored_keys=frozenset(stored[name]),
                stored_bytes=profile.input_bytes + sum(c.nbytes for c in kept),
                recompute_seconds=full - sum(c.seconds for c in kept), full_recompute_seconds=full,
            )
            log.info("selective_checkpoint %s", self.decisions[name].describe())


def _store_within(capacity: float, profiles: dict[str, BlockProfile]) -> dict[str, set]:
    """The operator calls to store, per block, so that their bytes fit ``capacity`` at the least recompute
    time (each call: recompute, no bytes and its time; or store, its bytes and no time)."""
    calls = [(name, c) for name, p in profiles.items() for c in p.calls if c.nbytes > 0]
    costs, units = in_units([[0, call.nbytes] for _, call in calls], max(capacity, 0))
    picks = choose_one_each(costs, [[call.seconds, 0.0] for _, call in calls], units) if calls else []
    stored: dict[str, set] = {name: set() for name in profiles}
    for (name, call), pick in zip(calls, picks):
        if pick:
            stored[name].add(call.key)
    return stored


def block_decisions(model: nn.Module) -> list[BlockDecision]:
    """The per-block decisions, in forward order (empty before the first training forward)."""
    return list(model.__dict__[_PLANNER].decisions.values())


_PLANNER = "_lowmem_sac_planner"


def apply_selective_checkpoint(model: nn.Module, blocks: Iterable[str], *, memory_budget: float = 0.5,
                               per_block: bool = False) -> _Planner:
    """Selectively checkpoint the modules of ``model`` named in ``blocks`` (idempotent).

    One planner per model takes the decision for all of them on the first training forward, so ``model``
    is the root whose forward runs the blocks. Returns it (its ``decisions`` are the report).
    """
    planner = model.__dict__.get(_PLANNER)
    if planner is None:
        planner = model.__dict__[_PLANNER] = _Planner(memory_budget, per_block)
        install_pipeline(model)  # the census counts what the model's pipeline stores
        model.register_forward_pre_hook(planner.start_census)
        model.register_forward_hook(planner.decide, always_call=True)
    elif (planner.budget, planner.per_block) != (memory_budget, per_block):
        raise StrategyError(f"selective_checkpoint is already applied to this model with memory_budget="
                            f"{planner.budget}, per_block={planner.per_block}; one budget per model")
    for name in blocks:
        wrap_forward(model.get_submodule(name), "selective_checkpoint", Phase.REBUILD,
                     partial(_selective_forward, planner, name), name=name)
    return planner


def _selective_forward(planner: _Planner, name: str, module: nn.Module, inner, *args, **kwargs):
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    # Profiling and recomputation run the block again: a key/value cache would grow with every run.
    args, kwargs = without_kv_cache(args, kwargs)
    decision = planner.decisions.get(name)
    if decision is None and planner.census is not None and name not in planner.profiles:
        planner.profiles[name] = _profile(module, inner, args, kwargs, model_state_storages(module))
    stored = decision.stored_keys if decision else frozenset()  # undecided: full checkpointing
    options = {"context_fn": partial(_contexts, stored), "respect_saved_tensors_hooks": True}
    return checkpointed_call(module, inner, *args, recompute_guard=_frozen_norms_outside_sac,
                             checkpoint_options=options, **kwargs)


@contextmanager
def _frozen_norms_outside_sac(module: nn.Module):
    """Batch-norm freezing for the recomputation, its own tensor ops hidden from SAC's operator count."""
    frozen = frozen_norm_statistics(module)
    with _disable_current_modes():
        frozen.__enter__()
    try:
        yield
    finally:
        with _disable_current_modes():
            frozen.__exit__(None, None, None)


def _contexts(stored: frozenset):
    """Fresh SAC contexts for one checkpointed call: calls are numbered per operator, as when profiled."""
    counts: dict[str, int] = {}

    def policy(ctx, func, *args, **kwargs):
        name = str(func)
        index = counts.get(name, 0)
        counts[name] = index + 1
        return CheckpointPolicy.MUST_SAVE if (name, index) in stored else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class _OpProfiler(TorchDispatchMode):
    """Records every operator call's fresh output bytes and wall time (synchronising CUDA around it; under
    ``estimate=true`` the estimated device's time)."""

    def __init__(self):
        super().__init__()
        self.calls: list[OpCall] = []
        self._counts: dict[str, int] = {}
        self._producer: dict[int, int] = {}  # storage -> index of the call that produced it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        cuda = any(t.is_cuda for t in inputs)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = func(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        modelled = modelled_op_seconds(func, args, kwargs, out)  # estimate=true: the device's, not the fake op's
        seconds = seconds if modelled is None else modelled
        for ptr in _written_storages(func, args, kwargs):
            # SAC refuses a stored output that is later changed in place (ReLU(inplace), ``out += x``).
            if ptr in self._producer:
                self.calls[self._producer.pop(ptr)].nbytes = 0
        input_storages = {storage_key(t.untyped_storage()) for t in inputs}
        fresh = {}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and storage_key(t.untyped_storage()) not in input_storages:
                fresh[storage_key(t.untyped_storage())] = t.untyped_storage().nbytes()
        name = str(func)
        index = self._counts.get(name, 0)
        self._counts[name] = index + 1
        self._producer.update(dict.fromkeys(fresh, len(self.calls)))
        self.calls.append(OpCall((name, index), sum(fresh.values()), seconds))
        return out


def _written_storages(func, args, kwargs) -> list[int]:
    """Storages of the arguments an operator writes in place (from its schema's alias annotations)."""
    written = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        written += [storage_key(t.untyped_storage()) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return written


def _profile(module: nn.Module, forward, args, kwargs, param_storages: set[int], repeats: int = 2) -> BlockProfile:
    """Operator calls of ``forward`` (time: the fastest of ``repeats``) and the bytes backprop saves.

    The passes must not change training: RNG is forked (dropout masks of the real forward unchanged) and
    batch-norm running statistics put back. One block's full activations live only during this call.
    """
    inputs = {storage_key(t.untyped_storage()): t.untyped_storage().nbytes()
              for t in tree_flatten((args, kwargs))[0]
              if isinstance(t, torch.Tensor) and storage_key(t.untyped_storage()) not in param_storages}
    saved: dict[int, int] = {}  # storage -> bytes, of the first pass (later passes may reuse addresses)

    def pack(tensor):
        ptr = storage_key(tensor.untyped_storage())
        if ptr not in param_storages and ptr not in inputs and not runs:
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    runs: list[list[OpCall]] = []
    with undisturbed(module, modes=False, devices=cuda_devices(args, kwargs)):
        for _ in range(repeats):
            profiler = _OpProfiler()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), profiler:
                output = forward(*args, **kwargs)
            if not runs:
                # The output is the next block's input, which the census already counts when it is kept.
                for tensor in tree_flatten(output)[0]:
                    if isinstance(tensor, torch.Tensor):
                        saved.pop(storage_key(tensor.untyped_storage()), None)
            runs.append(profiler.calls)
            del output
    calls = [OpCall(c.key, c.nbytes, min(run[i].seconds for run in runs)) for i, c in enumerate(runs[0])]
    return BlockProfile(calls, sum(saved.values()), sum(inputs.values()))

"""Reversible residual stacks: activations of the blocks are rebuilt from outputs in backward, not stored.

Each run of consecutive repeated blocks with equal input and output shapes becomes a two-stream RevNet
stack. With ``f_k(x) = block_k(x) - x`` (the block's residual branch), block k maps the streams
``(x1, x2) -> (x2, x1 + f_k(x2))``, whose inverse is ``x2 = y1, x1 = y2 - f_k(y1)``. The stack's first
block starts both streams from its input, the last returns their mean; between blocks the two streams
travel concatenated on the last dimension, so the parent's own loop (Hugging Face layers, Sequential)
still calls every block with its usual arguments.

This changes the architecture (a different function of the same weights), so it is for models trained
from scratch; a model loaded with ``from_pretrained`` is refused: a plain residual step
``h + f(h)`` has no exact inverse, so no coupling keeps a pretrained model's function.

Only the stack's last outputs are saved (plus each block's RNG state and the tensors it is called with,
shared by all blocks): memory stays flat in depth. In backward each block recomputes ``f`` once, with the
forward's RNG state (dropout masks replayed) and batch-norm statistics frozen, and hands its rebuilt
inputs to the block before it. A drift guard stores the true inputs every ``drift_check_every`` steps,
compares them with the rebuilt ones, and if the relative error exceeds ``drift_tolerance`` (fp16/bf16,
non-deterministic blocks) warns and falls back to plain autograd (storing activations) for good.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lowmem_train import Strategy, StrategyError, Touch, repeated_blocks, select_modules
from lowmem_train.forward_wrap import Phase, wrap_forward
from lowmem_train.recompute import frozen_norm_statistics, is_kv_cache
from lowmem_train.undisturbed import example_inputs, undisturbed


@dataclass
class ReversibleOptions:
    """Reversible (RevNet two-stream) residual stacks, activation memory flat in depth.

    Changes the architecture, so for models trained from scratch (a model loaded with from_pretrained is
    refused). ``targets``: null, every block that repeats in a ModuleList/Sequential; shape-changing blocks
    (downsample) are skipped. ``exclude``: same pattern syntax; removed from the targets.
    ``drift_check_every``: every N steps store the true block inputs and compare the rebuilt ones; 0: never.
    ``drift_tolerance``: relative reconstruction error above which it warns and stores activations from then on::

        lowmem-train strategy=reversible
        lowmem-train strategy=reversible strategy.reversible.drift_check_every=10
    """

    targets: Optional[list[str]] = None  # class names / name regexes; None: every repeated block
    exclude: list[str] = field(default_factory=list)
    drift_check_every: int = 100  # steps between reconstruction checks (the first step is always checked); 0: never
    drift_tolerance: float = 1e-3  # max |rebuilt - true| / max |true| before falling back to storing

    def validate(self, strategy_name: str) -> None:
        if self.drift_check_every < 0:
            raise StrategyError(f"strategy '{strategy_name}': option 'drift_check_every' must be >= 0, "
                                f"got {self.drift_check_every}")
        if self.drift_tolerance <= 0:
            raise StrategyError(f"strategy '{strategy_name}': option 'drift_tolerance' must be > 0, "
                                f"got {self.drift_tolerance}")


class Reversible(Strategy):
    exact = False  # a different architecture: compare with the same converted model under plain autograd
    changes_architecture = True
    order = 80  # a conversion of the blocks: before forward wrappers (order 90)
    Options = ReversibleOptions
    summary = ("RevNet two-stream stacks: block activations rebuilt from outputs, memory flat in depth "
               "(changes the architecture; ~1 extra block forward in backward)")

    def __init__(self, options=None):
        super().__init__(options)
        self.stacks: dict[str, _Stack] = {}  # by first block

    def estimate_problem(self) -> str | None:
        return None  # tests/test_estimate.py checks its fake step against a real one (the rebuild assumed to hold)

    def report(self) -> dict:
        """Whether each stack still rebuilds its activations: one whose drift check failed (bf16 or fp16
        arithmetic, typically) stores them as plain autograd does, and saves nothing."""
        if not self.stacks:
            return {}
        return {"stacks": len(self.stacks),
                "stacks_storing_activations": sorted(name for name, s in self.stacks.items() if s.plain),
                "max_rebuild_error": max(s.max_error for s in self.stacks.values())}

    def plan(self, model: nn.Module) -> list[Touch]:
        pretrained = getattr(getattr(model, "config", None), "name_or_path", "")
        if pretrained:
            raise StrategyError(
                f"strategy '{self.name}': {type(model).__name__} was loaded from '{pretrained}'; the reversible "
                "coupling changes the model's function, so it only applies to models trained from scratch"
            )
        stacks, left_out = _stacks(model, self)
        touches = [Touch(name, type(model.get_submodule(name)).__name__,
                         f"reversible stack {s} block {i + 1}/{len(stack)}: rebuilt from outputs in backward",
                         phase=Phase.REBUILD)
                   for s, stack in enumerate(stacks) for i, name in enumerate(stack)]
        return touches + [Touch(name, type(model.get_submodule(name)).__name__, f"left alone: {reason}", changed=False)
                          for name, reason in left_out.items()]

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        for stack_names in _stacks(model, self)[0]:
            if "_lowmem_rev" in model.get_submodule(stack_names[0]).__dict__:
                continue
            stack = _Stack(self.options.drift_check_every, self.options.drift_tolerance)
            self.stacks[stack_names[0]] = stack
            for index, name in enumerate(stack_names):
                block = model.get_submodule(name)
                block._lowmem_rev = _Position(stack, name, index == 0, index == len(stack_names) - 1)
                wrap_forward(block, self.name, Phase.REBUILD, _reversible_forward, name=name)


def use_plain_autograd(model: nn.Module, plain: bool = True) -> None:
    """Run the converted stacks with ordinary autograd (storing activations): the reference for gradients."""
    for module in model.modules():
        if "_lowmem_rev" in module.__dict__:
            module._lowmem_rev.stack.plain = plain


def _stacks(model: nn.Module, strategy: Reversible) -> tuple[list[list[str]], dict[str, str]]:
    """Runs of consecutive siblings among the chosen blocks, and the blocks left out with the reason: those
    whose output shape differs from their input's (a downsample, no skip connection) have no inverse."""
    blocks = select_modules(model, strategy=strategy.name, targets=strategy.options.targets,
                            exclude=strategy.options.exclude, default=repeated_blocks, what="residual blocks")
    left_out = _shape_changes(model, blocks)
    stacks: list[list[str]] = []
    previous = None
    for name, module in blocks:
        if getattr(module, "downsample", None) is not None:
            left_out.setdefault(name, "it downsamples (input and output shapes differ)")
        if getattr(module, "use_res_connect", True) is False:
            left_out.setdefault(name, "it has no skip connection")
        if name in left_out:
            previous = None
            continue
        parent, _, child = name.rpartition(".")
        position = (parent, [n for n, _ in model.get_submodule(parent).named_children()].index(child))
        if previous and previous[0] == parent and previous[1] + 1 == position[1]:
            stacks[-1].append(name)
        else:
            stacks.append([name])
        previous = position
    if not stacks:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in list(left_out.items())[:3])
        raise StrategyError(
            f"strategy '{strategy.name}': {type(model).__name__} has no residual blocks with equal input and "
            f"output shapes ({reasons}); set strategy.reversible.targets to such blocks"
        )
    return stacks, left_out


def _shape_changes(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Blocks whose hidden state changes shape, seen in one example forward (none when there is no example
    input or the forward fails: the attribute checks and the forward-time check remain)."""
    inputs = example_inputs(model)
    changes: dict[str, str] = {}
    if inputs is None:
        return changes
    handles = [module.register_forward_hook(functools.partial(_note_shape_change, changes, name), with_kwargs=True)
               for name, module in blocks]
    try:
        with undisturbed(model), torch.no_grad():
            model(*inputs[0], **inputs[1])
    except Exception:  # noqa: BLE001 - a model that needs other inputs: decided by the other checks
        pass
    finally:
        for handle in handles:
            handle.remove()
    return changes


def _note_shape_change(changes: dict[str, str], name: str, module, args, kwargs, output) -> None:
    """Why a block is no coupling's residual: the same checks as the forward's, seen before training."""
    hidden = args[0] if args else next(iter(kwargs.values()), None)
    out = _first(output)
    if not isinstance(hidden, torch.Tensor):
        changes[name] = f"it takes a {type(hidden).__name__}, not a hidden-state tensor"
    elif isinstance(output, tuple) and any(extra is not None for extra in output[1:]):
        changes[name] = f"it returns {len(output)} outputs that the model reads on"
    elif isinstance(out, torch.Tensor) and out.shape != hidden.shape:
        changes[name] = f"it maps {tuple(hidden.shape)} to {tuple(out.shape)}"


class _Stack:
    """State shared by the blocks of one stack: the step count, the drift guard and the backward hand-off."""

    def __init__(self, check_every: int, tolerance: float):
        self.check_every = check_every
        self.tolerance = tolerance
        self.steps = 0
        self.checking = False
        self.plain = False  # fallen back to plain autograd after drift
        self.handoff: tuple[torch.Tensor, torch.Tensor] | None = None  # inputs rebuilt by the next block
        self.max_error = 0.0  # largest relative reconstruction error of the last checked step


@dataclass
class _Position:
    stack: _Stack
    name: str
    first: bool
    last: bool


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _reversible_forward(self: nn.Module, inner, hidden: torch.Tensor, *args, **kwargs):
    position: _Position = self._lowmem_rev
    stack = position.stack
    if not isinstance(hidden, torch.Tensor):
        raise StrategyError(f"strategy 'reversible': block {position.name} takes a {type(hidden).__name__}, not a "
                            "hidden-state tensor; exclude it (strategy.reversible.exclude)")
    if position.first:
        x1 = x2 = hidden
        if torch.is_grad_enabled():
            stack.checking = stack.check_every > 0 and stack.steps % stack.check_every == 0
            stack.steps += 1
            if stack.checking:
                stack.max_error = 0.0
    else:
        x1, x2 = hidden.chunk(2, dim=-1)
    leaves, spec = tree_flatten((args, kwargs))
    tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = [leaves[i] for i in tensor_at]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise StrategyError(f"strategy 'reversible': block {position.name} gets an extra tensor argument that "
                            "requires grad; only the hidden state may carry gradients through a reversible stack")
    # The closure outlives the forward (backward calls it): it holds no tensor, those go through the ctx.
    # A key/value cache would be appended to again by the recomputation: training runs without it.
    template = [None if isinstance(leaf, torch.Tensor) or (is_kv_cache(leaf) and torch.is_grad_enabled()) else leaf
                for leaf in leaves]
    returns_tuple = False

    def residual(x, *tensors):
        nonlocal returns_tuple
        call_leaves = list(template)
        for i, tensor in zip(tensor_at, tensors):
            call_leaves[i] = tensor
        call_args, call_kwargs = tree_unflatten(call_leaves, spec)
        output = inner(x, *call_args, **call_kwargs)
        returns_tuple = isinstance(output, tuple)
        if returns_tuple and any(extra is not None for extra in output[1:]):
            # T5 hands its first block's position bias to the others: a stack returns only the hidden state.
            raise StrategyError(f"strategy 'reversible': block {position.name} returns {len(output)} outputs that "
                                "the model reads on; exclude it (strategy.reversible.exclude)")
        if _first(output).shape != x.shape:
            raise StrategyError(f"strategy 'reversible': block {position.name} maps {tuple(x.shape)} to "
                                f"{tuple(_first(output).shape)}; exclude it (strategy.reversible.exclude)")
        return _first(output) - x

    if stack.plain or not torch.is_grad_enabled():
        y1, y2 = x2, x1 + residual(x2, *tensors)
    else:
        y1, y2 = _Coupling.apply(self, residual, x1, x2, *tensors)
    out = (y1 + y2) / 2 if position.last else torch.cat([y1, y2], dim=-1)
    return (out,) if returns_tuple else out  # blocks returning (hidden, extras...): the parent reads [0]


class _Coupling(torch.autograd.Function):
    """``(x1, x2) -> (x2, x1 + f(x2))`` saving no activations; backward rebuilds the inputs."""

    @staticmethod
    def forward(ctx, block, residual, x1, x2, *tensors):
        position: _Position = block._lowmem_rev
        ctx.block, ctx.residual = block, residual
        devices = sorted({t.device.index or 0 for t in (x1, x2) if t.is_cuda})
        rng = [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices]
        ctx.devices, ctx.tensor_count = devices, len(tensors)
        device_type = x1.device.type  # autograd runs backward outside autocast: re-entered for the rebuild
        ctx.autocast = ((device_type, torch.get_autocast_dtype(device_type))
                        if torch.is_autocast_enabled(device_type) else None)
        with torch.no_grad():
            y1, y2 = x2, x1 + residual(x2, *tensors)
        y1 = y1.clone()  # an output of its own: x2 may be freed or rebuilt independently
        kept = (y1, y2) if position.last else ()
        truth = (x1, x2) if position.stack.checking else ()
        ctx.kept, ctx.truth = len(kept), len(truth)
        ctx.save_for_backward(*rng, *tensors, *kept, *truth)
        return y1, y2

    @staticmethod
    def backward(ctx, grad_y1, grad_y2):
        block, residual = ctx.block, ctx.residual
        position: _Position = block._lowmem_rev
        stack = position.stack
        saved = list(ctx.saved_tensors)
        rng, saved = saved[:1 + len(ctx.devices)], saved[1 + len(ctx.devices):]
        tensors, saved = saved[:ctx.tensor_count], saved[ctx.tensor_count:]
        kept, truth = saved[:ctx.kept], saved[ctx.kept:]
        y1, y2 = kept if kept else stack.handoff
        stack.handoff = None
        autocast = torch.autocast(*ctx.autocast) if ctx.autocast else contextlib.nullcontext()
        with torch.random.fork_rng(devices=ctx.devices), frozen_norm_statistics(block), torch.enable_grad(), autocast:
            torch.set_rng_state(rng[0])
            for device, state in zip(ctx.devices, rng[1:]):
                torch.cuda.set_rng_state(state, device)
            x2 = y1.detach().requires_grad_(True)
            f = residual(x2, *tensors)
            torch.autograd.backward(f, grad_y2)  # parameter gradients accumulate; x2.grad is J_f^T g2
        grad_x2 = grad_y1 + x2.grad if x2.grad is not None else grad_y1
        with torch.no_grad():
            x1, x2 = y2 - f.detach(), x2.detach()
        if truth and isinstance(x1, FakeTensor):
            truth = None  # estimate=true: fake tensors hold no values to compare; the estimate assumes the rebuild holds
        if truth:
            error = max(((rebuilt - true).abs().max() / true.abs().max().clamp_min(1e-12)).item()
                        for rebuilt, true in zip((x1, x2), truth))
            stack.max_error = max(stack.max_error, error)
            if error > stack.tolerance:
                warnings.warn(f"reversible: block {position.name} rebuilt its input with relative error "
                              f"{error:.2e} > {stack.tolerance:g}; falling back to storing activations")
                stack.plain = True
                x1, x2 = truth
        if not position.first:
            stack.handoff = (x1, x2)
        return (None, None, grad_y2, grad_x2) + (None,) * ctx.tensor_count

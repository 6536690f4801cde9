"""Per-module forward wrappers, their state kept on the module, so mechanisms mix module by module.

As ``torch.distributed._composable`` does, a mechanism applied to a module keeps its state on that module:
``module.__dict__["_lowmem_forward"]`` holds the module's original forward once and the wrappers applied
to it by phase. The rule for two mechanisms on one module, stated here once:

- one wrapper per phase: a second mechanism asking for a phase another one holds is refused, naming both;
- wrappers of different phases nest, ``REPLACE`` innermost, ``REBUILD`` outermost;
- applying the same mechanism again is a no-op.

Everything is reached from the module (bound methods and ``functools.partial`` of module-level
functions, no closures), so ``copy.deepcopy`` of a model gives a copy whose wrappers run the copy.
"""

from __future__ import annotations

import enum
import functools
import types
from collections.abc import Callable

from torch import nn

from .errors import StrategyError


class Phase(enum.IntEnum):
    REPLACE = 1  # computes the module's function another way, saving less (compact encodings, projections)
    REBUILD = 2  # runs the forward again in backward instead of keeping its inside (checkpointing, reversible)


Wrapper = Callable[..., object]  # wrapper(module, inner, *args, **kwargs): call inner(*args, **kwargs) or replace it

_STATE = "_lowmem_forward"


class ForwardWrappers:
    """The original forward of one module and the wrappers around it, by phase."""

    def __init__(self, original: Callable):
        self.original = original
        self.by_phase: dict[Phase, tuple[str, Wrapper]] = {}

    def call(self, module: nn.Module, *args, **kwargs):
        inner = self.original
        for phase in sorted(self.by_phase):
            inner = functools.partial(self.by_phase[phase][1], module, inner)
        return inner(*args, **kwargs)


def wrap_forward(module: nn.Module, owner: str, phase: Phase, wrapper: Wrapper, *, name: str = "") -> bool:
    """Run ``wrapper(module, inner, *args, **kwargs)`` in place of ``module``'s forward at ``phase``.

    Returns False when ``owner`` already holds that phase of the module (idempotent); raises StrategyError
    when another mechanism holds it. ``name`` (the module's qualified name) is for the message.
    """
    state = module.__dict__.get(_STATE)
    if state is None:
        state = module.__dict__[_STATE] = ForwardWrappers(module.forward)
        # A bound method, so copy.deepcopy rebinds it to the copy (a closure would keep calling the original).
        module.forward = types.MethodType(_wrapped_forward, module)
    holder = state.by_phase.get(phase)
    if holder is not None:
        if holder[0] == owner:
            return False
        raise StrategyError(phase_clash(name or type(module).__name__, phase, holder[0], owner))
    state.by_phase[phase] = (owner, wrapper)
    return True


def phase_clash(module: str, phase: Phase, holder: str, newcomer: str) -> str:
    return (f"module '{module}': '{newcomer}' cannot {phase.name.lower()} its forward, '{holder}' already does; "
            f"give the two strategies disjoint targets (or exclude)")


def wrapper_owner(module: nn.Module, phase: Phase) -> str | None:
    """Which mechanism holds ``phase`` of ``module``'s forward, if any."""
    state = module.__dict__.get(_STATE)
    holder = state.by_phase.get(phase) if state is not None else None
    return holder[0] if holder else None


def original_forward(module: nn.Module) -> Callable:
    """The module's forward without any wrapper (profiling, reference runs)."""
    state = module.__dict__.get(_STATE)
    return state.original if state is not None else module.forward


def _wrapped_forward(self: nn.Module, *args, **kwargs):
    return self.__dict__[_STATE].call(self, *args, **kwargs)

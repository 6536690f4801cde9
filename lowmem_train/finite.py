"""The NaN/inf guard on gradients: one fused check per step, and a one-line message saying where it went wrong.

A lossy strategy (``Strategy.exact = False``) changes what backward computes, so a finite loss can still give
NaN/inf gradients; training on them would corrupt the weights silently. When the check fails, the message
names the module where the non-finite values entered backward: backward runs from the deepest module to the
first, and every module before the one that went wrong inherits its NaN, so it is the deepest module (in
registration order, which is the forward order of torchvision and Hugging Face models) with a non-finite
parameter gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import LowmemError
from .strategy import get_strategy_class


class NonFiniteError(LowmemError):
    """A non-finite loss, or gradients a strategy's backward (or the model's own) made non-finite."""


@dataclass(frozen=True)
class NonFinite:
    """Where non-finite gradients entered backward."""

    module: str  # the deepest module with a non-finite parameter gradient ('' for the root)
    kind: str  # its class
    tensors: tuple[str, ...]  # its parameters whose gradients are non-finite
    value: str  # "NaN" or "inf"
    affected: int  # parameters of the whole model with non-finite gradients
    total: int  # parameters with gradients

    def parameter(self) -> str:
        return f"{self.module}.{self.tensors[0]}" if self.module else self.tensors[0]

    def describe(self) -> str:
        module = f"'{self.module}'" if self.module else "<root>"
        return (f"{self.value} entered backward at module {module} ({self.kind}), parameter "
                f"{', '.join(self.tensors)} ({self.affected} of {self.total} parameter gradients non-finite)")


def gradients(model: nn.Module) -> list[torch.Tensor]:
    """The gradients of ``model``'s parameters (a sparse gradient's stored values)."""
    return [p.grad._values() if p.grad.is_sparse else p.grad for p in model.parameters() if p.grad is not None]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN/inf: one fused norm kernel and a single host sync, no tensor-sized temporary.

    A norm can overflow to inf on finite values; ``locate_nonfinite`` then finds nothing and the caller goes on.
    """
    return not tensors or bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all())


def locate_nonfinite(model: nn.Module) -> NonFinite | None:
    """Where NaN/inf entered ``model``'s backward (None if every gradient is finite); for the failure path only,
    it checks each gradient on its own."""
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    bad = [(name, grad) for name, grad in named if not torch.isfinite(grad._values() if grad.is_sparse else grad).all()]
    if not bad:
        return None
    module, _, _ = bad[-1][0].rpartition(".")
    own = [(name.rpartition(".")[2], grad) for name, grad in bad if name.rpartition(".")[0] == module]
    value = "NaN" if any(grad.isnan().any() for _, grad in own) else "inf"
    return NonFinite(module, type(model.get_submodule(module)).__name__, tuple(name for name, _ in own), value,
                     len(bad), len(named))


def lossy_strategies(model: nn.Module) -> list[str]:
    """The strategies applied to ``model`` (``apply_strategies`` or the trainer) that are not exact."""
    return [name for name in model.__dict__.get("_lowmem_applied", {}) if not get_strategy_class(name).exact]


def gradient_message(model: nn.Module, where: NonFinite, step: int | None) -> str:
    """One line for non-finite gradients from a finite loss: a lossy strategy is blamed where one is applied."""
    at = "" if step is None else f" at step {step}"
    lossy = lossy_strategies(model)
    if lossy:
        return (f"lossy strategy {'+'.join(lossy)} made the gradients non-finite{at} (the loss is finite): "
                f"{where.describe()}; train without it, or keep that module out of it")
    return f"non-finite gradients{at} from a finite loss (no lossy strategy applied): {where.describe()}"


def check_finite_gradients(model: nn.Module, loss: torch.Tensor | None = None, step: int | None = None) -> None:
    """For a plain PyTorch loop: after ``loss.backward()``, before ``optimizer.step()``, raise NonFiniteError
    (one line) if ``loss`` or a gradient of ``model`` is NaN/inf, naming the module and parameter where it
    entered backward and the lossy strategies applied. One fused check and one host sync when all is finite.
    """
    loss_values = [] if loss is None else [loss.detach().float()]
    if all_finite(gradients(model) + loss_values):
        return
    at = "" if step is None else f" at step {step}"
    if loss_values and not all_finite(loss_values):
        raise NonFiniteError(f"non-finite loss{at}: the forward pass made it, not a strategy's backward")
    where = locate_nonfinite(model)
    if where is not None:
        raise NonFiniteError(gradient_message(model, where, step))

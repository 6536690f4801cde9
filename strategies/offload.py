"""Activation offload: saved activations wait for the backward in pinned host memory instead of on the GPU.

A stage of the model's saved-tensor pipeline (parameters never reach it). In pack, every CUDA tensor of at
least ``min_bytes`` is copied into pinned CPU memory on a side stream, so the copy overlaps the forward's
compute; ``record_stream`` keeps the allocator from reusing the GPU block before the copy has read it, after
which it is freed. In unpack the backward's stream waits for that copy and brings the tensor back
(non-blocking from pinned memory). The values are copied bit for bit, so gradients are identical.

It composes through the pipeline: with ``checkpoint`` it offloads the kept block inputs, with
``selective_checkpoint`` the stored operator outputs, and after ``compress`` (its stage position is MOVE,
compress's ENCODE) the compressed payload. ``targets``/``exclude`` limit it to the saves of some subtrees. CPU tensors pass through: on a CPU-only run it is a no-op (logged once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_map

from lowmem_train import Strategy, StrategyError, Touch
from lowmem_train.module_scope import ModuleScope, module_scope
from lowmem_train.saved_tensors import StagePosition
from lowmem_train.targets import SubtreeScope, subtree_scope

log = logging.getLogger(__name__)


@dataclass
class OffloadOptions:
    """Offload saved activations to pinned CPU memory during the forward, bring them back for the backward.

    On a CPU-only run it is a no-op (activations already live in host memory); a log line says so.
    ``min_bytes``: tensors smaller than this stay on the GPU (the copy would cost more than it frees).
    ``pin_memory``: pinned host buffers allow asynchronous copies that overlap with compute. ``targets`` /
    ``exclude``: only the saves of these subtrees move / these subtrees' saves stay (null / []: all move)::

        lowmem-train strategy=offload trainer.accelerator=gpu
        lowmem-train 'strategy=[checkpoint,offload]'      # offload only the checkpointed block inputs
        lowmem-train strategy=offload trainer.accelerator=gpu 'strategy.offload.targets=[layers.0,layers.1]'
    """

    min_bytes: int = 1024  # smaller tensors stay on the GPU: their copy costs more than it frees
    pin_memory: bool = True  # pinned host buffers: asynchronous copies, overlapped with compute
    targets: Optional[list[str]] = None  # subtrees whose saved tensors move (class names / names / regexes); None: all
    exclude: list[str] = field(default_factory=list)  # subtrees whose saved tensors stay on the device

    def validate(self, strategy_name: str) -> None:
        if self.min_bytes < 0:
            raise StrategyError(f"strategy '{strategy_name}': option 'min_bytes' must be >= 0, got {self.min_bytes}")


class Offload(Strategy):
    exact = True
    Options = OffloadOptions
    summary = "moves saved activations to pinned CPU memory in forward, back in backward (PCIe traffic)"

    stage: OffloadStage | None = None

    def plan(self, model: nn.Module) -> list[Touch]:
        scope = self._scope(model)
        action = f"saved activations >= {self.options.min_bytes} B to {'pinned ' if self.options.pin_memory else ''}CPU"
        if scope.excluded:
            action += f", except under {', '.join(scope.excluded)}"
        return [Touch(root, type(model.get_submodule(root)).__name__, action) for root in scope.roots]

    def estimate_problem(self) -> str | None:
        return ("on a GPU it moves saved tensors to host memory; the estimate counts one device's tensors and does not "
                "split them yet")

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        if not torch.cuda.is_available():
            log.warning("offload: no CUDA device, saved activations already live in host memory; offload is a no-op")
        everything = self.options.targets is None and not self.options.exclude
        self.stage = OffloadStage(self.options.min_bytes, self.options.pin_memory,
                                  None if everything else (module_scope(model), self._scope(model)))

    def saved_tensor_stage(self) -> OffloadStage:
        return self.stage

    def _scope(self, model: nn.Module) -> SubtreeScope:
        return subtree_scope(model, strategy=self.name, targets=self.options.targets, exclude=self.options.exclude)


@dataclass(frozen=True)
class Offloaded:
    """A tensor waiting in host memory: its copy, where it came from, and the event ending the copy."""

    host: torch.Tensor
    device: torch.device
    copied: torch.cuda.Event


class OffloadStage:
    """Pack: CUDA tensors >= ``min_bytes`` to host on a side stream. Unpack: back to their device."""

    position = StagePosition.MOVE  # after compress: its payload is what gets offloaded

    def __init__(self, min_bytes: int, pin_memory: bool, scope: tuple[ModuleScope, SubtreeScope] | None = None):
        self.min_bytes = min_bytes
        self.pin_memory = pin_memory
        self.scope = scope  # (which module runs, which modules' saves move); None: every module's

    def pack(self, value: Any) -> Any:
        if self.scope is not None and not self.scope[1](self.scope[0].current()):
            return value
        return tree_map(self._offload, value)  # a tensor, or the tensors inside an earlier stage's payload

    def unpack(self, value: Any) -> Any:
        return tree_map(self._restore, value)

    def _offload(self, leaf: Any) -> Any:
        if not (isinstance(leaf, torch.Tensor) and leaf.is_cuda and leaf.nbytes >= self.min_bytes):
            return leaf
        compute = torch.cuda.current_stream(leaf.device)
        side = _side_stream(leaf.device)
        side.wait_stream(compute)  # the tensor is complete before it is read
        with torch.cuda.stream(side):
            host = torch.empty_like(leaf, device="cpu", pin_memory=self.pin_memory)
            host.copy_(leaf, non_blocking=self.pin_memory)
            copied = torch.cuda.Event()
            copied.record(side)
        leaf.record_stream(side)  # its memory is not reused until the side stream has read it
        return Offloaded(host, leaf.device, copied)

    @staticmethod
    def _restore(leaf: Any) -> Any:
        if not isinstance(leaf, Offloaded):
            return leaf
        torch.cuda.current_stream(leaf.device).wait_event(leaf.copied)
        return leaf.host.to(leaf.device, non_blocking=leaf.host.is_pinned())


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per device, shared by all models (streams are a device resource, not model state)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]

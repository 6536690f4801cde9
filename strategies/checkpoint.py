"""Activation checkpointing of repeated blocks: keep each block's inputs, recompute its inside in backward.

Uses ``torch.utils.checkpoint`` with ``use_reentrant=False`` (kwargs, frozen inputs and nested graphs
work) and its RNG replay, so dropout masks in the recomputation equal the forward's. Batch-norm running
statistics are frozen during the recomputation, so buffers also match plain backprop.

In a plain loop, ``apply_checkpoint(module)`` checkpoints one module (idempotent), so a model can mix it
with ``selective_checkpoint`` or ``compress`` on other modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lowmem_train import Strategy, Touch, outermost, repeated_blocks, select_modules
from lowmem_train.forward_wrap import Phase, wrap_forward
from lowmem_train.recompute import checkpointed_call, without_kv_cache


@dataclass
class CheckpointOptions:
    """Activation checkpointing of repeated blocks.

    ``targets``: null, every block that repeats in a ModuleList/Sequential (ResNet blocks, transformer
    layers); otherwise a list of class names (BasicBlock, LlamaDecoderLayer) or regexes on module names.
    ``exclude``: same pattern syntax; removed from the targets::

        lowmem-train strategy=checkpoint
        lowmem-train strategy=checkpoint 'strategy.checkpoint.targets=[BasicBlock]' 'strategy.checkpoint.exclude=[layer1.*]'
    """

    targets: Optional[list[str]] = None  # class names / name regexes; None: every repeated block
    exclude: list[str] = field(default_factory=list)


class Checkpoint(Strategy):
    exact = True
    order = 90  # wraps forwards, so it runs after strategies that swap modules inside the blocks
    Options = CheckpointOptions
    summary = "saves only each block's inputs, recomputes the block in backward (~1 extra forward)"

    def plan(self, model: nn.Module) -> list[Touch]:
        blocks = select_modules(
            model, strategy=self.name, targets=self.options.targets, exclude=self.options.exclude,
            default=repeated_blocks, what="repeated blocks",
        )
        # A module inside another target is recomputed with it already: checkpointing it again only nests.
        return [Touch(name, type(module).__name__, "checkpoint: keep inputs, recompute in backward", phase=Phase.REBUILD)
                for name, module in outermost(blocks)]

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        for touch in plan:
            apply_checkpoint(model.get_submodule(touch.module), name=touch.module)

    def estimate_problem(self) -> str | None:
        return None  # tests/test_estimate.py checks its fake step against a real one


def apply_checkpoint(module: nn.Module, *, name: str = "") -> nn.Module:
    """Make ``module`` checkpoint its forward (idempotent; parameters and state_dict keys unchanged)."""
    wrap_forward(module, "checkpoint", Phase.REBUILD, _checkpointed_forward, name=name)
    return module


def _checkpointed_forward(module: nn.Module, inner, *args, **kwargs):
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    args, kwargs = without_kv_cache(args, kwargs)
    return checkpointed_call(module, inner, *args, **kwargs)

"""Optimizer step in backward: each parameter steps and frees its gradient as soon as it is accumulated.

Plain training keeps every gradient alive until ``optimizer.step()``; here one optimizer per parameter
(built from the ``optimizer`` config group, so it combines with adamw8bit, adafactor, ...) steps inside
the parameter's post-accumulate-grad hook and sets its ``.grad`` to None, so at most the gradients of the
parameters still being back-propagated are alive (peak gradient memory: a few parameters, not the model).

Exact for element-wise optimizers (SGD, AdamW and their quantized forms): the update equals the stepped-
after-backward one. It cannot accumulate gradients over micro-batches (the step happens in every backward)
and global-norm gradient clipping is impossible (no moment sees all gradients): both are refused. So is DDP
(it would step each rank on its own gradient before DDP averages them); under FSDP2 (``trainer=fsdp``) the hook
fires on each shard after the reduce-scatter, so it runs there.
No options:

    lowmem-train recipe=llama_finetune strategy=step_in_backward optimizer=adamw8bit
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lowmem_train import Strategy, StrategyError
from lowmem_train.optimizers import PerParameterOptimizer


class StepInBackwardOptimizer(PerParameterOptimizer):
    """Per-parameter optimizers, each stepped in its parameter's post-accumulate-grad hook."""

    def __init__(self, params: Iterable[nn.Parameter],
                 build: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]):
        params = [p for p in params if p.requires_grad]
        super().__init__(params, build)
        for index, param in enumerate(params):
            param.register_post_accumulate_grad_hook(partial(self._step_hook, index))

    def _step_hook(self, index: int, param: torch.Tensor) -> None:
        self.step_parameter(index)


class RefuseAccumulation(L.Callback):
    """Checks the trainer settings step_in_backward cannot honour, before the first step."""

    def setup(self, trainer, pl_module, stage):
        if trainer.accumulate_grad_batches > 1:
            raise StrategyError(
                f"strategy 'step_in_backward' steps in every backward, so it cannot accumulate gradients: set "
                f"trainer.accumulate_grad_batches=1 (got {trainer.accumulate_grad_batches}) or drop the strategy")
        if isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1:
            raise StrategyError("strategy 'step_in_backward' would step on each rank's own gradient before DDP "
                                "averages them: shard with trainer=fsdp (it steps after the reduce-scatter) or drop "
                                "the strategy")
        if trainer.gradient_clip_val:
            raise StrategyError("strategy 'step_in_backward' cannot clip gradients (no step sees them all): "
                                "set trainer.gradient_clip_val=null or drop the strategy")


class StepInBackward(Strategy):
    exact = True
    summary = "frees each gradient right after its parameter's step in backward (gradients ~0 bytes); no accumulation"

    def configure_optimizer(self, model, build_default):
        return StepInBackwardOptimizer(model.parameters(), build_default)

    def callbacks(self) -> list:
        return [RefuseAccumulation()]

    def estimate_problem(self) -> str | None:
        return None  # tests/test_estimate.py checks its fake step against a real one

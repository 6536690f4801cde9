"""Optimizer step in backward: each parameter steps and frees its gradient as soon as it is accumulated.

Plain training keeps every gradient alive until ``optimizer.step()``; here one optimizer per parameter
(built from the ``optimizer`` config group, so it combines with adamw8bit, adafactor, ...) steps inside
the parameter's post-accumulate-grad hook and sets its ``.grad`` to None, so at most the gradients of the
parameters still being back-propagated are alive (peak gradient memory: a few parameters, not the model).

Exact for element-wise optimizers (SGD, AdamW and their quantized forms): the update equals the stepped-
after-backward one. It cannot accumulate gradients over micro-batches (the step happens in every backward)
and global-norm gradient clipping is impossible (no moment sees all gradients): both are refused.
No options:

    lowmem-train recipe=llama_finetune strategy=step_in_backward optimizer=adamw8bit
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning as L
from lightning.pytorch.strategies import DDPStrategy
import torch
from torch import nn

from lowmem_train import Strategy, StrategyError


class StepInBackwardOptimizer(torch.optim.Optimizer):
    """What Lightning drives: ``step(closure)`` only runs the closure (forward + backward, during which the
    per-parameter optimizers step), ``zero_grad`` finds nothing left to zero. ``state`` and ``state_dict``
    gather the per-parameter optimizers' states for the memory accounting and checkpoints."""

    def __init__(self, params: Iterable[nn.Parameter],
                 build: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]):
        params = [p for p in params if p.requires_grad]
        self.inner = [build([p]) for p in params]
        super().__init__(params, {})
        # The inner optimizers' groups themselves, so an LR scheduler on this optimizer reaches them.
        self.param_groups = [group for optimizer in self.inner for group in optimizer.param_groups]
        for param, optimizer in zip(params, self.inner):
            param.register_post_accumulate_grad_hook(self._step_parameter(optimizer))

    @staticmethod
    def _step_parameter(optimizer: torch.optim.Optimizer):
        def hook(param: torch.Tensor) -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return hook

    @property
    def state(self):
        return {p: s for optimizer in self.inner for p, s in optimizer.state.items()}

    @state.setter
    def state(self, value):
        """Optimizer.__init__ assigns an empty state; the real one lives in the per-parameter optimizers."""

    def step(self, closure=None):
        return closure() if closure is not None else None

    def state_dict(self):
        """The per-parameter optimizers' states as one optimizer's (parameter i is inner optimizer i's only
        one), so tools that read optimizer state dicts (FSDP2's distributed checkpoint) see the usual layout."""
        states = [optimizer.state_dict() for optimizer in self.inner]
        return {"state": {i: s["state"][0] for i, s in enumerate(states) if 0 in s["state"]},
                "param_groups": [{**s["param_groups"][0], "params": [i]} for i, s in enumerate(states)]}

    def load_state_dict(self, state_dict):
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.inner):
            raise StrategyError("strategy 'step_in_backward': the checkpoint's optimizer state is not from a "
                                "step_in_backward run of this model; resume with the same strategies")
        for i, (optimizer, group) in enumerate(zip(self.inner, groups)):
            state = state_dict["state"]
            optimizer.load_state_dict({"state": {0: state[i]} if i in state else {},
                                       "param_groups": [{**group, "params": [0]}]})


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

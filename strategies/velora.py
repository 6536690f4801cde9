"""VeLoRA: keep one scalar per sub-token of a linear layer's input for its weight gradient.

The input x (..., C) of a chosen ``nn.Linear`` is split into ``groups`` sub-tokens of C/G values; with one
unit vector v (C/G values) shared by all of them, the forward saves only z = <sub-token, v> (G values per
token instead of C). Backward rebuilds x_hat = z * v per sub-token for the weight gradient; the input
gradient (grad_out @ W) needs no saved input and stays exact. v is the normalised mean sub-token of the first
training batch (``init=first_batch``, the paper's default) and then frozen; it is a buffer of the layer, so
checkpoints and resume reproduce it. ``init=batch_average`` recomputes it from every training batch.

Savings are per layer: the bytes saved for the layer's input shrink by C/G. Autograd stores a tensor once,
so when another layer saves the same input (Llama's q/k projections share v_proj's input) the model-wide
saving comes only from inputs no other layer keeps (Llama's down_proj input); with PEFT LoRA, target the
adapters' ``lora_A`` layers, whose input is the only one saved for the adapter's weight gradient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lowmem_train import Strategy, StrategyError, Touch, select_modules
from lowmem_train.forward_wrap import Phase, wrap_forward
from lowmem_train.targets import weight_read_by_parent

INITS = ("first_batch", "batch_average")
# Value and MLP-down projections of Llama-style models, qkv and fc2 of ViTs (timm naming).
DEFAULT_LAYERS = ("v_proj", "down_proj", "qkv", "fc2")


@dataclass
class VeloraOptions:
    """VeLoRA: chosen linear layers keep one scalar per sub-token of their input for the weight gradient.

    ``targets``: null, v_proj/down_proj (Llama), qkv/fc2 (ViT), or their PEFT lora_A adapters; otherwise
    class names or regexes. ``groups``: sub-tokens per token; every target's input width must be divisible by
    it. ``init``: first_batch (normalised mean sub-token, then frozen) or batch_average (every batch)::

        lowmem-train recipe=llama_finetune strategy=velora
        lowmem-train recipe=llama_finetune model=llama_tiny data=synthetic strategy=velora strategy.velora.groups=16
    """

    targets: Optional[list[str]] = None  # class names / name regexes of nn.Linear modules; None: DEFAULT_LAYERS
    exclude: list[str] = field(default_factory=list)
    groups: int = 64                     # sub-tokens per token: the layer's input width must be divisible by it
    init: str = "first_batch"            # first_batch (then frozen) or batch_average (every training batch)

    def validate(self, strategy: str) -> None:
        if self.groups < 1:
            raise StrategyError(f"strategy '{strategy}': groups={self.groups} must be >= 1")
        if self.init not in INITS:
            raise StrategyError(f"strategy '{strategy}': init={self.init}; valid: {', '.join(INITS)}")


def default_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear layers named like DEFAULT_LAYERS, or the LoRA ``lora_A`` adapters of such layers (PEFT)."""
    names = "|".join(DEFAULT_LAYERS)
    pattern = re.compile(rf"(.*\.)?({names})(\.lora_A\.[^.]+)?")
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and pattern.fullmatch(n) and m.weight.requires_grad
            and not weight_read_by_parent(model, n)]


class Velora(Strategy):
    exact = False
    order = 40  # swaps forwards of single layers: before wrappers such as checkpointing
    Options = VeloraOptions
    summary = "saves one scalar per sub-token of chosen linear inputs (C/G x fewer bytes); weight grad rank-1 per sub-token"

    def plan(self, model: nn.Module) -> list[Touch]:
        chosen = select_modules(model, strategy=self.name, targets=self.options.targets,
                                exclude=self.options.exclude, default=default_layers,
                                what="value/MLP-down projections (v_proj, down_proj, qkv, fc2)")
        groups = self.options.groups
        touches = []
        for name, module in chosen:
            if not isinstance(module, nn.Linear):
                raise StrategyError(f"strategy '{self.name}': {name} is a {type(module).__name__}, not an nn.Linear; "
                                    "set strategy.velora.targets to linear layers")
            if weight_read_by_parent(model, name):
                raise StrategyError(f"strategy '{self.name}': {name}'s weight is read directly by its parent's "
                                    "forward, which never calls the layer; exclude it")
            if module.in_features % groups:
                raise StrategyError(
                    f"strategy '{self.name}': {name} has {module.in_features} input features, not divisible by "
                    f"groups={groups} (no padding support); set strategy.velora.groups to a divisor of every "
                    "target's width")
            touches.append(Touch(name, "Linear", f"save {groups} of {module.in_features} values per token "
                                                 f"(sub-tokens of {module.in_features // groups})", phase=Phase.REPLACE))
        return touches

    def estimate_problem(self) -> str | None:
        return None  # tests/test_estimate.py checks its fake step against a real one

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        for touch in plan:
            velora_linear(model.get_submodule(touch.module), self.options.groups, self.options.init)


def velora_linear(module: nn.Linear, groups: int, init: str) -> None:
    """Make ``module`` save VeLoRA projections in training (parameters unchanged; adds the buffers)."""
    if "_lowmem_velora" in module.__dict__:
        return
    module._lowmem_velora = (groups, init)
    size = module.in_features // groups
    module.register_buffer("velora_v", torch.zeros(size, device=module.weight.device, dtype=module.weight.dtype))
    module.register_buffer("velora_initialized", torch.zeros((), dtype=torch.bool, device=module.weight.device))
    wrap_forward(module, "velora", Phase.REPLACE, _velora_forward)


def _velora_forward(self: nn.Linear, inner, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
        return inner(x)
    groups, init = self._lowmem_velora
    v = self.velora_v
    if init == "batch_average" or not bool(self.velora_initialized):
        mean = x.detach().reshape(-1, v.numel()).float().mean(0)
        v = (mean / mean.norm().clamp_min(torch.finfo(mean.dtype).tiny)).to(v.dtype)
        with torch.no_grad():  # the buffer is what checkpoints keep; the backward uses this fresh tensor
            self.velora_v.copy_(v)
            self.velora_initialized.fill_(True)
    return VeloraLinearFunction.apply(x, self.weight, self.bias, v.to(x.dtype), groups)


class VeloraLinearFunction(torch.autograd.Function):
    """y = x W^T + b saving z = <sub-token, v> instead of x; dW from x_hat = z v, dx = dy W exactly."""

    @staticmethod
    def forward(ctx, x, weight, bias, v, groups):
        z = x.detach().unflatten(-1, (groups, v.numel())) @ v  # (..., groups)
        ctx.save_for_backward(z, weight, v)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, v = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            x_hat = (z.unsqueeze(-1) * v).flatten(-2).reshape(flat_grad.shape[0], -1)
            grad_weight = (flat_grad.T @ x_hat.to(flat_grad.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_x, grad_weight, grad_bias, None, None

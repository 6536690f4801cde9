"""The causal-LM loss from the last hidden states in chunks of tokens: no batch x seq x vocab logits.

Swaps the model's loss head (``lowmem_train.causal_lm``) for one that computes each chunk's logits, its
fp32 logsumexp and cross-entropy, and drops the chunk; backward recomputes each chunk's logits from the
saved hidden states. What it keeps for backward is the hidden states, the targets and (own function) one
fp32 logsumexp per token, all through ``ctx.save_for_backward``, so compress/offload/the meter see them.

Two implementations: torch's ``linear_cross_entropy`` (``reduction="none"``, its chunked path, fp32
accumulation for bf16/fp16 inputs; it returns per-token losses in the input dtype) where it exists, and
``ChunkedLinearCrossEntropy`` below where it does not, or where the model soft-caps its logits, which torch's
op cannot. The scoring pass of a sample-selecting strategy (no grad) runs the chunk loop directly and also
returns per-sample statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowmem_train import Strategy, StrategyError, Touch
from lowmem_train.causal_lm import (IGNORE_INDEX, LogitSettings, LossHeadOutput, causal_lm_of, logit_settings,
                                    per_sample, set_loss_head, shifted_targets, statistics_wanted, token_statistics,
                                    transform_logits, unsupported_reason)


@dataclass
class ChunkedCEOptions:
    """Causal-LM loss from the last hidden states in chunks of tokens (no batch x seq x vocab logits).

    ``chunk_size``: tokens per chunk; the loss holds at most chunk_size x vocab fp32 logits at a time.
    ``native``: torch.nn.functional.linear_cross_entropy where torch has it and the logits are not soft-capped::

        lowmem-train recipe=llama_finetune strategy=chunked_ce strategy.chunked_ce.chunk_size=2048
    """

    chunk_size: int = 4096   # tokens per chunk: peak of the loss is chunk_size x vocab fp32 values
    native: bool = True      # torch.nn.functional.linear_cross_entropy where it exists (and no soft-cap)

    def validate(self, strategy: str) -> None:
        if self.chunk_size <= 0:
            raise StrategyError(f"strategy '{strategy}': chunk_size={self.chunk_size} must be > 0 (tokens per chunk)")


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 settings: LogitSettings) -> torch.Tensor:
    """A chunk's logits in fp32 (the matmul in the weight's dtype, as the plain head does)."""
    return transform_logits(nn.functional.linear(hidden, weight, bias).float(), settings)


@torch.no_grad()
def chunked_loss(hidden, weight, bias, targets, chunk_size: int, settings: LogitSettings, with_stats: bool):
    """Per-token cross-entropy (fp32), its logsumexp, and per-token statistics if asked, chunk by chunk."""
    loss = torch.zeros(len(targets), dtype=torch.float32, device=hidden.device)
    logsumexp = torch.empty_like(loss)
    stats: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(targets), chunk_size):
        rows = slice(start, start + chunk_size)
        logits = chunk_logits(hidden[rows], weight, bias, settings)
        target = targets[rows]
        valid = target != IGNORE_INDEX
        logsumexp[rows] = logits.logsumexp(-1)
        picked = logits.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
        loss[rows] = torch.where(valid, logsumexp[rows] - picked, 0.0)
        if with_stats:
            for key, value in token_statistics(logits, target).items():
                stats.setdefault(key, []).append(value)
    return loss, logsumexp, {key: torch.cat(values) for key, values in stats.items()} if with_stats else None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of ``softcap(scale * (hidden @ weight.T + bias))``, recomputing each chunk's
    logits in backward. The weight gradient accumulates in the weight's dtype (no fp32 copy of the head)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, settings: LogitSettings):
        loss, logsumexp, _ = chunked_loss(hidden, weight, bias, targets, chunk_size, settings, with_stats=False)
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.chunk_size, ctx.settings = chunk_size, settings
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        settings = ctx.settings
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs_bias else None
        for start in range(0, len(targets), ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits = chunk_logits(hidden[rows], weight, bias, settings)
            target = targets[rows]
            valid = (target != IGNORE_INDEX).float()
            grad = (logits - logsumexp[rows].unsqueeze(1)).exp()  # softmax
            grad.scatter_add_(1, target.clamp_min(0).unsqueeze(1), -valid.unsqueeze(1))
            grad *= (grad_loss[rows].float() * valid * settings.scale).unsqueeze(1)
            if settings.softcap is not None:
                grad *= 1 - (logits / settings.softcap).pow(2)  # d(cap * tanh(u / cap)) / du
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), hidden[rows])
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


class ChunkedCrossEntropyHead(nn.Module):
    """Loss head with the same output as the plain one, never holding more than ``chunk_size`` tokens' logits."""

    def __init__(self, settings: LogitSettings, chunk_size: int, native: bool):
        super().__init__()
        self.settings, self.chunk_size = settings, chunk_size
        self.native = native and settings.softcap is None and hasattr(nn.functional, "linear_cross_entropy")

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, output_embeddings: nn.Module) -> LossHeadOutput:
        if labels.shape != hidden.shape[:2]:  # torch's op would not notice
            raise ValueError(f"labels of shape {tuple(labels.shape)} for hidden states {tuple(hidden.shape)}")
        targets = shifted_targets(labels)
        flat, flat_targets = hidden.flatten(0, 1), targets.flatten()
        weight, bias = output_embeddings.weight, getattr(output_embeddings, "bias", None)
        if not torch.is_grad_enabled():
            per_token, _, stats = chunked_loss(flat, weight, bias, flat_targets, self.chunk_size, self.settings,
                                               with_stats=statistics_wanted())
            return per_sample(per_token, targets, stats)
        if self.native:
            scale = self.settings.scale
            per_token = nn.functional.linear_cross_entropy(
                flat * scale if scale != 1.0 else flat, weight, flat_targets,
                linear_bias=bias * scale if bias is not None and scale != 1.0 else bias, reduction="none",
                ignore_index=IGNORE_INDEX,
                options=nn.LinearCrossEntropyOptions(batch_chunk_size=self.chunk_size, chunking_method=None))
        else:
            per_token = ChunkedLinearCrossEntropy.apply(flat, weight, bias, flat_targets, self.chunk_size,
                                                        self.settings)
        stats = None
        if statistics_wanted():
            stats = chunked_loss(flat.detach(), weight, bias, flat_targets, self.chunk_size, self.settings, True)[2]
        return per_sample(per_token, targets, stats)

    def extra_repr(self) -> str:
        kind = "torch linear_cross_entropy" if self.native else "ChunkedLinearCrossEntropy"
        return f"chunk_size={self.chunk_size}, {kind}, scale={self.settings.scale}, softcap={self.settings.softcap}"


class ChunkedCE(Strategy):
    exact = True
    order = 10  # swaps the loss head, independent of what other strategies do inside the decoder
    Options = ChunkedCEOptions
    summary = "causal-LM loss from the hidden states in chunks of tokens: no batch x seq x vocab logits"

    def plan(self, model: nn.Module) -> list[Touch]:
        causal_lm = causal_lm_of(model)
        if causal_lm is None:
            raise StrategyError(f"strategy '{self.name}': {unsupported_reason(model)}; it needs a Hugging Face "
                                "*ForCausalLM (recipe=llama_finetune)")
        weight = causal_lm.get_output_embeddings().weight
        settings = logit_settings(causal_lm.config)
        native = ChunkedCrossEntropyHead(settings, self.options.chunk_size, self.options.native).native
        action = (f"chunked cross-entropy over {tuple(weight.shape)} output embedding, {self.options.chunk_size} "
                  f"tokens per chunk ({'torch linear_cross_entropy' if native else 'ChunkedLinearCrossEntropy'})")
        return [Touch("loss_head", "loss head", action)]

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        causal_lm = causal_lm_of(model)
        set_loss_head(model, ChunkedCrossEntropyHead(logit_settings(causal_lm.config), self.options.chunk_size,
                                                     self.options.native))

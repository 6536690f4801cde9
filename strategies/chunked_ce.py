"""The causal-LM loss from the last hidden states in tiles of the logits: no batch x seq x vocab logits.

Swaps the model's loss head (``lowmem_train.causal_lm``) for ``ChunkedLinearCrossEntropy``, whose tiles of
logits hold at most ``chunk_bytes`` of fp32 values. It does the plain head's arithmetic (matmuls in the
weight's dtype, log-softmax and losses in fp32), so its losses and gradients are the plain head's, bitwise
or to the last bit of a few values, in fp32 and in bf16 alike:

- forward, chunks of tokens over the whole vocabulary: torch's ``log_softmax`` and ``nll_loss``, as the plain
  head's ``cross_entropy`` runs them; kept per token: the largest logit and the log-sum of exponentials
  after it, from which backward rebuilds any block of log-probabilities exactly as ``log_softmax`` made them;
- backward, for the hidden states, the same chunks of tokens: each hidden state's gradient is one matmul over
  the whole vocabulary, rounded once, as the plain head's;
- backward, for a trained output weight (and bias), blocks of the vocabulary (an eighth of it at most) over
  all tokens: each row of the weight's gradient is one matmul over the whole batch, rounded once, as the
  plain head's. Nothing is accumulated across tiles: no fp32 copy of the weight's gradient. The price: the
  logits are computed again for each of the two (five head matmuls per step instead of three; four with a
  frozen output weight).

What backward needs (hidden states, weight, bias, targets, two fp32 values per token) goes through
``ctx.save_for_backward``, so compress/offload/the meter see it. The scoring pass of a sample-selecting
strategy (no grad) runs the forward chunks directly and also returns per-sample statistics.

torch's ``linear_cross_entropy`` is not used: with ``reduction="none"`` it returns per-token losses in the
input dtype (issue 31: bf16 losses on bf16 SmolLM2, 5e-4 off at the first step), and its backward with a
trained weight peaks above the plain head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowmem_train import Strategy, StrategyError, Touch
from lowmem_train.causal_lm import (IGNORE_INDEX, LogitSettings, LossHeadOutput, causal_lm_of, logit_settings,
                                    per_sample, set_loss_head, shifted_targets, statistics_wanted, token_statistics,
                                    unsupported_reason)

FP32_BYTES = 4
MIN_BLOCKS = 8  # backward splits the vocabulary at least this far (rows_per_block)


@dataclass
class ChunkedCEOptions:
    """Causal-LM loss from the last hidden states in tiles of the logits (no batch x seq x vocab logits).

    ``chunk_bytes``: the most bytes of fp32 logits one tile holds: forward, that many bytes' worth of tokens
    over the whole vocabulary (at least one token); backward also blocks of the vocabulary over all tokens.
    Tiles split the batch evenly; a batch whose fp32 logits fit is one tile::

        lowmem-train recipe=llama_finetune strategy=chunked_ce strategy.chunked_ce.chunk_bytes=268435456
    """

    chunk_bytes: int = 64 * 2**20  # fp32 logits per tile: 64 MiB

    def validate(self, strategy: str) -> None:
        if self.chunk_bytes <= 0:
            raise StrategyError(f"strategy '{strategy}': chunk_bytes={self.chunk_bytes} must be > 0 "
                                "(bytes of fp32 logits per tile)")


def even_part(total: int, most: int) -> int:
    """The size of the fewest equal parts of ``total`` no larger than ``most``: a batch just over one tile
    is two halves, not a full tile and a sliver (which would hold as much as no tiling)."""
    parts = -(-total // most)
    return max(1, -(-total // max(1, parts)))


def tokens_per_chunk(chunk_bytes: int, tokens: int, vocab: int) -> int:
    return even_part(tokens, max(1, chunk_bytes // (FP32_BYTES * vocab)))


def rows_per_block(chunk_bytes: int, tokens: int, vocab: int) -> int:
    """At most an eighth of the vocabulary: with the weight's gradient, which the plain head makes too, a
    block stays well below the batch's whole logit gradient, which the plain head holds then."""
    return even_part(vocab, max(1, min(chunk_bytes // (FP32_BYTES * max(1, tokens)), vocab // MIN_BLOCKS)))


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 settings: LogitSettings) -> torch.Tensor:
    """A tile's logits in fp32: the matmul in the weight's dtype, as the plain head's, then its scale and
    soft-cap, in place (no second tile)."""
    logits = nn.functional.linear(hidden, weight, bias).float()
    if settings.scale != 1.0:
        logits.mul_(settings.scale)
    if settings.softcap is not None:
        logits.div_(settings.softcap).tanh_().mul_(settings.softcap)
    return logits


@torch.no_grad()
def chunked_loss(hidden, weight, bias, targets, chunk_bytes: int, settings: LogitSettings, with_stats: bool):
    """Per-token cross-entropy (fp32), each token's largest logit ``top`` and ``log_sum`` (``log_softmax``
    computes (logit - top) - log_sum), and per-token statistics if asked, chunk by chunk."""
    tokens = len(targets)
    loss = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    top, log_sum = torch.empty_like(loss), torch.empty_like(loss)
    stats: dict[str, list[torch.Tensor]] = {}
    step = tokens_per_chunk(chunk_bytes, tokens, weight.shape[0])
    for start in range(0, tokens, step):
        rows = slice(start, start + step)
        logits = chunk_logits(hidden[rows], weight, bias, settings)
        target = targets[rows]
        if with_stats:
            for key, value in token_statistics(logits, target).items():
                stats.setdefault(key, []).append(value)
        top[rows], top_index = logits.max(1)
        log_probs = torch.log_softmax(logits, 1)  # the plain head's cross_entropy: log_softmax, then nll_loss
        del logits
        log_sum[rows] = -log_probs.gather(1, top_index.unsqueeze(1)).squeeze(1)  # (top - top) - log_sum
        loss[rows] = nn.functional.nll_loss(log_probs, target, reduction="none", ignore_index=IGNORE_INDEX)
    return loss, top, log_sum, {key: torch.cat(values) for key, values in stats.items()} if with_stats else None


def logit_grad(hidden, weight, bias, targets, top, log_sum, loss_grad, settings: LogitSettings) -> torch.Tensor:
    """d(sum of token losses * ``loss_grad``) / d(hidden @ weight.T + bias) for the vocabulary rows in
    ``weight`` (``targets`` counted from the first of them), fp32: the log-probabilities rebuilt as the
    forward's log_softmax made them, softmax minus one-hot, back through the soft-cap and scale. In place:
    one fp32 tile (two with a soft-cap)."""
    grad = chunk_logits(hidden, weight, bias, settings)
    cap_slope = None if settings.softcap is None else 1 - (grad / settings.softcap).square()  # d cap*tanh(u/cap)/du
    grad.sub_(top.unsqueeze(1)).sub_(log_sum.unsqueeze(1)).exp_().mul_(loss_grad.unsqueeze(1))
    in_block = (targets >= 0) & (targets < grad.shape[1])
    grad.scatter_add_(1, targets.clamp(0, grad.shape[1] - 1).unsqueeze(1), -(loss_grad * in_block).unsqueeze(1))
    if cap_slope is not None:
        grad.mul_(cap_slope)
    return grad.mul_(settings.scale) if settings.scale != 1.0 else grad


def hidden_grad(hidden, weight, bias, targets, top, log_sum, loss_grad, chunk_bytes: int,
                settings: LogitSettings) -> torch.Tensor:
    """The hidden states' gradient, chunks of tokens over the whole vocabulary: one matmul per hidden state."""
    grad_hidden = torch.empty_like(hidden)
    step = tokens_per_chunk(chunk_bytes, len(targets), weight.shape[0])
    for start in range(0, len(targets), step):
        rows = slice(start, start + step)
        low = logit_grad(hidden[rows], weight, bias, targets[rows], top[rows], log_sum[rows], loss_grad[rows],
                         settings).to(weight.dtype)  # what the plain head's linear backward gets
        grad_hidden[rows] = low @ weight
    return grad_hidden


def weight_grads(hidden, weight, bias, targets, top, log_sum, loss_grad, chunk_bytes: int, settings: LogitSettings,
                 needs_weight: bool, needs_bias: bool):
    """The output weight's and bias's gradients, blocks of the vocabulary over all tokens: one matmul per row."""
    grad_weight = torch.empty_like(weight) if needs_weight else None
    grad_bias = torch.empty_like(bias) if needs_bias else None
    width = rows_per_block(chunk_bytes, len(targets), weight.shape[0])
    for start in range(0, weight.shape[0], width):
        cols = slice(start, start + width)
        low = logit_grad(hidden, weight[cols], None if bias is None else bias[cols], targets - start, top, log_sum,
                         loss_grad, settings).to(weight.dtype)
        if grad_weight is not None:
            torch.mm(low.t(), hidden, out=grad_weight[cols])
        if grad_bias is not None:
            grad_bias[cols] = low.sum(0)
    return grad_weight, grad_bias


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy (fp32) of ``softcap(scale * (hidden @ weight.T + bias))``, never holding more
    than ``chunk_bytes`` of fp32 logits in a tile; backward recomputes them (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_bytes: int, settings: LogitSettings):
        loss, top, log_sum, _ = chunked_loss(hidden, weight, bias, targets, chunk_bytes, settings, with_stats=False)
        ctx.save_for_backward(hidden, weight, bias, targets, top, log_sum)
        ctx.chunk_bytes, ctx.settings = chunk_bytes, settings
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, top, log_sum = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        per_token = (targets, top, log_sum, grad_loss.float() * (targets != IGNORE_INDEX))
        grad_hidden = grad_weight = grad_bias = None
        if needs_hidden:
            grad_hidden = hidden_grad(hidden, weight, bias, *per_token, ctx.chunk_bytes, ctx.settings)
        if needs_weight or needs_bias:  # after the hidden states' tiles are gone
            grad_weight, grad_bias = weight_grads(hidden, weight, bias, *per_token, ctx.chunk_bytes, ctx.settings,
                                                  needs_weight, needs_bias)
        return grad_hidden, grad_weight, grad_bias, None, None, None


class ChunkedCrossEntropyHead(nn.Module):
    """Loss head with the plain head's output, never holding more than ``chunk_bytes`` of fp32 logits."""

    def __init__(self, settings: LogitSettings, chunk_bytes: int):
        super().__init__()
        self.settings, self.chunk_bytes = settings, chunk_bytes

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, output_embeddings: nn.Module) -> LossHeadOutput:
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} for hidden states {tuple(hidden.shape)}")
        targets = shifted_targets(labels)
        flat, flat_targets = hidden.flatten(0, 1), targets.flatten()
        weight, bias = output_embeddings.weight, getattr(output_embeddings, "bias", None)
        if not torch.is_grad_enabled():
            per_token, _, _, stats = chunked_loss(flat, weight, bias, flat_targets, self.chunk_bytes, self.settings,
                                                  with_stats=statistics_wanted())
            return per_sample(per_token, targets, stats)
        device = flat.device.type
        if torch.is_autocast_enabled(device):  # the plain head's linear runs in the autocast dtype: so do all tiles
            dtype = torch.get_autocast_dtype(device)
            flat, weight, bias = flat.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            per_token = ChunkedLinearCrossEntropy.apply(flat, weight, bias, flat_targets, self.chunk_bytes,
                                                        self.settings)
        stats = None
        if statistics_wanted():
            stats = chunked_loss(flat.detach(), weight, bias, flat_targets, self.chunk_bytes, self.settings, True)[3]
        return per_sample(per_token, targets, stats)

    def extra_repr(self) -> str:
        return f"chunk_bytes={self.chunk_bytes}, scale={self.settings.scale}, softcap={self.settings.softcap}"


class ChunkedCE(Strategy):
    exact = True
    order = 10  # swaps the loss head, independent of what other strategies do inside the decoder
    Options = ChunkedCEOptions
    summary = "causal-LM loss from the hidden states in tiles of the logits: no batch x seq x vocab logits"

    def plan(self, model: nn.Module) -> list[Touch]:
        causal_lm = causal_lm_of(model)
        if causal_lm is None:
            raise StrategyError(f"strategy '{self.name}': {unsupported_reason(model)}; it needs a Hugging Face "
                                "*ForCausalLM (recipe=llama_finetune)")
        weight = causal_lm.get_output_embeddings().weight
        chunk_bytes = self.options.chunk_bytes
        action = (f"chunked cross-entropy over {tuple(weight.shape)} output embedding, at most "
                  f"{chunk_bytes / 2**20:g} MiB of fp32 logits at a time "
                  f"({max(1, chunk_bytes // (FP32_BYTES * weight.shape[0]))} tokens per forward chunk at most)")
        return [Touch("loss_head", "loss head", action)]

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        causal_lm = causal_lm_of(model)
        set_loss_head(model, ChunkedCrossEntropyHead(logit_settings(causal_lm.config), self.options.chunk_bytes))

    def estimate_problem(self) -> str | None:
        return None  # tests/test_estimate.py checks its fake step against a real one

"""Skip the backward of confident samples, with a threshold that adapts to an allowed gradient error.

After ``warmup_steps`` of full backprop, a sample whose confidence (top-1 probability, or the margin between
the top-2 probabilities) is above the threshold gets weight 0 in the loss. The threshold is not a
constant: after every batch it is recomputed from the last ``window`` samples as the lowest confidence
above which the skipped samples would carry at most ``max_grad_error`` of the window's logit-gradient norm
(for cross-entropy a sample's logit gradient is softmax - onehot, whose norm follows from its loss and its
probabilities), and at most ``max_skip`` of its samples. ``selection=random`` skips as many samples per
batch as the confidence rule would, chosen at random (its own generator): the baseline it must beat.

The loss is the sum of the kept samples' losses over the batch size, i.e. the full-batch mean with the
skipped samples' terms removed, so the gradient error is exactly what the bound measures. Each micro-batch
(gradient accumulation) and each DDP rank decides for its own samples; the epoch is never cut short.
The bound holds on the window; a batch more confident than the window (the model improving) may exceed it.

What it saves, honestly: the skipped samples contribute nothing to the gradient, but autograd still runs
the backward over the whole batch (a zero upstream gradient is multiplied through every layer), so in this
form the share of skipped samples is the share of per-sample backward work a batch-compacting backward
could drop, not a measured speed-up. See the README section for the core change that makes it real.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import lightning as L
import torch

from lowmem_train import Strategy, StrategyError

CRITERIA = ("margin", "top1")
SELECTIONS = ("confidence", "random")


@dataclass
class SkipBackwardOptions:
    criterion: str = "margin"        # margin: top-1 minus top-2 probability; top1: top-1 probability
    max_grad_error: float = 0.1      # share of the logit-gradient norm the skipped samples may carry, in (0, 1)
    max_skip: float = 0.9            # never skip more than this share of the window, in [0, 1)
    warmup_steps: int = 20           # optimizer steps of full backprop first (statistics are gathered)
    window: int = 1024               # recent samples the threshold is computed from
    selection: str = "confidence"    # confidence, or random: the same count of random samples (baseline)
    seed: int = 0                    # the random selection's own generator

    def validate(self, strategy: str) -> None:
        if self.criterion not in CRITERIA:
            raise StrategyError(f"strategy '{strategy}': criterion={self.criterion}; valid: {', '.join(CRITERIA)}")
        if self.selection not in SELECTIONS:
            raise StrategyError(f"strategy '{strategy}': selection={self.selection}; valid: {', '.join(SELECTIONS)}")
        if not 0.0 < self.max_grad_error < 1.0:
            raise StrategyError(f"strategy '{strategy}': max_grad_error={self.max_grad_error} is outside (0, 1)")
        if not 0.0 <= self.max_skip < 1.0:
            raise StrategyError(f"strategy '{strategy}': max_skip={self.max_skip} is outside [0, 1)")
        if self.warmup_steps < 0 or self.window < 1:
            raise StrategyError(f"strategy '{strategy}': warmup_steps must be >= 0 and window >= 1")


class SkipState:
    """Threshold and statistics shared by the strategy (which skips) and its callback (which adapts)."""

    def __init__(self, options: SkipBackwardOptions):
        self.options = options
        self.threshold = 1.0  # skip samples whose confidence is strictly above it: none until adapted
        self.window: deque[tuple[float, float]] = deque(maxlen=options.window)
        self.generator = torch.Generator().manual_seed(options.seed)
        self.warming_up = options.warmup_steps > 0
        self.skipped = self.seen = 0  # totals, for the share of backward work skipped
        self.last: dict[str, float] = {}

    def adapt(self) -> None:
        """The lowest threshold whose skipped samples stay within max_grad_error and max_skip of the window."""
        confidence, norm = torch.tensor(list(self.window), dtype=torch.float64).unbind(1)
        order = confidence.argsort(descending=True)
        share = norm[order].cumsum(0) / norm.sum().clamp_min(1e-12)
        allowed = int((share <= self.options.max_grad_error).sum())
        count = min(allowed, int(self.options.max_skip * len(order)))  # < len(order) as max_skip < 1
        self.threshold = float(confidence[order[count]])  # the count most confident lie strictly above it

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "window": list(self.window), "generator": self.generator.get_state(),
                "warming_up": self.warming_up, "skipped": self.skipped, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = state["threshold"]
        self.window = deque(state["window"], maxlen=self.options.window)
        self.generator.set_state(state["generator"])
        self.warming_up, self.skipped, self.seen = state["warming_up"], state["skipped"], state["seen"]


def confidence_and_grad_norm(per_sample_loss: torch.Tensor, logits: torch.Tensor, criterion: str):
    """Per-sample confidence and the norm of d(cross-entropy)/d(logits) = softmax - onehot(label).

    ||p - e_y||^2 = 1 - 2 p_y + ||p||^2 with p_y = exp(-loss), so no labels are needed. When p_y > 1/2 the
    label is the arg-max and the norm is taken from the probabilities alone ((1 - p_max)^2 plus the other
    squares, in float64): the formula would cancel there, below the float32 loss's rounding.
    """
    probs = logits.detach().double().softmax(-1)
    top2 = probs.topk(2, dim=-1).values
    confidence = top2[:, 0] - top2[:, 1] if criterion == "margin" else top2[:, 0]
    p_label = (-per_sample_loss.detach().double()).exp()
    squares = probs.pow(2).sum(-1)
    confident = (1 - top2[:, 0]).pow(2) + squares - top2[:, 0].pow(2)
    norm_sq = torch.where(p_label > 0.5, confident, 1 - 2 * p_label + squares)
    return confidence, norm_sq.clamp_min(0).sqrt()


class AdaptThreshold(L.Callback):
    """Warm-up, threshold adaptation and per-step logging; its state_dict puts the threshold in checkpoints."""

    def __init__(self, state: SkipState):
        self.state = state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.state.warming_up = trainer.global_step < self.state.options.warmup_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = self.state
        if state.window:
            state.adapt()
        seen = max(state.seen, 1)
        pl_module.log_dict({
            "skip_backward/skip_rate": state.last.get("skip_rate", 0.0),
            "skip_backward/grad_error": state.last.get("grad_error", 0.0),
            "skip_backward/threshold": state.threshold,
            "skip_backward/skipped_share": state.skipped / seen,  # over all steps so far, warm-up included
        }, on_step=True, on_epoch=False)

    def state_dict(self):
        return self.state.state_dict()

    def load_state_dict(self, state_dict):
        self.state.load_state_dict(state_dict)


class SkipBackward(Strategy):
    exact = False
    Options = SkipBackwardOptions
    summary = "drops confident samples from the loss (adaptive threshold within a gradient-error bound)"

    def __init__(self, options=None):
        super().__init__(options)
        self.state = SkipState(self.options)

    def callbacks(self) -> list:
        return [AdaptThreshold(self.state)]

    def reduce_loss(self, per_sample_loss, logits):
        if logits.dim() != 2 or per_sample_loss.shape != logits.shape[:1]:
            raise StrategyError("strategy 'skip_backward' needs a classification recipe (one loss per sample and "
                                f"logits of shape batch x classes, got {tuple(logits.shape)}): use recipe=cifar_resnet "
                                "or recipe=imagenet_resnet")
        state = self.state
        confidence, norm = confidence_and_grad_norm(per_sample_loss, logits, self.options.criterion)
        skip = torch.zeros_like(confidence, dtype=torch.bool)
        if not state.warming_up:
            skip = confidence > state.threshold
            if self.options.selection == "random":
                chosen = torch.randperm(len(skip), generator=state.generator)[: int(skip.sum())]
                skip = torch.zeros_like(skip)
                skip[chosen.to(skip.device)] = True
        state.window.extend(zip(confidence.tolist(), norm.tolist()))
        state.skipped += int(skip.sum())
        state.seen += len(skip)
        state.last = {"skip_rate": float(skip.float().mean()),
                      "grad_error": float(norm[skip].sum() / norm.sum().clamp_min(1e-12))}
        keep = (~skip).to(per_sample_loss.dtype)
        return (per_sample_loss * keep).sum() / len(per_sample_loss)

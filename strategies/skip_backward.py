"""Leave confident samples out of the backward, with a threshold that adapts to an allowed gradient error.

The trainer first scores the whole batch in a no-grad forward; after ``warmup_steps`` of full backprop, a
sample whose confidence there (top-1 probability, or the margin between the top-2 probabilities) is above
the threshold is left out of the graph-building forward and the backward, so their compute and activation
memory are saved for real (the scoring pass costs one forward without saved activations). The threshold
is not a constant: after every step it is recomputed from the last ``window`` samples (of every DDP rank)
as the lowest confidence above which the skipped samples would carry at most ``max_grad_error`` of the
window's logit-gradient norm (for cross-entropy a sample's logit gradient is softmax - onehot, whose norm
follows from its loss and its probabilities), and at most ``max_skip`` of its samples. ``selection=random``
skips as many samples per batch as the confidence rule would, chosen at random (its own generator): the
baseline it must beat.

A language model's loss head gives the same figures per sample (``sample_stats``: mean token confidence and
the norm of the sample's logit gradient), computed chunk by chunk when the logits are never materialised.

The loss is the kept samples' loss sums over the whole batch's count, i.e. the full-batch mean with the
skipped samples' terms removed, so the gradient error is exactly what the bound measures. Each micro-batch
(gradient accumulation) decides for its own samples; the epoch is never cut short. The bound holds on the
window; a batch more confident than the window (the model improving) may exceed it.
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
    """Leave confident samples out of the backward; the threshold adapts to a gradient-error bound.

    ``criterion``: margin (top-1 minus top-2 probability) or top1 (top-1 probability). ``max_grad_error``:
    share of the logit-gradient norm skipped samples may carry, in (0, 1). ``max_skip``: at most this share of
    recent samples skipped, in [0, 1). ``warmup_steps``: optimizer steps of full backprop first. ``window``:
    recent samples the threshold is computed from. ``selection``: confidence, or random (as many random
    samples as the confidence rule would skip). ``seed``: generator of the random selection (the model's RNG
    stream is untouched)::

        lowmem-train strategy=skip_backward
        lowmem-train strategy=skip_backward strategy.skip_backward.selection=random   # random baseline, same share
    """

    criterion: str = "margin"        # margin: top-1 minus top-2 probability; top1: top-1 probability
    max_grad_error: float = 0.1      # share of the logit-gradient norm the skipped samples may carry, in (0, 1)
    max_skip: float = 0.9            # never skip more than this share of the window or a batch, in [0, 1)
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
        self.skipped = self.seen = 0  # totals, for the share of samples left out of the backward
        self.pending: torch.Tensor | None = None  # the last batch's statistics, for the callback

    def adapt(self) -> None:
        """The lowest threshold whose skipped samples stay within max_grad_error and max_skip of the window."""
        confidence, norm = torch.tensor(list(self.window), dtype=torch.float64).unbind(1)
        order = confidence.argsort(descending=True)
        share = norm[order].cumsum(0) / norm.sum().clamp_min(1e-12)
        allowed = int((share <= self.options.max_grad_error).sum())
        count = min(allowed, int(self.options.max_skip * len(order)))  # < len(order) as max_skip < 1
        self.threshold = float(confidence[order[count]])  # the count most confident lie strictly above it

    def record(self, scored: torch.Tensor) -> dict[str, float]:
        """Add a step's (confidence, gradient norm, skipped) rows to the window and adapt; the step's figures."""
        confidence, norm, skipped = scored.double().cpu().unbind(1)
        self.window.extend(zip(confidence.tolist(), norm.tolist()))
        self.adapt()
        self.skipped += int(skipped.sum())
        self.seen += len(skipped)
        return {"skip_rate": float(skipped.mean()),
                "grad_error": float((norm * skipped).sum() / norm.sum().clamp_min(1e-12)),
                "threshold": self.threshold,
                "skipped_share": self.skipped / self.seen}  # over all steps so far, warm-up included

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
    """Warm-up, threshold adaptation (on every rank's samples) and per-step logging; its state_dict puts the
    threshold in checkpoints."""

    def __init__(self, state: SkipState):
        self.state = state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.state.warming_up = trainer.global_step < self.state.options.warmup_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = self.state
        if state.pending is None:
            return
        scored = state.pending  # (samples, 3): confidence, gradient norm, skipped
        if trainer.world_size > 1:  # equal batch sizes per rank: the distributed sampler pads
            scored = pl_module.all_gather(scored).reshape(-1, 3)
        state.pending = None
        pl_module.log_dict({f"skip_backward/{k}": v for k, v in state.record(scored).items()},
                           on_step=True, on_epoch=False)

    def state_dict(self):
        return self.state.state_dict()

    def load_state_dict(self, state_dict):
        self.state.load_state_dict(state_dict)


class SkipBackward(Strategy):
    exact = False
    Options = SkipBackwardOptions
    summary = "back-propagates only samples below an adaptive confidence threshold (gradient-error bound)"

    def __init__(self, options=None):
        super().__init__(options)
        self.state = SkipState(self.options)

    def estimate_problem(self) -> str | None:
        return "it back-propagates the samples it picks by their loss, which fake tensors do not have"

    def callbacks(self) -> list:
        return [AdaptThreshold(self.state)]

    def select_samples(self, scored):
        state = self.state
        confidence, norm = self.confidence_and_grad_norm(scored)
        skip = torch.zeros_like(confidence, dtype=torch.bool)
        if not state.warming_up:
            count = min(int((confidence > state.threshold).sum()), int(self.options.max_skip * len(skip)))
            if self.options.selection == "random":
                chosen = torch.randperm(len(skip), generator=state.generator)[:count]
            else:
                chosen = confidence.argsort(descending=True)[:count]
            skip[chosen.to(skip.device)] = True
        state.pending = torch.stack([confidence, norm, skip.double()], 1)
        return ~skip

    def confidence_and_grad_norm(self, scored):
        """From classification logits, or from the per-sample statistics of a loss head that has no logits
        (a language model's: mean token confidence, norm of the sample's logit gradient)."""
        logits, stats = scored.logits, scored.sample_stats
        if logits is not None and logits.dim() == 2 and scored.per_sample_loss.shape == logits.shape[:1]:
            return confidence_and_grad_norm(scored.per_sample_loss, logits, self.options.criterion)
        if stats is not None and f"confidence_{self.options.criterion}" in stats and "logit_grad_norm" in stats:
            return stats[f"confidence_{self.options.criterion}"].double(), stats["logit_grad_norm"].double()
        shape = "none" if logits is None else tuple(logits.shape)
        raise StrategyError("strategy 'skip_backward' needs logits of shape batch x classes (a classification recipe) "
                            f"or per-sample confidence statistics from the model's loss head (got logits {shape}): "
                            "use recipe=cifar_resnet, recipe=imagenet_resnet or recipe=llama_finetune")

    def report(self) -> dict:
        state = self.state
        return {"skipped_share": state.skipped / max(state.seen, 1), "samples_scored": state.seen,
                "threshold": state.threshold}

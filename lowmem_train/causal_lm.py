"""The causal-LM loss inside the model: a swappable loss head on any Hugging Face ``*ForCausalLM``.

Hugging Face computes the loss from full ``batch x seq x vocab`` logits. Here the model the trainer sees
(``CausalLMWithLossHead``) runs the decoder to its last hidden states and hands them, with the labels, to a
loss head submodule that returns per-sample sums of token losses and target-token counts. Because the loss
is computed inside the model's forward, saved-tensor stages (compress, offload, the meter) cover it, and a
strategy can swap the head (``chunked_ce`` computes it chunk by chunk, never holding the full logits).

Labels follow Hugging Face's convention: unshifted (the head shifts them), ``-100`` for positions without a
target (prompt masking, padding).
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

IGNORE_INDEX = -100
# Config keys that change the logits after the output embedding: multiplied in, divided in, and the final
# soft-cap (cap * tanh(logits / cap)); any other such transform cannot be reproduced and is refused.
LOGIT_MULTIPLIERS = ("logit_scale", "lm_head_multiplier")  # Cohere, Falcon-H1
LOGIT_DIVISORS = ("logits_scaling",)  # Granite
LOGIT_SOFTCAP = "final_logit_softcapping"  # Gemma 2/3
UNSUPPORTED_LOGIT_KEYS = ("dim_model_base", "mup_width_multiplier")  # MiniCPM, Phi-3-small: rescaled hidden states

_STATISTICS_WANTED: ContextVar[bool] = ContextVar("lowmem_sample_statistics", default=False)


@contextmanager
def sample_statistics() -> Iterator[None]:
    """Ask loss heads for per-sample statistics (the trainer's scoring pass, for sample selection)."""
    token = _STATISTICS_WANTED.set(True)
    try:
        yield
    finally:
        _STATISTICS_WANTED.reset(token)


def statistics_wanted() -> bool:
    return _STATISTICS_WANTED.get()


@dataclass
class LossHeadOutput:
    """Per-sample loss sums (fp32), target-token counts and, when asked for, per-sample statistics."""

    per_sample_loss: torch.Tensor
    per_sample_count: torch.Tensor
    sample_stats: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class LogitSettings:
    """What the model does to the output embedding's result: logits = softcap(scale * (h W^T + b))."""

    scale: float = 1.0
    softcap: float | None = None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot get a loss head (not a causal LM, a logit transform we cannot reproduce), or None."""
    config = getattr(model, "config", None)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or output is None:
        return f"{type(model).__name__} is not a causal language model (no output embedding)"
    if getattr(config, "is_encoder_decoder", False):  # T5, BART: unshifted labels, a decoder fed by an encoder
        return f"{type(model).__name__} is an encoder-decoder model, not a causal language model"
    if decoder_of(model) is model:
        return f"{type(model).__name__} has no separate decoder to run to the last hidden states"
    if not isinstance(getattr(output, "weight", None), torch.Tensor) or output.weight.dim() != 2:
        return f"its output embedding {type(output).__name__} has no 2-D weight"
    for key in UNSUPPORTED_LOGIT_KEYS:
        if getattr(config, key, None) is not None:
            return f"{type(model).__name__} rescales its hidden states or logits (config {key}), which is not supported"
    return None


def decoder_of(causal_lm: nn.Module) -> nn.Module:
    """The module that returns the last hidden states: ``get_decoder()`` (which also sees through a PEFT
    wrapper to the adapted decoder), else Hugging Face's ``base_model``."""
    if hasattr(causal_lm, "get_decoder"):
        return causal_lm.get_decoder()
    return getattr(causal_lm, "base_model", causal_lm)


def logit_settings(config) -> LogitSettings:
    scale = 1.0
    for key in LOGIT_MULTIPLIERS:
        scale *= float(getattr(config, key, None) or 1.0)
    for key in LOGIT_DIVISORS:
        scale /= float(getattr(config, key, None) or 1.0)
    softcap = getattr(config, LOGIT_SOFTCAP, None)
    return LogitSettings(scale, float(softcap) if softcap else None)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the hidden states: position t predicts labels[t + 1]; the last none."""
    return nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def transform_logits(logits: torch.Tensor, settings: LogitSettings) -> torch.Tensor:
    if settings.scale != 1.0:
        logits = logits * settings.scale
    if settings.softcap is not None:
        logits = torch.tanh(logits / settings.softcap) * settings.softcap
    return logits


@torch.no_grad()
def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token confidence (top-1 probability, top-1 minus top-2) and the squared norm of the token's
    cross-entropy gradient w.r.t. its logits (softmax - onehot), from fp32 logits (tokens x vocab).
    Tokens without a target get zeros."""
    probs = logits.float().softmax(-1)
    top2 = probs.topk(2, dim=-1).values
    valid = targets != IGNORE_INDEX
    probs.scatter_add_(1, targets.clamp_min(0).unsqueeze(1), -valid.to(probs.dtype).unsqueeze(1))
    stats = {"confidence_top1": top2[:, 0], "confidence_margin": top2[:, 0] - top2[:, 1],
             "logit_grad_sq": probs.pow(2).sum(-1)}
    return {key: value * valid for key, value in stats.items()}


def per_sample(per_token_loss: torch.Tensor, targets: torch.Tensor,
               token_stats: dict[str, torch.Tensor] | None) -> LossHeadOutput:
    """Sums over each sample's target tokens; statistics become per-sample means (confidence) and the norm
    of the sample's logit gradient (``logit_grad_norm``)."""
    batch = targets.shape[0]
    count = (targets != IGNORE_INDEX).view(batch, -1).sum(1)
    stats = None
    if token_stats is not None:
        sums = {key: value.view(batch, -1).sum(1) for key, value in token_stats.items()}
        stats = {"confidence_top1": sums["confidence_top1"] / count.clamp_min(1),
                 "confidence_margin": sums["confidence_margin"] / count.clamp_min(1),
                 "logit_grad_norm": sums["logit_grad_sq"].sqrt()}
    return LossHeadOutput(per_token_loss.float().view(batch, -1).sum(1), count, stats)


class CausalLMLossHead(nn.Module):
    """The plain loss head: the whole sequence's logits at once, in fp32 as Hugging Face's loss does."""

    def __init__(self, settings: LogitSettings = LogitSettings()):
        super().__init__()
        self.settings = settings

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, output_embeddings: nn.Module) -> LossHeadOutput:
        targets = shifted_targets(labels).flatten()
        logits = transform_logits(output_embeddings(hidden).float(), self.settings).flatten(0, 1)
        per_token = nn.functional.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)
        stats = token_statistics(logits, targets) if statistics_wanted() else None
        return per_sample(per_token, targets.view(labels.shape), stats)


def loss_forward(causal_lm: nn.Module, head: nn.Module, labels: torch.Tensor, **inputs) -> LossHeadOutput:
    """Decoder to the last hidden states, then the loss head (the output embedding passed, not owned)."""
    inputs.setdefault("use_cache", False)
    hidden = decoder_of(causal_lm)(**inputs).last_hidden_state
    return head(hidden, labels, causal_lm.get_output_embeddings())


class CausalLMWithLossHead(nn.Module):
    """A Hugging Face ``*ForCausalLM`` whose forward with ``labels`` returns a ``LossHeadOutput``.

    The causal LM stays a submodule (``causal_lm``: state_dict keys are its own under ``causal_lm.``, PEFT can
    wrap it) and its output embedding is registered once, there. Without labels the forward is the causal
    LM's own (logits, generation).
    """

    main_input_name = "input_ids"

    def __init__(self, causal_lm: nn.Module):
        reason = unsupported_reason(causal_lm)
        if reason is not None:
            raise ValueError(reason)
        super().__init__()
        self.causal_lm = causal_lm
        self.loss_head = CausalLMLossHead(logit_settings(causal_lm.config))

    @property
    def config(self):
        return self.causal_lm.config

    def get_input_embeddings(self) -> nn.Module:
        return self.causal_lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **inputs):
        if labels is None:
            return self.causal_lm(input_ids=input_ids, **inputs)
        return loss_forward(self.causal_lm, self.loss_head, labels, input_ids=input_ids, **inputs)


def record_source(causal_lm: nn.Module, name_or_path: str | None, gguf_file: str | None, dtype: torch.dtype) -> None:
    """Note where the weights were loaded from (a local directory made absolute), for files that must name
    their base: a saved adapter. A GGUF base is not visible in the transformers config, hence this note."""
    if name_or_path and os.path.exists(os.path.expanduser(name_or_path)):
        name_or_path = os.path.abspath(os.path.expanduser(name_or_path))
    causal_lm.lowmem_source = {"base_model_name_or_path": name_or_path, "gguf_file": gguf_file,
                               "dtype": str(dtype).removeprefix("torch.")}


def source_of(causal_lm: nn.Module) -> dict:
    """What ``record_source`` noted; for a model loaded otherwise, what its config says."""
    noted = getattr(causal_lm, "lowmem_source", None)
    if noted is not None:
        return noted
    config = getattr(causal_lm, "config", None)
    return {"base_model_name_or_path": getattr(config, "_name_or_path", None) or None, "gguf_file": None,
            "dtype": str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")}


def causal_lm_of(model: nn.Module) -> nn.Module | None:
    """The causal LM whose loss a head of ``model`` computes (the recipe's wrapper or a bare one), or None."""
    if isinstance(model, CausalLMWithLossHead):
        return model.causal_lm
    return model if unsupported_reason(model) is None else None


def set_loss_head(model: nn.Module, head: nn.Module) -> None:
    """Give ``model`` (a ``CausalLMWithLossHead`` or a bare Hugging Face causal LM) the loss head ``head``.

    A bare causal LM gets it as submodule ``loss_head`` (no parameters: state_dict unchanged) and a forward
    that, called with ``labels``, returns Hugging Face's output with ``loss`` (summed token losses over the
    target tokens, or over ``num_items_in_batch`` as the HF Trainer passes for gradient accumulation) and
    ``logits=None``; without labels it is the model's own forward.
    """
    model.loss_head = head
    if isinstance(model, CausalLMWithLossHead) or "_lowmem_forward_without_loss_head" in model.__dict__:
        return
    model._lowmem_forward_without_loss_head = model.forward
    # A bound method (not a closure) so copy.deepcopy rebinds it to the copy.
    model.forward = types.MethodType(_forward_with_loss_head, model)


def _forward_with_loss_head(self: nn.Module, input_ids: torch.Tensor | None = None, *args, labels=None,
                            num_items_in_batch=None, **inputs):
    if labels is None:
        return self._lowmem_forward_without_loss_head(input_ids, *args, **inputs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if args:
        raise TypeError(f"{type(self).__name__}.forward with labels takes its inputs as keyword arguments")
    inputs.pop("logits_to_keep", None)
    inputs.pop("return_dict", None)
    output = loss_forward(self, self.loss_head, labels, input_ids=input_ids, **inputs)
    divisor = output.per_sample_count.sum() if num_items_in_batch is None else num_items_in_batch
    loss = output.per_sample_loss.sum() / torch.as_tensor(divisor, device=output.per_sample_loss.device).clamp_min(1)
    return CausalLMOutputWithPast(loss=loss, logits=None)


# Sizes a causal LM's config gives as counts: each must be a positive integer for the model to build.
POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings")
SAMPLE_NEW_TOKENS = 32  # how far a sample generation runs past its prompt


def decoder_problem(config) -> str | None:
    """Why a transformers config is no causal decoder with a causal-LM head, or None. Catches what
    ``AutoModelForCausalLM`` would load anyway: an encoder such as BERT (``BertLMHeadModel`` attends both ways
    unless ``is_decoder``), an encoder-decoder, weights saved without a causal-LM head."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        return f"{kind} is an encoder-decoder model, not a causal decoder"
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"{kind} has no causal-LM head in transformers (AutoModelForCausalLM does not take it)"
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return f"{kind} is a bidirectional encoder (is_decoder=false): each position would see the token it predicts"
    causal_classes = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                      for name in ((names,) if isinstance(names, str) else names)}
    saved = getattr(config, "architectures", None) or []
    if saved and not causal_classes & set(saved):
        return f"its weights are a {saved[0]}, which has no causal-LM head"
    return None


def size_problem(config, head_dim_given: bool) -> tuple[str, str] | None:
    """(key, why) for a size in ``config`` that no model can be built with, or None: a count that is not a
    positive integer, heads that do not split ``hidden_size`` (unless ``head_dim`` is given), query heads that
    key/value heads do not divide."""
    for key in POSITIVE_SIZES:
        value = getattr(config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return key, f"must be a positive integer, got {value!r}"
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if hidden and heads and not head_dim_given and hidden % heads:
        divisors = [n for n in range(1, hidden + 1) if hidden % n == 0]
        valid = [n for n in divisors if n % kv_heads == 0] or divisors
        return "num_attention_heads", (f"={heads} does not divide hidden_size={hidden} into equal heads; valid: "
                                       f"{', '.join(map(str, valid[:8]))}{', ...' if len(valid) > 8 else ''}")
    if heads and kv_heads and heads % kv_heads:
        return "num_key_value_heads", f"={kv_heads} does not divide num_attention_heads={heads}"
    return None


@torch.no_grad()
def greedy_answer(causal_lm: nn.Module, tokenizer, prompt: str, max_new_tokens: int = SAMPLE_NEW_TOKENS) -> str:
    """The model's greedy continuation of ``prompt``, as a user turn through the tokenizer's chat template
    when it has one: what ``generate(do_sample=False)`` of a plain transformers model gives, new tokens only,
    special tokens skipped. Train/eval flags and the random streams are left as they were."""
    from .undisturbed import undisturbed

    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    device = next(causal_lm.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with undisturbed(causal_lm, buffers=False):
        causal_lm.eval()
        output = causal_lm.generate(ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)

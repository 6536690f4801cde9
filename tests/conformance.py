"""The conformance check of one strategy combination on one zoo architecture, shared by
tests/test_strategy_registry.py and scripts/conformance_table.py.

``check`` never raises: it returns an ``Outcome`` whose ``status`` is ``ok`` (exact gradients),
``bound`` (a lossy strategy within its declared cosine), ``refused`` (a one-line StrategyError where the
settings expect one) or ``FAIL`` (anything else: a crash, a multi-line or unexpected refusal, a strategy
that applies where it should refuse, a changed forward, gradients off their bound, no memory saved).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass

import torch

from lowmem_train import ExampleBatch, SavedBytesMeter, StrategyError, apply_strategies, get_strategy_class
from strategy_settings import STRATEGY_SETTINGS, applies
from zoo import Arch

EXACT_RTOL, EXACT_ATOL = 1e-4, 1e-6
NOISE = 1e-7  # a parameter gradient this small relative to the whole gradient is rounding noise


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | bound | refused | FAIL
    detail: str = ""
    cosine: float | None = None  # the least per-parameter gradient cosine, for lossy combinations

    def cell(self) -> str:
        if self.status == "bound":
            return f"bound met (cos {self.cosine:.2f})"
        if self.status == "refused":  # the reason, without the strategy's name and the hint after ';'
            reason = re.sub(r"strategy '[^']+': ", "", self.detail).split(";")[0]
            return f"refused ({reason[:90]})"
        return f"{self.status} ({self.detail})" if self.detail else self.status


class Failure(Exception):
    pass


def fail(message: str):
    raise Failure(message)


def check(names: tuple[str, ...], arch: Arch) -> Outcome:
    """Apply ``names`` (with their test options) to ``arch`` and check the outcome against the settings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loop-hook notices, Hugging Face config chatter
            return _check(names, arch)
    except Failure as exc:
        return Outcome("FAIL", str(exc))
    except Exception as exc:  # a crash anywhere (surgery, forward, backward) is a failure, reported in one line
        return Outcome("FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160])


def spec_of(names) -> dict:
    return {name: STRATEGY_SETTINGS[name]["options"] for name in names}


def _check(names: tuple[str, ...], arch: Arch) -> Outcome:
    torch.manual_seed(0)
    base = arch.build()
    # Strategies that change the model's function (an architecture conversion, adapters) are the reference
    # the others in the combination are compared with.
    reference = tuple(n for n in names if STRATEGY_SETTINGS[n].get("min_grad_cosine", 0) is None
                      or STRATEGY_SETTINGS[n].get("adapter"))
    compared = [n for n in names if n not in reference]
    model = copy.deepcopy(base)
    params_before = dict(model.named_parameters())
    batch = arch.make_batch()
    example = ExampleBatch(loss=lambda m: arch.loss(m, batch), build_optimizer=torch.optim.AdamW,
                           device=torch.device("cpu"))  # for strategies that measure first (auto)
    try:
        apply_strategies(model, spec_of(names), example=example)
    except StrategyError as exc:
        return _refusal(names, arch, str(exc))
    if apply_strategies(model, spec_of(names), example=example) is not model:
        fail("applying again returned another model")
    if reference:
        ref = apply_strategies(copy.deepcopy(base), spec_of(reference), example=example)
    else:
        ref = base
    adapter = any(STRATEGY_SETTINGS[n].get("adapter") for n in names)
    if adapter:
        _check_adapter(base, model, params_before, arch)
    else:
        if dict(model.named_parameters()).keys() != params_before.keys():
            fail("parameter names changed")
        replaced = [n for n, p in model.named_parameters() if p is not params_before[n]]
        if replaced:
            fail(f"replaced parameter {replaced[0]}")
    try:
        expected_loss, expected, expected_bytes = _first_step(ref, arch, batch)
        loss, got, saved_bytes = _first_step(model, arch, batch)
    except StrategyError as exc:  # what only the first forward can see (a block that changes shapes)
        return _refusal(names, arch, f"at the first forward: {exc}")
    if not applies(names, arch.traits):
        fail("applied where the settings expect a refusal")
    if not torch.allclose(loss, expected_loss, rtol=1e-4, atol=1e-5):
        fail(f"forward changed: loss {loss.item():.6f} vs {expected_loss.item():.6f}")
    frozen = {n for n, p in ref.named_parameters() if p.requires_grad} - {n for n, p in model.named_parameters()
                                                                          if p.requires_grad}
    if adapter and got.keys() != {n for n, p in model.named_parameters() if p.requires_grad}:
        fail("an adapter got no gradient (its layer's forward is never called)")
    if got.keys() != expected.keys() - frozen:
        fail(f"gradients of other parameters: {sorted(got.keys() ^ (expected.keys() - frozen))[:3]}")
    if any(STRATEGY_SETTINGS[n].get("saves_activations") for n in compared) and saved_bytes >= expected_bytes:
        fail(f"saves nothing: {saved_bytes} saved bytes vs {expected_bytes}")
    if not compared:
        return Outcome("ok", "" if adapter else "converted")
    if all(get_strategy_class(n).exact for n in compared):
        if frozen:
            fail(f"exact strategy froze {sorted(frozen)[0]}")
        for n in expected:
            if not torch.allclose(got[n], expected[n], rtol=EXACT_RTOL, atol=EXACT_ATOL):
                error = (got[n] - expected[n]).abs().max().item()
                fail(f"grad of {n} differs (max abs error {error:.2e})")
        return Outcome("ok")
    bound = min(STRATEGY_SETTINGS[n]["min_grad_cosine"] for n in compared if not get_strategy_class(n).exact)
    total = torch.sqrt(sum(g.double().pow(2).sum() for g in expected.values()))
    # A gradient that is zero up to rounding (a key bias under softmax, a bias before a batch norm) has no
    # direction to keep: it must stay small against the whole gradient instead.
    cosines = {}
    for n in got:
        if expected[n].double().norm() <= NOISE * total:
            if got[n].double().norm() > 1e-3 * total:
                fail(f"grad of {n} is {got[n].norm():.2e} where plain backprop's is zero up to rounding")
            continue
        cosines[n] = torch.nn.functional.cosine_similarity(got[n].double().flatten(), expected[n].double().flatten(),
                                                           dim=0, eps=0).item()
    if not cosines:
        fail("no parameter gradient above rounding noise to compare")
    worst = min(cosines, key=cosines.get)
    if not cosines[worst] >= bound:
        whole = torch.nn.functional.cosine_similarity(torch.cat([got[n].double().flatten() for n in got]),
                                                      torch.cat([expected[n].double().flatten() for n in got]), dim=0)
        fail(f"grad cosine of {worst} is {cosines[worst]:.3f} < {bound} (whole gradient: {whole:.3f})")
    return Outcome("bound", cosine=cosines[worst])


def input_gradient_cosine(spec, arch: Arch) -> float:
    """Cosine between the loss gradient w.r.t. the model's first activation (the images, or the input
    embeddings' output) with ``spec`` applied and without it: whether a lossy strategy keeps the gradient's
    direction through the whole backward, as a parameter-by-parameter bound cannot tell."""
    torch.manual_seed(0)
    base = arch.build()
    batch = arch.make_batch()
    gradients = []
    for model in (base, apply_strategies(copy.deepcopy(base), spec)):
        first = []
        if isinstance(batch, tuple) and batch[0].is_floating_point():  # images
            batch = (batch[0].detach().requires_grad_(), *batch[1:])
            first.append(batch[0])
        else:  # tokens: the output of the (first call of the) input embedding
            def keep(module, args, output):
                if not first:
                    output.retain_grad()
                    first.append(output)
            encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            encoder = model.get_encoder() if encoder_decoder else model  # T5: the encoder's own embedding
            encoder.get_input_embeddings().register_forward_hook(keep)
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arch.loss(model, batch).backward()
        gradients.append(first[0].grad.double().flatten())
    return torch.nn.functional.cosine_similarity(*gradients, dim=0).item()


def _refusal(names, arch: Arch, message: str) -> Outcome:
    if "\n" in message or not message:
        fail(f"refusal is not one line: {message!r}")
    if applies(names, arch.traits):
        fail(f"refused where it should apply: {message}")
    return Outcome("refused", message)


def _first_step(model, arch: Arch, batch, steps: int = 2):
    """Loss, gradients and saved bytes of the first of ``steps`` SGD steps (so a strategy also runs after
    its first-forward initialisation), checking every step's loss and gradients are finite."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.01)
    first = None
    for _ in range(steps):
        torch.manual_seed(7)  # the same dropout masks in the reference and the strategy run
        with SavedBytesMeter(model) as meter:
            loss = arch.loss(model, batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if not torch.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads.values()):
            fail("non-finite loss or gradient")
        if first is None:
            first = loss.detach(), grads, meter.bytes
        optimizer.step()
        optimizer.zero_grad()
    if all(torch.equal(b, p) for b, p in zip(before, trainable)):
        fail(f"{steps} training steps left every parameter unchanged")
    return first


def _check_adapter(base, model, params_before, arch: Arch) -> None:
    """Adapters start at zero, so the forward is the base model's; every original parameter is kept, frozen."""
    batch = arch.make_batch()
    torch.manual_seed(7)
    adapted = arch.loss(model, batch)
    torch.manual_seed(7)
    if not torch.allclose(adapted, arch.loss(base, batch), rtol=1e-4, atol=1e-5):
        fail("adapters changed the forward at initialisation")
    originals = {id(p) for p in params_before.values()}
    kept = [p for p in model.parameters() if id(p) in originals]
    if len(kept) != len(originals) or any(p.requires_grad for p in kept):
        fail("original parameters replaced or left trainable")


def _pairs(first: str, others: str) -> list[tuple[str, str]]:
    return [(first, other) for other in others.split()]


# The combinations the README promises, each as (strategy, strategy).
PAIRS = [
    ("checkpoint", "compress"), ("checkpoint", "offload"), ("selective_checkpoint", "offload"),
    ("compress", "offload"), ("approx_bp", "compress"), ("approx_bp", "checkpoint"),
    *_pairs("chunked_ce", "checkpoint selective_checkpoint compress approx_bp offload velora compile"),
    *_pairs("lora", "checkpoint selective_checkpoint offload chunked_ce compress approx_bp velora"),
    *_pairs("compile", "checkpoint approx_bp offload reversible velora step_in_backward skip_backward"),
]

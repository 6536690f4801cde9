"""Forward-only training (zeroth order, MeZO's SPSA): no backward pass, so no activation is kept at all.

Each step draws ``n_perturbations`` seeds from the strategy's own generator; for each seed s it runs the
batch's loss at theta + eps z and theta - eps z, with z ~ N(0, I) regenerated from (s, parameter) whenever it
is needed and never stored, and takes the projected gradient g = (L+ - L-) / (2 eps). The update is the
configured optimizer's (``optimizer=sgd optimizer.momentum=0 optimizer.nesterov=false``: MeZO's ZO-SGD; ``optimizer=adamw``: an
Adam-style update) stepped one parameter at a time on the estimate mean_s(g_s z_s), so no gradient of the whole
model is ever held either.

The parameters are never written while perturbed: a forward pre-hook on each module that owns a perturbed
parameter hands the module ``param + sign * eps * z`` for that forward and the original tensor is put back
after it, so "restoring" is exact in any dtype (bf16 weights do not drift) and only one module's perturbed
weights exist at a time. Only trainable parameters are perturbed (with ``lora``: the adapters, MeZO+LoRA),
optionally only those matching ``parameters``::

    lowmem-train strategy=zo_sgd     # the recipe's optimizer and learning rate, on the normalized estimate
    lowmem-train recipe=llama_finetune strategy=zo_sgd strategy.zo_sgd.normalize=false optimizer=sgd \
        optimizer.momentum=0 optimizer.nesterov=false optimizer.lr=1e-6     # MeZO: its raw estimate and rate
    lowmem-train recipe=llama_finetune 'strategy=[lora,zo_sgd]' optimizer=adamw optimizer.lr=1e-4

Needs many more steps than backprop (MeZO: x10-x100), a pretrained model and a prompt-style task.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import lightning as L
import torch
from torch import nn

from lowmem_train import Strategy, StrategyError, Touch
from lowmem_train.optimizers import PerParameterOptimizer
from lowmem_train.recipe import StepOutput
from lowmem_train.undisturbed import undisturbed

# Strategies that change how backward runs or what it keeps: without a backward they have nothing to do.
BACKWARD_STRATEGIES = frozenset({"checkpoint", "selective_checkpoint", "offload", "compress", "approx_bp",
                                 "reversible", "velora", "skip_backward", "step_in_backward", "chunked_ce", "auto",
                                 "compile"})


@dataclass
class Options:
    """``eps``: the perturbation scale (MeZO: 1e-3); ``n_perturbations``: seeds per step (2 forwards each),
    the estimate averaged over them; ``parameters``: glob patterns of trainable parameter names to perturb and
    train (null: every trainable parameter), each must match one; ``normalize``: hand the optimizer the estimate
    scaled by sqrt(n / (d + n + 1)), d the values perturbed, so its expected norm is the gradient's and the
    recipe's learning rate, tuned for gradients, takes steps of a gradient's size (false: MeZO's raw estimate,
    sqrt(d / n) times longer, which needs a learning rate that much smaller); ``seed``: the strategy's own
    generator."""

    eps: float = 1e-3
    n_perturbations: int = 1
    parameters: Optional[list[str]] = None
    normalize: bool = True
    seed: int = 0

    def validate(self, strategy: str) -> None:
        if not self.eps > 0:
            raise StrategyError(f"strategy '{strategy}': eps must be > 0, got {self.eps}")
        if self.n_perturbations < 1:
            raise StrategyError(f"strategy '{strategy}': n_perturbations must be >= 1, got {self.n_perturbations}")


def chosen_parameters(model: nn.Module, patterns: list[str] | None) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters matching ``patterns`` (every one if None); a pattern that matches none, or no
    trainable parameter at all, is a StrategyError."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for pattern in patterns or ():
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
            raise StrategyError(f"strategy 'zo_sgd': parameters pattern {pattern!r} matches no trainable "
                                f"parameter; e.g. {', '.join(n for n, _ in named[:4])}")
    if patterns is not None:
        named = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns)]
    if not named:
        raise StrategyError("strategy 'zo_sgd': the model has no trainable parameter to perturb")
    return named


class SPSA:
    """The zeroth-order estimator on a model: chosen parameters, perturbations regenerated from seeds, and the
    projected gradients of a loss (``loss()`` returns a StepOutput or a scalar tensor). In a plain loop::

        spsa = SPSA(model, eps=1e-3)
        optimizer = PerParameterOptimizer(spsa.parameters, lambda p: torch.optim.SGD(p, lr=1e-6))
        for step, (x, y) in enumerate(loader):
            with torch.no_grad():
                loss = spsa.step(lambda: criterion(model(x), y), optimizer, step)
    """

    def __init__(self, model: nn.Module, *, eps: float = 1e-3, n_perturbations: int = 1,
                 parameters: list[str] | None = None, normalize: bool = True, seed: int = 0):
        self.model, self.eps, self.n_perturbations, self.seed = model, eps, n_perturbations, seed
        self.names = [n for n, _ in chosen_parameters(model, parameters)]
        self.bind()
        # E|mean_s g_s z_s|^2 = (d + n + 1) / n |grad|^2 for Gaussian z: scaled, the estimate has a gradient's norm.
        values = sum(p.numel() for p in self.parameters)
        self.scale = math.sqrt(n_perturbations / (values + n_perturbations + 1)) if normalize else 1.0
        self.active: tuple[float, int] | None = None  # (sign * eps, seed) while a perturbed forward runs
        self.owners = [m for m in model.modules() if any(id(p) in self.index for p in m.parameters(recurse=False))]
        self.handles = [h for m in self.owners for h in (m.register_forward_pre_hook(self._perturb),
                                                          m.register_forward_hook(self._restore))]

    def bind(self) -> None:
        """Take the chosen parameters as the model holds them now (``estimate=true`` swaps fake tensors in after
        the strategies are applied)."""
        named = dict(self.model.named_parameters())
        self.parameters = [named[n] for n in self.names]
        self.index = {id(p): i for i, p in enumerate(self.parameters)}  # a tied weight: one index, one z

    def z(self, index: int, seed: int) -> torch.Tensor:
        """Parameter ``index``'s direction for ``seed``, the same every time it is drawn (never stored)."""
        param = self.parameters[index]
        generator = torch.Generator(param.device).manual_seed(seed * 1_000_003 + index)
        return torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)

    def _perturb(self, module: nn.Module, args) -> None:
        if self.active is None:
            return
        scale, seed = self.active
        originals = {}
        for name, param in module._parameters.items():
            index = None if param is None else self.index.get(id(param))
            if index is not None:
                originals[name] = param
                module._parameters[name] = (param.float() + scale * self.z(index, seed)).to(param.dtype)
        module.__dict__["_zo_originals"] = originals

    def _restore(self, module: nn.Module, args, output) -> None:
        for name, param in module.__dict__.pop("_zo_originals", {}).items():
            module._parameters[name] = param

    @contextmanager
    def perturbed(self, sign: float, seed: int) -> Iterator[None]:
        """Forwards inside see theta + sign * eps * z(seed); the parameters themselves are not touched (also when
        a forward raises: what it swapped in is swapped back)."""
        self.active = (sign * self.eps, seed)
        try:
            yield
        finally:
            self.active = None
            for module in self.owners:
                self._restore(module, None, None)

    def seeds(self, step: int) -> list[int]:
        """The step's seeds: a function of (seed, step) only, so a resumed run draws the same ones."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(0, 2**31 - 1, (self.n_perturbations,), generator=generator).tolist()

    def projected_gradients(self, loss: Callable[[], StepOutput], step: int) -> tuple[list[int], list[float], StepOutput]:
        """(seeds, g per seed, the output of the first seed's pair with the two losses averaged: the loss at
        theta up to O(eps^2)). Every forward draws the same dropout masks and sees the same buffers; the last
        one leaves the model's random stream and buffers (batch-norm statistics) as one training forward does."""
        seeds, projected, logged = self.seeds(step), [], None
        for i, seed in enumerate(seeds):
            with self.perturbed(+1.0, seed), undisturbed(self.model, modes=False):
                plus = loss()
            last = i == len(seeds) - 1
            with self.perturbed(-1.0, seed), nullcontext() if last else undisturbed(self.model, modes=False):
                minus = loss()
            projected.append(float((scalar(plus) - scalar(minus)) / (2 * self.eps)))
            if logged is None:
                logged = averaged(plus, minus)
        return seeds, projected, logged

    def update(self, optimizer: PerParameterOptimizer, seeds: list[int], projected: list[float]) -> None:
        """Step each parameter on mean_s(g_s z_s(parameter)), one parameter's gradient alive at a time."""
        for index, param in enumerate(self.parameters):
            grad = sum(g * self.z(index, seed) for g, seed in zip(projected, seeds)) * (self.scale / len(seeds))
            param.grad = grad.to(param.dtype)
            optimizer.step_parameter(index)

    def step(self, loss: Callable[[], StepOutput], optimizer: PerParameterOptimizer, step: int) -> StepOutput:
        """One forward-only training step; no update when a loss is not finite (the trainer then reports it)."""
        seeds, projected, output = self.projected_gradients(loss, step)
        if all(map(torch.isfinite, torch.tensor(projected))):
            self.update(optimizer, seeds, projected)
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def scalar(output: StepOutput | torch.Tensor) -> torch.Tensor:
    return output.mean_loss() if isinstance(output, StepOutput) else output


def averaged(plus: StepOutput | torch.Tensor, minus: StepOutput | torch.Tensor) -> StepOutput | torch.Tensor:
    """The mean of the two losses (the loss at theta up to O(eps^2)), in the form ``loss()`` returned."""
    if not isinstance(plus, StepOutput):
        return (plus + minus) / 2
    return StepOutput((plus.per_sample_loss + minus.per_sample_loss) / 2, plus.per_sample_count, plus.num_samples,
                      num_tokens=plus.num_tokens)


class ZOSGD(Strategy):
    exact = False
    order = 90  # after adapters (lora) are added: it perturbs what trains
    incompatible_with = BACKWARD_STRATEGIES
    Options = Options
    summary = "no backward: two forwards per perturbation estimate the gradient (SPSA); activations ~0 bytes, many more steps"

    def __init__(self, options=None):
        super().__init__(options)
        self.spsa: SPSA | None = None
        self.optimizer: PerParameterOptimizer | None = None
        self.forwards, self.seconds = 0, 0.0

    def plan(self, model):
        chosen = [p for _, p in chosen_parameters(model, self.options.parameters)]
        return [Touch("", type(model).__name__, f"forward-only training of {len(chosen)} parameter tensor(s) "
                      f"({sum(p.numel() for p in chosen):,} values), {2 * self.options.n_perturbations} "
                      "forwards per step")]

    def estimate_problem(self) -> str | None:
        return None  # tests/test_estimate.py checks its fake step against a real one (the losses stand in as 1)

    def apply(self, model, plan):
        o = self.options
        self.spsa = SPSA(model, eps=o.eps, n_perturbations=o.n_perturbations, parameters=o.parameters,
                         normalize=o.normalize, seed=o.seed)

    def configure_optimizer(self, model, build_default):
        self.spsa.bind()
        self.optimizer = PerParameterOptimizer(self.spsa.parameters, build_default)
        return self.optimizer

    def step_without_backward(self, model, loss, step):
        start = time.perf_counter()
        output = self.spsa.step(loss, self.optimizer, step)
        self.seconds += time.perf_counter() - start
        self.forwards += 2 * self.options.n_perturbations
        return output

    def callbacks(self):
        return [RefuseBackwardSettings()]

    def nonfinite_hint(self) -> str | None:
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer and self.optimizer.param_groups else None
        if lr is None:
            return None
        return (f"zo_sgd diverged at optimizer.lr={lr:g}: a zeroth-order estimate is far noisier than a gradient, "
                f"try optimizer.lr={lr / 10:g}" + ("" if self.options.normalize else
                                                   " or strategy.zo_sgd.normalize=true"))

    def sharding_problem(self):
        return "it perturbs whole parameters module by module; sharded parameters are not supported"

    def report(self):
        if not self.forwards:
            return {}
        return {"forwards": self.forwards, "forwards_per_step": 2 * self.options.n_perturbations,
                "forwards_per_s": self.forwards / self.seconds}


class RefuseBackwardSettings(L.Callback):
    """Trainer settings that need a backward or a gradient across steps or ranks, checked before the first step."""

    def setup(self, trainer, pl_module, stage):
        if trainer.accumulate_grad_batches > 1:
            raise StrategyError("strategy 'zo_sgd' updates on every batch's estimate: set "
                                f"trainer.accumulate_grad_batches=1 (got {trainer.accumulate_grad_batches}), or raise "
                                "strategy.zo_sgd.n_perturbations / data.batch_size")
        if trainer.gradient_clip_val:
            raise StrategyError("strategy 'zo_sgd' has no gradient to clip: set trainer.gradient_clip_val=null")
        if trainer.world_size > 1:
            raise StrategyError("strategy 'zo_sgd' runs in one process (its ranks would not share one estimate); "
                                "set trainer.devices=1")

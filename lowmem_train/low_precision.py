"""Optimizer updates that survive bf16/fp16 weights.

An update smaller than half a unit in the last place (ulp) of a bf16 weight rounds back to the same value:
AdamW at lr 2e-5 on a pretrained model loses most of its updates that way (bf16 keeps 8 significant bits).
``LowPrecisionUpdates`` wraps any optimizer: each bf16/fp16 parameter is stepped on an fp32 copy (a chunk of
parameters at a time, so the copy is transient and bounded), then written back by the chosen ``mode``:

- ``stochastic``: stochastic rounding, up with probability (distance to the lower neighbour) / ulp, so the
  stored weight moves by the update in expectation. No extra bytes; draws from the wrapper's own generator.
- ``kahan``: Kahan-compensated summation: the rounding error is kept in a buffer of the weight's dtype (2
  bytes per parameter in bf16) and added back before the next step. Deterministic.
- ``fp32_master``: an fp32 master copy (4 bytes per parameter) is what the optimizer steps; the weight is its
  nearest bf16 value.
- ``nearest``: plain round-to-nearest (what bf16 training does without help), for comparison.

``kahan`` and ``fp32_master`` keep the exact sum, but the model computes with its nearest bf16 value, and a
weight loaded from bf16 starts at the centre of its rounding cell: it moves only once its summed update
passes half an ulp. Stochastic rounding has no such dead zone, which is why it is the default (README:
"bf16 weights that keep their updates" has the measured fine-tune).

The inner optimizer's state is created on the fp32 copies, so it is fp32 (AdamW: 8 bytes per parameter, as
for fp32 weights). Every step measures, on a strided sample of each tensor, the share of non-zero updates
below half an ulp, which round-to-nearest loses (``lost_share``): the report prints it, and warns when
``nearest`` loses most of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .errors import ConfigError

MODES = ("stochastic", "kahan", "fp32_master", "nearest")
LOW_PRECISION = (torch.bfloat16, torch.float16)
CHUNK_VALUES = 1 << 24  # fp32 values widened at a time (64 MiB a copy): bounds the step's transient memory
SAMPLE_VALUES = 1 << 16  # values per tensor and step on which lost updates are counted
COMPENSATION, MASTER = "kahan_compensation", "fp32_master"  # this wrapper's keys in a parameter's state


def stochastic_round(values: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """``values`` (fp32) rounded to ``dtype`` up or down at random, so that the expected result is ``values``:
    the neighbour away from the nearest one is taken with probability (distance to nearest) / (gap)."""
    if dtype == torch.bfloat16:  # bf16 is fp32's top 16 bits: add 16 random low bits, then truncate
        noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, generator=generator, device=values.device)
        return ((values.view(torch.int32) + noise) & -(1 << 16)).view(torch.float32).to(dtype)
    nearest = values.to(dtype)
    error = values - nearest.float()
    away = torch.nextafter(nearest, torch.where(error > 0, torch.inf, -torch.inf).to(dtype))
    gap = (away.float() - nearest.float()).abs()
    chance = torch.where(gap > 0, error.abs() / gap, 0.0)
    draw = torch.rand(values.shape, generator=generator, device=values.device)
    return torch.where(draw < chance, away, nearest)


def sample(tensor: torch.Tensor) -> torch.Tensor:
    """A strided view of at most SAMPLE_VALUES of ``tensor``'s values: where lost updates are counted."""
    flat = tensor.reshape(-1)  # a view where the tensor is contiguous
    return flat[:: max(1, flat.numel() // SAMPLE_VALUES)]


def low_precision_parameters(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.dtype in LOW_PRECISION]


class LowPrecisionUpdates(torch.optim.Optimizer):
    """``optimizer`` whose bf16/fp16 parameters keep their sub-ulp updates (see the module docstring)::

        optimizer = LowPrecisionUpdates(torch.optim.AdamW(model.parameters(), lr=2e-5), mode="stochastic")

    Parameter groups, learning-rate schedulers and checkpoints work as on the inner optimizer; this wrapper's
    buffers (Kahan compensation, fp32 master) live in the parameters' ``state`` next to the inner optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str = "stochastic", seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.inner, self.mode, self.seed = optimizer, mode, seed
        self.own: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        self.generators: dict[torch.device, torch.Generator] = {}
        self.changed = self.lost = 0  # counts kept as tensors: no device sync per step
        self.last_changed = self.last_lost = 0
        super().__init__([p for group in optimizer.param_groups for p in group["params"]], optimizer.defaults)
        self.param_groups = optimizer.param_groups  # shared: schedulers and Lightning see the inner groups

    @property
    def state(self):
        """The inner optimizer's state with this wrapper's buffers added (what memory accounting counts)."""
        return {p: {**self.inner.state.get(p, {}), **self.own.get(p, {})}
                for p in set(self.inner.state) | set(self.own)}

    @state.setter
    def state(self, value):
        """Optimizer.__init__ assigns an empty state; the real one is the inner optimizer's and ``own``."""

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        low = low_precision_parameters(stepped)
        if not low:
            self.inner.step()
            return loss
        grads = {p: p.grad for p in stepped}
        batches = ([[p for p in stepped if p.dtype not in LOW_PRECISION]] if len(low) < len(stepped) else []) + list(
            chunks(low))
        self.last_changed = self.last_lost = 0
        try:
            for batch in batches:
                for p in stepped:
                    p.grad = None
                if batch[0].dtype in LOW_PRECISION:
                    self._step_widened(batch, grads)
                else:
                    for p in batch:
                        p.grad = grads[p]
                    self.inner.step()
        finally:
            for p in stepped:
                p.grad = grads[p]
        self.changed += self.last_changed
        self.lost += self.last_lost
        return loss

    def _step_widened(self, batch: list[nn.Parameter], grads: dict) -> None:
        """Step ``batch`` on fp32 copies, then write each back into its low-precision storage."""
        stored = [p.data for p in batch]
        try:
            wide = [self._widen(p) for p in batch]
            before = [sample(w).clone() for w in wide]
            for p, w in zip(batch, wide):
                p.data = w
                p.grad = grads[p].float()
            self.inner.step()
        finally:
            for p, s in zip(batch, stored):
                p.grad = None
                p.data = s
        for p, w, b in zip(batch, wide, before):
            update, stored = sample(w) - b, sample(p.data)
            toward = torch.nextafter(stored, torch.where(update > 0, torch.inf, -torch.inf).to(p.dtype))
            half_ulp = (toward.float() - stored.float()).abs() / 2
            changed = update != 0
            self.last_changed += changed.sum()
            self.last_lost += (changed & (update.abs() < half_ulp)).sum()
            self._narrow(p, w)

    def _widen(self, p: nn.Parameter) -> torch.Tensor:
        own = self.own.setdefault(p, {})
        if self.mode == "fp32_master":
            if MASTER not in own:
                own[MASTER] = p.data.float()
            return own[MASTER]  # stepped in place
        if self.mode == "kahan":
            if COMPENSATION not in own:
                own[COMPENSATION] = torch.zeros_like(p.data)
            return p.data.float() + own[COMPENSATION].float()
        return p.data.float()

    def _narrow(self, p: nn.Parameter, wide: torch.Tensor) -> None:
        if self.mode == "stochastic":
            p.data.copy_(stochastic_round(wide, p.dtype, self.generator(p.device)))
            return
        p.data.copy_(wide)  # round to nearest
        if self.mode == "kahan":
            self.own[p][COMPENSATION].copy_(wide - p.data.float())

    def generator(self, device: torch.device) -> torch.Generator:
        """This wrapper's own random stream per device: the model's stream (dropout masks) is untouched."""
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def lost_share(self, last: bool = False) -> float | None:
        """The share of non-zero updates to low-precision weights that round-to-nearest loses (whole run, or
        the last step); None before any such update."""
        changed, lost = (self.last_changed, self.last_lost) if last else (self.changed, self.lost)
        changed = int(changed)
        return None if changed == 0 else int(lost) / changed

    def state_dict(self):
        """The inner optimizer's state dict (the usual layout) with this wrapper's buffers in each parameter's
        state and its generators' states, so a resumed run continues exactly."""
        state = self.inner.state_dict()
        index = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for p, buffers in self.own.items():
            state["state"].setdefault(index[id(p)], {}).update(buffers)
        state["rounding_generators"] = {str(d): g.get_state() for d, g in self.generators.items()}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        generators = state_dict.pop("rounding_generators", {})
        params = [p for group in self.param_groups for p in group["params"]]
        inner_state = {}
        for i, values in state_dict["state"].items():
            own = {k: v for k, v in values.items() if k in (COMPENSATION, MASTER)}
            if own:
                p = params[int(i)]
                dtype = torch.float32 if MASTER in own else p.dtype
                self.own[p] = {k: v.to(device=p.device, dtype=dtype, copy=True) for k, v in own.items()}
            inner_state[i] = {k: v for k, v in values.items() if k not in own}
        low = low_precision_parameters(params)
        stored = [p.data for p in low]
        try:  # torch casts loaded state to its parameter's dtype: it belongs to the fp32 copies
            for p in low:
                p.data = p.data.float()
            self.inner.load_state_dict({**state_dict, "state": inner_state})
        finally:
            for p, s in zip(low, stored):
                p.data = s
        for device, generator_state in generators.items():
            self.generator(torch.device(device)).set_state(generator_state)


def chunks(params: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """Consecutive groups of parameters of at most CHUNK_VALUES values (a larger parameter alone)."""
    batch, size = [], 0
    for p in params:
        if batch and size + p.numel() > CHUNK_VALUES:
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += p.numel()
    if batch:
        yield batch


def keep_low_precision_updates(factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer], mode: str,
                               seed: int = 0) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """An optimizer factory whose optimizers wrap ``factory``'s in ``LowPrecisionUpdates`` when they step any
    bf16/fp16 parameter (fp32-only parameter lists get the plain optimizer)."""

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        params = list(params)
        low = low_precision_parameters(params)
        if any(isinstance(p, DTensor) for p in low):
            raise ConfigError("trainer=fsdp with bf16/fp16 weights: load fp32 weights (model.dtype=float32) and compute "
                              "in bf16 with trainer.strategy.param_dtype=bfloat16 (FSDP2 keeps fp32 shards to update)")
        optimizer = factory(params)
        if not low:
            return optimizer
        return LowPrecisionUpdates(optimizer, mode, seed)

    return build


def rounding_report(optimizers: Iterable[torch.optim.Optimizer]) -> dict | None:
    """The run report's figures of every LowPrecisionUpdates among ``optimizers`` (also inside a per-parameter
    optimizer's ``inner`` list), or None when no low-precision weight was trained."""
    found = []
    for optimizer in optimizers:
        inner = getattr(optimizer, "inner", None)
        found += [optimizer] if isinstance(optimizer, LowPrecisionUpdates) else [
            o for o in (inner if isinstance(inner, list) else []) if isinstance(o, LowPrecisionUpdates)]
    if not found:
        return None
    changed = sum(int(o.changed) for o in found)
    lost = sum(int(o.lost) for o in found)
    return {"mode": found[0].mode, "updated_values": changed,
            "below_half_ulp_share": None if changed == 0 else lost / changed}

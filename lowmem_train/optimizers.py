"""Low-memory optimizers for the ``optimizer`` config group: quantized AdamW states, matrix Adafactor, GaLore.

``configs/optimizer/*.yaml`` name these by ``_target_``. ``quantized_adamw`` is called when the config is
validated (no ``_partial_``), so a missing optional package is a one-line ConfigError before the run starts;
it returns the factory ``params -> optimizer`` the trainer calls after surgery.

Every tensor of an optimizer's state lives in ``optimizer.state`` (GaLore's projection matrices included),
so ``lowmem_train.memory.optimizer_state_bytes`` counts it and Lightning checkpoints restore it.
"""

from __future__ import annotations

import contextlib
import functools
import unittest.mock
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .errors import ConfigError

OPTIM_EXTRA = "pip install 'lowmem-train[optim]'"
BACKENDS = ("torchao", "bitsandbytes")


def quantized_adamw(
    *,
    bits: int,
    backend: str = "torchao",
    lr: float = 3e-4,
    betas: Sequence[float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    block_size: int | None = None,
) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """AdamW whose two moments are stored block-quantized (8 bits: ~2 bytes/param, 4 bits: ~1 byte/param).

    torchao (CPU and CUDA; its step is torch.compile'd, so the first step of each parameter shape compiles)
    or bitsandbytes (8-bit only). ``block_size`` null: the backend's default (torchao 256 for 8-bit, 128 for
    4-bit). Like bitsandbytes, torchao keeps tensors under 4,096 values (biases, norms) in fp32.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"optimizer.backend={backend} is not a backend; valid: {', '.join(BACKENDS)}")
    if bits not in (4, 8) or (backend == "bitsandbytes" and bits != 8):
        valid = "8" if backend == "bitsandbytes" else "4, 8"
        raise ConfigError(f"optimizer.bits={bits} is not supported by backend {backend}; valid: {valid}")
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if backend == "torchao":
        try:
            from torchao.optim import AdamW4bit, AdamW8bit
        except ImportError:
            raise ConfigError(f"optimizer=adamw{bits}bit needs torchao: {OPTIM_EXTRA}") from None
        cls = compiled_step_optimizer(AdamW8bit if bits == 8 else AdamW4bit)
        if block_size is not None:
            kwargs["block_size"] = block_size
    else:
        try:
            from bitsandbytes.optim import AdamW8bit as cls
        except ImportError:
            raise ConfigError(f"optimizer.backend=bitsandbytes needs bitsandbytes: {OPTIM_EXTRA}") from None
        if block_size is not None:
            raise ConfigError("optimizer.block_size is fixed by bitsandbytes (256); set it to null")
    return functools.partial(cls, **kwargs)


def compiled_step_optimizer(cls: type):
    """Builds ``cls`` marked ``compiled_step = True`` (torchao compiles its step), which the memory monitor and
    the estimate read: no dispatch-mode meter can run inside a compiled step."""

    def build(params, **kwargs):
        optimizer = cls(params, **kwargs)
        optimizer.compiled_step = True
        return optimizer

    return build


@contextlib.contextmanager
def compiled_steps_as_in_place_updates(build_optimizer):
    """Inside: a torch.compile'd optimizer step (torchao's quantized AdamW) runs eagerly as what its one fused
    kernel per parameter does to memory, the parameter written in place and no temporaries, so it can step fake
    tensors under the estimate's meters. Its states are still built by the optimizer's own code, their bytes its
    own; the constants it builds with ``.tolist()`` (quantization maps, cached) are made first, on real tensors,
    by one step of ``build_optimizer`` on a small real parameter."""

    def compile_as_in_place_update(function, **options):
        return update_in_place

    with unittest.mock.patch.object(torch, "compile", compile_as_in_place_update):
        with unset_fake_temporarily():
            warm_up = nn.Parameter(torch.zeros(2**16))  # over torchao's 4,096-value floor, a multiple of any block
            warm_up.grad = torch.zeros_like(warm_up)
            build_optimizer([warm_up]).step()
        yield


def update_in_place(param: torch.Tensor, grad: torch.Tensor, *state_and_settings) -> None:
    """The memory of a fused AdamW kernel: it reads the gradient and writes the parameter, creating nothing."""
    param.sub_(grad)


class MatrixAdafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` factoring every tensor of >= 2 dims as the matrix (dim 0, all other dims).

    torch factors only the last two dims, so a conv weight (out, in, k, k) keeps out * in * 2k state values
    (2.75 bytes/param on ResNet-18); as a matrix (out, in*k*k) it keeps out + in*k*k. The update is
    torch's, applied to the (out, in*k*k) view; 1-D tensors keep a full second moment as in torch.
    """

    def __init__(self, params, *, eps: Sequence[float | None] = (None, 1e-3), **kwargs):
        # A tuple, not Hydra's ListConfig: the param groups go into checkpoints loaded with weights_only.
        super().__init__(params, eps=tuple(eps), **kwargs)

    def _init_group(self, group, params_with_grad, grads, row_vars, col_vars, variances, state_steps) -> bool:
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p) or p.grad.is_sparse:
                raise RuntimeError("MatrixAdafactor needs real parameters with dense gradients")
            state = self.state[p]
            param, grad = (p.view(p.shape[0], -1), p.grad.reshape(p.shape[0], -1)) if p.dim() > 1 else (p, p.grad)
            if not state:
                state["step"] = torch.tensor(0.0)
                if p.dim() > 1:
                    state["row_var"] = grad.new_zeros(grad.shape[0], 1)
                    state["col_var"] = grad.new_zeros(1, grad.shape[1])
                else:
                    state["variance"] = torch.zeros_like(grad)
            params_with_grad.append(param)
            grads.append(grad)
            row_vars.append(state.get("row_var"))
            col_vars.append(state.get("col_var"))
            variances.append(state.get("variance"))
            state_steps.append(state["step"])
        return False  # no complex parameters


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW in a low-rank subspace of each matrix's gradient (GaLore, Zhao et al. 2024).

    For a 2-D parameter of shape (m, n) whose smaller side exceeds ``rank``, the gradient G is projected on
    its top-``rank`` singular vectors (on the smaller side, refreshed by an SVD of G every
    ``update_proj_gap`` steps); the moments live in that (m x rank or rank x n) space and the normalised
    update is projected back and scaled by ``scale``. State: moments of rank * max(m, n) values each plus the
    projection of rank * min(m, n), instead of 2 * m * n. Other parameters get plain AdamW.
    Approximate: the update ignores the gradient outside the subspace (between refreshes).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25):
        if rank < 1:
            raise ConfigError(f"optimizer.rank={rank} must be >= 1")
        if update_proj_gap < 1:
            raise ConfigError(f"optimizer.update_proj_gap={update_proj_gap} must be >= 1")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                low_rank = p.dim() == 2 and min(p.shape) > group["rank"]
                if not state:
                    state["step"] = torch.tensor(0.0)
                step = int(state["step"].add_(1).item())
                if low_rank:
                    if (step - 1) % group["update_proj_gap"] == 0:
                        state["projection"] = _projection(grad, group["rank"])
                    grad = _project(grad, state["projection"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
                update = exp_avg / (1 - beta1**step) / denom
                if low_rank:
                    update = _project_back(update, state["projection"]) * group["scale"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def _projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` singular vectors of ``grad`` on its smaller side: (rank, n) if m >= n, else (m, rank)."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    return vh[:rank].contiguous() if grad.shape[0] >= grad.shape[1] else u[:, :rank].contiguous()


def _project(grad: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    return grad @ projection.T if grad.shape[0] >= grad.shape[1] else projection.T @ grad


def _project_back(update: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    # The projection is (rank, n) for tall matrices and (m, rank) for wide ones; its shape tells which.
    return update @ projection if projection.shape[0] < projection.shape[1] else projection @ update


def sharding_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot step FSDP2's sharded parameters (``trainer=fsdp``: each rank holds a slice of
    rows of every parameter, as a DTensor), or None. Checked on the CPU with torch 2.14: torchao's 8-bit AdamW
    steps shards (its quantization blocks are then the shard's)."""
    cls = type(optimizer)
    if cls.__module__.startswith("bitsandbytes"):
        return ("bitsandbytes optimizers mix plain tensors with the sharded DTensor parameters (bitsandbytes#1633); "
                "use optimizer.backend=torchao")
    if cls.__module__.startswith("torchao") and "4bit" in cls.__name__:
        return "torchao's 4-bit AdamW cannot build its state for sharded DTensor parameters; use optimizer=adamw8bit"
    if issubclass(cls, MatrixAdafactor):
        return ("its factored second moment needs whole rows and columns (DTensor refuses the in-place row/column "
                "norms); use optimizer=adamw8bit or adamw")
    if issubclass(cls, GaLoreAdamW):
        return ("it projects each gradient matrix on its top singular vectors, and a rank holds only a slice of "
                "the rows, so it would project slices, not the matrix (GaLore#2); use optimizer=adamw8bit or adamw")
    return None


class PerParameterOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter (built by the ``optimizer`` config's factory, so every optimizer of the
    group works), stepped one parameter at a time by ``step_parameter``: for updates that come parameter by
    parameter (a step inside backward, a zeroth-order estimate), so no gradient of the whole model is held.

    What Lightning drives: ``step(closure)`` only runs the closure. ``state`` gathers the inner optimizers'
    states for the memory accounting; ``state_dict`` lays them out as one optimizer's (parameter i is inner
    optimizer i's only one), so checkpoints and tools that read optimizer state dicts see the usual format.
    """

    def __init__(self, params: Iterable[nn.Parameter], build: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]):
        params = list(params)
        self.inner = [build([p]) for p in params]
        super().__init__(params, {})
        # The inner optimizers' groups themselves, so an LR scheduler on this optimizer reaches them.
        self.param_groups = [group for optimizer in self.inner for group in optimizer.param_groups]

    def step_parameter(self, index: int) -> None:
        """Step parameter ``index`` on its ``.grad``, then free the gradient."""
        self.inner[index].step()
        self.inner[index].zero_grad(set_to_none=True)

    @property
    def state(self):
        return {p: s for optimizer in self.inner for p, s in optimizer.state.items()}

    @state.setter
    def state(self, value):
        """Optimizer.__init__ assigns an empty state; the real one lives in the per-parameter optimizers."""

    def step(self, closure=None):
        return closure() if closure is not None else None

    def state_dict(self):
        states = [optimizer.state_dict() for optimizer in self.inner]
        return {"state": {i: s["state"][0] for i, s in enumerate(states) if 0 in s["state"]},
                "param_groups": [{**s["param_groups"][0], "params": [i]} for i, s in enumerate(states)]}

    def load_state_dict(self, state_dict):
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.inner):
            raise ConfigError(f"the checkpoint's optimizer state has {len(groups)} parameter(s), this run "
                              f"{len(self.inner)}; resume with the same strategies")
        for i, (optimizer, group) in enumerate(zip(self.inner, groups)):
            state = state_dict["state"]
            optimizer.load_state_dict({"state": {0: state[i]} if i in state else {},
                                       "param_groups": [{**group, "params": [0]}]})

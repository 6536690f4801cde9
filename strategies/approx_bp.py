"""Approximate and memory-sharing backprop (Approx-BP, ICML 2024), applied to unmodified models by surgery.

- 2-bit GELU / SiLU derivatives: the forward is the model's own activation (exact); backward uses a 4-level
  step derivative, so only a 2-bit code per element is saved, four codes per uint8 (16x less than an fp32
  input, 8x less than bf16). This is the approximate part. By default the levels are fitted to the
  derivative; ``derivative=paper`` gives the published ReGELU2 / ReSiLU2, whose levels (a fit to the
  function) are far off near 0, where pre-activations sit at initialisation.
- MS-LayerNorm / MS-RMSNorm: the norm becomes affine-free and saves only its output y and an fp32 rstd per
  row; the linear layers that read it apply the norm's gamma/beta themselves (``W (gamma * y + beta) + b``)
  and save the very same y, recomputing ``gamma * y + beta`` in backward, so y is stored once and the norm's
  input not at all. The backward is exact, gamma/beta included: they keep training under their own names.
  (Folding gamma into the weights instead, ``W' = W diag(gamma)``, froze gamma and trained ``W diag(gamma)``
  in place of W: a different optimisation, with every norm weight left without a gradient.)

Where a norm's output goes is not guessed from module order: one example forward (train mode, no grad,
RNG and buffers restored) follows the output tensor through every aten op. A norm is shared only when
linear layers alone read it; otherwise the plan says what else does (dropout, a residual add, a copy).

On CUDA the code packing, the step backward and the norm forward/backward run as Triton kernels
(``_approx_bp_triton``); the PyTorch functions here serve the CPU and are the reference for the kernels.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowmem_train import Strategy, StrategyError, Touch
from lowmem_train.bitpack import pack_bits, unpack_bits
from lowmem_train.saved_tensors import iter_tensors
from lowmem_train.targets import matched, subtree_scope, under
from lowmem_train.undisturbed import example_inputs, undisturbed

# ---------------------------------------------------------------------------------------------------------
# 2-bit step derivatives (ReGELU2, ReSiLU2)


@dataclass(frozen=True)
class StepDerivative:
    """A derivative replaced by a 4-level step: ``levels[code]``, where the code counts the thresholds
    below x. Two bits per element are all backward needs."""

    name: str
    thresholds: tuple[float, float, float]
    levels: tuple[float, float, float, float]

    @classmethod
    def from_relus(cls, name: str, slopes: tuple[float, float, float], thresholds: tuple[float, float, float]):
        """The paper's form: the derivative of ``sum_i a_i ReLU(x - c_i)``, a fit to the activation itself
        (``sum(a) = 1``, ``sum(a * c) = 0``)."""
        a0, a1, a2 = slopes
        return cls(name, thresholds, (0.0, a0, a0 + a1, a0 + a1 + a2))


# The published ReGELU2 / ReSiLU2 (derivative=paper). Fitted to the function, their derivative is 0 or ~1.05
# on either side of 0, where GELU'/SiLU' pass smoothly through 0.5: with pre-activations of std 0.1-0.5
# (any model near initialisation) the gradient through the activation keeps a cosine of only 0.73-0.87 per
# element and a norm 1.3-1.5x too large.
REGELU2 = StepDerivative.from_relus(
    "ReGELU2",
    (-0.04922261145617846, 1.0979632065417297, -0.048740595085551286),
    (-3.1858810036855245, -0.001178821281161997, 3.190832613414926),
)
RESILU2 = StepDerivative.from_relus(
    "ReSiLU2",
    (-0.04060357190528599, 1.080925428529668, -0.040321856624382146),
    (-6.3050461001646445, -0.0008684942046214787, 6.325815242089708),
)
# derivative=fitted (default): the same 2 bits, but the 4 levels and 3 thresholds minimise the squared error
# of the derivative itself (Lloyd's algorithm, as in Few-Bit Backward, ICML 2023) over x ~ N(0, s^2) with
# log s uniform on [log 0.25, log 4]: per-element gradient cosine 0.98-0.996 for std 0.1-4.
GELU2_FIT = StepDerivative("GELU-2bit-fit", (-0.4663, 0.0015, 0.4686), (-0.0283, 0.3356, 0.6667, 1.0289))
SILU2_FIT = StepDerivative("SiLU-2bit-fit", (-0.6997, -0.0006, 0.6989), (-0.0029, 0.3563, 0.6430, 1.0029))
_STEPS = {"paper": {"gelu": REGELU2, "silu": RESILU2}, "fitted": {"gelu": GELU2_FIT, "silu": SILU2_FIT}}


@functools.cache
def _triton_kernels():
    """The Triton kernels, or None where Triton cannot be imported (the PyTorch path is used then)."""
    try:
        from lowmem_train.strategies import _approx_bp_triton
    except ImportError:
        return None
    return _approx_bp_triton


def _kernels_for(tensor: torch.Tensor):
    return _triton_kernels() if tensor.is_cuda else None


def step_codes(x: torch.Tensor, thresholds: tuple[float, ...]) -> torch.Tensor:
    """Per element, how many thresholds lie below x (compared in fp32), as a flat uint8 tensor."""
    xf = x.reshape(-1).float()
    c0, c1, c2 = thresholds
    return (xf > c0).to(torch.uint8) + (xf > c1) + (xf > c2)


@functools.cache
def _slopes_by_byte(step: StepDerivative, device: torch.device) -> torch.Tensor:
    """(256, 4) fp32: the derivative of each of the four elements packed in each possible byte."""
    codes = unpack_bits(torch.arange(256, dtype=torch.uint8, device=device), 2, 1024).view(256, 4)
    return torch.tensor(step.levels, dtype=torch.float32, device=device)[codes.int()]


def pack_step_codes(x: torch.Tensor, step: StepDerivative) -> torch.Tensor:
    """The packed 2-bit codes of x: ceil(numel / 4) bytes, all autograd keeps of an activation's input."""
    kernels = _kernels_for(x)
    if kernels is not None:
        return kernels.pack_step_codes(x.contiguous().view(-1), step.thresholds)
    return pack_bits(step_codes(x, step.thresholds), 2)


def step_backward(grad: torch.Tensor, packed: torch.Tensor, step: StepDerivative) -> torch.Tensor:
    """``grad * step'(x)`` from the packed codes of x, in grad's dtype and shape."""
    kernels = _kernels_for(grad)
    if kernels is not None:
        return kernels.step_backward(grad.contiguous(), packed, step.levels)
    slope = _slopes_by_byte(step, grad.device)[packed.int()].view(-1)[: grad.numel()].view(grad.shape)
    return (grad.float() * slope).to(grad.dtype)


class _StepDerivativeActivation(torch.autograd.Function):
    """Exact forward (the wrapped module), 2-bit step-derivative backward."""

    @staticmethod
    def forward(ctx, x, activation: nn.Module, step: StepDerivative):
        ctx.step = step
        ctx.save_for_backward(pack_step_codes(x, step))
        return activation(x)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return step_backward(grad, packed, ctx.step), None, None


class ApproxActivation(nn.Module):
    """Wraps a GELU/SiLU module: its own forward, a 2-bit step derivative in backward."""

    def __init__(self, activation: nn.Module, step: StepDerivative):
        super().__init__()
        self.activation = activation
        self.step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.activation(x)
        return _StepDerivativeActivation.apply(x, self.activation, self.step)

    def extra_repr(self) -> str:
        return f"backward={self.step.name}"


def _hf_activation_classes(names: tuple[str, ...]) -> tuple[type, ...]:
    try:
        from transformers import activations
    except ImportError:
        return ()
    return tuple(getattr(activations, name) for name in names if hasattr(activations, name))


# Exact classes only: a subclass may compute something else. Every tanh form keeps its own forward.
_HF_ERF_GELU = ("GELUActivation",)
_HF_TANH_GELU = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "AccurateGELUActivation")
_HF_SILU = ("SiLUActivation",)


def activation_kind(module: nn.Module) -> tuple[str, str] | None:
    """(family: gelu or silu, description of the forward kept) for a convertible activation, else None."""
    kind = type(module)
    if kind is nn.GELU:
        return "gelu", "erf-GELU" if module.approximate == "none" else "tanh-GELU"
    if kind is nn.SiLU or kind in _hf_activation_classes(_HF_SILU):
        return "silu", "SiLU"
    if kind in _hf_activation_classes(_HF_ERF_GELU):
        return "gelu", "erf-GELU"
    if kind in _hf_activation_classes(_HF_TANH_GELU):
        return "gelu", "tanh-GELU"
    return None


# ---------------------------------------------------------------------------------------------------------
# Memory-sharing norms (MS-LayerNorm, MS-RMSNorm)


def norm_forward(x: torch.Tensor, eps: float, centered: bool, out_dtype: torch.dtype):
    """Affine-free LayerNorm (centered) or RMSNorm over the last dim, in fp32: (y in out_dtype, fp32 rstd
    per row with x.shape[:-1])."""
    kernels = _kernels_for(x)
    if kernels is not None and kernels.supports_row(x.shape[-1]):
        return kernels.norm_forward(x.contiguous(), eps, centered, out_dtype)
    xf = x.float()
    if centered:
        xf = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(out_dtype), rstd.squeeze(-1)


def norm_backward(grad: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, centered: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """Exact input gradient from the normalised output: ``rstd * (g - mean(g) - y * mean(g * y))``,
    without the ``mean(g)`` term for RMSNorm."""
    kernels = _kernels_for(grad)
    if kernels is not None and kernels.supports_row(grad.shape[-1]):
        return kernels.norm_backward(grad.contiguous(), y, rstd, centered, dtype)
    g, yf = grad.float(), y.float()
    projection = (g * yf).mean(-1, keepdim=True)
    if centered:
        g = g - g.mean(-1, keepdim=True)
    return ((g - yf * projection) * rstd.unsqueeze(-1)).to(dtype)


class _SharedNorm(torch.autograd.Function):
    """Saves the output y (which the consuming linears save too: one storage) and rstd, not the input."""

    @staticmethod
    def forward(ctx, x, eps: float, centered: bool, out_dtype: torch.dtype):
        y, rstd = norm_forward(x, eps, centered, out_dtype)
        ctx.centered, ctx.input_dtype = centered, x.dtype
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, rstd = ctx.saved_tensors
        return norm_backward(grad, y, rstd, ctx.centered, ctx.input_dtype), None, None, None


class MSNorm(nn.Module):
    """A LayerNorm/RMSNorm that outputs the affine-free y; the linears reading it apply its gamma/beta.

    It keeps the original norm's Parameter objects under their names (so state_dict keys, values and the
    model's parameters are unchanged); they get their gradients through the readers (``AffineInputLinear``).
    Under autocast y is produced in the autocast dtype, which is what the linears compute in anyway, so they
    save this very tensor.
    """

    def __init__(self, norm: nn.Module, centered: bool, eps: float | None):
        super().__init__()
        for name, parameter in norm.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name in ("weight", "bias"):
            if name not in self._parameters:
                setattr(self, name, None)
        self.centered = centered
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if not (torch.is_grad_enabled() and x.requires_grad):
            return norm_forward(x, eps, self.centered, _compute_dtype(x))[0]
        return _SharedNorm.apply(x, eps, self.centered, _compute_dtype(x))

    def extra_repr(self) -> str:
        return f"{'LayerNorm' if self.centered else 'RMSNorm'}, eps={self.eps}, affine applied by its readers"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _affine(y: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, dtype: torch.dtype):
    u = y.to(dtype)
    if gamma is not None:
        u = u * gamma.to(dtype)
    if beta is not None:
        u = u + beta.to(dtype)
    return u


class _AffineInputLinear(torch.autograd.Function):
    """``linear(gamma * y + beta)`` that saves y (the norm's saved output: one storage) instead of its
    affine image, which backward recomputes; gradients for y, gamma, beta, weight and bias are exact."""

    @staticmethod
    def forward(ctx, y, gamma, beta, weight, bias, dtype: torch.dtype):
        ctx.dtype = dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(y, gamma, beta, weight)
        with torch.autocast(y.device.type, enabled=False):
            return nn.functional.linear(_affine(y, gamma, beta, dtype), weight.to(dtype),
                                        None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        y, gamma, beta, weight = ctx.saved_tensors
        need_y, need_gamma, need_beta, need_weight, need_bias, _ = ctx.needs_input_grad
        grad = grad.to(ctx.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        d_y = d_gamma = d_beta = d_weight = d_bias = None
        if need_weight:
            u = _affine(y, gamma, beta, ctx.dtype)
            d_weight = (rows.t() @ u.reshape(-1, u.shape[-1])).to(weight.dtype)
        if need_bias:
            d_bias = rows.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        if need_y or need_gamma or need_beta:
            d_u = grad @ weight.to(ctx.dtype)
            flat = d_u.reshape(-1, d_u.shape[-1]).float()
            if need_gamma:
                d_gamma = (flat * y.reshape(flat.shape).float()).sum(0).to(gamma.dtype)
            if need_beta:
                d_beta = flat.sum(0).to(beta.dtype)
            if need_y:
                d_y = (d_u if gamma is None else d_u * gamma.to(ctx.dtype)).to(y.dtype)
        return d_y, d_gamma, d_beta, d_weight, d_bias, None


class AffineInputLinear(nn.Module):
    """An ``nn.Linear`` reading an MSNorm's output: it applies the norm's gamma/beta before its matmul.

    It holds the linear's own Parameter objects under their names; the norm is referenced, not registered,
    so the state_dict is the unconverted model's (same keys, same values).
    """

    def __init__(self, linear: nn.Linear, norm: MSNorm):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.__dict__["norm"] = norm

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        gamma, beta, dtype = self.norm.weight, self.norm.bias, _compute_dtype(y)
        if not torch.is_grad_enabled():
            return nn.functional.linear(_affine(y, gamma, beta, dtype), self.weight, self.bias)
        return _AffineInputLinear.apply(y, gamma, beta, self.weight, self.bias, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               "applies the norm's affine to its input"


_NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm")


def _is_norm_candidate(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(_NORM_CLASS_SUFFIXES)


def _norm_eps(module: nn.Module) -> tuple[bool, float | None]:
    for attribute in ("eps", "variance_epsilon", "epsilon"):
        if hasattr(module, attribute):
            value = getattr(module, attribute)
            if value is None or isinstance(value, (int, float)):
                return True, value
    return False, None


def identify_norm(module: nn.Module) -> tuple[bool, float | None] | str:
    """(centered, eps) when ``module`` computes ``weight * norm(x) + bias`` over the last dim, checked on a
    random input (so custom classes such as Gemma's ``1 + weight`` or channels-first norms are refused);
    otherwise the reason it cannot be converted."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) - {"weight", "bias"}:
        return f"it has parameters other than weight/bias ({', '.join(sorted(params))})"
    weight, bias = params.get("weight"), params.get("bias")
    shape = tuple(getattr(module, "normalized_shape", ())) or tuple(next(iter(params.values()), torch.empty(0)).shape)
    if len(shape) != 1 or any(p.shape != shape for p in params.values()):
        return "it does not normalise over exactly the last dimension"
    found, eps = _norm_eps(module)
    if not found:
        return "it has no eps attribute to reproduce it with"
    reference = next(iter(params.values()), torch.empty(0))
    dtype, device = reference.dtype, reference.device
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, shape[0], generator=generator) * 2 + 0.5).to(device=device, dtype=dtype)
    with torch.no_grad():
        try:
            actual = module(x).float()
        except Exception as exc:  # noqa: BLE001 - any failure means "not a last-dim norm"
            return f"it is not a norm over the last dimension ({type(exc).__name__} on a 2-d input)"
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        for centered in (True, False):
            expected = norm_forward(x, torch.finfo(dtype).eps if eps is None else eps, centered, torch.float32)[0]
            if weight is not None:
                expected = expected * weight.float()
            if bias is not None:
                expected = expected + bias.float()
            if actual.shape == expected.shape and torch.allclose(actual, expected, atol=tolerance, rtol=tolerance):
                return centered, eps
    return "it computes neither weight * LayerNorm(x) + bias nor weight * RMSNorm(x) over the last dimension"


# ---------------------------------------------------------------------------------------------------------
# Following each norm's output through one example forward


def _storage(tensor: torch.Tensor) -> int | None:
    if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
        return None
    return tensor.untyped_storage().data_ptr()


_aten = torch.ops.aten
# Ops that read only a tensor's metadata: using a norm output in them shares nothing and costs nothing.
_METADATA_OPS = {_aten.empty_like, _aten.zeros_like, _aten.ones_like, _aten.full_like, _aten.new_empty,
                 _aten.new_zeros, _aten.new_ones, _aten.new_full, _aten.new_empty_strided, _aten.sym_size,
                 _aten.sym_stride, _aten.sym_numel, _aten.sym_storage_offset, _aten.is_same_size}
# What a linear may do with its input and still save that very tensor for backward.
_MATMUL_OPS = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.matmul, _aten.linear, _aten.mv, _aten.addmv}


class _OutputTracer(TorchDispatchMode):
    """Records, for each norm output, which linear layers read it and the first other use of it."""

    def __init__(self, model: nn.Module, norms: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.norms = norms
        self.owner: dict[int, str] = {}  # storage of a norm output -> norm name
        self.kept: list[torch.Tensor] = []  # keeps those storages alive so no later tensor reuses them
        self.calls: Counter[str] = Counter()
        self.readers: dict[str, dict[str, None]] = defaultdict(dict)  # ordered set, first read first
        self.other_use: dict[str, str] = {}
        self.linear_inputs: dict[str, list[int | None]] = defaultdict(list)
        self.stack: list[tuple[str, nn.Module]] = []

    def hooks(self):
        names = {id(norm): name for name, norm in self.norms.items()}
        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            handles.append(module.register_forward_hook(self._leave(names.get(id(module)))))
        return handles

    def _enter(self, name):
        def hook(module, args, kwargs):
            self.stack.append((name, module))
            if isinstance(module, nn.Linear):
                self.linear_inputs[name].append(_storage(args[0] if args else kwargs.get("input")))
        return hook

    def _leave(self, norm_name):
        def hook(module, args, output):
            self.stack.pop()
            if norm_name is not None:
                self.calls[norm_name] += 1
                self.kept.append(output)
                self.owner[_storage(output)] = norm_name
        return hook

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view and func.overloadpacket not in _METADATA_OPS:
            for leaf in tree_leaves((args, kwargs)):
                norm = self.owner.get(_storage(leaf)) if isinstance(leaf, torch.Tensor) else None
                if norm is not None:
                    self._record(norm, func, _storage(leaf))
        return func(*args, **kwargs)

    def _record(self, norm: str, func, storage: int) -> None:
        name, module = self.stack[-1] if self.stack else ("", self.model)
        op = func.overloadpacket.__name__
        if isinstance(module, nn.Linear) and self.linear_inputs[name][-1] == storage:
            if func.overloadpacket in _MATMUL_OPS:
                self.readers[norm][name] = None
            else:
                self.other_use.setdefault(norm, f"linear '{name}' copies it first (aten.{op}) and saves the copy")
        else:
            where = f"{type(module).__name__} '{name}'" if name else f"the top-level forward of {type(module).__name__}"
            self.other_use.setdefault(norm, f"its output is read by aten.{op} in {where}, not by a linear")


def trace_norm_outputs(model: nn.Module, norms: dict[str, nn.Module]) -> dict[str, list[str] | str]:
    """For each norm: the linear layers that alone read its output, or why its output cannot be shared.

    Runs one forward in train mode (dropout and the like must show up) under no_grad, then puts back
    the RNG state, every buffer (batch-norm statistics) and each module's train/eval flag.
    """
    inputs = example_inputs(model)
    if inputs is None:
        return dict.fromkeys(norms, f"there is no example input for {type(model).__name__} to trace where its "
                                    "output goes")
    tracer = _OutputTracer(model, norms)
    handles = tracer.hooks()
    try:
        with undisturbed(model), torch.no_grad():
            model.train()
            with tracer:
                output = model(*inputs[0], **inputs[1])
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported per norm instead of raised
        message = (str(exc).strip().splitlines() or [""])[0][:120]
        return dict.fromkeys(norms, f"the example forward failed ({type(exc).__name__}: {message})")
    finally:
        for handle in handles:
            handle.remove()
    returned = {tracer.owner.get(_storage(t)) for t in iter_tensors(output)}
    result: dict[str, list[str] | str] = {}
    for name in norms:
        readers = list(tracer.readers[name])
        mine = {storage for storage, owner in tracer.owner.items() if owner == name}
        foreign = [r for r in readers if any(s not in mine for s in tracer.linear_inputs[r])]
        if tracer.calls[name] != 1:
            result[name] = f"it runs {tracer.calls[name]} times in one forward"
        elif name in tracer.other_use:
            result[name] = tracer.other_use[name]
        elif name in returned:
            result[name] = "its output is returned by the model"
        elif not readers:
            result[name] = "no linear layer reads its output"
        elif foreign:
            result[name] = f"linear '{foreign[0]}' also reads other inputs"
        else:
            result[name] = readers
    return result


# ---------------------------------------------------------------------------------------------------------
# The strategy


@dataclass
class ApproxBPOptions:
    """Approximate + memory-sharing backprop (ReGELU2/ReSiLU2, MS-LayerNorm/MS-RMSNorm), exact forward.

    ``activations``: GELU/SiLU save a 2-bit derivative code per element (16x less than fp32), approximate
    gradient. ``norms``: LayerNorm/RMSNorm read only by linears store their output once, shared with those
    linears; exact. ``targets``: null, the whole model; otherwise class names or regexes on module names of
    the subtrees to convert. ``exclude``: same pattern syntax; these subtrees stay as they are (a norm whose
    reader is excluded too)::

        lowmem-train recipe=llama_finetune strategy=approx_bp
        lowmem-train recipe=llama_finetune strategy=approx_bp strategy.approx_bp.norms=false
        lowmem-train recipe=llama_finetune 'strategy=[approx_bp,checkpoint]'
        lowmem-train recipe=llama_finetune strategy=approx_bp dry_run=true   # what is converted, and why not
    """

    activations: bool = True  # 2-bit step derivatives on GELU and SiLU modules
    derivative: str = "fitted"  # fitted: levels fitted to the derivative; paper: ReGELU2 / ReSiLU2 as published
    norms: bool = True  # MS-LayerNorm / MS-RMSNorm where only linear layers read the norm's output
    targets: Optional[list[str]] = None  # class names / name regexes of subtrees to convert; None: the model
    exclude: list[str] = field(default_factory=list)  # subtrees left alone (norm consumers included)

    def validate(self, strategy: str) -> None:
        if self.derivative not in _STEPS:
            raise StrategyError(f"strategy '{strategy}': derivative={self.derivative}; valid: {', '.join(_STEPS)}")
        if not (self.activations or self.norms):
            raise StrategyError(f"strategy '{strategy}': options activations and norms are both false; "
                                "set at least one to true")


@dataclass(frozen=True)
class _SwapActivation:
    step: StepDerivative


@dataclass(frozen=True)
class _ShareNorm:
    centered: bool
    eps: float | None
    consumers: tuple[str, ...]


class ApproxBP(Strategy):
    exact = False
    order = 10  # swaps modules, so it runs before wrappers such as checkpoint (90)
    Options = ApproxBPOptions
    summary = ("2-bit GELU/SiLU derivative codes (16x smaller in fp32) and LayerNorm/RMSNorm outputs shared "
               "with the next linear; exact forward, approximate activation gradients")

    def __init__(self, options=None):
        super().__init__(options)
        self._planned: tuple[weakref.ref, dict] | None = None

    def plan(self, model: nn.Module) -> list[Touch]:
        touches, conversions = self._decide(model)
        self._planned = (weakref.ref(model), conversions)
        return touches

    def estimate_problem(self) -> str | None:
        return ("it recognises norms by running them on sample values and traces where their outputs go with a forward, "
                "which a model without weights cannot answer")

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        if self._planned is None or self._planned[0]() is not model:
            self.plan(model)
        conversions = self._planned[1]
        for touch in plan:
            conversion = conversions.get(touch.module)
            if isinstance(conversion, _SwapActivation):
                old = model.get_submodule(touch.module)
                _replace_module(model, old, ApproxActivation(old, conversion.step))
            elif isinstance(conversion, _ShareNorm):
                _share(model, touch.module, conversion)

    def _decide(self, model: nn.Module) -> tuple[list[Touch], dict[str, object]]:
        in_scope, excluded = self._scope(model)
        touches: list[Touch] = []
        conversions: dict[str, object] = {}
        candidates = [(n, m) for n, m in model.named_modules() if n and in_scope(n)
                      and not _inside_converted(model, n)]
        if self.options.activations:
            for name, module in candidates:
                kind = activation_kind(module)
                if kind is None:
                    continue
                family, forward = kind
                step = _STEPS[self.options.derivative][family]
                saving = "16x less than its fp32 input, 8x less than bf16"
                action = (f"{step.name}: exact {forward} forward, saves a 2-bit derivative code ({saving})"
                          if forward != "tanh-GELU" else
                          f"{step.name} backward, keeps its own tanh-GELU forward; saves a 2-bit code ({saving})")
                touches.append(Touch(name, type(module).__name__, action))
                conversions[name] = _SwapActivation(step)
        norms = [(n, m) for n, m in candidates if _is_norm_candidate(m)] if self.options.norms else []
        if norms:
            for name, module, outcome in self._norm_outcomes(model, norms, excluded):
                shared = isinstance(outcome, _ShareNorm)
                if shared:
                    label = "MS-LayerNorm" if outcome.centered else "MS-RMSNorm"
                    action = (f"{label}: affine applied by its readers {', '.join(outcome.consumers)}; saves only y "
                              "and rstd, y shared with them; exact")
                    conversions[name] = outcome
                else:
                    action = f"nothing to share: {outcome}"
                touches.append(Touch(name, type(module).__name__, action, changed=shared))
        if not conversions:
            detail = f"; e.g. {touches[0].module}: {touches[0].action}" if touches else ""
            raise StrategyError(
                f"strategy '{self.name}': nothing to convert in {type(model).__name__}: no GELU/SiLU module "
                f"(nn.GELU, nn.SiLU, Hugging Face GELU/SiLU classes) and no LayerNorm/RMSNorm read only by "
                f"linear layers{detail}")
        return touches, conversions

    def _scope(self, model: nn.Module):
        """Membership tests: in the target subtrees minus the excluded ones; in an excluded subtree."""
        in_scope = subtree_scope(model, strategy=self.name, targets=self.options.targets, exclude=self.options.exclude)
        excluded = matched(model, self.options.exclude, strategy=self.name, option="exclude")
        return in_scope, functools.partial(under, roots=excluded)

    def _norm_outcomes(self, model, norms, excluded):
        identified = {name: identify_norm(module) for name, module in norms}
        traceable = {name: module for name, module in norms if not isinstance(identified[name], str)}
        traced = trace_norm_outputs(model, traceable) if traceable else {}
        for name, module in norms:
            outcome = identified[name]
            if not isinstance(outcome, str):
                outcome = traced[name]
            if not isinstance(outcome, str):
                outcome = self._check_readers(model, identified[name], outcome, excluded)
            yield name, module, outcome

    @staticmethod
    def _check_readers(model, identity, consumers, excluded) -> _ShareNorm | str:
        """Only plain ``nn.Linear`` readers can take over the affine (a quantized or adapted subclass
        computes something else with its weight), excluded ones stay as they are, and the output embedding
        is left alone: fused or chunked loss heads (chunked_ce) multiply by its weight themselves."""
        get_output = getattr(model, "get_output_embeddings", None)
        output_embedding = get_output() if callable(get_output) else None
        for consumer_name in consumers:
            consumer = model.get_submodule(consumer_name)
            if excluded(consumer_name):
                return f"its reader '{consumer_name}' is excluded"
            if consumer is output_embedding:
                return f"its reader '{consumer_name}' is the output embedding, which loss heads use directly"
            if type(consumer) is not nn.Linear:
                return f"its reader '{consumer_name}' is a {type(consumer).__name__}, not a plain nn.Linear"
        return _ShareNorm(*identity, tuple(consumers))


def _inside_converted(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), (ApproxActivation, MSNorm))
               for i in range(1, len(parts)))


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (a module object may sit under several names)."""
    sites = [(module, child_name) for module in model.modules()
             for child_name, child in module._modules.items() if child is old]
    for module, child_name in sites:
        module._modules[child_name] = new


def _share(model: nn.Module, name: str, share: _ShareNorm) -> None:
    """The norm becomes an MSNorm and each reader an AffineInputLinear applying the norm's gamma/beta."""
    norm = MSNorm(model.get_submodule(name), share.centered, share.eps)
    _replace_module(model, model.get_submodule(name), norm)
    if norm.weight is None and norm.bias is None:
        return  # no affine: the plain linears already save the norm's output itself
    for consumer_name in share.consumers:
        linear = model.get_submodule(consumer_name)
        _replace_module(model, linear, AffineInputLinear(linear, norm))

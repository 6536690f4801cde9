"""Compressed saved activations: the forward is exact, backward gets a low-bit copy of each activation.

Every float tensor autograd saves (inputs of convolutions, linears, norms, activations, attention
products, element-wise products) goes through one saved-tensor stage that keeps it as groups of
``group_size`` consecutive values (in memory order), each group with its own bf16 minimum and step,
rounded stochastically to ``bits`` bits (unbiased) and bit-packed. Cheaper exact encodings are used
where they exist: a 1-bit mask for ReLU and dropout, max-pool window offsets in one byte, nothing but
the shape for average pooling, and for mostly-zero tensors a bitmap (shared with the ReLU/dropout mask
when the tensor is that op's output) or positions plus the non-zero values. Parameters and buffers are
never compressed; a tensor saved by several ops is encoded once.

Pretrained models carry hazards that tiny random ones hide, each handled where a tensor is packed: the
one value per group farthest from its mean is kept exact (``outliers``: massive activations); tensors
with inf/NaN or a log-softmax output stay exact, so do tensors that need no gradient and are not the
model's input; what ``scaled_dot_product_attention`` saves and the inputs a checkpointed block is
recomputed from keep at least 8 bits; norm inputs are quantised per standardised row (channel); smooth
activations (GELU, SiLU, hard-swish) save their derivative instead of their input.

Module knowledge comes from forward hooks: every module pushes its kind (conv, linear, ...) while it
runs, so the stage knows which kind of layer saves each tensor (the ``layers`` and ``exclude`` options,
the per-layer bit allocation of the adaptive mode). ReLU, dropout and pooling modules get a forward that
saves their compact encoding through ``ctx.save_for_backward``.

Quantisation and packing run as Triton kernels on CUDA (``_compress_triton``) and as the PyTorch
reference below elsewhere. Stochastic rounding draws from the strategy's own generators, so the model's
random stream (dropout masks) is the same with and without compression.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from lowmem_train import Strategy, StrategyError, Touch, repeated_blocks
from lowmem_train.forward_wrap import Phase, wrap_forward
from lowmem_train.knapsack import choose_one_each, in_units
from lowmem_train.module_scope import ModuleScope, module_scope
from lowmem_train.bitpack import pack_bits, pack_mask, unpack_bits, unpack_mask
from lowmem_train.saved_tensors import (
    _ACTIVE_METERS,
    is_dense,
    is_recompute_input,
    memory_key,
    memory_perm,
    saved_tensor_stages,
    storage_key,
)
from lowmem_train.targets import subtree_scope
from lowmem_train.undisturbed import cuda_devices, undisturbed

BITS = (2, 4, 8)
ADAPTIVE_BITS = (1, 2, 4, 8)  # every width divides 8, so codes pack into whole bytes
KINDS = ("conv", "linear", "norm", "activation", "dropout", "pool", "attention", "other", "top")
META_BYTES = 4  # per group: bf16 minimum + bf16 step


@dataclass
class CompressOptions:
    """Compressed saved activations (exact forward, low-bit copies for backward, 1-bit ReLU/dropout masks).

    ``bits``: 2, 4 or 8 bits per saved value (adaptive: the average); 2 bits ~ 12-15x less than fp32.
    ``group_size``: values sharing one bf16 min/step (power of two, 16..4096): smaller = finer, more
    overhead. ``layers``: kinds of layer whose saved tensors shrink: conv, linear, norm, activation, dropout,
    pool, attention, other (containers' own ops, e.g. the MLP's element-wise product), top (the root's own
    ops, e.g. the loss). ``targets``: the subtrees whose saved tensors shrink (null: the whole model).
    ``exclude``: subtrees that keep exact saved tensors, e.g. [fc, lm_head] (patterns: class names, module
    names or dotted suffixes, regexes). ``min_numel``: saved tensors with fewer values are kept as they are. ``outliers``:
    values per group kept exact below 8 bits (pretrained transformers' huge activations). ``adaptive``:
    per-class bits (1/2/4/8) from measured gradient sensitivity, averaging ``bits``. ``adapt_every``:
    optimizer steps between two calibrations (adaptive, Lightning callback). ``seed``: compress's own
    stochastic-rounding generator (the model's RNG is untouched)::

        lowmem-train strategy=compress strategy.compress.bits=2
        lowmem-train strategy=compress strategy.compress.bits=4 'strategy.compress.exclude=[fc]'
        lowmem-train recipe=llama_finetune strategy=compress strategy.compress.adaptive=true
        lowmem-train 'strategy=[compress,checkpoint]'   # compress the block inputs checkpointing keeps
        lowmem-train recipe=llama_finetune strategy=compress 'strategy.compress.targets=[lm_head]'
    """

    bits: int = 2  # 2, 4 or 8; in adaptive mode the average over all quantised values
    group_size: int = 256  # values per min/step group: a power of two in [16, 4096]
    layers: list[str] = field(default_factory=lambda: list(KINDS))  # kinds of layer whose saves shrink
    targets: Optional[list[str]] = None  # subtrees whose saves shrink (class names / names / regexes); None: all
    exclude: list[str] = field(default_factory=list)  # subtrees kept exact (same patterns)
    min_numel: int = 1024  # smaller saved tensors are kept as they are
    adaptive: bool = False  # per-tensor bits (1/2/4/8) by measured sensitivity, averaging `bits`
    adapt_every: int = 1000  # steps between two calibrations (adaptive mode; training forwards in a plain loop)
    seed: int = 0  # seed of the strategy's own stochastic-rounding generators
    outliers: int = 1  # values per group kept exact (the farthest from the group's mean), below 8 bits

    def validate(self, strategy: str) -> None:
        if self.bits not in BITS:
            raise StrategyError(f"strategy '{strategy}': option 'bits' must be one of {list(BITS)}, got {self.bits}")
        size = self.group_size
        if size < 16 or size > 4096 or size & (size - 1):
            raise StrategyError(
                f"strategy '{strategy}': option 'group_size' must be a power of two in [16, 4096], got {size}"
            )
        unknown = sorted(set(self.layers) - set(KINDS))
        if unknown or not self.layers:
            raise StrategyError(
                f"strategy '{strategy}': option 'layers' takes kinds among {list(KINDS)}, got {self.layers}"
            )
        if self.min_numel < 0:
            raise StrategyError(f"strategy '{strategy}': option 'min_numel' must be >= 0, got {self.min_numel}")
        if not 0 <= self.outliers <= 16 or self.outliers >= size // 2:
            raise StrategyError(
                f"strategy '{strategy}': option 'outliers' must be in [0, min(16, group_size/2)), got {self.outliers}"
            )
        if self.adapt_every < 1:
            raise StrategyError(f"strategy '{strategy}': option 'adapt_every' must be >= 1, got {self.adapt_every}")


# ---------------------------------------------------------------- quantisation (reference)


def round_to_bf16(x: Tensor, up: bool) -> Tensor:
    """fp32 values rounded to the nearest bf16 value towards +inf (``up``) or -inf, still as fp32.

    The stored minimum is rounded down and the step up, so the group's range always covers its values
    and stochastic rounding stays unbiased without clamping.
    """
    raw = x.view(torch.int32)
    truncated = raw & -65536  # towards zero
    away = (x > 0) if up else (x < 0)
    return (truncated + (((truncated != raw) & away).to(torch.int32) << 16)).view(torch.float32)


def _grid(flat: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``flat`` as fp32 [groups, group_size] (the last group padded with its last value, which leaves its
    min and max unchanged) with each group's bf16 minimum and step."""
    n = flat.numel()
    groups = -(-n // group_size)
    x = flat.float()
    pad = groups * group_size - n
    if pad:
        x = torch.cat([x, x[-1:].expand(pad)])
    x = x.view(groups, group_size)
    low, high = x.aminmax(dim=1)
    low = round_to_bf16(low, up=False)
    step = round_to_bf16((high - low) / (2**bits - 1), up=True)
    return x, low, step


def _scaled(x: Tensor, low: Tensor, step: Tensor) -> Tensor:
    divisor = torch.where(step > 0, step, torch.ones_like(step))  # step 0: every value equals low
    return (x - low[:, None]).div_(divisor[:, None])


def quantize(flat: Tensor, bits: int, group_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Stochastic per-group quantisation of a 1-D float tensor: (packed uint8 codes, bf16 [groups, 2] meta).

    ``code = floor((x - min) / step + u)`` with ``u ~ U[0, 1)`` is ``x`` in expectation (unbiased).
    """
    x, low, step = _grid(flat, bits, group_size)
    scaled = _scaled(x, low, step)
    scaled.add_(torch.rand(scaled.shape, generator=generator, device=scaled.device, dtype=scaled.dtype))
    codes = scaled.floor_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return pack_bits(codes.view(-1), bits), torch.stack([low, step], dim=1).to(torch.bfloat16)


def rounding_variance(flat: Tensor, bits: int, group_size: int) -> float:
    """The variance stochastic rounding at ``bits`` adds, summed over values: ``step**2 * f * (1 - f)``."""
    x, low, step = _grid(flat, bits, group_size)
    fraction = _scaled(x, low, step).frac_()
    per_value = fraction * (1 - fraction) * step[:, None].square()
    return float(per_value.view(-1)[: flat.numel()].sum())


def dequantize(packed: Tensor, meta: Tensor, bits: int, group_size: int, n: int, dtype: torch.dtype) -> Tensor:
    groups = meta.shape[0]
    codes = unpack_bits(packed, bits, groups * group_size).view(groups, group_size)
    low, step = meta.float().unbind(1)
    return torch.addcmul(low[:, None], codes.float(), step[:, None]).view(-1)[:n].to(dtype)


def split_outliers(flat: Tensor, k: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` values of each group farthest from its mean, taken out: (the rest, with those replaced
    by the mean of the others, so they no longer set the group's range; their positions in the group;
    their exact values).

    Pretrained transformers carry a few huge activations (hundreds to tens of thousands of times the
    typical value, at a few tokens and channels): one of them in a group makes its step so coarse that
    every other value of the group is rounded to noise.
    """
    n = flat.numel()
    groups = -(-n // group_size)
    x = F.pad(flat, (0, groups * group_size - n)).view(groups, group_size)
    mean = x.mean(dim=1, keepdim=True, dtype=torch.float32)
    positions = (x.float() - mean).abs_().topk(k, dim=1, sorted=False).indices
    values = x.gather(1, positions)
    rest_mean = (mean * group_size - values.float().sum(dim=1, keepdim=True)) / (group_size - k)
    rest = x.scatter(1, positions, rest_mean.to(x.dtype).expand(-1, k))
    index_dtype = torch.uint8 if group_size <= 256 else torch.int16
    return rest.view(-1)[:n], positions.to(index_dtype), values


def merge_outliers(flat: Tensor, positions: Tensor, values: Tensor, group_size: int) -> Tensor:
    n = flat.numel()
    groups = positions.shape[0]
    x = F.pad(flat, (0, groups * group_size - n)).view(groups, group_size)
    return x.scatter_(1, positions.long(), values.to(x.dtype)).view(-1)[:n]


def _triton():
    """The Triton kernels (used for CUDA tensors only), or None where Triton is not installed."""
    try:
        from lowmem_train.strategies import _compress_triton
    except ImportError:
        return None
    return _compress_triton


# ---------------------------------------------------------------- memory layout


def memory_order(x: Tensor) -> tuple[Tensor, tuple[int, ...] | None]:
    """``x`` flattened in memory order, and the permutation that ``restore`` needs."""
    perm = memory_perm(x)
    return (x if perm is None else x.permute(perm)).reshape(-1), perm


def restore(flat: Tensor, shape: torch.Size, perm: tuple[int, ...] | None) -> Tensor:
    if perm is None:
        return flat.view(shape)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return flat.view([shape[d] for d in perm]).permute(inverse)


# ---------------------------------------------------------------- module kinds


@dataclass(frozen=True)
class Scope:
    """What the stage knows about the module running while a tensor is saved."""

    name: str
    family: str  # the name with block indices wildcarded: what repeated blocks have in common
    kind: str
    compress: bool  # kind selected by `layers` and not under an excluded module
    per_channel: bool = False  # a norm whose statistics are per channel (dim 1: batch/instance/group norms)


_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")


def module_kind(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.Linear, nn.Bilinear)) or name == "Conv1D":  # HF GPT-2 style linear
        return "linear"
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or \
            name.endswith("Norm"):
        return "norm"
    if isinstance(module, nn.MultiheadAttention) or "Attention" in name:
        return "attention"
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "dropout"
    if isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        return "pool"
    if type(module).__module__ in _ACTIVATION_MODULES:
        return "activation"
    return "other"


def module_scopes(model: nn.Module, layers: list[str], in_scope: Callable[[str], bool]) -> dict[str, Scope]:
    """The scope of every module; only modules ``in_scope`` (targets minus exclude subtrees) compress.

    The family of a module inside a repeated block names the block by its parent plus ``*``
    (``model.layers.*.mlp.down_proj``), so the adaptive mode calibrates one class per position in the
    block rather than per layer.
    """
    blocks = {name: name.rpartition(".")[0] + (".*" if "." in name else "*") for name, _ in repeated_blocks(model)}
    scopes = {}
    for name, module in model.named_modules():
        kind = module_kind(module)
        if not name and kind == "other":  # the root's own code: loss, glue
            kind = "top"
        family = name
        for block, wildcard in blocks.items():
            if name == block or name.startswith(block + "."):
                family = wildcard + name[len(block):]
                break
        per_channel = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm))
        scopes[name] = Scope(name, f"{family}:{type(module).__name__}", kind, kind in layers and in_scope(name),
                             per_channel)
    return scopes


_TOP = Scope("", "", "top", True)
_EXACT = "exact"  # the encoding of a tensor kept as it is
_LOG_DOMAIN_OPS = {"LogSoftmaxBackward0"}
_QUANTIZABLE = 2.0**126  # larger magnitudes (and inf/NaN) are kept as they are: a group's range must stay finite


@dataclass
class _Probe:
    """A calibration pass: which slot class is rounded at which bits (all others at 8), and what the
    reference pass (``probed`` None: everything at 8 bits) measured of each class's values."""

    probed: tuple | None
    probe_bits: int = 0
    values: Counter = field(default_factory=Counter)  # class -> quantised values per forward
    noise: dict = field(default_factory=dict)  # class -> {bits: summed rounding variance}


class CompressStage:
    """Pack: encode a saved float tensor (quantised / bitmap / positions). Unpack: decode it.

    Per forward it remembers which tensors are zero outside a ReLU/dropout mask (by ``memory_key``), so their
    encoding reuses that mask; the pipeline packs memory saved by several ops once.

    A *slot* is the i-th tensor a module saves in a forward; a slot *class* is a slot with the indices
    of repeated blocks wildcarded (``model.layers.*.mlp.down_proj`` #0). The adaptive mode (``adaptive``)
    gives each class its own bits; ``codec`` does the encodings.
    """

    def __init__(self, options: CompressOptions):
        self.options = options
        self.codec = GroupCodec(options)
        self.adaptive = AdaptiveBits(options)
        self._modules: ModuleScope | None = None
        self._scope_of: dict[str, Scope] = {}
        self._zero_outside: dict = {}
        self._buffers: set[int] = set()
        self._inputs: set[int] = set()  # storages of the model's inputs (an image batch is compressed)
        self._derivatives: set[int] = set()  # storages of saved activation derivatives (no grad, yet quantised)
        self._attention_mode: _FusedAttentionCalls | None = None
        self.in_fused_attention = 0  # depth of F.scaled_dot_product_attention calls running
        self._slot_counts: Counter = Counter()
        self._in_forward = False  # not during a checkpoint's recomputation in backward

    # --- forward bracketing, called from module hooks

    def begin_forward(self, model: nn.Module, args, kwargs) -> None:
        self._clear()
        self._buffers = {storage_key(b.untyped_storage()) for b in model.buffers()}
        self._inputs = {storage_key(leaf.untyped_storage()) for leaf in tree_flatten((args, kwargs))[0]
                        if isinstance(leaf, Tensor)}
        self._in_forward = True
        self._attention_mode = _FusedAttentionCalls(self)
        self._attention_mode.__enter__()

    def end_forward(self, model: nn.Module, args, output) -> None:
        self._clear()
        self._in_forward = False
        if self._attention_mode is not None:
            self._attention_mode.__exit__(None, None, None)
            self._attention_mode = None

    def _clear(self) -> None:
        self._zero_outside.clear()
        self._slot_counts.clear()
        self._inputs = set()
        self._derivatives = set()

    def track(self, modules: ModuleScope, scopes: dict[str, Scope]) -> None:
        """Read which module is saving from ``modules``; ``scopes`` says how each module's saves are kept."""
        self._modules, self._scope_of = modules, scopes

    def note_zero_outside(self, tensor: Tensor, packed_mask: Tensor) -> None:
        """``tensor`` is zero wherever the (memory-order) mask is 0: its encoding may reuse the mask."""
        if self._in_forward:
            key = memory_key(tensor)
            self._zero_outside[key] = (StorageWeakRef(tensor.untyped_storage()), packed_mask)

    def note_derivative(self, tensor: Tensor) -> None:
        """``tensor`` is an activation's derivative saved for backward: quantised although it needs no grad."""
        self._derivatives.add(storage_key(tensor.untyped_storage()))

    # --- pack / unpack

    def pack(self, value):
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.layout != torch.strided \
                or value.numel() < self.options.min_numel:
            return value
        if storage_key(value.untyped_storage()) in self._buffers:
            return value
        if any(stride == 0 and size > 1 for stride, size in zip(value.stride(), value.shape)):
            return value  # broadcast: a quantised copy would be bigger than the tensor's storage
        scope = self._scope_of.get(self._modules.current(), _TOP) if self._modules is not None else _TOP
        index = self._slot_counts[scope.name]
        self._slot_counts[scope.name] += 1
        if not scope.compress or backward_constant(value, self._inputs | self._derivatives):
            return value
        perm, key = memory_perm(value), memory_key(value)
        masked = _lookup(self._zero_outside, key) is not None
        stats = row_statistics(value, scope.per_channel) if scope.kind == "norm" and not masked else None
        value_ = value if stats is None else value.float().sub(stats[0].float()).div_(stats[1].float()).to(value.dtype)
        flat = (value_ if perm is None else value_.permute(perm)).reshape(-1)  # in the value's memory order
        at_least_8 = self.in_fused_attention or is_recompute_input(value)
        payload = self._encode(flat, key, (scope.name, index), (scope.family, index), 8 if at_least_8 else 0)
        if payload is _EXACT:
            return value
        if stats is not None:
            payload = ("standardized", *stats, payload)
        return (value.shape, perm, value.dtype, payload)

    def unpack(self, value):
        if isinstance(value, Tensor):
            return value
        shape, perm, dtype, payload = value
        if payload[0] != "standardized":
            return restore(self.codec.decode(payload, dtype), shape, perm)
        _, mean, std, payload = payload
        standardized = restore(self.codec.decode(payload, dtype), shape, perm)
        return standardized.float().mul_(std.float()).add_(mean.float()).to(dtype)

    def _encode(self, flat: Tensor, key, slot, slot_class, min_bits: int):
        if not bool(flat.abs().amax() < _QUANTIZABLE):  # inf / NaN (e.g. an additive attention mask), or a
            return _EXACT                              # range whose width overflows: kept as it is
        bits = max(self.adaptive.bits_for(slot_class), min_bits)
        return self.codec.encode(flat, bits, _lookup(self._zero_outside, key), slot, slot_class, self.adaptive.probe)


def backward_constant(value: Tensor, quantized_anyway: set[int]) -> bool:
    """Whether ``value`` must stay exact whatever its scope: log-domain values and tensors that carry
    no gradient.

    A log-softmax output (the loss path) or an attention kernel's log-sum-exp is exponentiated in
    backward, so a rounding error of ``d`` becomes a factor ``exp(d)``: at 2 to 8 bits the gradient
    loses its direction (or overflows). Tensors that need no gradient and are not the model's input
    are the backward's constants (rotary cos/sin tables, attention masks, softmax statistics): one
    rounding of them is shared by every sample and head instead of averaging out, and they are small.
    ``quantized_anyway``: storages of the model's inputs and of saved activation derivatives.
    """
    if value.grad_fn is not None and value.grad_fn.name() in _LOG_DOMAIN_OPS:
        return True
    return not value.requires_grad and storage_key(value.untyped_storage()) not in quantized_anyway


def row_statistics(value: Tensor, per_channel: bool):
    """bf16 (mean, std) per row (per channel for batch/group norms) of a norm's input, or None.

    A norm's backward reads its input only relative to each row's (channel's) own mean and spread, and
    rows of very different scales share a quantisation group: a class token or a low-variance channel
    next to large ones (ViT, BatchNorm), or a pretrained LLM's massive-activation token next to normal
    ones. Quantising the standardised rows and keeping their bf16 statistics gives each row its own step.
    """
    if value.dim() < 2:
        return None
    dims = [d for d in range(value.dim()) if d != 1] if per_channel else [-1]
    std, mean = torch.std_mean(value.float(), dim=dims, keepdim=True, correction=0)
    if not bool(torch.isfinite(std).all() and torch.isfinite(mean).all()):
        return None  # kept exact by the encoding
    return mean.to(torch.bfloat16), std.clamp_min_(1e-30).to(torch.bfloat16)  # 4 bytes a row, like a group's


class GroupCodec:
    """Group-wise stochastic rounding of a flat tensor, stored dense, as a bitmap of its nonzeros or as their
    positions, whichever is smallest; rounding draws from the strategy's own generators."""

    def __init__(self, options: CompressOptions):
        self.options = options
        self.group_size = options.group_size
        self._generators: dict[torch.device, torch.Generator] = {}

    def encode(self, flat: Tensor, bits: int, mask, slot, slot_class, probe: _Probe | None):
        """``flat`` at ``bits``; ``mask``: the packed mask it is zero outside of (a ReLU's), if any."""
        n = flat.numel()
        if mask is not None:
            if isinstance(flat, FakeTensor):
                raise StrategyError("strategy 'compress': estimate=true cannot size what it keeps of a ReLU's or "
                                    "dropout's output: that is its nonzero values, which fake tensors do not have")
            values = flat[unpack_mask(mask, n)]
            return ("bitmap", n, mask, self._quantize(values, bits, slot, slot_class, probe))
        # estimate=true cannot know a tensor's zeros: counted dense (an upper bound where a real one is sparse)
        nonzero = n if isinstance(flat, FakeTensor) else int(torch.count_nonzero(flat))
        dense, sparse_values = self.nbytes(n, bits, flat.element_size()), self.nbytes(nonzero, bits, flat.element_size())
        bitmap = -(-n // 8) + sparse_values
        index = (4 if n < 2**31 else 8) * nonzero + sparse_values
        if min(bitmap, index) >= dense:
            return ("dense", self._quantize(flat, bits, slot, slot_class, probe))
        if bitmap <= index:
            nonzero_mask = flat != 0
            return ("bitmap", n, pack_mask(nonzero_mask), self._quantize(flat[nonzero_mask], bits, slot, slot_class, probe))
        positions = torch.nonzero(flat).view(-1)
        positions = positions.to(torch.int32) if n < 2**31 else positions
        return ("index", n, positions, self._quantize(flat[positions], bits, slot, slot_class, probe))

    def nbytes(self, n: int, bits: int, value_bytes: int) -> int:
        """Bytes of ``n`` values quantised at ``bits``, with their exact outliers (``value_bytes`` each)."""
        groups = -(-n // self.group_size)
        outliers = self.options.outliers if bits < 8 else 0
        index_bytes = 1 if self.group_size <= 256 else 2
        return groups * (self.group_size * bits // 8 + META_BYTES + outliers * (index_bytes + value_bytes))

    def _quantize(self, flat: Tensor, bits: int, slot, slot_class, probe: _Probe | None):
        n = flat.numel()
        if n == 0:
            return (bits, 0, flat.new_empty(0, dtype=torch.uint8), flat.new_empty((0, 2), dtype=torch.bfloat16), None)
        outliers = None
        if self.options.outliers and bits < 8:
            flat, *outliers = split_outliers(flat, self.options.outliers, self.group_size)
        if probe is not None and probe.probed is None:  # the reference pass
            probe.values[slot_class] += n
            noise = probe.noise.setdefault(slot_class, Counter())
            for b in ADAPTIVE_BITS:
                noise[b] += rounding_variance(flat, b, self.group_size)
        kernels = _triton() if flat.is_cuda and n < 2**31 else None
        if kernels is not None:
            seed = int(torch.randint(2**31 - 1, (), generator=self._generator(torch.device("cpu"), slot, probe)))
            packed, meta = kernels.quantize(flat, bits, self.group_size, seed)
        else:
            packed, meta = quantize(flat, bits, self.group_size, self._generator(flat.device, slot, probe))
        return (bits, n, packed, meta, outliers)

    def decode(self, payload, dtype: torch.dtype) -> Tensor:
        if payload[0] == "dense":
            return self._dequantize(payload[1], dtype)
        _, n, where, quantized = payload
        values = self._dequantize(quantized, dtype)
        out = values.new_zeros(n)
        if payload[0] == "bitmap":
            return out.masked_scatter_(unpack_mask(where, n), values)
        return out.index_copy_(0, where.long(), values)

    def _dequantize(self, quantized, dtype: torch.dtype) -> Tensor:
        bits, n, packed, meta, outliers = quantized
        kernels = _triton() if packed.is_cuda and n else None
        if kernels is not None:
            flat = kernels.dequantize(packed, meta, bits, self.group_size, n, dtype)
        else:
            flat = dequantize(packed, meta, bits, self.group_size, n, dtype)
        return flat if outliers is None else merge_outliers(flat, *outliers, self.group_size)

    def _generator(self, device: torch.device, slot, probe: _Probe | None) -> torch.Generator:
        """The strategy's own random stream. In calibration each slot draws from its own seed, so a pass
        that probes one class rounds every other tensor exactly as the reference pass did."""
        if probe is not None:
            return torch.Generator(device).manual_seed(zlib.crc32(repr(slot).encode()) + self.options.seed)
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device).manual_seed(self.options.seed)
            self._generators[device] = generator
        return generator


class AdaptiveBits:
    """The adaptive mode: bits per slot class from measured gradient sensitivity (``calibrate``), and in a
    plain loop, calibration on the model's own steps (``tap_output``, ``calibrate_if_due``)."""

    def __init__(self, options: CompressOptions):
        self.options = options
        self.bits = options.bits
        self.class_bits: dict[tuple[str, int], int] = {}
        self.probe: _Probe | None = None  # during a calibration pass
        self.loop_calibration = options.adaptive  # off under the Lightning trainer: its callback calibrates
        self._training_forwards = 0
        self._tapped = None  # (args, kwargs, output gradients) of a step to calibrate on

    def bits_for(self, slot_class) -> int:
        if self.probe is None:  # adaptive and not yet calibrated (a plain loop's first step): 8 bits
            uncalibrated = self.options.adaptive and not self.class_bits
            return ADAPTIVE_BITS[-1] if uncalibrated else self.class_bits.get(slot_class, self.bits)
        return self.probe.probe_bits if self.probe.probed == slot_class else ADAPTIVE_BITS[-1]

    def calibrate(self, parameters: list[nn.Parameter], loss_fn) -> dict[tuple[str, int], int]:
        """Measure each slot class's sensitivity and give it bits in {1, 2, 4, 8}, averaging ``bits``.

        One reference pass keeps everything at 8 bits; then one pass per class rounds that class at
        ``bits`` (4 when ``bits`` is 8) and every other tensor exactly as the reference did (per-slot
        seeds), so the squared difference of the two gradients is the variance the class adds (GACT's
        sensitivity), nearly free of cross terms with the other classes' rounding. 1 bit is measured the
        same way (its error grows faster than its rounding variance: second-order terms in norms); 2 to 8
        bits scale the other measurement by the rounding variance of the class's own values at each width.
        Calibration passes hold 8-bit activations: a quarter of plain backprop's activation memory.
        """
        def gradient(probed, bits=0):
            self.probe = _Probe(probed, bits)
            try:
                loss = loss_fn()
                grads = torch.autograd.grad(loss, parameters, allow_unused=True)
            finally:
                probe, self.probe = self.probe, None
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                              for g, p in zip(grads, parameters)])
            return flat, probe

        reference, probe = gradient(None)
        measured = min(self.bits, 4)  # the reference holds 8 bits: probe below it
        variance = {}
        for cls, noise in probe.noise.items():
            at_bits, at_one = (float((gradient(cls, b)[0] - reference).square().sum()) for b in (measured, 1))
            variance[cls] = {b: at_bits * noise[b] / noise[measured] if noise[measured] else 0.0
                             for b in ADAPTIVE_BITS}
            variance[cls][1] = at_one
        self.class_bits = allocate_bits(variance, dict(probe.values), self.bits)
        self._tapped, self._training_forwards = None, 1  # a plain loop's next calibration: adapt_every steps on
        return self.class_bits

    # --- in a plain loop: calibrate on the model's own steps

    def tap_output(self, model: nn.Module, args, kwargs, output):
        """Every ``adapt_every``-th training forward since the last calibration (the first when there was
        none): route the outputs through an identity whose backward keeps the loss's gradient w.r.t. each
        output, so the next forward can calibrate on this batch with the user's own loss
        (``sum(output * gradient)`` has the same parameter gradients)."""
        if not self.loop_calibration or self.probe is not None or not torch.is_grad_enabled():
            return None
        self._training_forwards += 1
        if (self._training_forwards - 1) % self.options.adapt_every:
            return None
        leaves, spec = tree_flatten(output)
        at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.requires_grad]
        if not at:
            return None
        gradients: list = []
        self._tapped = (args, kwargs, gradients)
        for i, tapped in zip(at, _OutputGradients.apply(gradients, *(leaves[i] for i in at))):
            leaves[i] = tapped
        return tree_unflatten(leaves, spec)

    def calibrate_if_due(self, model: nn.Module, args, kwargs) -> None:
        """Forward pre-hook: calibrate on the tapped step once its backward has run."""
        if self.probe is not None or self._tapped is None or not self._tapped[2]:
            return
        (tapped_args, tapped_kwargs, gradients), self._tapped = self._tapped, None

        def surrogate_loss():
            outputs = [leaf for leaf in tree_flatten(model(*tapped_args, **tapped_kwargs))[0]
                       if isinstance(leaf, Tensor) and leaf.requires_grad]
            return sum((o * g).sum() for o, g in zip(outputs, gradients) if g is not None)

        meters = _ACTIVE_METERS.set(())  # a meter around this forward counts what it keeps, not the passes
        try:
            calibrate(model, surrogate_loss)
        finally:
            _ACTIVE_METERS.reset(meters)


def _lookup(table: dict, key):
    """A per-forward cache entry, unless its storage has been freed since (its address may be reused)."""
    entry = table.get(key)
    if entry is None or entry[0].expired():
        return None
    return entry[1]


class _FusedAttentionCalls(TorchFunctionMode):
    """Counts running ``scaled_dot_product_attention`` calls, whose saved tensors keep at least 8 bits: a
    fused kernel's backward recomputes the probabilities as ``exp(q.k - logsumexp)`` against the exact
    log-sum-exp of the forward, so a coarse rounding of q or k is exponentiated (2 bits overflow to inf),
    and it subtracts ``rowsum(dO * O)`` from every key's gradient, a small difference a 2-bit O drowns."""

    def __init__(self, stage: CompressStage):
        super().__init__()
        self.stage = stage

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.stage.in_fused_attention += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.stage.in_fused_attention -= 1


class _OutputGradients(torch.autograd.Function):
    """Identity on the model's outputs; backward records the gradient of the loss w.r.t. each output."""

    @staticmethod
    def forward(ctx, record: list, *outputs):
        ctx.record = record
        ctx.set_materialize_grads(False)
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.record[:] = [None if g is None else g.detach() for g in grads]
        return (None, *grads)


def allocate_bits(variance: dict, values: dict, bits: int, resolution: int = 4096) -> dict:
    """Bits per class in {1, 2, 4, 8} minimising the summed gradient variance ``variance[cls][b]`` with
    ``sum(n * b) <= bits * sum(n)`` (the core's knapsack, the budget cut into ``resolution`` units; the
    uniform choice always fits, so the result is never worse than it)."""
    classes = [cls for cls in values if values[cls] > 0]
    if not classes:
        return {}
    costs, budget = in_units([[values[cls] * b for b in ADAPTIVE_BITS] for cls in classes],
                             bits * sum(values[cls] for cls in classes), resolution)
    budget = max(budget, sum(cost[ADAPTIVE_BITS.index(bits)] for cost in costs))
    picks = choose_one_each(costs, [[variance[cls][b] for b in ADAPTIVE_BITS] for cls in classes], budget)
    return {cls: ADAPTIVE_BITS[i] for cls, i in zip(classes, picks)}


# ---------------------------------------------------------------- exact compact encodings of single ops


class _ReLUMask(torch.autograd.Function):
    """ReLU that keeps a 1-bit mask (in the output's memory order) instead of its output."""

    @staticmethod
    def forward(ctx, x: Tensor, inplace: bool):
        out = x.relu_() if inplace else x.relu()
        if inplace:
            ctx.mark_dirty(x)
        flat, perm = memory_order(out)
        mask = pack_mask(flat > 0)
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        ctx.layout = (out.shape, perm)
        return out, mask

    @staticmethod
    def backward(ctx, grad: Tensor, _):
        (mask,) = ctx.saved_tensors
        shape, perm = ctx.layout
        return grad * restore(unpack_mask(mask, shape.numel()), shape, perm), None


class _DropoutMask(torch.autograd.Function):
    """Dropout that keeps its 1-bit mask. ``native_dropout`` draws the very mask ``F.dropout`` would."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float):
        out, keep = torch.native_dropout(x, p, True)
        flat, perm = memory_order(keep)
        mask = pack_mask(flat)
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        ctx.layout, ctx.scale = (keep.shape, perm), 1 / (1 - p)
        return out, mask

    @staticmethod
    def backward(ctx, grad: Tensor, _):
        (mask,) = ctx.saved_tensors
        shape, perm = ctx.layout
        return grad * restore(unpack_mask(mask, shape.numel()), shape, perm) * ctx.scale, None


class _MaxPoolWindow(torch.autograd.Function):
    """Max pooling that keeps, per output, the offset of the maximum inside its window (one byte when the
    window has at most 256 values) instead of the input and int64 indices."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: int, kernel, stride, padding, dilation, ceil_mode: bool):
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        out, indices = pool(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
        in_size, out_size = x.shape[-dims:], out.shape[-dims:]
        coords = _unravel(indices, in_size)
        offset = torch.zeros_like(indices)
        for d in range(dims):
            start = _positions(out_size, d, indices.device) * stride[d] - padding[d]
            offset = offset * kernel[d] + (coords[d] - start) // dilation[d]
        window = offset.to(torch.uint8 if math.prod(kernel) <= 256 else torch.int32)
        ctx.save_for_backward(window)
        ctx.geometry = (x.shape, dims, kernel, stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (window,) = ctx.saved_tensors
        shape, dims, kernel, stride, padding, dilation = ctx.geometry
        in_size, out_size = shape[-dims:], grad.shape[-dims:]
        offset, flat_index = window.long(), 0
        for d in reversed(range(dims)):
            k = offset % kernel[d]
            offset = offset // kernel[d]
            coord = _positions(out_size, d, grad.device) * stride[d] - padding[d] + k * dilation[d]
            flat_index = flat_index + coord * math.prod(in_size[d + 1:])
        planes = math.prod(shape[:-dims])
        grad_in = grad.new_zeros(planes, math.prod(in_size))
        grad_in.scatter_add_(1, flat_index.reshape(planes, -1), grad.reshape(planes, -1))
        return grad_in.view(shape), None, None, None, None, None, None


def _unravel(flat_index: Tensor, size) -> list[Tensor]:
    coords, rest = [], flat_index
    for extent in reversed(size):
        coords.append(rest % extent)
        rest = rest // extent
    return coords[::-1]


def _positions(out_size, d: int, device) -> Tensor:
    """Output coordinate along spatial dim ``d``, shaped to broadcast over the output's spatial dims."""
    view = [1] * len(out_size)
    view[d] = out_size[d]
    return torch.arange(out_size[d], device=device).view(view)


class _ShapeOnly(torch.autograd.Function):
    """A linear op (average pooling) whose backward needs only the input's shape: keeps nothing.

    Backward is the op's vector-Jacobian product at a zero input, computed by autograd.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fn):
        ctx.fn, ctx.like = fn, (x.shape, x.stride() if is_dense(x, memory_perm(x)) else None, x.dtype, x.device)
        return fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shape, stride, dtype, device = ctx.like
        zero = torch.zeros(shape, dtype=dtype, device=device) if stride is None else \
            torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
        zero.requires_grad_(True)
        with torch.enable_grad():
            (grad_in,) = torch.autograd.grad(ctx.fn(zero), zero, grad)
        return grad_in, None


class _SavedDerivative(torch.autograd.Function):
    """An element-wise activation that saves its derivative ``f'(x)`` instead of ``x``.

    Backward is then linear in what was saved (``grad * f'(x)``), so its stochastic rounding stays unbiased
    and its error is one step of f', where rounding x and evaluating f' on it is biased (at 2 bits, with
    only the activations compressed: input-gradient cosine 0.21 -> 0.62 on the zoo's EfficientNet, 0.34 ->
    0.41 on its MobileNetV3).
    """

    @staticmethod
    def forward(ctx, x: Tensor, function, derivative, stage: CompressStage):
        derivative_ = derivative(x).to(x.dtype)
        stage.note_derivative(derivative_)
        ctx.save_for_backward(derivative_)
        return function(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (derivative,) = ctx.saved_tensors
        return grad * derivative, None, None, None


def _silu_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(x.float())
    return s * (1 + x.float() * (1 - s))


def _gelu_derivative(x: Tensor) -> Tensor:
    x = x.float()
    return 0.5 * (1 + torch.erf(x * math.sqrt(0.5))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gelu_tanh_derivative(x: Tensor) -> Tensor:
    x = x.float()
    t = torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)


def _hardswish_derivative(x: Tensor) -> Tensor:
    x = x.float()
    return torch.where(x <= -3, 0.0, torch.where(x >= 3, 1.0, (2 * x + 3) / 6))  # as aten at the kinks


def _activation_pair(module: nn.Module):
    """(f, f') of an element-wise activation module whose backward reads its input, or None."""
    name = type(module).__name__
    if name in ("SiLU", "SiLUActivation"):
        return F.silu, _silu_derivative
    if name == "Hardswish":
        return F.hardswish, _hardswish_derivative
    if name == "GELU" and getattr(module, "approximate", "none") == "tanh" or \
            name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh"):
        return functools.partial(F.gelu, approximate="tanh"), _gelu_tanh_derivative
    if name in ("GELU", "GELUActivation"):
        return F.gelu, _gelu_derivative
    return None


def _derivative_forward(stage: CompressStage, module: nn.Module, inner, x):
    if not _needs_grad(x):
        return inner(x)
    function, derivative = _activation_pair(module)
    return _SavedDerivative.apply(x, function, derivative, stage)


def _needs_grad(x) -> bool:
    return isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()


def _relu_forward(stage: CompressStage, module: nn.ReLU, inner, x):
    if not _needs_grad(x):
        return inner(x)
    out, mask = _ReLUMask.apply(x, module.inplace)
    stage.note_zero_outside(out, mask)
    return out


def _dropout_forward(stage: CompressStage, module: nn.Dropout, inner, x):
    if not (_needs_grad(x) and module.training and 0 < module.p < 1):
        return inner(x)
    out, mask = _DropoutMask.apply(x, module.p)
    stage.note_zero_outside(out, mask)
    return out


_MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


def _max_pool_forward(stage: CompressStage, module: nn.Module, inner, x):
    dims = next(d for cls, d in _MAX_POOLS.items() if isinstance(module, cls))
    if not _needs_grad(x) or x.dim() < dims + 1:
        return inner(x)
    expand = nn.modules.utils._ntuple(dims)
    stride = module.stride if module.stride is not None else module.kernel_size
    return _MaxPoolWindow.apply(x, dims, expand(module.kernel_size), expand(stride), expand(module.padding),
                                expand(module.dilation), module.ceil_mode)


def _avg_pool_forward(stage: CompressStage, module: nn.Module, inner, x):
    if not _needs_grad(x):
        return inner(x)
    return _ShapeOnly.apply(x, inner)


def _special_forward(module: nn.Module):
    """The compact-encoding forward for this module, or None (its saves go through the stage)."""
    pooling = nn.modules.pooling
    if type(module) is nn.ReLU:
        return _relu_forward
    if type(module) is nn.Dropout:
        return _dropout_forward
    if isinstance(module, tuple(_MAX_POOLS)) and not module.return_indices:
        return _max_pool_forward
    if isinstance(module, (pooling._AvgPoolNd, pooling._AdaptiveAvgPoolNd)):
        return _avg_pool_forward
    if _activation_pair(module) is not None:
        return _derivative_forward
    return None


_SPECIAL_ACTIONS = {
    _relu_forward: "1-bit mask instead of the output",
    _dropout_forward: "1-bit mask",
    _max_pool_forward: "window offsets (1 byte) instead of input + int64 indices",
    _avg_pool_forward: "input shape only",
    _derivative_forward: "its derivative instead of its input, as codes",
}


# ---------------------------------------------------------------- the plugin


class Compress(Strategy):
    exact = False
    order = 40  # swaps forwards of ReLU/dropout/pooling: before wrappers such as checkpointing (90)
    Options = CompressOptions
    summary = ("keeps saved activations as 2/4/8-bit stochastic per-group codes and 1-bit masks "
               "(~12-15x less at 2 bits); gradients approximate, unbiased")

    def __init__(self, options=None):
        super().__init__(options)
        self.stage = CompressStage(self.options)

    def plan(self, model: nn.Module) -> list[Touch]:
        scopes = self._scopes(model)
        touches = []
        for name, module in model.named_modules():
            if not scopes[name].compress:
                continue
            special = _special_forward(module)
            action = _SPECIAL_ACTIONS[special] if special else f"saved tensors as {self.options.bits}-bit codes"
            if scopes[name].kind in ("other", "top"):
                action = f"its own ops' saved tensors as {self.options.bits}-bit codes"
            touches.append(Touch(name, type(module).__name__, action, phase=Phase.REPLACE if special else None))
        if not touches:
            present = sorted({scope.kind for scope in scopes.values()})
            raise StrategyError(
                f"strategy '{self.name}': no module of {type(model).__name__} has a kind in layers="
                f"{self.options.layers}" + (f" in targets={self.options.targets}" if self.options.targets else "")
                + (f" outside exclude={self.options.exclude}" if self.options.exclude else "")
                + f"; kinds present: {present}"
            )
        return touches

    def apply(self, model: nn.Module, plan: list[Touch]) -> None:
        stage = self.stage
        scopes = self._scopes(model)
        if self.options.adaptive:  # before the stage's own hooks: calibration runs whole forwards
            model.register_forward_pre_hook(stage.adaptive.calibrate_if_due, with_kwargs=True)
        model.register_forward_pre_hook(stage.begin_forward, with_kwargs=True)
        model.register_forward_hook(stage.end_forward, always_call=True)
        if self.options.adaptive:
            model.register_forward_hook(stage.adaptive.tap_output, with_kwargs=True)
        stage.track(module_scope(model), scopes)
        for name, module in model.named_modules():
            special = _special_forward(module) if scopes[name].compress else None
            if special is not None:
                wrap_forward(module, self.name, Phase.REPLACE, functools.partial(special, stage), name=name)

    def _scopes(self, model: nn.Module) -> dict[str, Scope]:
        in_scope = subtree_scope(model, strategy=self.name, targets=self.options.targets, exclude=self.options.exclude)
        return module_scopes(model, self.options.layers, in_scope)

    def estimate_problem(self) -> str | None:
        if self.options.adaptive:
            return "adaptive=true sets each tensor's bits from gradients measured on real data"
        return None  # tests/test_estimate.py checks its fake step against a real one

    def saved_tensor_stage(self) -> CompressStage:
        return self.stage

    def callbacks(self) -> list:
        return [Recalibrate(self.options.adapt_every)] if self.options.adaptive else []


def calibrate(model: nn.Module, loss_fn) -> dict[tuple[str, int], int]:
    """Adaptive mode: allocate bits per slot class from the batch that ``loss_fn()`` computes the loss of.

    ``model`` is the compressed model or a module containing it (a LightningModule). The Lightning
    callback calls it every ``adapt_every`` steps; in a plain loop the stage calls it after every
    ``adapt_every``-th training step, on that step's batch (calling it directly works too). Buffers
    (batch-norm statistics), ``.grad`` and the model's random stream are left unchanged.
    Returns the bits chosen per (module family, slot index).
    """
    stages = _stages(model)
    if not stages:
        raise StrategyError("calibrate: strategy 'compress' is not applied to this model")
    cuda = cuda_devices(model)
    with undisturbed(model, modes=False, devices=cuda):
        cpu_state, cuda_states = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]

        def same_randomness_loss():  # every pass draws the same dropout masks
            torch.set_rng_state(cpu_state)
            for device, state in zip(cuda, cuda_states):
                torch.cuda.set_rng_state(state, device)
            return loss_fn()

        return stages[0].adaptive.calibrate([p for p in model.parameters() if p.requires_grad], same_randomness_loss)


def _stages(model: nn.Module) -> list[CompressStage]:
    return [stage for module in model.modules() for stage in saved_tensor_stages(module)
            if isinstance(stage, CompressStage)]


class Recalibrate(L.Callback):
    """Calibrates on the current batch every ``every`` optimizer steps, before the step, through the training
    module's side-effect-free ``batch_loss``."""

    def __init__(self, every: int):
        self.every = every
        self.last_step = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for stage in _stages(pl_module):
            stage.adaptive.loop_calibration = False  # this callback calibrates, before the step
        step = trainer.global_step
        if step % self.every or step == self.last_step:
            return
        self.last_step = step
        calibrate(pl_module, lambda: pl_module.batch_loss(batch))

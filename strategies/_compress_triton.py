"""Triton kernels for ``compress``: per-group stochastic quantisation with bit-packing, and its inverse.

One program per group of ``GROUP`` values: it finds the group's min and max, rounds them to bf16
(minimum down, step up, exactly as the PyTorch reference in ``compress.py``), rounds every value
stochastically with Philox noise from ``seed`` and writes the packed bytes. Dequantisation unpacks and
rescales in one pass. Imported only for CUDA tensors. ``check_against_reference`` compares them with the
reference: on CUDA before the GPU benchmark times anything, on CPU tensors under ``TRITON_INTERPRET=1`` in the
tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_to_bf16(x, UP: tl.constexpr):
    raw = x.to(tl.int32, bitcast=True)
    truncated = raw & -65536
    if UP:
        away = x > 0
    else:
        away = x < 0
    adjust = ((truncated != raw) & away).to(tl.int32) << 16
    return (truncated + adjust).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, meta_ptr, n, seed, BITS: tl.constexpr, GROUP: tl.constexpr):
    group = tl.program_id(0)
    offsets = group * GROUP + tl.arange(0, GROUP)
    valid = offsets < n
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    low = tl.min(tl.where(valid, x, float("inf")), axis=0)
    high = tl.max(tl.where(valid, x, float("-inf")), axis=0)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    low = _round_to_bf16(low, False)
    step = _round_to_bf16((high - low) / LEVELS, True)
    divisor = tl.where(step > 0, step, 1.0)
    noise = tl.rand(seed, offsets)
    codes = tl.minimum(tl.maximum(tl.floor((x - low) / divisor + noise), 0.0), LEVELS).to(tl.int32)
    PER_BYTE: tl.constexpr = 8 // BITS
    if PER_BYTE == 1:
        tl.store(codes_ptr + offsets, codes.to(tl.uint8))
    else:
        shifts = tl.arange(0, PER_BYTE) * BITS
        packed = tl.sum(tl.reshape(codes, (GROUP // PER_BYTE, PER_BYTE)) << shifts[None, :], axis=1)
        tl.store(codes_ptr + group * (GROUP // PER_BYTE) + tl.arange(0, GROUP // PER_BYTE), packed.to(tl.uint8))
    tl.store(meta_ptr + 2 * group, low.to(tl.bfloat16))
    tl.store(meta_ptr + 2 * group + 1, step.to(tl.bfloat16))


@triton.jit
def _dequantize_kernel(codes_ptr, meta_ptr, out_ptr, n, BITS: tl.constexpr, GROUP: tl.constexpr):
    group = tl.program_id(0)
    offsets = group * GROUP + tl.arange(0, GROUP)
    valid = offsets < n
    PER_BYTE: tl.constexpr = 8 // BITS
    byte = tl.load(codes_ptr + offsets // PER_BYTE).to(tl.int32)
    codes = (byte >> ((offsets % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
    low = tl.load(meta_ptr + 2 * group).to(tl.float32)
    step = tl.load(meta_ptr + 2 * group + 1).to(tl.float32)
    value = codes.to(tl.float32) * step + low
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=valid)


def quantize(flat: torch.Tensor, bits: int, group_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``compress.quantize``; the noise comes from Philox(seed) instead of a generator."""
    n = flat.numel()
    groups = -(-n // group_size)
    codes = torch.empty(groups * group_size * bits // 8, dtype=torch.uint8, device=flat.device)
    meta = torch.empty((groups, 2), dtype=torch.bfloat16, device=flat.device)
    _quantize_kernel[(groups,)](flat, codes, meta, n, seed, BITS=bits, GROUP=group_size)
    return codes, meta


def dequantize(codes: torch.Tensor, meta: torch.Tensor, bits: int, group_size: int, n: int,
               dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype, device=codes.device)
    _dequantize_kernel[(meta.shape[0],)](codes, meta, out, n, BITS=bits, GROUP=group_size)
    return out


def check_against_reference(device: str | torch.device) -> None:
    """Raises AssertionError naming the case where the kernels on ``device`` tensors differ from the PyTorch
    reference (run on CPU copies): group min and step bit-exact, dequantisation up to fma rounding, values
    within one step, and the Philox rounding unbiased."""
    import math

    from lowmem_train.strategies import compress as reference

    generator = torch.Generator().manual_seed(0)
    for bits, n in ((1, 1), (2, 300), (4, 1024), (8, 300)):
        x = torch.randn(n, generator=generator) * 3 + 1
        codes, meta = quantize(x.to(device), bits, 128, seed=11)
        ref_codes, ref_meta = reference.quantize(x, bits, 128, torch.Generator().manual_seed(0))
        assert codes.shape == ref_codes.shape, f"compress quantize bits={bits} n={n}: codes shape {codes.shape}"
        assert torch.equal(meta.cpu(), ref_meta), f"compress quantize bits={bits} n={n}: group min/step differ"
        for dtype in (torch.float32, torch.bfloat16):
            back = dequantize(codes, meta, bits, 128, n, dtype).cpu()
            expected = reference.dequantize(codes.cpu(), meta.cpu(), bits, 128, n, dtype)
            torch.testing.assert_close(back, expected, msg=lambda m: f"compress dequantize bits={bits} {dtype}: {m}")
        step = meta[:, 1].float().cpu().repeat_interleave(128)[:n]
        assert ((back.float() - x).abs() <= step * 1.01 + 0.05).all(), f"compress bits={bits} n={n}: off the grid"
    x, samples = torch.randn(128, generator=generator), 100
    mean = sum(dequantize(*quantize(x.to(device), 2, 128, seed), 2, 128, 128, torch.float32).cpu()
               for seed in range(samples)) / samples
    step = float(quantize(x.to(device), 2, 128, 0)[1][0, 1])
    assert ((mean - x).abs() <= 5 * step / (2 * math.sqrt(samples))).all(), "compress: Philox rounding is biased"

"""Triton kernels of approx_bp, one memory pass each instead of chains of elementwise PyTorch ops.

Imported by ``approx_bp`` only for CUDA tensors; ``approx_bp``'s PyTorch functions are the reference.
``check_against_reference`` compares the two: on CUDA before the GPU benchmark times anything, on CPU tensors
under ``TRITON_INTERPRET=1`` in the tests. Inputs must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_ROW = 65536  # one row per program, held in registers


@triton.jit
def _pack_codes_kernel(x_ptr, out_ptr, n, n_bytes, c0, c1, c2, BLOCK: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, 4)
    index = byte[:, None] * 4 + lane[None, :]  # a contiguous [BLOCK, 4] tile of x
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside, other=0.0).to(tl.float32)
    code = (x > c0).to(tl.int32) + (x > c1).to(tl.int32) + (x > c2).to(tl.int32)
    code = tl.where(inside, code, 0)  # padding codes are 0, as in the reference
    packed = tl.sum(code << (lane[None, :] * 2), axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)


@triton.jit
def _step_backward_kernel(grad_ptr, packed_ptr, out_ptr, n, level0, level1, level2, level3, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    grad = tl.load(grad_ptr + index, mask=mask, other=0.0).to(tl.float32)
    byte = tl.load(packed_ptr + index // 4, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((index % 4) * 2).to(tl.int32)) & 3
    slope = tl.where(code == 0, level0, tl.where(code == 1, level1, tl.where(code == 2, level2, level3)))
    tl.store(out_ptr + index, (grad * slope).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_forward_kernel(x_ptr, y_ptr, rstd_ptr, width, eps, CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    if CENTERED:
        x = tl.where(mask, x - tl.sum(x, axis=0) / width, 0.0)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    tl.store(y_ptr + row * width + cols, (x * rstd).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_backward_kernel(grad_ptr, y_ptr, rstd_ptr, out_ptr, width, CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    grad = tl.load(grad_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    dx = grad - y * (tl.sum(grad * y, axis=0) / width)
    if CENTERED:
        dx = dx - tl.sum(grad, axis=0) / width
    rstd = tl.load(rstd_ptr + row)
    tl.store(out_ptr + row * width + cols, (dx * rstd).to(out_ptr.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def supports_row(width: int) -> bool:
    return width <= _MAX_ROW


def pack_step_codes(x: torch.Tensor, thresholds) -> torch.Tensor:
    n = x.numel()
    out = torch.empty((n + 3) // 4, dtype=torch.uint8, device=x.device)
    if n == 0:
        return out
    block = 1024
    _pack_codes_kernel[(triton.cdiv(out.numel(), block),)](x, out, n, out.numel(), *thresholds, BLOCK=block)
    return out


def step_backward(grad: torch.Tensor, packed: torch.Tensor, levels) -> torch.Tensor:
    out = torch.empty_like(grad)
    if grad.numel() == 0:
        return out
    block = 2048
    _step_backward_kernel[(triton.cdiv(grad.numel(), block),)](grad, packed, out, grad.numel(), *levels,
                                                              BLOCK=block)
    return out


def norm_forward(x: torch.Tensor, eps: float, centered: bool, out_dtype: torch.dtype):
    width = x.shape[-1]
    rows = x.numel() // width
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    block = triton.next_power_of_2(width)
    _norm_forward_kernel[(rows,)](x, y, rstd, width, eps, CENTERED=centered, BLOCK=block, num_warps=_warps(block))
    return y, rstd


def norm_backward(grad: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, centered: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    width = grad.shape[-1]
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if out.numel() == 0:
        return out
    block = triton.next_power_of_2(width)
    _norm_backward_kernel[(grad.numel() // width,)](grad, y, rstd, out, width, CENTERED=centered, BLOCK=block,
                                                    num_warps=_warps(block))
    return out


def check_against_reference(device: str | torch.device) -> None:
    """Raises AssertionError naming the case where the kernels on ``device`` tensors differ from
    ``approx_bp``'s PyTorch functions (run on CPU copies, which never take the kernels): packed codes
    bit-exact, the rest within rounding."""
    from lowmem_train.bitpack import pack_bits
    from lowmem_train.strategies import approx_bp as reference

    generator = torch.Generator().manual_seed(0)
    steps = (reference.REGELU2, reference.RESILU2, reference.GELU2_FIT, reference.SILU2_FIT)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for numel in (1, 7, 2051):
            x = (torch.randn(numel, generator=generator) * 4).to(dtype)
            grad = torch.randn(numel, generator=generator).to(dtype)
            for step in steps:
                case = f"approx_bp {step.name} {dtype} numel={numel}"
                packed = pack_bits(reference.step_codes(x, step.thresholds), 2)
                assert torch.equal(pack_step_codes(x.to(device), step.thresholds).cpu(), packed), f"{case}: codes"
                torch.testing.assert_close(step_backward(grad.to(device), packed.to(device), step.levels).cpu(),
                                           reference.step_backward(grad, packed, step),
                                           msg=lambda m, case=case: f"{case}: step backward: {m}")
        for width in (5, 96):
            x = (torch.randn(3, 4, width, generator=generator) * 3 + 1).to(dtype)
            grad = torch.randn(x.shape, generator=generator).to(dtype)
            for centered in (True, False):
                case = f"approx_bp norm {dtype} width={width} centered={centered}"
                # fp32 within 1e-5: the kernel sums a row in another order than the CPU does
                tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
                y, rstd = reference.norm_forward(x, 1e-5, centered, dtype)
                y_kernel, rstd_kernel = norm_forward(x.to(device), 1e-5, centered, dtype)
                torch.testing.assert_close(y_kernel.cpu(), y, **tolerance, msg=lambda m, c=case: f"{c}: y: {m}")
                torch.testing.assert_close(rstd_kernel.cpu(), rstd, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, c=case: f"{c}: rstd: {m}")
                torch.testing.assert_close(
                    norm_backward(grad.to(device), y.to(device), rstd.to(device), centered, dtype).cpu(),
                    reference.norm_backward(grad, y, rstd, centered, dtype), **tolerance,
                    msg=lambda m, c=case: f"{c}: backward: {m}")

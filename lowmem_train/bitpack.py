"""Bit packing for what strategies keep for backward: uint8 codes of 1, 2, 4 or 8 bits, several per byte."""

from __future__ import annotations

import torch
from torch import Tensor


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Flat uint8 codes below ``2**bits``, ``8 // bits`` per byte, the first in the low bits (zero-padded)."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    codes = torch.nn.functional.pad(codes, (0, -codes.numel() % per_byte)).view(-1, per_byte)
    packed = codes[:, 0].clone()
    for j in range(1, per_byte):
        packed |= codes[:, j] << (bits * j)
    return packed


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """The first ``n`` codes of ``pack_bits`` output, as flat uint8."""
    if bits == 8:
        return packed[:n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).view(-1)[:n]


def pack_mask(mask: Tensor) -> Tensor:
    """A flat bool tensor as one bit per value."""
    return pack_bits(mask.to(torch.uint8), 1)


def unpack_mask(packed: Tensor, n: int) -> Tensor:
    return unpack_bits(packed, 1, n).bool()

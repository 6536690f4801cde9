"""Bit packing shared by strategies (approx_bp's 2-bit codes, compress's codes and masks)."""

import pytest
import torch

from lowmem_train.bitpack import pack_bits, pack_mask, unpack_bits, unpack_mask


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [8, 24, 1000])
def test_pack_bits_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == n * bits // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    mask = torch.rand(n + 3) > 0.5  # not a multiple of 8
    assert torch.equal(unpack_mask(pack_mask(mask), n + 3), mask)


def test_two_bit_codes_pad_to_whole_bytes_first_code_in_the_low_bits():
    generator = torch.Generator().manual_seed(0)
    for numel in (0, 1, 3, 4, 5, 1001):
        codes = torch.randint(0, 4, (numel,), generator=generator, dtype=torch.uint8)
        packed = pack_bits(codes, 2)
        assert packed.dtype == torch.uint8 and packed.numel() == (numel + 3) // 4
        assert torch.equal(unpack_bits(packed, 2, numel), codes)
    # first element in the low bits: 1 | 2 << 2 | 3 << 4 | 0 << 6
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [57]

"""LiveTensorBytes: the peak of live tensor bytes created in a block, temporaries and backward included."""

import torch

from lowmem_train.live_memory import LiveTensorBytes

MIB = 2**20


def test_counts_temporaries_and_frees_but_not_views_or_older_tensors():
    before = torch.zeros(MIB // 4)  # 1 MiB from before the block: never counted
    with LiveTensorBytes() as live:
        kept = before * 2  # 1 MiB, kept
        (kept + 1).sum()  # a 1 MiB temporary, freed at once
        view, same = kept[:10], kept.add_(1)  # views and in-place ops allocate nothing
        assert live.current == MIB and live.peak == 2 * MIB + 4  # at the peak: the temporary and its sum
    del kept, view, same
    assert live.current == 0 and live.peak == 2 * MIB + 4


def test_sees_backward_and_the_gradients_it_leaves():
    weight = torch.randn(256, 256, requires_grad=True)  # 256 KiB
    with LiveTensorBytes() as live:
        (weight @ weight).square().sum().backward()  # product and square saved, their gradients, weight.grad
    assert live.current == weight.grad.nbytes
    assert live.peak >= 4 * weight.nbytes

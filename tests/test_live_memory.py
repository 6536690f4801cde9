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


def test_tracked_tensors_are_counted_until_freed_and_let_go_after_the_block():
    import gc
    import weakref

    weight = torch.zeros(MIB // 4)
    grad = torch.zeros(MIB // 4)
    live = LiveTensorBytes()
    live.track([weight, grad, weight[:10]])  # a view counts once
    with live:
        assert live.current == 2 * MIB
        del grad  # freed inside the block: uncounted
        assert live.current == MIB
        (weight + 1).sum()
    assert live.peak == 2 * MIB + 4  # the temporary and its sum on top of the weight
    tracker = weakref.ref(live)
    del live
    gc.collect()
    assert tracker() is None  # the weight that outlives the block keeps no finalizer holding the tracker

"""The peak of live tensor bytes while a block of code runs, temporaries included, on any device.

CPU has no allocator statistics, and process RSS mixes in the allocator's caching and the rest of the
process; ``SavedBytesMeter`` sees only what autograd keeps. ``LiveTensorBytes`` sees every ATen op's outputs
(forward, backward, inside custom autograd functions): each new storage is counted once and uncounted when
it is freed, so ``peak`` is the most bytes of tensors created inside the block that were alive at once.
Tensors that existed before the block are not counted::

    with LiveTensorBytes() as live:
        loss_head(hidden, labels, lm_head).per_sample_loss.sum().backward()
    print(live.peak)
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """``current``: bytes of storages created in the block and still alive; ``peak``: their maximum."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._sizes: dict[int, int] = {}  # id of a counted storage still alive -> its bytes
        self._lock = threading.Lock()  # storages can be freed on autograd's worker threads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(storage) for storage in _storages((args, kwargs))}  # views, in-place and out= ops allocate nothing
        for storage in _storages(out):
            if id(storage) not in inputs:
                self._count(storage)
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # torch keeps one Python object per storage while it lives: a stable key
        with self._lock:
            if key in self._sizes:
                return
            self._sizes[key] = storage.nbytes()
            self.current += self._sizes[key]
            self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            self.current -= self._sizes.pop(key)


def _storages(tree) -> list[torch.UntypedStorage]:
    return [leaf.untyped_storage() for leaf in tree_leaves(tree)
            if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and leaf.device.type != "meta"]

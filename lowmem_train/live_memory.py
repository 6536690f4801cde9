"""The peak of live tensor bytes while a block of code runs, temporaries included, on any device.

CPU has no allocator statistics, and process RSS mixes in the allocator's caching and the rest of the
process; ``SavedBytesMeter`` sees only what autograd keeps. ``LiveTensorBytes`` sees every ATen op's outputs
(forward, backward, inside custom autograd functions): each new storage is counted once and uncounted when
it is freed, so ``peak`` is the most bytes of tensors created inside the block that were alive at once.
Tensors that existed before the block are not counted, unless handed to ``track`` (a training step's weights,
gradients and optimizer state: counted from the start, uncounted when freed, so the peak is the step's)::

    with LiveTensorBytes() as live:
        loss_head(hidden, labels, lm_head).per_sample_loss.sum().backward()
    print(live.peak)

Works on fake tensors too (``FakeTensorMode``: an estimate of a step that never allocates).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .saved_tensors import storages


class LiveTensorBytes(TorchDispatchMode):
    """``current``: bytes of storages created in the block and still alive; ``peak``: their maximum;
    ``created``: bytes of every storage the block created (what its ops wrote). ``round_to``: count each
    storage as an allocator would hand it out (the CUDA caching allocator's blocks are multiples of 512 bytes)."""

    def __init__(self, round_to: int = 1):
        super().__init__()
        self.current = self.peak = self.created = 0
        self.round_to = round_to
        self._sizes: dict[int, int] = {}  # id of a counted storage still alive -> its bytes
        self._finalizers: dict[int, weakref.finalize] = {}
        self._tracked: list[int] = []
        self._lock = threading.Lock()  # storages can be freed on autograd's worker threads

    def track(self, tensors) -> None:
        """Count ``tensors`` (created before the block) as live until they are freed, or the block ends."""
        for tensor in tensors:
            for storage in storages(tensor):
                if id(storage) not in self._sizes:
                    self._count(storage)
                    self._tracked.append(id(storage))

    def __exit__(self, *exc):
        # Tracked storages usually outlive the block (weights): drop their finalizers, else a tracker per step
        # would stay referenced by every weight for the rest of the run.
        for key in self._tracked:
            finalizer = self._finalizers.pop(key, None)
            if finalizer is not None:
                finalizer.detach()
        self._tracked = []
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        new = [storage for storage in _storages(out) if id(storage) not in self._sizes]
        if new:  # views, in-place and out= ops allocate nothing: their outputs are an input's storage
            inputs = {id(storage) for storage in _storages((args, kwargs))}
            for storage in new:
                if id(storage) not in inputs:
                    self.created += self._count(storage)
        return out

    def _count(self, storage: torch.UntypedStorage) -> int:
        """Count ``storage`` as live (once); the bytes it added (0: counted already)."""
        key = id(storage)  # torch keeps one Python object per storage while it lives: a stable key
        with self._lock:
            if key in self._sizes:
                return 0
            self._sizes[key] = -(-storage.nbytes() // self.round_to) * self.round_to
            self.current += self._sizes[key]
            self.peak = max(self.peak, self.current)
            added = self._sizes[key]
            self._finalizers[key] = weakref.finalize(storage, self._free, key)
        return added

    def _free(self, key: int) -> None:
        with self._lock:
            self.current -= self._sizes.pop(key)
            self._finalizers.pop(key, None)


def _storages(tree) -> list[torch.UntypedStorage]:
    """Storages of the tensors in ``tree``; a wrapper subclass (a DTensor shard) by its inner tensors."""
    return [storage for leaf in tree_leaves(tree)
            if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and leaf.device.type != "meta"
            for storage in storages(leaf)]

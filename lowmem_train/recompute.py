"""Helpers for strategies that run a module's forward again during backward (checkpointing, reversible)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from .saved_tensors import recompute_inputs


@contextmanager
def frozen_norm_statistics(module: nn.Module):
    """During a recomputation, batch norm must not update its running statistics a second time.

    Momentum 0 keeps the running statistics as they are while the recomputation saves exactly the
    tensors the forward saved (torch's checkpoint checks that); the batch counter is put back afterwards.
    """
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, (momentum, batches) in zip(norms, saved):
                norm.momentum = momentum
                norm.num_batches_tracked.copy_(batches)


def is_kv_cache(value) -> bool:
    """A Hugging Face key/value cache (``DynamicCache``...), state that each call of a layer appends to."""
    return type(value).__name__.endswith("Cache") and hasattr(value, "update")


def without_kv_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with every key/value cache replaced by None.

    A layer run again (recomputation, profiling) would append its keys and values to the cache once more,
    so the rerun attends over a longer sequence than the forward did: training with recomputation runs
    without the cache, as Hugging Face's own gradient checkpointing does.
    """
    leaves, spec = tree_flatten((args, kwargs))
    if not any(is_kv_cache(leaf) for leaf in leaves):
        return args, kwargs
    return tree_unflatten([None if is_kv_cache(leaf) else leaf for leaf in leaves], spec)


def checkpointed_call(module: nn.Module, forward, *args, recompute_guard=frozen_norm_statistics,
                      checkpoint_options: dict | None = None, **kwargs):
    """``forward(*args, **kwargs)`` under ``torch.utils.checkpoint`` (non-reentrant, RNG replayed); every
    recomputation runs inside ``recompute_guard(module)``, so batch-norm statistics update only once."""
    # Rebuild the argument containers: a caller may change a list after the call (DenseNet appends each
    # layer's output to the list of features it passed), and the recomputation must see it as it was.
    args, kwargs = tree_unflatten(*tree_flatten((args, kwargs)))
    calls = 0

    def run(*inner_args, **inner_kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            return forward(*inner_args, **inner_kwargs)
        with recompute_guard(module):
            return forward(*inner_args, **inner_kwargs)

    kept = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
    with recompute_inputs(kept):
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **(checkpoint_options or {}),
                          **kwargs)

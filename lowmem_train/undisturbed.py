"""Forwards a strategy runs for itself (tracing, profiling, calibration, initialisation) must leave training
as it was: the model's random stream (so its dropout masks), its buffers (batch-norm statistics) and each
module's train/eval flag. One context for all of them, and the example input a plan-time forward runs on."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._pytree import tree_flatten


def cuda_devices(*values) -> list[int]:
    """Indices of the CUDA devices that the tensors, modules or nested arguments in ``values`` live on."""
    tensors: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, nn.Module):
            tensors += [*value.parameters(), *value.buffers()]
        else:
            tensors += [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]
    return sorted({t.device.index or 0 for t in tensors if t.is_cuda})


@contextmanager
def undisturbed(model: nn.Module, *, buffers: bool = True, modes: bool = True, devices: Iterable[int] | None = None):
    """Run the body on a forked random stream; afterwards put back ``model``'s buffers and train/eval flags.

    ``buffers=False`` keeps buffer updates (a scoring pass that should update batch-norm statistics).
    """
    saved_modes = {m: m.training for m in model.modules()} if modes else {}
    saved_buffers = [(b, b.clone()) for b in model.buffers()] if buffers else []
    try:
        with torch.random.fork_rng(devices=cuda_devices(model) if devices is None else list(devices)):
            yield
    finally:
        for module, training in saved_modes.items():
            module.training = training
        with torch.no_grad():
            for buffer, value in saved_buffers:
                buffer.copy_(value)


def example_inputs(model: nn.Module) -> tuple[tuple, dict] | None:
    """A small (args, kwargs) input for one tracing forward, from the model's own description, or None.

    Hugging Face models: ``input_ids`` (8 tokens) or ``pixel_values`` at the config's image size. Other
    models: built for the first layer with parameters (Conv2d: a 64x64 image, or ``model.image_size``;
    Linear or a norm: two feature vectors; Embedding: 8 token ids).
    """
    parameters = list(model.parameters())
    if not parameters:
        return None
    device = parameters[0].device
    dtype = next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)
    generator = torch.Generator().manual_seed(0)
    main_input = getattr(model, "main_input_name", None)
    config = getattr(model, "config", None)
    if main_input == "input_ids" and hasattr(model, "get_input_embeddings"):
        vocab = model.get_input_embeddings().num_embeddings
        return (), {"input_ids": torch.randint(0, vocab, (1, 8), generator=generator).to(device)}
    if main_input == "pixel_values" and hasattr(config, "image_size"):
        size = config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        image = torch.randn(1, getattr(config, "num_channels", 3), *size, generator=generator)
        return (), {"pixel_values": image.to(device=device, dtype=dtype)}
    if main_input is not None:
        return None
    first = next((m for m in model.modules() if next(m.children(), None) is None
                  and next(m.parameters(recurse=False), None) is not None), None)
    if isinstance(first, nn.Conv2d):
        size = getattr(model, "image_size", 64)
        x = torch.randn(1, first.in_channels, size, size, generator=generator)
    elif isinstance(first, nn.Linear):
        x = torch.randn(2, first.in_features, generator=generator)
    elif hasattr(first, "normalized_shape"):
        x = torch.randn(2, *first.normalized_shape, generator=generator)
    elif isinstance(first, nn.Embedding):
        return (torch.randint(0, first.num_embeddings, (1, 8), generator=generator).to(device),), {}
    else:
        return None
    return (x.to(device=device, dtype=dtype),), {}

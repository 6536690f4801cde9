"""Resuming from a checkpoint: is it a readable Lightning checkpoint, and does it fit this run?

Every checkpoint records the recipe, the model class and the strategies (``KEY`` in the checkpoint).
A resume with another recipe, or with other architecture-changing strategies, is refused in one line, and
so is one whose parameter names or shapes differ from the model built for this run; any other change of
strategies is allowed and said.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, one_line

KEY = "lowmem_train"


def read_checkpoint(path: str) -> dict:
    """The checkpoint at ``path``, memory-mapped (tensors are not read until used), or a one-line ConfigError.
    A sharded checkpoint (a directory, ``trainer=fsdp``) gives its ``state_dict`` as meta tensors of the
    unsharded shapes: enough to check that it fits, nothing read."""
    file = Path(path).expanduser()
    if file.is_dir():
        checkpoint = read_sharded_checkpoint(file, path)
    elif not file.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist")
    else:
        try:
            checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        except Exception as exc:  # truncated zip, not a torch file, an unpicklable class: many exception types
            raise ConfigError(f"ckpt_path={path} is not a readable checkpoint: truncated, or not written by "
                              f"torch.save ({one_line(exc, 100)})") from None
    if not (isinstance(checkpoint, dict) and "state_dict" in checkpoint and "loops" in checkpoint):
        raise ConfigError(f"ckpt_path={path} is not a Lightning training checkpoint (no state_dict and loop state)")
    return checkpoint


def read_sharded_checkpoint(directory: Path, path: str) -> dict:
    """Lightning's distributed checkpoint: ``meta.pt`` (loops, callbacks, ``KEY``) beside the shards' metadata."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint import FileSystemReader

    try:
        checkpoint = torch.load(directory / _METADATA_FILENAME, map_location="cpu", weights_only=False)
        shapes = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as exc:  # a missing file, a truncated one: several exception types
        raise ConfigError(f"ckpt_path={path} is not a readable sharded checkpoint ({one_line(exc, 100)})") from None
    prefix = "state_dict."
    if isinstance(checkpoint, dict):
        checkpoint["state_dict"] = {key[len(prefix):]: torch.empty(tuple(meta.size), device="meta")
                                    for key, meta in shapes.items() if key.startswith(prefix) and hasattr(meta, "size")}
    return checkpoint


def run_identity(recipe: str, model: nn.Module, strategies) -> dict:
    """What a checkpoint records about the run that wrote it."""
    return {
        "recipe": recipe,
        "model": type(model).__name__,
        "strategies": [s.name for s in strategies],
        "architecture": sorted(s.name for s in strategies if s.changes_architecture),
    }


def check_recipe(checkpoint: dict, path: str, recipe: str) -> None:
    saved = checkpoint.get(KEY, {}).get("recipe")
    if saved is not None and saved != recipe:
        raise ConfigError(f"ckpt_path={path} was written by recipe={saved}; resume it with recipe={saved}, "
                          f"not {recipe}")


def check_fits(checkpoint: dict, path: str, identity: dict, module: nn.Module) -> str | None:
    """Raise ConfigError when the checkpoint cannot resume this run; return a note when strategies changed."""
    saved = checkpoint.get(KEY, {})
    check_recipe(checkpoint, path, identity["recipe"])
    if "architecture" in saved and saved["architecture"] != identity["architecture"]:
        raise ConfigError(f"ckpt_path={path} was trained with architecture-changing strategies "
                          f"[{', '.join(saved['architecture'])}], this run has [{', '.join(identity['architecture'])}]; "
                          "resume with the same ones")
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in checkpoint["state_dict"].items()}
    for key in sorted(expected.keys() | found.keys()):
        if expected.get(key) != found.get(key):
            raise ConfigError(f"ckpt_path={path} does not fit this model: {key} is {found.get(key, 'missing')} in the "
                              f"checkpoint and {expected.get(key, 'missing')} here (model={saved.get('model', '?')} "
                              "there); resume with the model and strategies it was trained with")
    if "strategies" in saved and saved["strategies"] != identity["strategies"]:
        return (f"resuming {path} with strategies {identity['strategies'] or ['none']} "
                f"(it was trained with {saved['strategies'] or ['none']})")
    return None

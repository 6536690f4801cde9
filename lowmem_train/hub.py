"""The Hugging Face hub, reached once or not at all: with no network, loading goes offline at once.

Without this, ``from_pretrained`` of a hub id on a machine with no network retries for most of a minute
before it fails. ``hub_reachable`` connects to the hub's endpoint once (a few seconds at most); when that
fails it switches huggingface_hub, transformers and datasets to their offline mode, so files already in the
local cache still load and anything else fails at once.

Offline, the advice names what works without the hub (a local model directory, a GGUF file, a random tiny
model on synthetic tokens) and keeps the user's strategies in its command, so the smoke run is their run.
"""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

# The run's ``cfg.strategy`` while its recipe is built: recipes get only the model and data configs.
_RUN_STRATEGY: ContextVar[Mapping | None] = ContextVar("lowmem_run_strategy", default=None)
OFFLINE_COMMAND = "lowmem-train recipe=llama_finetune model=llama_tiny data=synthetic"  # a smoke run
LOCAL_MODEL_OPTIONS = ("a local model directory (model.name_or_path=<dir>), a GGUF file in one "
                       "(model.name_or_path=<dir> model.gguf_file=<file>.gguf, needs `pip install gguf`), or a "
                       "random tiny model on random tokens for a smoke run")


def is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


def looks_local(path: str) -> bool:
    """A path the user meant as a file or directory on this machine, not a hub id (``<org>/<name>``): it starts
    with /, ./, ../ or ~, has more than one slash, or its first component exists here."""
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def nearest_existing_parent(path: str) -> str:
    """The deepest directory of ``path`` that exists (where a typo in the path begins)."""
    parent = Path(os.path.expanduser(path)).absolute()
    while not parent.exists():
        parent = parent.parent
    return str(parent)


@contextmanager
def building_for(strategy: Mapping | None) -> Iterator[None]:
    """Make ``strategy`` (a composed ``cfg.strategy``) the run's, for ``run_strategy``, while a recipe is built."""
    token = _RUN_STRATEGY.set(strategy)
    try:
        yield
    finally:
        _RUN_STRATEGY.reset(token)


def run_strategy() -> Mapping | None:
    """The strategies of the run whose recipe is being built (None outside ``building_for``)."""
    return _RUN_STRATEGY.get()


def strategy_overrides(strategy: Mapping | None) -> list[str]:
    """The command-line overrides that choose ``strategy`` (a composed ``cfg.strategy``): its names, and every
    option that differs from the strategy's default, shell-quoted."""
    from omegaconf import OmegaConf

    from .strategy import get_strategy_class

    chosen = {name: options for name, options in (strategy or {}).items() if name != "none"}
    if not chosen:
        return []
    names = list(chosen)
    overrides = [f"strategy={names[0]}" if len(names) == 1 else f"strategy=[{','.join(names)}]"]
    for name, options in chosen.items():
        defaults = OmegaConf.to_container(OmegaConf.structured(get_strategy_class(name).Options))
        given = OmegaConf.to_container(options) if OmegaConf.is_config(options) else dict(options or {})
        overrides += [f"strategy.{name}.{key}={override_value(value)}" for key, value in given.items()
                      if defaults.get(key) != value]
    return [shlex.quote(override) for override in overrides]


def override_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    return str(value)


def offline_advice(strategy: Mapping | None = None) -> str:
    """What trains without the hub, with the user's strategies kept in the smoke-run command."""
    return f"{LOCAL_MODEL_OPTIONS}: {' '.join([OFFLINE_COMMAND, *strategy_overrides(strategy)])}"


@cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """True when the hub answers a TCP connection; else switch the libraries to offline mode and say False."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        go_offline()
        return False


def go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass

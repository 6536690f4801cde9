"""The Hugging Face hub, reached once or not at all: with no network, loading goes offline at once.

Without this, ``from_pretrained`` of a hub id on a machine with no network retries for most of a minute
before it fails. ``hub_reachable`` connects to the hub's endpoint once (a few seconds at most); when that
fails it switches huggingface_hub, transformers and datasets to their offline mode, so files already in the
local cache still load and anything else fails at once.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from urllib.parse import urlparse

OFFLINE_COMMAND = "lowmem-train recipe=llama_finetune model=llama_tiny data=synthetic"


def is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


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

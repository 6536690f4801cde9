"""Config schemas in Hydra's ConfigStore, so each default is written once and Hydra checks every key.

``strategy/<name>`` is each registered strategy's ``Options`` dataclass (package ``strategy.<name>``),
found through the entry-point registry, so a third-party strategy gets ``strategy=<name>`` and its options
too; ``data``, ``model``, ``optimizer`` and the ``recipe`` node come from ``lowmem_train.configs.groups``.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf.errors import OmegaConfBaseException

from .configs import groups
from .errors import one_line
from .strategy import _registry


def register_configs() -> None:
    """Store every schema; storing again replaces the entries (strategies installed since are added)."""
    store = ConfigStore.instance()
    for name, strategy in _registry().items():
        try:
            store.store(group="strategy", name=name, node=strategy.Options, package=f"strategy.{name}")
        except OmegaConfBaseException as exc:  # a plugin's field type OmegaConf cannot hold (Literal, tuple...)
            raise TypeError(f"strategy '{name}': {strategy.Options.__name__} is not a valid structured config: "
                            f"{one_line(exc)}") from None
    groups.register(store)

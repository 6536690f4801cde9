"""Choosing which modules a strategy touches: include/exclude patterns and architecture-free defaults.

A pattern matches a module when it equals the module's class name (``BasicBlock``, ``LlamaDecoderLayer``)
or, as a regular expression, fully matches its qualified name (``layer[12]\\..*``, ``model.layers.0``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable

from torch import nn

from .errors import StrategyError

Selection = list[tuple[str, nn.Module]]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern == type(module).__name__:
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as exc:
        raise StrategyError(f"target pattern {pattern!r} is not a valid regular expression: {exc}") from None


def repeated_blocks(model: nn.Module) -> Selection:
    """The outermost modules that sit, two or more of one class side by side, in a ModuleList/Sequential/ModuleDict.

    This finds the bodies of ResNets (``layer1.0``, ...), transformer stacks (``model.layers.3``,
    ``encoder.layers.encoder_layer_0``, DenseNet's ``denseblock1.denselayer1``) and any model built the same
    way, without per-model rules.
    Modules of one class that are not neighbours (Swin's patch-merging layers between stages) are no stack.
    """
    blocks: Selection = []
    for name, module in model.named_modules():
        if not isinstance(module, _CONTAINERS) or any(name.startswith(chosen + ".") for chosen, _ in blocks):
            continue
        children = list(module.named_children())
        stacked = {type(a) for (_, a), (_, b) in zip(children, children[1:])
                   if type(a) is type(b) and not isinstance(a, _CONTAINERS) and _is_block(a)}
        prefix = f"{name}." if name else ""
        blocks += [(prefix + child_name, child) for child_name, child in children if type(child) in stacked]
    return blocks


def outermost(selection: Selection) -> Selection:
    """The selected modules not inside another selected one (wrapping a module inside a wrapped one only nests)."""
    return [(n, m) for n, m in selection if not any(n.startswith(other + ".") for other, _ in selection)]


def weight_read_by_parent(model: nn.Module, name: str) -> bool:
    """Whether the parent of module ``name`` reads its weight in its own forward (``nn.MultiheadAttention``'s
    ``out_proj``, torchvision Swin's ``qkv`` and ``proj``) instead of calling it: a strategy that swaps or wraps
    the module's forward (LoRA, VeLoRA) would never run there."""
    parent, _, child = name.rpartition(".")
    try:
        source = inspect.getsource(type(model.get_submodule(parent)).forward)
    except (OSError, TypeError):  # no Python source (a C++ module): it calls its children, if any
        return False
    return re.search(rf"self\.{re.escape(child)}\.weight\b", source) is not None


def _is_block(module: nn.Module) -> bool:
    """A block has parameters and sub-modules: a layer of layers, not a single Linear or activation."""
    has_children = next(module.children(), None) is not None
    has_params = next(module.parameters(), None) is not None
    return has_children and has_params


def select_modules(
    model: nn.Module,
    *,
    strategy: str,
    targets: Iterable[str] | None,
    exclude: Iterable[str] = (),
    default: Callable[[nn.Module], Selection],
    what: str = "modules",
    option: str = "targets",
) -> Selection:
    """Modules named by ``targets`` (or ``default(model)`` when targets is None), minus ``exclude``.

    Raises StrategyError when nothing is left, naming the patterns and the module classes that exist.
    """
    if targets is None:
        chosen = default(model)
        source = f"its default {what}"
    else:
        targets = list(targets)
        chosen = [(n, m) for n, m in model.named_modules() if n and any(matches(p, n, m) for p in targets)]
        source = f"{option} {targets}"
    exclude = list(exclude)
    chosen = [(n, m) for n, m in chosen if not any(matches(p, n, m) for p in exclude)]
    if not chosen:
        classes = sorted({type(m).__name__ for n, m in model.named_modules() if n})
        hint = f" minus exclude {exclude}" if exclude else ""
        raise StrategyError(
            f"strategy '{strategy}': {source}{hint} match no module of {type(model).__name__}; "
            f"set strategy.{strategy}.{option} to class names or name regexes, e.g. one of {classes[:12]}"
        )
    return chosen

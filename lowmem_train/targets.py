"""Choosing which modules a strategy touches: one pattern grammar for every strategy, and defaults.

A pattern matches a module, as in PEFT's ``target_modules``, when it is the module's class name
(``BasicBlock``, ``LlamaDecoderLayer``), its qualified name or a dotted suffix of it (``q_proj``,
``mlp.down_proj``), or a regular expression that fully matches the qualified name (``layer[12]\\..*``).
``exclude`` removes whole subtrees. A pattern that matches nothing is an error naming the near names.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from .errors import StrategyError

Selection = list[tuple[str, nn.Module]]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern == type(module).__name__ or name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as exc:
        raise StrategyError(f"target pattern {pattern!r} is not a valid regular expression: {exc}") from None


def exact_name(name: str) -> str:
    """A pattern that matches only the module whose qualified name is ``name`` (a bare name such as ``relu``
    would also match every ``*.relu`` as a dotted suffix)."""
    return f"(?:{re.escape(name)})"


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
                   if type(a) is type(b) and not isinstance(a, _CONTAINERS) and is_block(a)}
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


def is_block(module: nn.Module) -> bool:
    """A block has parameters and sub-modules: a layer of layers, not a single Linear or activation."""
    has_children = next(module.children(), None) is not None
    has_params = next(module.parameters(), None) is not None
    return has_children and has_params


def under(name: str, roots: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``roots`` or inside one ("" is the whole model)."""
    return any(root == "" or name == root or name.startswith(root + ".") for root in roots)


def matched(model: nn.Module, patterns: Iterable[str], *, strategy: str, option: str) -> list[str]:
    """Names of the modules the patterns match; each pattern must match one, else the error names near ones."""
    named = [(n, m) for n, m in model.named_modules() if n]
    names: list[str] = []
    for pattern in patterns:
        hits = [n for n, m in named if matches(pattern, n, m)]
        if not hits:
            candidates = sorted({n for n, _ in named} | {type(m).__name__ for _, m in named})
            near = difflib.get_close_matches(pattern, candidates, n=4, cutoff=0.5) or candidates[:6]
            raise StrategyError(
                f"strategy '{strategy}': {option} pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"near: {', '.join(near)}"
            )
        names += [n for n in hits if n not in names]
    return names


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
    """Modules named by ``targets`` (or ``default(model)`` when targets is None), minus the ``exclude`` subtrees.

    Raises StrategyError for a pattern that matches no module, and when nothing is left.
    """
    if targets is None:
        chosen = default(model)
        source = f"its default {what}"
    else:
        targets = list(targets)
        wanted = set(matched(model, targets, strategy=strategy, option=option))
        chosen = [(n, m) for n, m in model.named_modules() if n in wanted]
        source = f"{option} {targets}"
    exclude = list(exclude)
    excluded = matched(model, exclude, strategy=strategy, option="exclude")
    chosen = [(n, m) for n, m in chosen if not under(n, excluded)]
    if not chosen:
        classes = sorted({type(m).__name__ for n, m in model.named_modules() if n})
        hint = f" minus exclude {exclude}" if exclude else ""
        raise StrategyError(
            f"strategy '{strategy}': {source}{hint} match no module of {type(model).__name__}; "
            f"set strategy.{strategy}.{option} to class names or name regexes, e.g. one of {classes[:12]}"
        )
    return chosen


@dataclass(frozen=True)
class SubtreeScope:
    """Membership test for module names: inside a ``roots`` subtree ("" is the whole model) and outside every
    ``excluded`` one."""

    roots: tuple[str, ...]
    excluded: tuple[str, ...]

    def __call__(self, name: str) -> bool:
        return under(name, self.roots) and not under(name, self.excluded)


def subtree_scope(model: nn.Module, *, strategy: str, targets: Iterable[str] | None,
                  exclude: Iterable[str] = ()) -> SubtreeScope:
    """The ``targets`` subtrees (None: the whole model) minus the ``exclude`` subtrees, for strategies that act
    on everything inside a module (compress, offload, approx_bp)."""
    roots = [""] if targets is None else matched(model, targets, strategy=strategy, option="targets")
    return SubtreeScope(tuple(roots), tuple(matched(model, exclude, strategy=strategy, option="exclude")))

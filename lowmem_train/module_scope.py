"""Which module of a model is running: for saved-tensor stages that act per module (compress's layer kinds
and targets, offload's targets). One set of forward hooks per model, whoever asks first installs them."""

from __future__ import annotations

import functools

from torch import nn

_TRACKER = "_lowmem_module_scope"


class ModuleScope:
    """A stack of the qualified names of the modules whose forward is running (the root is "")."""

    def __init__(self):
        self.stack: list[str] = []

    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    def enter(self, name: str, module: nn.Module, args) -> None:
        self.stack.append(name)

    def exit(self, name: str, module: nn.Module, args, output) -> None:
        self.stack.pop()


def module_scope(model: nn.Module) -> ModuleScope:
    """The model's tracker, its hooks installed on first use (partials of its bound methods: a deepcopy of
    the model tracks itself). Modules added to the model afterwards count as part of their parent."""
    tracker = model.__dict__.get(_TRACKER)
    if tracker is None:
        tracker = model.__dict__[_TRACKER] = ModuleScope()
        for name, module in model.named_modules():
            module.register_forward_pre_hook(functools.partial(tracker.enter, name))
            module.register_forward_hook(functools.partial(tracker.exit, name), always_call=True)
    return tracker

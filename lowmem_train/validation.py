"""Checking config values against type hints, so a wrong type fails early with the key's name."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any


def coerce(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` expects it (an int where a float is wanted, a str as a one-item list), or
    TypeError saying what was expected. Typing constructs it does not know are accepted as they are."""
    if hint in (Any, inspect.Parameter.empty) or isinstance(hint, (str, typing.TypeVar)):
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in sorted(args, key=lambda a: a is str):  # try str last: "5" is not meant for 5
            try:
                return coerce(value, option)
            except TypeError:
                continue
        raise TypeError(f"must be {describe(hint)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise TypeError(f"must be one of {', '.join(map(repr, args))}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise TypeError(f"must be null, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"must be a list, got {value!r}")
        return [coerce(item, args[0]) for item in value] if args else list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise TypeError(f"must be int, got {value!r}")
    if isinstance(hint, type) and origin is None and not isinstance(value, hint):
        raise TypeError(f"must be {hint.__name__}, got {value!r}")
    return value


def describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))

"""Checking config values against types: dataclass schemas (through OmegaConf) and type hints (``coerce``,
for lightning.Trainer's keywords and the top-level keys), so a wrong key or value fails early, by name."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import types
import typing
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class SchemaProblem(NamedTuple):
    """What OmegaConf refused on a dataclass-typed node: an unknown key (``valid`` lists the schema's keys)
    or a value of the wrong type (``expected`` says what it must be)."""

    key: str  # the full dotted key, e.g. strategy.compress.bits
    valid: list[str] | None = None
    expected: str | None = None

    def message(self) -> str:
        """The command line's wording: the bad key and what is valid."""
        if self.valid is not None:
            parent = self.key.rpartition(".")[0] or "the top level"
            return f"unknown option '{self.key}'; valid keys under {parent}: {', '.join(self.valid) or 'none'}"
        return f"{self.key} {self.expected}"


def schema_problem(exc: BaseException) -> SchemaProblem | None:
    """The first error in ``exc``'s cause chain that OmegaConf raised on a dataclass node, as a SchemaProblem;
    None when there is none (the caller keeps the original message)."""
    while exc is not None:
        schema, key = getattr(exc, "object_type", None), getattr(exc, "key", None)
        if isinstance(exc, OmegaConfBaseException) and dataclasses.is_dataclass(schema) and isinstance(key, str):
            full_key = exc.full_key or key
            fields = [f.name for f in dataclasses.fields(schema)]
            if key not in fields:
                return SchemaProblem(full_key, valid=fields)
            hint = typing.get_type_hints(schema)[key]
            return SchemaProblem(full_key, expected=f"must be {describe(hint)}, got {getattr(exc, 'value', None)!r}")
        exc = exc.__cause__
    return None


def unknown_keys(node: Any, prefix: str = "") -> SchemaProblem | None:
    """The first key of a composed config that its dataclass schema does not declare. Hydra's ``+key=value``
    forces a key even into a dataclass node; this finds it. Interpolations and ``???`` are not followed."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        extra = [str(key) for key in node.keys() if key not in fields]
        if extra:
            return SchemaProblem(prefix + extra[0], valid=fields)
    for key in node.keys():
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        child = node[key]
        if isinstance(child, DictConfig):
            problem = unknown_keys(child, f"{prefix}{key}.")
            if problem:
                return problem
    return None


def schema_defaults(node: Any) -> dict[str, Any]:
    """The defaults of a composed node's dataclass schema, by key (empty for a node without one): what a value
    set on the command line can be compared with, e.g. a list's length."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return {}
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(schema)}


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
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(member.name for member in hint)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))

"""Typed hyper-parameters.

Every component (defense, evaluator, model, dataset) declares its hyper-parameters as a
frozen dataclass.  Fields carry their constraints in ``metadata`` (built with
:func:`param`), so that ``--set key=value`` strings are cast to the declared type (never
guessed), checked against their range, and listed with their defaults by ``cfbench list``.

    @dataclass(frozen=True)
    class Params:
        beta: float = param(6.0, "weight of the KL term", ge=0)
        steps: int = param(10, "PGD steps", ge=1)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal, get_args, get_origin

from .errors import UsageError, suggest

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def param(default: Any, help: str = "", *, ge=None, gt=None, le=None, lt=None,
          choices: tuple | None = None) -> Any:
    """A dataclass field with a description and range constraints."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _cast(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType") \
            or type(tp).__name__ == "UnionType":
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            return None
        last = None
        for a in args:
            try:
                return _cast(value, a, where)
            except UsageError as e:
                last = e
        raise last  # type: ignore[misc]
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise UsageError(f"{where}: {value!r} is not allowed." + suggest(str(value), map(str, choices)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise UsageError(f"{where}: expected a boolean (true/false), got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"{where}: expected an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise UsageError(f"{where}: expected an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"{where}: expected a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                if "/" in value:  # e.g. eps=8/255
                    num, den = value.split("/", 1)
                    return float(num) / float(den)
                return float(value)
            except (ValueError, ZeroDivisionError):
                pass
        raise UsageError(f"{where}: expected a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{where}: expected a string, got {value!r}.")
    if origin in (tuple, list):
        (inner, *_) = get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return origin(_cast(v.strip() if isinstance(v, str) else v, inner, where) for v in value)
    return value


def check_value(f: dataclasses.Field, value: Any, where: str) -> None:
    m = f.metadata
    if value is None:
        return
    if isinstance(value, float) and math.isnan(value):
        raise UsageError(f"{where}: NaN is not a valid value.")
    if m.get("choices") is not None and value not in m["choices"]:
        raise UsageError(f"{where}: {value!r} is not allowed." + suggest(str(value), map(str, m["choices"])))
    for key, ok, text in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = m.get(key)
        if bound is not None and not ok(value, bound):
            raise UsageError(f"{where}: {value!r} is out of range; it must be {text} {bound}.")


def build(cls, values: dict[str, Any] | None = None, *, where: str = "") -> Any:
    """Build a params dataclass from (possibly string) values, casting and checking each."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        k = unknown[0]
        raise UsageError(f"unknown setting {where + k!r}." + suggest(k, fields))
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        label = f"{where}{name}"
        if name in values:
            v = _cast(values[name], hints[name], label)
        else:
            v = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        check_value(f, v, label)
        kwargs[name] = v
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def describe(cls) -> list[dict[str, Any]]:
    """Name, type, default and description of every field (for ``cfbench list``)."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        tp = hints[f.name]
        if get_origin(tp) is Literal:
            tname = "|".join(str(c) for c in get_args(tp))
        else:
            tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        out.append({"name": f.name, "type": tname, "default": default, "help": f.metadata.get("help", "")})
    return out


def to_dict(obj) -> dict[str, Any]:
    return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v

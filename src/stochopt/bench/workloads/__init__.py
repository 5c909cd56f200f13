"""The benchmark's workloads: a registry of the built-in ones and loading of a user's by import path.

``load_workload("digits_mlp")`` builds a registered workload; ``load_workload("mypkg.module:MyWorkload")`` imports a
user's :class:`Workload` subclass. Keyword options go to the workload's constructor (``data_dir=`` for real MNIST),
converted to its annotated types first (:func:`workload_options`): ``n="64"`` from the command line becomes ``64``,
and an option the constructor does not take, or a value of the wrong type, is one ValueError naming both.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, Union

from stochopt.bench.workloads.base import Batch, Workload
from stochopt.bench.workloads.char_gpt import CharGPTWorkload
from stochopt.bench.workloads.common import load_targets
from stochopt.bench.workloads.convex import LeastSquares, Logistic
from stochopt.bench.workloads.ctr import CTR
from stochopt.bench.workloads.online import OnlineConvex
from stochopt.bench.workloads.vision import Autoencoder, DigitsCNN, DigitsMLP

WORKLOADS: dict[str, type[Workload]] = {
    cls.name: cls
    for cls in (
        LeastSquares,
        Logistic,
        DigitsMLP,
        DigitsCNN,
        Autoencoder,
        CharGPTWorkload,
        CTR,
        OnlineConvex,
    )
}

#: the class attributes a workload must set (see :class:`Workload`)
REQUIRED_ATTRIBUTES = ("name", "metric", "target", "max_steps", "eval_every", "batch_size")


def workload_class(spec: str) -> type[Workload]:
    """The class a spec names: a registered name, or an import path ``package.module:ClassName``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"workload must be a registered name or 'package.module:ClassName', got {spec!r}")
    if ":" not in spec:
        if spec not in WORKLOADS:
            raise ValueError(
                f"unknown workload {spec!r}; known: {', '.join(sorted(WORKLOADS))} "
                "(or give an import path 'package.module:ClassName')"
            )
        return WORKLOADS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"workload import path {spec!r} must have the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing the user's module is the user's spec failing
        reason = f"{type(err).__name__}: {err}"
        raise ValueError(f"workload {spec!r}: cannot import module {module_name!r}: {reason}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"workload {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (inspect.isclass(obj) and issubclass(obj, Workload)):
        raise ValueError(f"workload {spec!r} is not a subclass of stochopt.bench.workloads.Workload: {obj!r}")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise ValueError(f"workload {spec!r} is abstract: it does not implement {missing}")
    missing_attrs = [a for a in REQUIRED_ATTRIBUTES if not hasattr(obj, a)]
    if missing_attrs:
        raise ValueError(f"workload {spec!r} does not set the class attributes {', '.join(missing_attrs)}")
    return obj


def load_workload(spec: str, **options: Any) -> Workload:
    """An instance of the workload ``spec`` names (see :func:`workload_class`), built with ``options`` converted by
    :func:`workload_options`; ``setup`` is left to the caller (the runner calls it once). Bad options give a
    ValueError naming the workload."""
    cls = workload_class(spec)
    options = workload_options(cls, options, spec)
    try:
        return cls(**options)
    except ValueError as err:  # the constructor's own checks (n >= dim, ...): say which workload refused
        raise ValueError(f"workload {spec!r}: {err}") from err


def workload_options(cls: type[Workload], options: dict[str, Any], spec: str | None = None) -> dict[str, Any]:
    """``options`` checked and converted against the annotations of ``cls``'s constructor (or, unannotated, the
    type of the parameter's default), so that text from the command line arrives typed: ``"64"`` for an ``int``,
    ``"1e-3"`` for a ``float``, ``true``/``false``/``yes``/``no``/``1``/``0`` for a ``bool``, ``none`` where
    ``None`` is allowed, a path for ``os.PathLike``; unions and ``Literal`` too. A non-text value must already be of
    an annotated type (an int for a float is fine, a bool for an int is not). An option the constructor does not
    take, or a value that does not convert, is a ValueError naming the option, the workload and the value.
    Annotations it cannot judge (``list[int]``, a class of the user's) pass the value through unchanged."""
    where = f"workload {spec or getattr(cls, 'name', cls.__name__)!r}"
    signature = inspect.signature(cls)
    named = {k: p for k, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        if unknown := sorted(set(options) - set(named)):
            raise ValueError(f"{where} does not take the options {unknown}; its options: {', '.join(named) or 'none'}")
    hints = _constructor_hints(cls)
    converted = {}
    for key, value in options.items():
        annotation = hints.get(key)
        if annotation is None and key in named:
            default = named[key].default
            annotation = type(default) if isinstance(default, (bool, int, float, str)) else None
        converted[key] = _convert(annotation, value, f"option {key} of {where}")
    try:
        signature.bind(**converted)
    except TypeError as err:  # e.g. a required constructor argument that was not given
        raise ValueError(f"{where} does not take the options {sorted(options)}: {err}") from err
    return converted


def _constructor_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve (a name only a type checker sees): judge none of them
        return {}


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NO = object()  # the value is not of, and does not convert to, a member of the annotation
_UNJUDGED = object()  # a member _convert cannot check (``list[int]`` given as text, say)


def _convert(annotation: Any, value: Any, what: str) -> Any:
    """``value`` as one of the types ``annotation`` allows, or a ValueError ``what must be ..., got ...``."""
    if annotation is None or annotation is Any:
        return value
    union = typing.get_origin(annotation) in (Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    # None first and text last, so that "none" and "64" do not stay strings in ``int | str | None``
    order = sorted(members, key=lambda m: (m is not type(None), m is str or _is_path(m), _is_path(m)))
    unjudged = False
    for member in order:
        result = _as_member(member, value)
        if result is _UNJUDGED:
            unjudged = True
        elif result is not _NO:
            return result[0]
    if unjudged:
        return value
    raise ValueError(f"{what} must be {' or '.join(_describe(m) for m in members)}, got {value!r}")


def _as_member(member: Any, value: Any) -> Any:
    """``(converted,)``, ``_NO`` or ``_UNJUDGED``."""
    text = value.strip() if isinstance(value, str) else None
    if typing.get_origin(member) is Literal:
        for choice in typing.get_args(member):
            if value == choice or (text is not None and text == str(choice)):
                return (choice,)
        return _NO
    if member is type(None):
        return (None,) if value is None or (text is not None and text.lower() in ("none", "null")) else _NO
    if member is bool:
        if isinstance(value, bool):
            return (value,)
        if text is not None and text.lower() in _TRUE + _FALSE:
            return (text.lower() in _TRUE,)
        return _NO
    if member is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return (value,)
        return (parse_int(text),) if text is not None and parse_int(text) is not None else _NO
    if member is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return (value,)
        try:
            return (float(text),) if text is not None else _NO
        except ValueError:
            return _NO
    if member is str:
        return (value,) if isinstance(value, str) else _NO
    if _is_path(member):
        if isinstance(value, os.PathLike):
            return (value,)
        return ((Path if member in (os.PathLike, PurePath) else member)(value),) if isinstance(value, str) else _NO
    origin = typing.get_origin(member) or member
    if inspect.isclass(origin) and text is None:
        return (value,) if isinstance(value, origin) else _NO
    return _UNJUDGED


def _is_path(member: Any) -> bool:
    return member is os.PathLike or (inspect.isclass(member) and issubclass(member, PurePath))


def parse_int(text: str) -> int | None:
    """``"64"``, ``"1_000"`` or an integral ``"1e4"`` as an int; None for anything else."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _describe(member: Any) -> str:
    if typing.get_origin(member) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(member))
    names = {type(None): "None", bool: "a bool (true or false)", int: "an int", float: "a float", str: "a str",
             os.PathLike: "a path"}  # fmt: skip
    if member in names:
        return names[member]
    return f"a {getattr(member, '__name__', str(member))}"


__all__ = [
    "WORKLOADS", "Batch", "Workload", "load_targets", "load_workload", "workload_class", "workload_options",
]  # fmt: skip

"""One way to declare and check a field: scenario blocks, presets, model specs and the
parameters of training and placement policies all use :class:`Field`, and every YAML file
is read by :func:`load_yaml`.

A field has a type, a default (or none: then it is required), and what is allowed: a
range, a set of choices, or a predicate with its description. Numbers must be finite
(NaN and infinities give plausible, wrong results, so they never pass). A bad value is a
:class:`~lina_sim.errors.ConfigError` naming the field's YAML path and what is allowed::

    model.layers: must be an integer >= 1, got 0 (allowed: an integer >= 1)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from lina_sim.errors import ConfigError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a field that must be given

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Field:
    """One field or parameter: its type, default and what is allowed.

    - ``type``: ``int``, ``float``, ``bool`` or ``str`` (ints are accepted for floats; a
      whole float is accepted for an int; ``True``/``False`` never count as numbers).
    - ``default``: used when the field is absent; :data:`REQUIRED` makes it mandatory.
    - ``minimum`` / ``maximum`` (inclusive; ``exclusive_minimum`` makes the minimum
      strict), ``choices`` (the allowed values), or ``predicate`` with ``allowed`` (the
      words that describe what the predicate accepts).
    - ``allow_none``: ``null`` is a valid value (e.g. "no limit").
    - ``help``: what the field is, with its unit; shown by ``--help`` style listings.
    """

    type: type
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple | None = None
    predicate: Callable[[Any], bool] | None = None
    allowed: str | None = None
    allow_none: bool = False
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        """What is allowed, in words: ``an integer >= 1``, ``a number > 0 or null``."""
        if self.allowed is not None:
            text = self.allowed
        elif self.choices is not None:
            text = ", ".join(str(c) for c in self.choices)
        else:
            text = _TYPE_WORDS.get(self.type, f"a {self.type.__name__}")
            if self.minimum is not None:
                text += f" {'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
            if self.maximum is not None:
                text += f"{' and' if self.minimum is not None else ''} <= {self.maximum:g}"
        return text + (" or null" if self.allow_none else "")

    def check(self, value: Any, path: str) -> Any:
        """``value`` as this field's type, or a ConfigError naming ``path``."""
        if value is None:
            if self.allow_none:
                return None
            raise ConfigError(path, "must be set", self.describe())
        v = _coerce(value, self.type)
        if v is _BAD:
            raise ConfigError(path, f"must be {_TYPE_WORDS.get(self.type, self.type.__name__)}, got {value!r}",
                              self.describe())
        ok = True
        if self.minimum is not None:
            ok = v > self.minimum if self.exclusive_minimum else v >= self.minimum
        if ok and self.maximum is not None:
            ok = v <= self.maximum
        if ok and self.choices is not None:
            ok = v in self.choices
        if ok and self.predicate is not None:
            ok = bool(self.predicate(v))
        if not ok:
            raise ConfigError(path, f"got {value!r}", self.describe())
        return v

    def get(self, block: Mapping[str, Any], key: str, where: str) -> Any:
        """The checked value of ``block[key]``, its default when absent, or an error
        naming ``<where>.<key>`` when it is required and missing."""
        path = f"{where}.{key}" if where else key
        if key not in block:
            if self.required:
                raise ConfigError(path, "missing", self.describe())
            return self.default
        return self.check(block[key], path)


_BAD = object()


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        return value if isinstance(value, bool) else _BAD
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _BAD
        f = float(value)
        if not math.isfinite(f):
            return _BAD
        if kind is int:
            return int(f) if f == int(f) else _BAD
        return f
    return value if isinstance(value, kind) else _BAD


def finite(value: Any, path: str, allowed: str = "a finite number") -> float:
    """``value`` as a float, or an error naming ``path``: NaN, infinities, booleans and
    non-numbers never pass."""
    v = _coerce(value, float)
    if v is _BAD:
        raise ConfigError(path, f"must be a finite number, got {value!r}", allowed)
    return v


def check_mapping(value: Any, path: str, allowed: str | Iterable[str] | None = None) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an error naming ``path``."""
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping, got {value!r}", allowed)
    return value


def check_known(block: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Every key of ``block`` is one of ``known``; else an error naming the first unknown
    key's path and listing the known ones."""
    known = list(known)
    for key in block:
        if key not in known:
            raise ConfigError(f"{where}.{key}" if where else str(key), "unknown field", sorted(known))


def check_fields(block: Mapping[str, Any], fields: Mapping[str, Field], where: str) -> dict[str, Any]:
    """Every field of ``fields`` read from ``block`` (defaults filled in); a key of
    ``block`` that is not a field is an error."""
    check_known(block, fields, where)
    return {name: f.get(block, name, where) for name, f in fields.items()}


def load_yaml(path: str | Path, what: str = "file", allowed: str | Iterable[str] | None = None) -> dict[str, Any]:
    """The YAML mapping in ``path``. A missing file, invalid YAML or a document that is
    not a mapping is one ConfigError naming the file; ``what`` says what the file should
    be (``scenario``, ``preset``, ``profile``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(what, f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"not valid YAML: {str(e).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"cannot read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"a {what} must be a YAML mapping", allowed)
    return data

"""One way to declare and check a field: scenario blocks, presets, model specs and the
parameters of training and placement policies all use :class:`Field`, and every YAML file
is read by :func:`load_yaml`.

A field has a type, a default (or none: then it is required), and what is allowed: a
range, a set of choices, or a predicate with its description. Numbers must be finite
(NaN and infinities give plausible, wrong results, so they never pass). A bad value is a
:class:`~lina_sim.errors.ConfigError` naming the field's YAML path and what is allowed::

    model.layers: got 0 (allowed: an integer >= 1)

A block is a table of fields (``dict[str, Field]``) read by one :func:`check_fields`
call; the cross-field rules of a block (a count that must divide another, an index that
must be in range) are explicit checks after it. A spec dataclass declares each of its
fields with :func:`declare`, so that its defaults and its checks are one table
(:func:`declared`), used both to read YAML and to check a spec built in code
(:func:`check_declared`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lina_sim.errors import ConfigError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a field that must be given

_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    tuple: "a list",
    dict: "a mapping",
}


@dataclass(frozen=True)
class Field:
    """One field or parameter: its type, default and what is allowed.

    - ``type``: ``int``, ``float``, ``bool`` or ``str`` (ints are accepted for floats; a
      whole float is accepted for an int; ``True``/``False`` never count as numbers; text
      that spells a number, as YAML 1.1 leaves ``1e9``, is read as that number);
      ``tuple`` (a YAML list, stored as a tuple) or ``dict`` (a mapping, e.g. a nested
      block read by its own table); any other type is an ``isinstance`` check.
    - ``default``: used when the field is absent; :data:`REQUIRED` makes it mandatory.
    - ``minimum`` / ``maximum`` (inclusive; ``exclusive_minimum`` / ``exclusive_maximum``
      make them strict), ``choices`` (the allowed values), and/or ``predicate`` with
      ``allowed`` (the words that describe what the field accepts; they replace the
      description built from the type and range).
    - ``allow_none``: ``null`` is a valid value (e.g. "no limit").
    - ``help``: what the field is, with its unit; shown by ``--help`` style listings.
    """

    type: type
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
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
                text += (
                    f"{' and' if self.minimum is not None else ''} {'<' if self.exclusive_maximum else '<='} "
                    f"{self.maximum:g}"
                )
        return text + (" or null" if self.allow_none else "")

    def check(self, value: Any, path: str) -> Any:
        """``value`` as this field's type, or a ConfigError naming ``path``."""
        if value is None:
            if self.allow_none:
                return None
            raise ConfigError(path, "must be set", self.describe())
        v = _coerce(value, self.type)
        if v is _BAD:
            kind = _TYPE_WORDS.get(self.type, f"a {self.type.__name__}")
            if self.type in (int, float) and _non_finite(value):
                kind = "a finite number"
            raise ConfigError(path, f"must be {kind}, got {value!r}", self.describe())
        ok = True
        if self.minimum is not None:
            ok = v > self.minimum if self.exclusive_minimum else v >= self.minimum
        if ok and self.maximum is not None:
            ok = v < self.maximum if self.exclusive_maximum else v <= self.maximum
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
    if kind is tuple:
        return tuple(value) if isinstance(value, (list, tuple)) else _BAD
    if kind is dict:
        return value if isinstance(value, Mapping) else _BAD
    if kind in (int, float):
        if isinstance(value, str):
            # PyYAML reads YAML 1.1, which leaves ``1e9`` (no dot, no exponent sign) as
            # text: the number a user wrote must still read as one.
            try:
                value = float(value)
            except ValueError:
                return _BAD
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _BAD
        f = float(value)
        if not math.isfinite(f):
            return _BAD
        if kind is int:
            return int(f) if f == int(f) else _BAD
        return f
    return value if isinstance(value, kind) else _BAD


def _non_finite(value: Any) -> bool:
    """Whether ``value`` is a NaN or an infinity, as a number or as text (``nan`` in a CSV)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value)


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


def check_known(block: Mapping[str, Any], known: Iterable[str], where: str, what: str = "field") -> None:
    """Every key of ``block`` is one of ``known``; else an error naming the first unknown
    key's path, the closest known key (a misspelling is the usual cause) and the known
    ones. ``what`` names a key in the message (``parameter of policy 'lina'``)."""
    known = sorted(known)
    for key in block:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
            raise ConfigError(path, f"unknown {what}{hint}", known or ["(none)"])


def check_fields(
    block: Mapping[str, Any], fields: Mapping[str, Field], where: str, *, strict: bool = True, what: str = "field"
) -> dict[str, Any]:
    """Every field of ``fields`` read from ``block`` (defaults filled in), in the table's
    order. With ``strict`` a key of ``block`` that is not a field is an error (see
    :func:`check_known`); without it such keys are left to the caller."""
    if strict:
        check_known(block, fields, where, what)
    return {name: f.get(block, name, where) for name, f in fields.items()}


_DECLARED = "lina_sim.field"  # the dataclass-field metadata key that holds a Field


def declare(f: Field, *, keyword: bool = True) -> Any:
    """A dataclass field checked by ``f``, whose default is ``f.default``.

    ``keyword=False`` keeps the constructor argument required even though ``f`` has a
    default (Python wants every field after a defaulted one to have a default, and
    specs are built positionally); the default then applies only to mappings read with
    :func:`check_fields` against :func:`declared`.
    """
    if f.required or not keyword:
        return dataclasses.field(metadata={_DECLARED: f})
    return dataclasses.field(default=f.default, metadata={_DECLARED: f})


def declared(cls: type) -> dict[str, Field]:
    """The fields of dataclass ``cls`` declared with :func:`declare`, as a table in field order."""
    return {d.name: d.metadata[_DECLARED] for d in dataclasses.fields(cls) if _DECLARED in d.metadata}


def check_declared(obj: Any, where: str) -> None:
    """Check every declared field of the dataclass instance ``obj`` (a spec built in code
    gets the same checks as one read from YAML); errors name ``<where>.<field>``."""
    for name, f in declared(type(obj)).items():
        f.check(getattr(obj, name), f"{where}.{name}" if where else name)


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing file, a directory, an unreadable or binary
    file is one ConfigError naming it (``what`` says what the file should be)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(str(path), f"is a directory, not a {what} file", f"the path of a {what} file")
    if not path.is_file():
        raise ConfigError(what, f"file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror or e}") from None
    # A NUL byte never occurs in text: the file is binary (an archive, a pickle, an image).
    bad = raw.find(b"\0")
    if bad < 0:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = e.start
    raise ConfigError(str(path), f"not a text file: binary data at byte {bad}", f"a {what} file in UTF-8 text")


def load_yaml(
    path: str | Path, what: str = "file", allowed: str | Iterable[str] | None = None, *, lists: bool = False
) -> dict[str, Any] | list[Any]:
    """The YAML mapping in ``path`` (or, with ``lists``, a mapping or a list). A missing
    file, invalid YAML or a document of another kind is one ConfigError naming the file;
    ``what`` says what the file should be (``scenario``, ``preset``, ``profile``)."""
    path = Path(path)
    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not (isinstance(data, dict) or lists and isinstance(data, list)):
        raise ConfigError(str(path), f"a {what} must be a YAML mapping{' or list' if lists else ''}", allowed)
    return data

"""Errors that explain themselves: each names the field (or file) and what is allowed."""

from __future__ import annotations

from typing import Iterable


class LinaSimError(Exception):
    """Base class for user-facing errors; the CLI prints these as one line."""


class ConfigError(LinaSimError, ValueError):
    """A bad scenario field, preset, size or argument.

    ``field`` is the dotted path of the offending field (e.g. ``cluster.nodes``) and
    ``allowed`` says what would have been accepted.
    """

    def __init__(self, field: str, problem: str, allowed: str | Iterable[str] | None = None):
        self.field = field
        self.problem = problem
        if allowed is not None and not isinstance(allowed, str):
            allowed = ", ".join(str(a) for a in allowed)
        self.allowed = allowed
        msg = f"{field}: {problem}"
        if allowed:
            msg += f" (allowed: {allowed})"
        super().__init__(msg)


def choose(field: str, value: str, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ConfigError naming them."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(field, f"unknown value {value!r}", allowed)
    return value

"""Errors that explain themselves: each names the field (or file) and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable


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
        self.message = msg
        super().__init__(field, problem, allowed)

    def __str__(self) -> str:
        return self.message


class RoutingTraceError(LinaSimError, ValueError):
    """A malformed or mismatched expert-routing trace.

    ``source`` names the file (or ``<memory>`` for an in-memory trace) and ``problem``
    says what is wrong with it; the message is ``"<source>: <problem>"``.
    """

    def __init__(self, source: str, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")

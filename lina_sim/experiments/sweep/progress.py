"""The sweep's one-line progress bar: points done, cached, failed, elapsed time and ETA."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _fmt_s(s: float) -> str:
    """Seconds as ``M:SS`` (``H:MM:SS`` from an hour), ``?`` when unknown."""
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A one-line progress bar on ``stream`` (stderr): points done, cached, failed, ETA.

    On a terminal the line is redrawn in place; otherwise a line is printed at most every
    ``every_s`` seconds, and at the end.
    """

    def __init__(
        self,
        total: int,
        cached: int = 0,
        stream: TextIO | None = None,
        every_s: float = 5.0,
        label: str = "sweep",
        enabled: bool = True,
    ):
        self.total, self.cached, self.failed, self.done = total, cached, 0, cached
        self.stream = stream or sys.stderr
        self.every_s, self.label, self.enabled = every_s, label, enabled
        self.t0 = time.monotonic()
        self._last, self._last_done = -math.inf, -1
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def eta_s(self) -> float:
        """Seconds left, extrapolated from the points run so far (cached ones excluded)."""
        ran = self.done - self.cached
        if ran <= 0:
            return math.inf
        return (time.monotonic() - self.t0) / ran * (self.total - self.done)

    def line(self) -> str:
        width = 24
        fill = int(width * self.done / self.total) if self.total else width
        extra = ", ".join(
            x
            for x in (f"{self.cached} cached" if self.cached else "", f"{self.failed} failed" if self.failed else "")
            if x
        )
        return (
            f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} points"
            + (f" ({extra})" if extra else "")
            + f"  elapsed {_fmt_s(time.monotonic() - self.t0)}"
            + f"  ETA {_fmt_s(self.eta_s()) if self.done < self.total else '0:00'}"
        )

    def update(self, ok: bool = True) -> None:
        self.done += 1
        self.failed += not ok
        self.show()

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        elif (final and self._last_done != self.done) or now - self._last >= self.every_s:
            self.stream.write(self.line() + "\n")
            self._last, self._last_done = now, self.done
        self.stream.flush()

"""The progress bar over points (tqdm): points done, cached, failed, elapsed time and ETA.

Drawn only on a terminal: when the stream (stderr by default) is a file or a pipe, or
when the caller turned it off (``--quiet``), nothing is drawn, so logs hold no
carriage-return noise.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

FALLBACK_COLUMNS, FALLBACK_ROWS = 80, 24


def _columns(stream: TextIO) -> int:
    """The terminal's width, 0 when it does not say (a pty nobody sized, e.g. under
    ``script``), where tqdm would draw nothing at all."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class Progress:
    """A progress bar over ``total`` points on ``stream`` (default: stderr).

    ``cached`` points count as done from the start; ETA is extrapolated from the points
    run since (tqdm's rate excludes the initial count). Use :meth:`write` for text that
    must not tear the bar, and :meth:`close` at the end (``show(final=True)`` too).
    """

    def __init__(
        self,
        total: int,
        cached: int = 0,
        stream: TextIO | None = None,
        label: str = "sweep",
        enabled: bool = True,
    ):
        self.total, self.cached, self.failed, self.done = total, cached, 0, cached
        self.stream = stream or sys.stderr
        self.label = label
        self.enabled = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None  # opened on first use, so a fully cached run draws nothing early

    def _open(self) -> Any:
        """The tqdm bar, opened on first use; None when drawing is off."""
        if self._bar is None and self.enabled:
            from tqdm import tqdm  # here: `lina-sim --help` and non-terminal runs never import it

            width = _columns(self.stream)
            self._bar = tqdm(
                total=self.total,
                initial=self.done,
                desc=self.label,
                unit="pt",
                file=self.stream,
                dynamic_ncols=width > 0,  # follows the window as it is resized
                ncols=None if width > 0 else FALLBACK_COLUMNS,
                nrows=None if width > 0 else FALLBACK_ROWS,  # 0 rows: tqdm hides the bar
            )
            self._postfix()
        return self._bar

    def _postfix(self) -> None:
        extra = [f"{self.cached} cached" if self.cached else "", f"{self.failed} failed" if self.failed else ""]
        if self._bar is not None and any(extra):
            self._bar.set_postfix_str(", ".join(x for x in extra if x), refresh=False)

    def update(self, ok: bool = True) -> None:
        """One more point done (``ok=False``: it failed)."""
        bar = self._open()  # before counting: the bar starts from the points done so far
        self.done += 1
        self.failed += not ok
        if bar is not None:
            self._postfix()
            bar.update(1)

    def show(self, final: bool = False) -> None:
        """Draw the bar now; ``final`` closes it."""
        bar = self._open()
        if bar is not None:
            bar.refresh()
        if final:
            self.close()

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print ``text`` (to stdout by default) above the bar, without tearing it."""
        if self._bar is not None:
            self._bar.write(text, file=file or sys.stdout)
        else:
            print(text, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        """Leave the bar as it stands (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self.enabled = False  # closed for good: a later update must not open a new bar

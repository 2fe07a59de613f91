"""Files that readers never see half-written: write a temp file, fsync, rename; and
directories of results that appear whole or not at all (:func:`staged_dir`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file so that readers never see half of it: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file owner-only; give it the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for text (UTF-8)."""
    return atomic_write_bytes(path, text.encode())


@contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``final`` to write results into; published as
    ``final`` when the block ends normally, removed when it raises (any exception,
    KeyboardInterrupt included), so a failed run leaves no partial files.

    Publishing renames the whole directory when ``final`` does not exist yet (atomic).
    Into an existing ``final`` (other files kept) each file is moved with an atomic
    rename, once everything was written: a reader sees every file old or new, never
    half-written, and a failure before the end leaves ``final`` exactly as it was.
    A SIGKILL can leave the hidden ``.<name>.*.tmp`` directory beside ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    # mkdtemp makes the directory owner-only; give it the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if not final.exists():
        try:
            os.rename(tmp, final)
            return
        except OSError:  # created meanwhile by someone else: merge file by file below
            pass
    for src in sorted(tmp.rglob("*")):
        if src.is_file():
            dst = final / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)

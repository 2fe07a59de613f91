"""Byte sizes as users write them: ``64M``, ``1K:1G`` (binary units, as nccl-tests)."""

from __future__ import annotations

import math
import re

from lina_sim.errors import ConfigError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
    "T": 1 << 40,
    "TB": 1 << 40,
}


# The largest size accepted: 1 PiB per rank, far beyond any accelerator's memory; beyond
# it a typo (``99999999T``) would run for ever rather than fail.
MAX_BYTES = 1 << 50
# The most sizes one range may expand to (nccl-tests' -f 1.000001 would never finish).
MAX_SIZES = 1000
_SIZE_WORDS = "a number with an optional unit B, K, M, G, T (e.g. 64M, 1e6)"


def _size_range_words(minimum: int) -> str:
    return f"{_SIZE_WORDS}, from {minimum} B to {MAX_BYTES >> 40}T"


def parse_size(text: str, field: str = "size", minimum: int = 0) -> int:
    """'64M' → 67108864 bytes (binary units, as nccl-tests); '1e6' → 1000000. A size
    below ``minimum`` bytes (after rounding down to whole bytes) or above :data:`MAX_BYTES`
    is a ConfigError on ``field`` naming the allowed range."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(field, f"cannot parse size {text!r}", _size_range_words(minimum))
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not minimum <= value <= MAX_BYTES or int(value) < minimum:
        raise ConfigError(field, f"size {text!r} is {value:.3g} bytes", _size_range_words(minimum))
    return int(value)


def parse_size_range(text: str, field: str = "--sizes") -> list[int]:
    """'1K:1G' → 1K, 2K, 4K, … 1G; 'MIN:MAX:F' multiplies by F; '64M' is one size.

    Every size is at least 1 byte (a collective of 0 bytes moves nothing: its time and
    bandwidth say nothing), and a range spans at least two sizes (``1M:1M`` or
    ``1K:2K:4`` are one size written as a range, most likely a typo)."""
    parts = str(text).split(":")
    if len(parts) == 1:
        return [parse_size(parts[0], field, minimum=1)]
    if len(parts) not in (2, 3):
        raise ConfigError(field, f"cannot parse {text!r}", "SIZE, MIN:MAX or MIN:MAX:FACTOR")
    lo, hi = parse_size(parts[0], field, minimum=1), parse_size(parts[1], field, minimum=1)
    factor = 2.0
    if len(parts) == 3:
        try:
            factor = float(parts[2])
        except ValueError:
            factor = 0.0
        if not 1 < factor < math.inf:
            raise ConfigError(field, f"factor must be a number > 1, got {parts[2]!r}")
    if hi < lo:
        raise ConfigError(field, f"need 0 < MIN <= MAX, got {text!r}")
    count = int(math.floor(math.log(hi / lo) / math.log(factor) + 1e-9)) + 1
    if count > MAX_SIZES:
        raise ConfigError(field, f"{text!r} gives {count} sizes", f"at most {MAX_SIZES} sizes (a larger FACTOR)")
    if count < 2:
        raise ConfigError(
            field,
            f"range {text!r} gives one size",
            f"MIN < MAX with MAX >= MIN x FACTOR ({factor:g}), or the single size {parts[0]}",
        )
    sizes, s = [], float(lo)
    while s <= hi * (1 + 1e-12):
        sizes.append(int(s))
        s *= factor
    return sizes

"""The machine the simulator itself runs on (not the simulated cluster): what it has
available, for the size guards that refuse a scenario before building it."""

from __future__ import annotations


def available_memory() -> float | None:
    """This machine's available memory, bytes (``MemAvailable`` of /proc/meminfo); None
    where it cannot be read (not Linux), and then nothing is refused."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gigabytes(nbytes: float) -> str:
    """``nbytes`` for a message: GB with three significant digits, TB above 1000 GB."""
    return f"{nbytes / 1e12:.3g} TB" if nbytes >= 1e12 else f"{nbytes / 1e9:.3g} GB"

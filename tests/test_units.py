"""Byte sizes as users write them (``--sizes``): units, scientific notation, ranges, and
one-line errors for what cannot run (a range of millions of sizes, a size beyond 1 PiB)."""

import pytest

from lina_sim.config.units import MAX_SIZES, parse_size, parse_size_range
from lina_sim.errors import ConfigError


def test_units_and_scientific_notation():
    assert parse_size("64M") == 64 << 20
    assert parse_size("1e6") == 1_000_000
    assert parse_size("1.5K") == 1536
    assert parse_size("0") == 0
    assert parse_size_range("1K:8K") == [1024, 2048, 4096, 8192]
    assert parse_size_range("1K:1G:1.5")[-1] <= 1 << 30


@pytest.mark.parametrize(
    "text, words",
    [
        ("99999999T", "to 1024T"),
        ("1K:1G:1.000001", f"at most {MAX_SIZES} sizes"),
        ("1K:1G:1", "factor must be a number > 1"),
        ("lots", "cannot parse size"),
        ("8K:1K", "0 < MIN <= MAX"),
    ],
)
def test_what_cannot_run_is_one_error(text, words):
    with pytest.raises(ConfigError) as e:
        parse_size_range(text)
    assert words in str(e.value) and "--sizes" in str(e.value)

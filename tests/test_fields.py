"""config.fields: the one mechanism that declares and checks a field, and the one YAML loader."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from lina_sim.config.fields import (
    REQUIRED,
    Field,
    check_declared,
    check_fields,
    check_known,
    check_mapping,
    declare,
    declared,
    finite,
    load_yaml,
    read_text,
)
from lina_sim.errors import ConfigError


def error(f: Field, value, path: str = "a.b") -> ConfigError:
    with pytest.raises(ConfigError) as e:
        f.check(value, path)
    assert e.value.field == path and "\n" not in str(e.value)
    return e.value


# -- types ---------------------------------------------------------------------------------------
def test_numbers_are_coerced_to_the_declared_type():
    assert Field(float).check(3, "x") == 3.0 and isinstance(Field(float).check(3, "x"), float)
    assert Field(int).check(4.0, "x") == 4 and isinstance(Field(int).check(4.0, "x"), int)
    assert Field(int).check(np.int64(5), "x") == 5 and Field(float).check(np.float32(0.5), "x") == 0.5
    # PyYAML leaves 1e9 (YAML 1.1: no dot, no exponent sign) as text; it still reads as a number.
    assert Field(float).check("1e9", "x") == 1e9 and Field(int).check("8", "x") == 8
    assert "must be an integer, got 2.5" in str(error(Field(int), 2.5))
    assert "must be a number, got 'fast'" in str(error(Field(float), "fast"))


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_booleans_are_never_numbers(value):
    error(Field(int), value)
    error(Field(float), value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", np.float64("nan")])
@pytest.mark.parametrize("kind", [int, float])
def test_only_finite_numbers_pass(kind, value):
    e = error(Field(kind, minimum=0), value)
    assert e.allowed.endswith(">= 0")
    assert "must be a finite number" in e.problem  # text too: "nan" in a CSV cell


def test_finite():
    assert finite(2, "x") == 2.0
    for value in (math.nan, math.inf, True, "x"):
        with pytest.raises(ConfigError, match="a.b: must be a finite number"):
            finite(value, "a.b")


def test_other_types():
    assert Field(bool).check(False, "x") is False
    assert "must be true or false" in str(error(Field(bool), "yes"))
    assert Field(str).check("s", "x") == "s"
    error(Field(str), 3)
    assert Field(tuple).check([1, 2], "x") == (1, 2)
    assert "must be a list" in str(error(Field(tuple), "1, 2"))
    assert Field(dict).check({"a": 1}, "x") == {"a": 1}
    assert "must be a mapping" in str(error(Field(dict), [1]))


# -- what is allowed ------------------------------------------------------------------------------
def test_ranges_and_their_description():
    f = Field(float, minimum=0, exclusive_minimum=True, maximum=1)
    assert f.describe() == "a number > 0 and <= 1"
    assert f.check(1, "x") == 1.0
    assert error(f, 0).allowed == "a number > 0 and <= 1"
    g = Field(float, minimum=0, exclusive_minimum=True, maximum=1, exclusive_maximum=True)
    assert g.describe() == "a number > 0 and < 1"
    error(g, 1.0)
    assert Field(int, minimum=1).describe() == "an integer >= 1"
    assert Field(int, None, minimum=1, allow_none=True).describe() == "an integer >= 1 or null"


def test_choices_predicate_and_allowed_words():
    f = Field(str, "ring", choices=("ring", "hierarchical"))
    assert str(error(f, "tree")) == "a.b: got 'tree' (allowed: ring, hierarchical)"
    even = Field(int, predicate=lambda v: v % 2 == 0, allowed="an even integer")
    assert even.check(4, "x") == 4
    assert error(even, 3).allowed == "an even integer"
    mb = Field(float, minimum=0, exclusive_minimum=True, allowed="a number of MB > 0")
    assert error(mb, -1).allowed == "a number of MB > 0"


def test_none_and_required():
    assert Field(int, None, allow_none=True).check(None, "x") is None
    assert error(Field(int, 3), None).problem == "must be set"
    assert Field(int, 3).get({}, "k", "blk") == 3
    with pytest.raises(ConfigError) as e:
        Field(int, minimum=1).get({}, "k", "blk")
    assert (e.value.field, e.value.problem, e.value.allowed) == ("blk.k", "missing", "an integer >= 1")
    assert Field(int).required and not Field(int, 0).required and Field(int).default is REQUIRED


# -- blocks ----------------------------------------------------------------------------------------
TABLE = {
    "bandwidth": Field(float, minimum=0, exclusive_minimum=True, help="bytes/s"),
    "latency": Field(float, 0.0, minimum=0, help="s"),
}


def test_check_fields_fills_defaults_in_table_order():
    assert check_fields({"bandwidth": 5}, TABLE, "nic") == {"bandwidth": 5.0, "latency": 0.0}
    with pytest.raises(ConfigError, match=r"nic\.latency: must be a finite number, got nan"):
        check_fields({"bandwidth": 5, "latency": math.nan}, TABLE, "nic")


def test_unknown_keys_name_the_closest_known_one():
    with pytest.raises(ConfigError) as e:
        check_fields({"bandwdth": 5}, TABLE, "cluster.nic")
    assert e.value.field == "cluster.nic.bandwdth"
    assert "did you mean cluster.nic.bandwidth?" in e.value.problem and e.value.allowed == "bandwidth, latency"
    with pytest.raises(ConfigError) as e:
        check_known({"colour": 1}, [], "policies.x", what="parameter of policy 'x'")
    assert str(e.value) == "policies.x.colour: unknown parameter of policy 'x' (allowed: (none))"
    # Not strict: keys that are not fields are the caller's.
    assert check_fields({"bandwidth": 1, "note": "x"}, TABLE, "nic", strict=False)["bandwidth"] == 1.0


def test_check_mapping():
    assert check_mapping({"a": 1}, "blk") == {"a": 1}
    with pytest.raises(ConfigError, match=r"blk: must be a mapping, got \[1\] \(allowed: a, b\)"):
        check_mapping([1], "blk", ["a", "b"])


# -- dataclasses ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Link:
    name: str = declare(Field(str, "link"), keyword=False)  # required here, defaulted in YAML
    bandwidth: float = declare(TABLE["bandwidth"])
    latency: float = declare(TABLE["latency"])
    note: str = ""  # not declared: not checked


def test_declared_dataclass_fields():
    assert declared(Link) == {"name": Field(str, "link"), **TABLE}
    assert Link("l", 1.0).latency == 0.0
    with pytest.raises(TypeError):
        Link(bandwidth=1.0)  # keyword=False: the constructor still needs it
    assert Link(**check_fields({"bandwidth": 2}, declared(Link), "l")) == Link("link", 2.0, 0.0)
    check_declared(Link("l", 1.0), "l")
    with pytest.raises(ConfigError, match=r"nic\.bandwidth: must be a finite number, got inf"):
        check_declared(Link("l", math.inf), "nic")


# -- YAML --------------------------------------------------------------------------------------------
def test_load_yaml(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("a: 1\nb: 12.5e9\n")
    assert load_yaml(ok) == {"a": 1, "b": "12.5e9"}  # what PyYAML gives; Field reads b as 12.5e9
    with pytest.raises(ConfigError, match="preset: file not found"):
        load_yaml(tmp_path / "nope.yaml", "preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a profile must be a YAML mapping"):
        load_yaml(lst, "profile")
    assert load_yaml(lst, "profile", lists=True) == [1, 2]


def test_a_path_that_is_not_text_is_one_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a scenario file"):
        load_yaml(tmp_path, "scenario")
    binary = tmp_path / "x.yaml"
    for data in (b"\x89PNG\r\n\x1a\n", b"a: 1\x00\n"):
        binary.write_bytes(data)
        with pytest.raises(ConfigError, match="x.yaml: not a text file: binary data at byte"):
            load_yaml(binary, "scenario")
    binary.write_bytes("a: é\n".encode())  # UTF-8 text is text
    assert read_text(binary) == "a: é\n"


def test_the_mechanism_imports_only_yaml_and_the_errors():
    import ast
    import sys

    import lina_sim.config.fields as fields

    tree = ast.parse(open(fields.__file__).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    outside = {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}
    assert outside == {"yaml", "lina_sim.errors"}

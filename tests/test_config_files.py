"""Hostile config files end quickly with one line: alias bombs, self-referring aliases, deep
nesting, huge files, keys given twice."""

from __future__ import annotations

import time

import pytest

from qpeft.config import load_config
from qpeft.errors import ConfigError

BOMB = """\
a: &a ["x","x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h,*h]
model: smollm2
quantizer: {name: none, options: {x: *i}}
"""


@pytest.mark.parametrize(
    "text,message",
    [
        (BOMB, "more than 100,000 values once its YAML aliases are expanded"),
        ("model: &m {name_or_path: smollm2, loop: *m}\n", "refers to itself"),
        ("model: " + "[" * 500 + "]" * 500 + "\n", "nested deeper than 32 levels"),
        ("model: smollm2\nquantizer: none\nmodel: other\n", "key 'model' given twice (line 3)"),
    ],
    ids=["alias-bomb", "recursive-alias", "500-levels", "duplicate-key"],
)
def test_hostile_config_is_one_line_and_fast(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert time.perf_counter() - t0 < 5
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_huge_config_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\nmodel: smollm2\n")
    with pytest.raises(ConfigError, match=r"bytes; a config file is at most 1,048,576"):
        load_config(str(path))

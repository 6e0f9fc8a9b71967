"""Config fuzzing: property-based tests feed invalid and edge-case configs to the
entry point of ``qpeft run`` (``qpeft.cli.app`` through typer's CliRunner, in-process).

Every invalid config must end with exit status 2 and exactly one line on stderr, never a
traceback, and never reach :func:`qpeft.orchestrator.run` (where files are read and weights
load): the tests replace it by a tripwire. Values are generated from the pydantic schemas of
the run config and of every installed plugin's options, so a new option is fuzzed without a
change here. A few real subprocesses check exit status and the single line end to end.

``python scripts/fuzz_counts.py`` runs these properties with more examples and prints how many
configs each one tried; docs/reliability.md records the numbers.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import types
import typing
from pathlib import Path

import pytest
import yaml
from transformers.utils import logging as transformers_logging

hypothesis = pytest.importorskip("hypothesis")
from conftest import WeightWatch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from qpeft import capability_table, cli, orchestrator
from qpeft.config import INT64_MAX, RunConfig
from qpeft.registry import load_registry

# Let transformers attach its log handler to the real stderr now: set up inside a CliRunner
# invocation it would keep that invocation's (later closed) stream.
transformers_logging.get_logger("transformers")
REGISTRY = load_registry()
_REAL_RUN = orchestrator.run  # before the tripwire replaces it
NAMES = {kind: sorted(REGISTRY.backends[kind]) for kind in ("quantizer", "peft", "trainer")}
#: Examples per property = base x this scale (scripts/fuzz_counts.py raises it).
SCALE = float(os.environ.get("QPEFT_FUZZ_SCALE", "1"))
#: How many configs each property tried, and how they ended: {property: Counter(outcome)}.
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def fuzz_settings(n: int):
    """Reproducible (derandomized) hypothesis settings with ``n`` x SCALE examples."""
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
    )


class ReachedWeightLoading(AssertionError):
    """Raised by the tripwire that replaces orchestrator.run during the fuzz tests."""


@pytest.fixture(scope="module", autouse=True)
def tripwire():
    """Any config that gets past validation reaches this instead of loading weights."""

    def run(*args, **kwargs):
        raise ReachedWeightLoading("an invalid config got past validation")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(orchestrator, "run", run)
        # The registry is what the CLI loads, built once: fuzzing is about the config.
        mp.setattr(cli, "_registry", lambda extra=(): REGISTRY)
        yield


@pytest.fixture(scope="module", autouse=True)
def write_counts():
    """After the module, write COUNTS where scripts/fuzz_counts.py asks for them."""
    yield
    target = os.environ.get("QPEFT_FUZZ_COUNTS_FILE")
    if target:
        Path(target).write_text(json.dumps({k: dict(v) for k, v in COUNTS.items()}, indent=2))


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="qpeft-fuzz-") as d:
        yield Path(d)


RUNNER = CliRunner()


def invoke(workdir: Path, config, *args: str, name: str = "config.yaml"):
    """``qpeft run CONFIG ARGS`` in-process; ``config`` is a dict (written as YAML), text or bytes."""
    path = workdir / name
    if isinstance(config, bytes):
        path.write_bytes(config)
    elif isinstance(config, str):
        path.write_text(config, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return RUNNER.invoke(cli.app, ["run", str(path), *args])


def outcome(result, prop: str, *, allow_ok: bool, progress: bool = False) -> str:
    """Check one CLI result: exit 2 with one line 'error: ...' (or exit 0 when ``allow_ok``),
    never an exception escaping; count it under ``prop`` and return the error line. With
    ``progress`` (a real run) the progress lines printed before the error are allowed."""
    assert not isinstance(result.exception, ReachedWeightLoading), "validation let an invalid config through"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}\n{result.output}")
    assert "Traceback" not in result.output
    if result.exit_code == 0 and allow_ok:
        assert "config ok" in result.stdout, result.output
        COUNTS[prop]["ok"] += 1
        return ""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if progress:
        lines = lines[-1:] if not any(line.startswith("error: ") for line in lines[:-1]) else lines
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    COUNTS[prop]["exit 2"] += 1
    return lines[0]


# ---------------------------------------------------------------------------- schema walking


def _args(ann) -> tuple:
    return typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)


def _model_in(ann) -> type[BaseModel] | None:
    return next((a for a in _args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _bounds(field) -> dict:
    out = {}
    for m in field.metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length"):
            if getattr(m, attr, None) is not None:
                out[attr] = getattr(m, attr)
    return out


NOT_NUMBER = st.text(max_size=12).map(lambda s: "x" + s)  # never parses as a number, bool or name
CONTAINERS = st.one_of(
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(), min_size=1, max_size=2),
)
HUGE = st.sampled_from([10**30, -(10**30), INT64_MAX + 1, -(INT64_MAX + 2)])
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def invalid_values(field) -> st.SearchStrategy | None:
    """Values the field's schema must refuse, or None if its type accepts anything."""
    members = _args(field.annotation)
    nullable = type(None) in members
    members = tuple(m for m in members if m is not type(None))
    b = _bounds(field)
    options = [CONTAINERS] if not any(typing.get_origin(m) in (list, dict) for m in members) else []
    if not nullable:
        options.append(st.none())
    literals = {v for m in members if typing.get_origin(m) is typing.Literal for v in typing.get_args(m)}
    kinds = {m for m in members if typing.get_origin(m) is None}
    if any(m is typing.Any or typing.get_origin(m) is dict for m in members) or (str in kinds and len(members) > 1):
        return None
    if kinds == {bool} or kinds == {bool} | set():
        if bool in kinds and not literals:
            options += [
                NOT_NUMBER,
                st.integers().filter(lambda i: i not in (0, 1)),
                st.floats(allow_nan=False).filter(lambda x: x not in (0.0, 1.0)),
            ]
        elif bool in kinds:  # bool | Literal["auto"]
            options += [NOT_NUMBER.filter(lambda s: s not in literals), st.integers(min_value=2)]
    elif int in kinds and not literals:
        lo = b.get("ge", b.get("gt", -INT64_MAX - 1) + 1 if "gt" in b else None)
        hi = b.get("le", b.get("lt", INT64_MAX + 1) - 1 if "lt" in b else None)
        options += [NOT_NUMBER, HUGE, NONFINITE, st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x))]
        if lo is not None:
            options.append(st.integers(max_value=lo - 1))
        if hi is not None:
            options.append(st.integers(min_value=hi + 1))
    elif float in kinds:
        options += [NOT_NUMBER, NONFINITE]
        if "ge" in b:
            options.append(st.floats(max_value=b["ge"], exclude_max=True, allow_nan=False, allow_infinity=False))
        if "gt" in b:
            options.append(st.floats(max_value=b["gt"], allow_nan=False, allow_infinity=False))
        if "le" in b:
            options.append(st.floats(min_value=b["le"], exclude_min=True, allow_nan=False, allow_infinity=False))
        if "lt" in b:
            options.append(st.floats(min_value=b["lt"], allow_nan=False, allow_infinity=False))
    elif str in kinds:
        options += [st.integers(), st.floats(allow_nan=False), st.booleans(), st.text(max_size=8).map(lambda s: s + "\x00")]
        if b.get("min_length"):
            options.append(st.just(""))
    elif literals and not kinds:
        options += [
            NOT_NUMBER.filter(lambda s: s not in literals),
            st.integers().filter(lambda i: i not in literals),
            st.booleans().filter(lambda b: b not in literals),
        ]
    elif any(typing.get_origin(m) is list for m in members):  # list[str] | None | Literal[...]
        options += [st.integers(), NOT_NUMBER.filter(lambda s: s not in literals), st.lists(st.integers(), min_size=1, max_size=2)]
    else:
        return None
    return st.one_of(options)


def schema_fields(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, object]]:
    """(path, field) of every field of ``model``, nested models included (and listed)."""
    out = []
    for name, field in model.model_fields.items():
        path = prefix + (name,)
        out.append((path, field))
        sub = _model_in(field.annotation)
        if sub is not None and sub.__name__ != "BackendRef":
            out.extend(schema_fields(sub, path))
    return out


def fields_for(base: dict) -> list[tuple[tuple, object]]:
    """Every fuzzable field of a config whose backends are ``base``: the run config's, the
    backend names, and each chosen backend's options."""
    out = [(p, f) for p, f in schema_fields(RunConfig) if p[0] not in ("quantizer", "peft", "trainer")]
    for kind in ("quantizer", "peft", "trainer"):
        plugin = REGISTRY.backends[kind][base[kind]["name"]]
        out.append(((kind, "name"), None))
        out.extend(((kind, "options") + p, f) for p, f in schema_fields(plugin.Options))
    return out


#: Quantizers a CPU base config can name validly (fp8 and torchao-int4 are refused on CPU, and a
#: base with one of them would fail on that, not on the key a test breaks).
CPU_QUANTIZERS = [
    q
    for q in NAMES["quantizer"]
    if "cpu" in REGISTRY.backends["quantizer"][q].capabilities.devices and REGISTRY.backends["quantizer"][q].capabilities.trainable
]


@functools.cache
def _valid_triples() -> list[tuple[str, str, str]]:
    """(quantizer, peft, trainer) combinations a CPU base may name: a refused combination (say
    ia3 on awq) would fail on its own key, before the key a test breaks."""
    return [
        (q, p, t)
        for q in CPU_QUANTIZERS
        for p in NAMES["peft"]
        for t in NAMES["trainer"]
        if expected_refusal(q, p, t, "auto", "cpu", False) is None
    ]


def valid_base(draw) -> dict:
    q, p, t = draw(st.sampled_from(_valid_triples()))
    return {
        "quantizer": {"name": q, "options": {}},
        "peft": {"name": p, "options": {}},
        "trainer": {"name": t, "options": {}},
        "model": {"name_or_path": "/nonexistent/qpeft-fuzz-model", "device": "cpu"},
        "output_dir": "/nonexistent/qpeft-fuzz-out",
    }


def set_path(data: dict, path: tuple, value) -> bool:
    """Set ``data[path] = value``; False where an earlier mutation left no mapping on the way."""
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return False
    node[path[-1]] = value
    return True


def mutate(draw, data: dict, fields: list) -> tuple | None:
    """Apply one mutation the schema must refuse to ``data`` and return the key the error must
    name as a path (None where an earlier mutation made this one impossible). Mutations: a wrong value
    for any field, an unknown key at any level, a missing required key, an unknown backend name."""
    kind = draw(st.sampled_from(["value", "value", "value", "unknown_key", "missing"]))
    if kind == "value":
        path, field = draw(st.sampled_from(fields))
        if field is None:  # a backend name: unknown names and non-strings
            value = draw(st.one_of(NOT_NUMBER, st.just(""), st.integers(), CONTAINERS))
        else:
            value = draw(invalid_values(field))
        return path if set_path(data, path, value) else None
    if kind == "unknown_key":
        scopes = [(), ("model",), ("data",), ("generate",), ("quantizer",), ("peft",), ("trainer",)]
        scopes += [(k, "options") for k in ("quantizer", "peft", "trainer")]
        scope = draw(st.sampled_from(scopes))
        if scope and scope[-1] == "options":
            name = data.get(scope[0], {}).get("name") if isinstance(data.get(scope[0]), dict) else None
            if not isinstance(name, str) or name not in REGISTRY.backends[scope[0]]:
                return None
            valid = set(REGISTRY.backends[scope[0]][name].Options.model_fields)
        else:
            model = RunConfig
            for part in scope:
                model = _model_in(model.model_fields[part].annotation)
            valid = set(model.model_fields)
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in valid and "\x00" not in k))
        return scope + (key,) if set_path(data, scope + (key,), draw(st.integers(0, 3))) else None
    backend = draw(st.sampled_from(["quantizer", "peft", "trainer"]))
    if backend not in data:
        return None
    if draw(st.booleans()) or not isinstance(data[backend], dict):
        del data[backend]
        return (backend,)
    data[backend].pop("name", None)
    return (backend, "name")


def fuzzable_fields(data: dict) -> list:
    return [(p, f) for p, f in fields_for(data) if f is None or invalid_values(f) is not None]


@st.composite
def invalid_configs(draw):
    """(config, key): a valid base with one mutation its schema must refuse, and the key the
    error must name."""
    data = valid_base(draw)
    key = mutate(draw, data, fuzzable_fields(data))
    return data, key


def _key_of(line: str) -> str:
    return line.removeprefix("error: ")


def _as_read(part: str) -> str:
    """A key as qpeft reads it back from the YAML file (YAML folds some line-break characters)."""
    return next(iter(yaml.safe_load(yaml.safe_dump({part: 0}, allow_unicode=True))))


def shown(path: tuple) -> str:
    """How an error names the key at ``path``: parts with spaces or unprintable characters are quoted."""
    parts = [_as_read(p) for p in map(str, path)]
    return ".".join(p if p and p.isprintable() and not any(c.isspace() for c in p) else repr(p) for p in parts)


@fuzz_settings(250)
@given(case=invalid_configs())
def test_invalid_config_exits_2_naming_the_key(workdir, case):
    data, key = case
    line = outcome(invoke(workdir, data), "schema mutations (one invalid value/key)", allow_ok=False)
    assert _key_of(line).startswith((shown(key) + ":", shown(key) + ".")), (key, line)  # .N: a list item


@st.composite
def several_mutations(draw):
    data = valid_base(draw)
    fields = fuzzable_fields(data)
    keys = [mutate(draw, data, fields) for _ in range(draw(st.integers(2, 5)))]
    assert keys[0] is not None
    return data


@fuzz_settings(80)
@given(data=several_mutations())
def test_several_invalid_values_still_one_line(workdir, data):
    outcome(invoke(workdir, data), "several mutations at once", allow_ok=False)


# ---------------------------------------------------------------------------- arbitrary input

YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE,
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["auto", "cpu", "cuda", "lora", "bnb-nf4", "hf", "smollm2", "", "~", "null", "1e400", "-0", "0x1F"]),
)
YAML_VALUES = st.recursive(
    YAML_SCALARS, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)), max_leaves=8
)


@st.composite
def junk_paths(draw):
    """A key path of the schema (or near it) to put arbitrary YAML at."""
    base = valid_base(draw)
    paths = [p for p, _ in fields_for(base)] + [("quantizer",), ("peft",), ("trainer",), ("model",), ("data",)]
    path = draw(st.sampled_from(paths))
    return base, path


@fuzz_settings(200)
@given(case=junk_paths(), value=YAML_VALUES)
def test_arbitrary_values_anywhere_never_crash(workdir, case, value):
    base, path = case
    set_path(base, path, value)
    outcome(invoke(workdir, base, "--check"), "arbitrary YAML value at a schema path", allow_ok=True)


@fuzz_settings(80)
@given(doc=YAML_VALUES)
def test_arbitrary_documents_never_crash(workdir, doc):
    outcome(invoke(workdir, doc, "--check"), "arbitrary YAML document", allow_ok=True)


@fuzz_settings(80)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(bytes)))
def test_arbitrary_file_contents_never_crash(workdir, text):
    outcome(invoke(workdir, text, "--check"), "arbitrary file contents (text, bytes)", allow_ok=True)


BASE_TEXT = "quantizer: none\npeft: lora\ntrainer: hf\nmodel: {device: cpu}\n"


@fuzz_settings(100)
@given(
    sets=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.tuples(
                st.sampled_from(
                    [".".join(p) for p, _ in fields_for({k: {"name": NAMES[k][0]} for k in ("quantizer", "peft", "trainer")})]
                    + ["quantizer", "peft", "x.y", ".", "a..b"]
                ),
                st.text(max_size=15),
            ).map("=".join),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_arbitrary_set_overrides_never_crash(workdir, sets):
    args = [a for s in sets for a in ("--set", s)]
    outcome(invoke(workdir, BASE_TEXT, "--check", *args), "arbitrary --set overrides", allow_ok=True)


PATH_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=40).filter(
    lambda s: s not in (".", "..")
)


@fuzz_settings(30)
@given(name=PATH_TEXT)
def test_unicode_config_paths(workdir, name):
    try:
        result = invoke(workdir, BASE_TEXT, "--check", name=name + ".yaml")
    except OSError:  # a name the file system refuses (too long in bytes): nothing to test
        hypothesis.assume(False)
    outcome(result, "unicode config file names", allow_ok=True)
    assert result.exit_code == 0, result.output
    missing = RUNNER.invoke(cli.app, ["run", str(workdir / "missing" / name)])
    assert "config file not found" in outcome(missing, "unicode config file names", allow_ok=False)


# ---------------------------------------------------------------------------- combinations

GC = [True, False, "auto"]
DEVICES = ["cpu", "cuda", "auto"]


def expected_refusal(q, p, t, gc, device, packing) -> str | None:
    """The key qpeft must refuse a combination under, from declared capabilities alone."""
    import torch

    quant, peft, trainer = REGISTRY.backends["quantizer"][q], REGISTRY.backends["peft"][p], REGISTRY.backends["trainer"][t]
    plugins = {"quantizer": quant, "peft": peft, "trainer": trainer}
    for plugin in plugins.values():  # declared incompatibilities, in check_combination's order
        for other_kind, other in plugins.items():
            if other is not plugin and other.name in plugin.capabilities.incompatible:
                return f"{other_kind}.name"
    if not capability_table.cell(quant, peft).train:
        return "quantizer.name"
    if packing and getattr(trainer, "data_kind", "lm") != "lm":  # preference/feedback/prompt rows are never packed
        return "data.packing"
    if device == "cuda" and not torch.cuda.is_available():
        return "model.device"
    resolved = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    if resolved not in quant.capabilities.devices:
        return "quantizer.name"
    if gc is True and not (quant.capabilities.grad_checkpointing and peft.capabilities.grad_checkpointing):
        return "gradient_checkpointing"
    if packing and not getattr(peft.capabilities, "packing", True):
        return "data.packing"
    return None


@fuzz_settings(100)
@given(
    q=st.sampled_from(NAMES["quantizer"]),
    p=st.sampled_from(NAMES["peft"]),
    t=st.sampled_from(NAMES["trainer"]),
    gc=st.sampled_from(GC),
    device=st.sampled_from(DEVICES),
    packing=st.booleans(),
)
def test_combinations_follow_declared_capabilities(workdir, q, p, t, gc, device, packing):
    data = {"quantizer": q, "peft": p, "trainer": t, "gradient_checkpointing": gc, "model": {"device": device}}
    if "packing" in RunConfig.model_fields["data"].annotation.model_fields:
        data["data"] = {"packing": packing}
    expected = expected_refusal(q, p, t, gc, device, packing and "data" in data)
    line = outcome(invoke(workdir, data, "--check"), "backend x backend x option combinations", allow_ok=True)
    if expected is None:
        assert not line, line
    else:
        assert _key_of(line).startswith(expected + ":"), (expected, line)


# ---------------------------------------------------------------------------- absurd numbers


def numeric_fields() -> list[tuple[str, str, str, object]]:
    """(scope, backend, field, annotation) of every int/float field of the run config and of
    every installed plugin's options."""
    out = []
    for path, field in schema_fields(RunConfig):
        if path[0] not in ("quantizer", "peft", "trainer") and {int, float} & set(_args(field.annotation)):
            out.append(("run", "", ".".join(path), field))
    for kind, items in REGISTRY.backends.items():
        for name, plugin in sorted(items.items()):
            for path, field in schema_fields(plugin.Options):
                if {int, float} & set(_args(field.annotation)) and bool not in _args(field.annotation):
                    out.append((kind, name, ".".join(path), field))
    return out


ABSURD = [math.nan, math.inf, -math.inf, 10**30, -(10**30)]
#: Float fields where a huge value is meaningful ("no limit"): 1e30 is accepted there.
HUGE_MEANS_OFF = {("trainer", "max_grad_norm"), ("quantizer", "threshold")}


@pytest.mark.parametrize("value", ABSURD, ids=["nan", "inf", "-inf", "1e30", "-1e30"])
def test_every_numeric_field_refuses_absurd_numbers(workdir, value):
    """Exhaustive, not sampled: each int/float field of the run config and of every plugin
    refuses non-finite numbers and numbers beyond 64 bits (floats: beyond a stated range)."""
    fields = numeric_fields()
    assert len(fields) > 20
    for scope, name, key, field in fields:
        if value == 10**30 and (scope, key) in HUGE_MEANS_OFF and int not in _args(field.annotation):
            continue
        if scope == "run":
            data = {"quantizer": "none", "peft": "lora", "trainer": "hf", "model": {"device": "cpu"}}
            set_path(data, tuple(key.split(".")), value)
            full_key = key
        elif scope in ("tracker", "evaluator"):  # lists in the config: trackers, eval
            section = {"tracker": "trackers", "evaluator": "eval"}[scope]
            data = {"quantizer": "none", "peft": "lora", "trainer": "hf", "model": {"device": "cpu"}}
            data[section] = [{"name": name, "options": {}}]
            set_path(data[section][0]["options"], tuple(key.split(".")), value)
            full_key = f"{section}.0.options.{key}"
        else:
            data = {"quantizer": "none", "peft": "lora", "trainer": "hf", "model": {"device": "cpu"}}
            data[scope] = {"name": name, "options": {}}
            set_path(data[scope]["options"], tuple(key.split(".")), value)
            full_key = f"{scope}.options.{key}"
        line = outcome(invoke(workdir, data, "--check"), "absurd numbers in every numeric field", allow_ok=False)
        assert _key_of(line).startswith(full_key + ":"), line


# ---------------------------------------------------------------------------- run-time checks, real orchestrator


@fuzz_settings(20)
@given(model_name=PATH_TEXT, out_name=PATH_TEXT)
def test_missing_unicode_model_paths_fail_before_weights(workdir, model_name, out_name):
    """Through the real orchestrator.run: a model folder that does not exist (unicode names)
    is a one-line exit 2 before any weight loads; the unicode output folder is written."""
    watch = WeightWatch()
    data = {
        "quantizer": "none",
        "peft": "lora",
        "trainer": "hf",
        "model": {"name_or_path": f"{workdir}/no-such-dir/{model_name}", "device": "cpu"},
        "output_dir": str(workdir / "out" / out_name),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(orchestrator, "run", _REAL_RUN)
        mp.setattr(cli, "_registry", lambda extra=(): load_registry([*extra, watch]))
        try:
            result = invoke(workdir, data)
        except OSError:  # a name the file system refuses (too long in bytes): nothing to test
            hypothesis.assume(False)
    line = outcome(result, "missing model folders with unicode names, real run", allow_ok=False, progress=True)
    assert watch.loaded == 0
    assert "model folder not found" in line, line


# ---------------------------------------------------------------------------- real processes

SUBPROCESS_CASES = [
    ("quantizer: none\npeft: lora\ntrainer: {name: hf, options: {lr: .inf}}\n", [], "trainer.options.lr"),
    ("quantizer: none\npeft: lora\ntrainer: hf\nseed: 1.0e+30\n", [], "seed"),
    (
        "quantizer: none\npeft: lora\ntrainer: hf\ngradient_checkpointing: maybe\n",
        [],
        "gradient_checkpointing: Input should be a valid boolean",
    ),
    ("quantizer: none\npeft: prefix\ntrainer: hf\ngradient_checkpointing: true\nmodel: {device: cpu}\n", [], "gradient_checkpointing"),
    ("quantizer: none\npeft: lora\ntrainer: hf\n", ["--set", "peft.options.target_modules=[1]"], "peft.options.target_modules"),
    (
        "quantizer: none\npeft: lora\ntrainer: hf\n",
        ["--set", "seed=[/bold] x"],
        "seed: Input should be a valid integer, unable to parse string as an integer (got '[/bold] x')",
    ),
    ("\x00\x01\x02 binary", [], "not valid YAML"),
]


@pytest.mark.parametrize("text,args,expect", SUBPROCESS_CASES, ids=range(len(SUBPROCESS_CASES)))
def test_real_process_exit_2_one_line(tmp_path, text, args, expect):
    cfg = tmp_path / "ünïcødé ✓.yaml"
    cfg.write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "qpeft", "run", str(cfg), *args], capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_counts_are_recorded():
    """Runs last in this module: every property above tried configs (see scripts/fuzz_counts.py)."""
    assert COUNTS, "no fuzz property ran"
    for prop, counter in COUNTS.items():
        assert sum(counter.values()) > 0, prop

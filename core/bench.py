"""``qpeft bench``: a matrix of quantizer × PEFT method × trainer (× any config key) cells, each
run in its own process, one comparable record per cell.

A matrix file names a base run config and the axes to vary::

    name: cpu-smoke
    base: ../quickstart.yaml          # a run config (path relative to this file) or a mapping
    set: [trainer.options.max_steps=4]  # overrides applied to every cell
    axes:                             # config key -> values (a mapping gives each value a label)
      quantizer: [none, bnb-nf4]
      peft: [lora, prefix]
      trainer.options.batch_size: {b2: 2, b4: 4}
    exclude: [{quantizer: none, peft: prefix}]   # cells to leave out of the matrix
    merge: true                       # also merge mergeable cells and measure max |Δlogit|

Expansion reuses the run config's own machinery: a cell's config is the base with ``set`` and
the cell's values applied as ``--set`` overrides (:func:`qpeft.config.apply_overrides`), and it
is resolved with :func:`qpeft.config.resolve`, so a combination that capabilities rule out is
listed as "not supported" with resolve's own reason, without a second copy of the rules.
A value that is wrong whatever it is combined with (an unknown key, a backend that does not
exist) is an error in the matrix: exit 2, naming ``axes.<key>``.

Each supported cell runs ``python -m qpeft.bench CELL.json`` (:func:`cell_main`), which calls
:func:`qpeft.orchestrator.run` (and ``merge``) and writes the cell's metrics; a crash or an
out-of-memory in one cell is recorded and the others go on. With ``isolation: worker`` one
``python -m qpeft.bench --worker`` process (:func:`worker_main`; one per GPU with ``--gpus``)
runs the cells one after another instead, its imports done once and CPU base loads after the
first copied from :class:`qpeft.modeling.BaseModelCache`; a cell that fails, dies or times out
takes its worker with it and the next cell starts a fresh one. Records are appended atomically
to ``DIR/results.jsonl``; running the same command again skips finished cells.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from .checkpoint import CHECKPOINTS
from .config import (
    apply_overrides,
    load_config,
    read_yaml,
    resolve,
    validate_options,
    validation_error,
)
from .errors import ConfigError, QpeftError
from .hookspecs import hookimpl
from .io import atomic_write_json, atomic_write_text, dumps_json, folder_lock

RESULTS_FILE = "results.jsonl"
MATRIX_FILE = "matrix.json"
EVENT_PREFIX = "@qpeft-bench "
_BACKEND_KINDS = ("quantizer", "peft", "trainer")

Event = Callable[[dict], None]


def _no_event(event: dict) -> None:
    pass


# ---------------------------------------------------------------------------- the matrix file


class MatrixConfig(BaseModel):
    """Top level of a ``qpeft bench`` matrix file."""

    model_config = ConfigDict(extra="forbid")

    #: Names the default output folder ``runs/bench/<name>``.
    name: str = Field("bench", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    description: str = ""
    #: The base run config: a YAML file (relative to the matrix file) or an inline mapping.
    base: str | dict[str, Any]
    #: ``key.path=value`` overrides applied to every cell (before the axes).
    set: list[str] = Field(default_factory=list)
    #: Config key -> values. A list labels each value by itself (a backend by its name); a
    #: mapping gives ``label: value``.
    axes: dict[str, list[Any] | dict[str, Any]] = Field(min_length=1)
    #: Partial cells (``{axis: label or [labels]}``, glob patterns allowed) left out of the matrix.
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    #: Merge the adapter of every mergeable cell and record the max |Δlogit| of the merge.
    merge: bool = True
    #: dtype the merged model is computed in and checked in (it is deleted afterwards).
    merge_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: A cell still running after this many seconds is stopped and recorded as failed. "auto"
    #: (the default): derived from each cell's own budget (:class:`Timeouts`); 0 or null: none.
    timeout_s: float | Literal["auto"] | None = "auto"
    #: Results folder (default ``runs/bench/<name>``); ``--out`` overrides it.
    output_dir: str | None = None
    #: How cells run. "process": each cell in a fresh process (nothing carries over between
    #: cells). "worker": one process (one per GPU with ``--gpus``) runs cells one after another,
    #: keeping its imports and, on CPU, an untouched copy of the last base it loaded (quantized
    #: as loaded), so that later loads of that base are copies; a failed, killed or timed-out
    #: cell's worker is replaced by a fresh one. ``--isolation`` overrides it.
    isolation: Literal["process", "worker"] = "process"
    #: Environment variables for the cells' processes, e.g. ``{OMP_WAIT_POLICY: PASSIVE}`` on a
    #: shared CPU; a variable already set where ``qpeft bench`` runs keeps its value. The values
    #: a cell got are in its record (``env``).
    env: dict[str, str | int | float] = Field(default_factory=dict)

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f'expected a number of seconds, "auto", 0 or null, not the boolean {str(value).lower()}')
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f'expected a number of seconds (0: no timeout), "auto" or null, got {value}')
        return None if value == 0 else value


@dataclass
class Cell:
    """One combination of axis values, expanded and resolved (no weights loaded)."""

    id: str
    labels: dict[str, str]
    #: The cell's ``key=value`` overrides (``set`` first, then the axes), without output_dir.
    overrides: list[str]
    slug: str
    #: The run config as a mapping, output_dir included.
    config: dict
    #: "pending" (supported) or "unsupported".
    status: str = "pending"
    reason: str = ""
    #: Hash of the resolved config (output_dir left out): a finished record counts only if it matches.
    fingerprint: str = ""
    mergeable: bool = False
    device: str = ""
    #: What the cell is asked to do, for its default timeout (:func:`cell_budget`).
    budget: dict = field(default_factory=dict)


@dataclass
class Matrix:
    """A loaded matrix: its file, its validated content and the base run config after ``set``."""

    path: Path
    config: MatrixConfig
    base: dict
    axes: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)


def load_matrix(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Matrix:
    """Read and validate a matrix file, with ``overrides`` (``--set``) added to its ``set``;
    every error is a ConfigError naming the key."""
    path = Path(path)
    data = read_yaml(path)
    try:
        cfg = MatrixConfig.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, MatrixConfig) from None
    cfg.set = [*cfg.set, *overrides]
    if isinstance(cfg.base, str):
        base_path = (path.parent / cfg.base) if not Path(cfg.base).is_absolute() else Path(cfg.base)
        try:
            base = read_yaml(base_path)
        except ConfigError as exc:
            raise ConfigError("base", exc.message) from None
    else:
        base = dict(cfg.base)
    try:
        base = apply_overrides(base, cfg.set)
    except ConfigError as exc:
        raise ConfigError("set", str(exc)) from None
    for key, values in cfg.axes.items():
        if any(not part or not re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in key.split(".")):
            raise ConfigError(f"axes.{key}", "is not a config key path like trainer.options.batch_size")
        if key == "output_dir":
            raise ConfigError("axes.output_dir", "cannot be an axis: qpeft bench gives every cell its own output_dir")
        if not values:
            raise ConfigError(f"axes.{key}", "has no values")
    axes = {key: axis_values(key, values) for key, values in cfg.axes.items()}
    axis_keys = list(axes)
    for i, rule in enumerate(cfg.exclude):
        for key in rule:
            if _axis_for(key, axis_keys) is None:
                raise ConfigError(f"exclude[{i}]", f"unknown axis {key!r}; axes: {', '.join(map(axis_title, axis_keys))}")
    return Matrix(path, cfg, base, axes)


def axis_values(key: str, values: list | dict) -> list[tuple[str, Any]]:
    """(label, value) pairs of one axis; labels must be unique within it."""
    if isinstance(values, dict):
        pairs = [(str(label), value) for label, value in values.items()]
    else:
        pairs = [(_label(v), v) for v in values]
        names = [v["name"] if isinstance(v, dict) and isinstance(v.get("name"), str) else None for v in values]
        # A backend with options is labelled by its name when no other value of the axis has that name.
        pairs = [(n if n and names.count(n) == 1 else label, v) for (label, v), n in zip(pairs, names)]
    seen: set[str] = set()
    for label, _ in pairs:
        if label in seen:
            raise ConfigError(f"axes.{key}", f"two values have the label {label!r}; give labels as a mapping (label: value)")
        seen.add(label)
    return pairs


def _label(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def _override(key: str, value: Any) -> str:
    """``key=value`` in the form :func:`qpeft.config.parse_override` reads (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def axis_title(key: str) -> str:
    """How an axis is shown and selected: ``trainer.name`` is ``trainer``."""
    return key.removesuffix(".name")


def _axis_for(key: str, axis_keys: list[str]) -> str | None:
    """The axis a selector or exclude rule names: its key, its title (``trainer`` for
    ``trainer.name``), or its last part when that is unique."""
    for axis in axis_keys:
        if key in (axis, axis_title(axis)):
            return axis
    matches = [a for a in axis_keys if a.rsplit(".", 1)[-1] == key]
    return matches[0] if len(matches) == 1 else None


def _check_schema(data: dict, registry, key: str) -> None:
    """Errors that no combination can fix: the config's schema, backend names, option keys."""
    try:
        cfg = load_config(data)
        for kind in _BACKEND_KINDS:
            ref = getattr(cfg, kind)
            validate_options(registry.get(kind, ref.name), ref.options, f"{kind}.options")
    except ConfigError as exc:
        raise ConfigError(key, str(exc)) from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120] or "cell"


def _fingerprint(data: dict) -> str:
    data = {k: v for k, v in data.items() if k != "output_dir"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expand(matrix: Matrix, registry, directory: Path) -> list[Cell]:
    """Every cell of the matrix in axis order (``exclude`` left out), each resolved: supported
    cells are "pending", the others "unsupported" with the reason resolve gave."""
    from . import capability_table

    cfg = matrix.config
    _check_schema(matrix.base, registry, "base")
    for key, pairs in matrix.axes.items():
        for label, value in pairs:
            _check_schema(apply_overrides(matrix.base, [_override(key, value)]), registry, f"axes.{key}[{label}]")

    keys = list(matrix.axes)
    # Whole sections (``peft``) before keys inside them (``peft.options.r``), so both apply.
    order = sorted(range(len(keys)), key=lambda i: keys[i].count("."))
    cells: list[Cell] = []
    slugs: set[str] = set()
    for combo in itertools.product(*(matrix.axes[k] for k in keys)):
        labels = {k: label for k, (label, _) in zip(keys, combo)}
        if any(_excluded(rule, labels, keys) for rule in cfg.exclude):
            continue
        overrides = [_override(keys[i], combo[i][1]) for i in order]
        cell_id = ",".join(f"{axis_title(k)}={labels[k]}" for k in keys)
        slug = base_slug = _slug("__".join(labels.values()))
        n = 2
        while slug in slugs:
            slug, n = f"{base_slug}-{n}", n + 1
        slugs.add(slug)
        run_dir = directory / "cells" / slug / "run"
        data = apply_overrides(matrix.base, overrides + [_override("output_dir", str(run_dir))])
        cell = Cell(cell_id, labels, list(cfg.set) + overrides, slug, data)
        try:
            resolved = resolve(load_config(data), registry)
        except ConfigError as exc:
            cell.status, cell.reason = "unsupported", str(exc)
            cell.fingerprint = _fingerprint(data)
        else:
            full = resolved.to_dict()
            cell.fingerprint = _fingerprint(full)
            cell.mergeable = capability_table.cell(resolved.quantizer, resolved.peft).merge
            cell.device = resolved.device
            cell.budget = cell_budget(full, bool(cfg.merge and cell.mergeable))
        cells.append(cell)
    return cells


def _excluded(rule: dict, labels: dict[str, str], keys: list[str]) -> bool:
    for key, want in rule.items():
        axis = _axis_for(key, keys)
        wants = want if isinstance(want, list) else [want]
        if not any(fnmatch.fnmatchcase(labels[axis], _label(w) if not isinstance(w, str) else w) for w in wants):
            return False
    return True


def select(cells: list[Cell], patterns: list[str] | tuple[str, ...], option: str = "--only") -> list[Cell]:
    """Cells matching any pattern. A pattern is comma-separated terms that must all match:
    ``axis=glob`` (axis by full key or last part) or a glob on the cell id or folder name."""
    if not patterns:
        return list(cells)
    keys = list(cells[0].labels) if cells else []
    chosen: list[Cell] = []
    for pattern in patterns:
        terms = [t.strip() for t in pattern.split(",") if t.strip()]
        hits = []
        for cell in cells:
            ok = True
            for term in terms:
                if "=" in term:
                    key, glob = term.split("=", 1)
                    axis = _axis_for(key.strip(), keys)
                    if axis is None:
                        raise QpeftError(f"{option} {pattern!r}: unknown axis {key.strip()!r}; axes: {', '.join(map(axis_title, keys))}")
                    ok = fnmatch.fnmatchcase(cell.labels[axis], glob.strip())
                else:
                    ok = fnmatch.fnmatchcase(cell.id, term) or fnmatch.fnmatchcase(cell.slug, term)
                if not ok:
                    break
            if ok:
                hits.append(cell)
        if not hits:
            raise QpeftError(f"{option} {pattern!r} matches no cell of the matrix")
        chosen.extend(c for c in hits if c not in chosen)
    return [c for c in cells if c in chosen]


# ---------------------------------------------------------------------------- results file


def read_records(directory: str | Path, *, strict: bool = False) -> list[dict]:
    """Every record of ``DIR/results.jsonl`` in order. A line that is not UTF-8, not JSON, or
    not a record (an object with a string ``cell``; for the report also ``labels``/``metrics``
    objects) is skipped, or with ``strict`` (``bench report``) is a :class:`QpeftError` naming
    the file and line."""
    path = Path(directory) / RESULTS_FILE
    if not path.is_file():
        return []
    records = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
            if not line:
                continue
            record = json.loads(line)
            problem = _record_problem(record, strict)
        except UnicodeDecodeError:
            problem = "is not UTF-8 text"
        except json.JSONDecodeError as exc:
            problem = f"is not valid JSON ({exc.msg})"
        if problem is None:
            records.append(record)
        elif strict:
            raise QpeftError(f"{path}: line {n} {problem}; fix or delete that line")
    return records


def _record_problem(record, strict: bool) -> str | None:
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not a record object"
    if not isinstance(record.get("cell"), str):
        return "has no 'cell' string"
    if not strict:  # bench run needs only the cell; the report reads the rest
        return None
    for key in ("labels", "metrics", "environment"):
        if key in record and not isinstance(record[key], dict):
            return f"has {key!r} as {type(record[key]).__name__}, expected an object"
    if record.get("status") == "ok" and not all(isinstance(record.get(k), dict) for k in ("labels", "metrics")):
        return "is an ok record without 'labels' and 'metrics' objects"
    return None


def latest_records(records: list[dict]) -> dict[str, dict]:
    """The newest record of each cell, in the order cells first appear."""
    latest: dict[str, dict] = {}
    for r in records:
        latest[r["cell"]] = r
    return latest


def append_record(directory: str | Path, record: dict) -> None:
    """Append one JSON line to ``DIR/results.jsonl`` atomically: the file is rewritten to a
    temp file and renamed, so a reader or a crash never sees half a line."""
    path = Path(directory) / RESULTS_FILE
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + dumps_json(record, sort_keys=False) + "\n")  # NaN/inf as null: valid JSON


# ---------------------------------------------------------------------------- timeouts

#: ``timeout_s: auto`` (the default) for a cell of which no similar cell was measured yet: an
#: allowance for loading, data, evaluation, saving, the reload check, generation and merging,
#: plus one per optimizer step. Generous on purpose (a 7B cell on one GPU loads, evaluates,
#: reloads and merges in a few minutes and trains about a second a step): it only has to end a
#: cell that hangs, and it is there before anything was measured.
FIRST_CELL_FIXED_S = 1800
FIRST_CELL_STEP_S = 60
#: Once a similar cell finished (:func:`cell_budget`'s group: same model, dtype, device,
#: quantizer, merge or not, sequence length, validation size, generation length), the default
#: is this multiple of its measured time, rescaled to this cell's steps and tokens per step...
TIMEOUT_FACTOR = 4
#: ...and never less than this.
TIMEOUT_MIN_S = 60


def cell_budget(resolved: dict, merge: bool) -> dict:
    """What a cell is asked to do, from its resolved config: ``steps`` (optimizer steps: the
    trainer's ``max_steps``, else epochs × ``data.max_train_examples`` / examples per step, an
    upper bound; None when only the data can tell, and then the trainer's first logged step
    tells), ``tokens_per_step`` (batch × grad_accum × max_length), ``merge``, and ``group``: the
    cells whose measured times stand for this one's."""
    options = (resolved.get("trainer") or {}).get("options") or {}
    data = resolved.get("data") or {}
    model = resolved.get("model") or {}
    per_step = _positive_int(options.get("batch_size"), 4) * _positive_int(options.get("grad_accum"), 1)
    steps = options.get("max_steps")
    if not isinstance(steps, int) or steps <= 0:
        steps = None
        n, epochs = data.get("max_train_examples"), options.get("epochs", 1.0)
        if isinstance(n, int) and n > 0 and isinstance(epochs, (int, float)) and epochs > 0:
            steps = math.ceil(epochs * n / per_step)
    group = [
        model.get("name_or_path"),
        model.get("dtype"),
        model.get("device"),
        (resolved.get("quantizer") or {}).get("name"),
        merge,
        data.get("max_length"),
        data.get("max_val_examples"),
        data.get("packing"),
        resolved.get("evaluate"),
        (resolved.get("generate") or {}).get("max_new_tokens"),
    ]
    return {
        "steps": steps,
        "tokens_per_step": per_step * _positive_int(data.get("max_length"), 256),
        "merge": merge,
        "group": json.dumps(group, default=str),
    }


def _positive_int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


@dataclass
class CellTimeout:
    """The timeout one cell runs under. ``kind`` "matrix": ``fixed_s`` (the matrix's
    ``timeout_s``); "off": none; "default": ``fixed_s + steps × step_s``, at least
    TIMEOUT_MIN_S, with ``steps`` from the cell's config or, when it cannot tell, from the
    trainer's first logged step (until then the fixed part alone applies)."""

    kind: str
    fixed_s: float = 0.0
    step_s: float = 0.0
    steps: int | None = None
    #: Where the numbers come from, in words (recorded as ``timeout_basis``).
    basis: str = ""

    def seconds(self) -> int | float | None:
        """The limit now, in seconds; None for no limit."""
        if self.kind == "off":
            return None
        if self.kind == "matrix":
            return self.fixed_s
        return max(TIMEOUT_MIN_S, math.ceil(self.fixed_s + (self.steps or 0) * self.step_s))

    def on_event(self, event: dict) -> None:
        """A step event of the cell: learn its number of steps if the config could not tell."""
        if self.kind == "default" and self.steps is None and event.get("kind") == "step":
            with contextlib.suppress(TypeError, ValueError):
                self.steps = max(1, int(event["max_steps"]))

    def describe(self) -> str:
        """``1980 s (default: …)``, ``none (…)``: as the plan and the records show it."""
        limit = self.seconds()
        if limit is None:
            return f"none ({self.basis})"
        pending = " until training reports its steps" if self.kind == "default" and self.steps is None else ""
        return f"{limit:g} s{pending} ({self.basis})"


class Timeouts:
    """Each cell's timeout (``timeout_s`` in the matrix: a number, "auto" or 0/null), and, for
    "auto", what finished cells measured: per group of similar cells (:func:`cell_budget`), the
    longest time outside training (``wall_seconds - train_seconds``: start, load, data,
    evaluation, save, reload, generation, merge) and the longest training time per token of a
    step. Records already in ``results.jsonl`` (of cells whose config is unchanged) count too."""

    def __init__(self, setting: float | str | None, cells: list[Cell] = (), records: list[dict] = ()):
        self.setting = setting
        self.groups: dict[str, dict] = {}
        by_id = {c.id: c for c in cells}
        for record in records:
            cell = by_id.get(record.get("cell"))
            if cell is not None and record.get("fingerprint") == cell.fingerprint:
                self.learn(cell, record)

    def learn(self, cell: Cell, record: dict) -> None:
        """Take the times of a finished cell (ok records only)."""
        metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
        wall, train_s, steps = record.get("wall_seconds"), metrics.get("train_seconds"), metrics.get("train_steps")
        if record.get("status") != "ok" or not cell.budget:
            return
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in (wall, train_s, steps)):
            return
        g = self.groups.setdefault(cell.budget["group"], {"fixed_s": 0.0, "token_s": 0.0, "cells": []})
        g["fixed_s"] = max(g["fixed_s"], wall - train_s)
        g["token_s"] = max(g["token_s"], train_s / (steps * cell.budget["tokens_per_step"]))
        g["cells"].append(cell.id)

    def for_cell(self, cell: Cell) -> CellTimeout:
        """The timeout ``cell`` gets if it starts now."""
        if self.setting is None:
            return CellTimeout("off", basis="timeout_s is off in the matrix")
        if self.setting != "auto":
            return CellTimeout("matrix", fixed_s=self.setting, basis="timeout_s in the matrix")
        budget = cell.budget or {"steps": None, "tokens_per_step": 0, "group": ""}
        steps = budget["steps"]
        n = f"{steps} steps" if steps is not None else "its steps"
        g = self.groups.get(budget["group"])
        if g is None:
            return CellTimeout(
                "default",
                FIRST_CELL_FIXED_S,
                FIRST_CELL_STEP_S,
                steps,
                f"default: {FIRST_CELL_FIXED_S} s + {n} × {FIRST_CELL_STEP_S} s, no similar cell measured yet",
            )
        step_s = TIMEOUT_FACTOR * g["token_s"] * budget["tokens_per_step"]
        measured = g["cells"][0] + (f" and {len(g['cells']) - 1} more" if len(g["cells"]) > 1 else "")
        return CellTimeout(
            "default",
            TIMEOUT_FACTOR * g["fixed_s"],
            step_s,
            steps,
            f"default: {TIMEOUT_FACTOR} × ({g['fixed_s']:.1f} s + {n} × {step_s / TIMEOUT_FACTOR:.3g} s) as measured on {measured}",
        )


# ---------------------------------------------------------------------------- running


def output_directory(matrix: Matrix, out_dir: str | Path | None = None) -> Path:
    """Where results go: ``--out``, else the matrix's ``output_dir``, else ``runs/bench/<name>``."""
    return Path(out_dir or matrix.config.output_dir or f"runs/bench/{matrix.config.name}")


def plan(cells: list[Cell], latest: dict[str, dict], rerun: set[str], retry_failed: bool) -> list[tuple[Cell, str]]:
    """(cell, action) with action "run", "done" (a matching finished record exists) or
    "unsupported"."""
    actions = []
    for cell in cells:
        prev = latest.get(cell.id)
        if cell.status == "unsupported":
            action = "unsupported"
        elif cell.id in rerun:
            action = "run"
        elif (
            prev
            and prev.get("fingerprint") == cell.fingerprint
            and (prev.get("status") == "ok" or (prev.get("status") == "failed" and not retry_failed))
        ):
            action = "done"
        else:
            action = "run"
        actions.append((cell, action))
    return actions


def run_matrix(
    matrix_path: str | Path,
    *,
    out_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    only: list[str] | tuple[str, ...] = (),
    rerun: list[str] | tuple[str, ...] = (),
    retry_failed: bool = False,
    dry_run: bool = False,
    stop_after_s: float | None = None,
    on_event: Event = _no_event,
    command: str = "",
    registry=None,
    python: str = sys.executable,
    gpus: list[str] | tuple[str, ...] = (),
    isolation: str | None = None,
) -> dict:
    """Expand the matrix, record unsupported cells, run the others (one process each, or one
    worker process for all: ``isolation``, default the matrix's); return counts and the results
    folder. ``overrides`` (``--set``) apply to every cell after the matrix's own ``set``;
    ``only`` selects cells, ``rerun`` runs finished cells again, ``retry_failed`` runs failed
    ones again; ``stop_after_s`` starts no cell after that long.
    ``gpus``: run cells side by side, one per listed GPU (its ``CUDA_VISIBLE_DEVICES``), each GPU
    taking the next cell when its cell ends; records are appended one at a time as cells end."""
    from .registry import load_registry

    # Ask NVML, not the CUDA runtime, whether a GPU exists: this process then holds no CUDA
    # context (and no accelerator memory) while its cells run.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    matrix = load_matrix(matrix_path, overrides)
    if isolation is not None:
        if isolation not in ("process", "worker"):
            raise ConfigError("--isolation", f"{isolation!r}; valid: process, worker")
        matrix.config.isolation = isolation
    registry = registry or load_registry()
    directory = output_directory(matrix, out_dir)
    cells = expand(matrix, registry, directory)
    selected = select(cells, only, "--only")
    forced = {c.id for c in select(cells, rerun, "--rerun")} if rerun else set()
    counts = {"cells": len(cells), "selected": len(selected), "ok": 0, "failed": 0, "unsupported": 0, "done": 0, "not_started": 0}

    def announce(actions, timeouts: Timeouts):
        on_event(
            {
                "type": "plan",
                "directory": str(directory),
                "matrix": matrix.config.name,
                "timeout_s": matrix.config.timeout_s,
                "cells": [
                    {
                        "cell": c.id,
                        "labels": c.labels,
                        "action": a,
                        "reason": c.reason,
                        **({"timeout": timeouts.for_cell(c).describe()} if a == "run" else {}),
                    }
                    for c, a in actions
                ],
            }
        )

    if dry_run:
        records = read_records(directory)
        actions = plan(selected, latest_records(records), forced, retry_failed)
        timeouts = Timeouts(matrix.config.timeout_s, cells, records)
        announce(actions, timeouts)
        return {
            "directory": str(directory),
            "actions": [(c.id, a, c.reason) for c, a in actions],
            "timeouts": {c.id: timeouts.for_cell(c).describe() for c, a in actions if a == "run"},
            **counts,
        }

    started = time.monotonic()
    with folder_lock(directory, "qpeft bench"):  # one qpeft bench (or run) per results folder
        records = read_records(directory)
        latest = latest_records(records)
        actions = plan(selected, latest, forced, retry_failed)
        timeouts = Timeouts(matrix.config.timeout_s, cells, records)
        announce(actions, timeouts)
        to_run, index = sum(1 for _, a in actions if a == "run"), 0
        atomic_write_json(
            directory / MATRIX_FILE,
            {
                "name": matrix.config.name,
                "description": matrix.config.description,
                "matrix_file": str(matrix.path),
                "axes": {k: [label for label, _ in pairs] for k, pairs in matrix.axes.items()},
                "cells": [c.id for c in cells],
                "base": matrix.base,
            },
        )
        commit = qpeft_commit()

        def finish(cell: Cell, outcome: dict) -> None:
            record = {**_base_record(cell, matrix, command, commit), **outcome}
            append_record(directory, record)
            counts[record["status"]] += 1
            timeouts.learn(cell, record)  # a finished cell's times set the default timeout of similar cells
            on_event({"type": "end", "cell": cell.id, "labels": cell.labels, "record": record})

        def too_late() -> bool:
            return stop_after_s is not None and time.monotonic() - started > stop_after_s

        side_by_side: list[Cell] = []  # with gpus: run after the loop, several at once
        worker = Worker(python, matrix_environment(matrix)) if matrix.config.isolation == "worker" and not gpus else None
        try:
            for cell, action in actions:
                prev = latest.get(cell.id)
                if action == "unsupported":
                    counts["unsupported"] += 1
                    if not (prev and prev.get("status") == "unsupported" and prev.get("reason") == cell.reason):
                        record = _base_record(cell, matrix, command, commit)
                        record.update(status="unsupported", reason=cell.reason)
                        append_record(directory, record)
                    on_event({"type": "unsupported", "cell": cell.id, "labels": cell.labels, "reason": cell.reason})
                    continue
                if action == "done":
                    counts["done"] += 1
                    on_event({"type": "done", "cell": cell.id, "labels": cell.labels, "record": prev})
                    continue
                if gpus:
                    side_by_side.append(cell)
                    continue
                if too_late():
                    counts["not_started"] += 1
                    continue
                index += 1
                timeout = timeouts.for_cell(cell)
                on_event(
                    {
                        "type": "start",
                        "cell": cell.id,
                        "labels": cell.labels,
                        "index": index,
                        "total": to_run,
                        "timeout": timeout.describe(),
                    }
                )
                finish(cell, run_cell(cell, matrix, directory, on_event=on_event, python=python, worker=worker, timeout=timeout))
        finally:
            if worker is not None:
                worker.close()
        if side_by_side:
            _run_side_by_side(side_by_side, list(gpus), matrix, directory, on_event, python, finish, too_late, counts, to_run, timeouts)
    return {"directory": str(directory), **counts}


def _run_side_by_side(pending, gpus, matrix, directory, on_event, python, finish, too_late, counts, total, timeouts) -> None:
    """Run ``pending`` cells on several GPUs at once: one worker thread per GPU takes the next cell
    and runs it in its own process with that GPU visible (``isolation: worker``: in that GPU's
    worker process). Events and records go through one lock, so the display and ``results.jsonl``
    see one cell at a time. An interrupt stops every running cell (recording nothing for them, as
    in a sequential run) and re-raises."""
    lock = threading.Lock()
    stop = threading.Event()
    running: dict[str, subprocess.Popen] = {}  # GPU -> its cell's process
    queue_ = list(pending)
    started = [0]
    errors: list[BaseException] = []

    def locked_event(event: dict) -> None:
        with lock:
            on_event(event)

    def worker(gpu: str) -> None:
        def track(proc: subprocess.Popen | None) -> None:
            if proc is None:
                running.pop(gpu, None)
            else:
                running[gpu] = proc

        cell_env = {**matrix_environment(matrix), "CUDA_VISIBLE_DEVICES": gpu}
        cell_worker = Worker(python, cell_env) if matrix.config.isolation == "worker" else None
        try:
            while not stop.is_set():
                with lock:
                    if not queue_:
                        return
                    if too_late():
                        counts["not_started"] += len(queue_)
                        queue_.clear()
                        return
                    cell = queue_.pop(0)
                    started[0] += 1
                    timeout = timeouts.for_cell(cell)
                    on_event(
                        {
                            "type": "start",
                            "cell": cell.id,
                            "labels": cell.labels,
                            "index": started[0],
                            "total": total,
                            "gpu": gpu,
                            "timeout": timeout.describe(),
                        }
                    )
                outcome = run_cell(
                    cell,
                    matrix,
                    directory,
                    on_event=locked_event,
                    python=python,
                    extra_env={"CUDA_VISIBLE_DEVICES": gpu},
                    stop=stop,
                    on_process=track,
                    worker=cell_worker,
                    timeout=timeout,
                )
                if outcome is None or stop.is_set():  # stopped by an interrupt: no record, the cell runs next time
                    return
                with lock:
                    finish(cell, outcome)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            stop.set()
        finally:
            if cell_worker is not None:
                cell_worker.close()

    threads = [threading.Thread(target=worker, args=(gpu,), name=f"qpeft-bench-gpu{gpu}") for gpu in gpus]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except BaseException:
        stop.set()
        for proc in list(running.values()):  # stop them from here too, whatever the workers are doing
            _kill(proc)
        for t in threads:
            t.join(timeout=30)
        raise
    if errors:
        raise errors[0]


def _base_record(cell: Cell, matrix: Matrix, command: str, commit: str | None) -> dict:
    return {
        "cell": cell.id,
        "labels": cell.labels,
        "matrix": matrix.config.name,
        "fingerprint": cell.fingerprint,
        "overrides": cell.overrides,
        "command": command,
        "qpeft_version": __version__,
        "qpeft_commit": commit,
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def qpeft_commit() -> str | None:
    """The commit of the qpeft that runs (not of the matrix file's repository): ``QPEFT_COMMIT``
    when set (a copy whose ``.git`` lags its files, such as a GPU machine's), else the HEAD of the
    git checkout holding qpeft's own package files (an editable install), marked ``+dirty`` when
    tracked files differ from it; None for an installed release (``qpeft_version`` names it)."""
    if os.environ.get("QPEFT_COMMIT"):
        return os.environ["QPEFT_COMMIT"]
    cwd = Path(__file__).resolve().parent

    def git(*args, **kw):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False, **kw)

    try:
        if git("ls-files", "--error-unmatch", Path(__file__).name, timeout=10).returncode != 0:
            return None  # not a checkout of qpeft (e.g. site-packages inside some other repository)
        out = git("rev-parse", "--short", "HEAD", timeout=10)
        dirty = git("diff", "--quiet", "HEAD", timeout=30).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) or None


def plugin_packages() -> str | None:
    """The installed packages that provide qpeft plugins (the distributions of the ``qpeft``
    entry points, qpeft's own built-ins aside) with their versions and those of the libraries
    they require, e.g. ``qpeft-torchao 0.1.0 (torchao 0.18.0)``; None when there are none."""
    found = {}
    for ep in importlib.metadata.entry_points(group="qpeft"):
        dist = getattr(ep, "dist", None)
        if dist is None or dist.metadata["Name"].lower() == "qpeft":
            continue
        libs = []
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]
            if name.lower() == "qpeft":
                continue
            try:
                libs.append(f"{name} {importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                libs.append(f"{name} (not installed)")
        found[dist.metadata["Name"]] = f"{dist.metadata['Name']} {dist.version}" + (f" ({', '.join(libs)})" if libs else "")
    return "; ".join(found[k] for k in sorted(found)) or None


def matrix_environment(matrix: Matrix) -> dict[str, str]:
    """The matrix's ``env`` variables that the environment of ``qpeft bench`` does not set itself."""
    return {k: str(v) for k, v in matrix.config.env.items() if k not in os.environ}


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a cell process runs with: offline, quiet, unbuffered (as ``qpeft run``),
    plus ``extra`` (e.g. the GPU a side-by-side cell may see)."""
    env = {**os.environ, **(extra or {})}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if env.get("QPEFT_ALLOW_HUB") != "1":
        env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cell(
    cell: Cell,
    matrix: Matrix,
    directory: Path,
    *,
    on_event: Event = _no_event,
    python: str = sys.executable,
    extra_env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
    on_process: Callable[[subprocess.Popen | None], None] | None = None,
    worker: Worker | None = None,
    timeout: CellTimeout | None = None,
) -> dict | None:
    """Run one cell in a fresh process, or in ``worker`` (``isolation: worker``); return its
    record (status "ok" or "failed").

    The process's stderr goes to ``cells/<slug>/log.txt``; its stdout carries progress events
    (lines starting with ``@qpeft-bench``) that are passed to ``on_event``. An interrupt of this
    process stops the cell and records nothing, so the next run starts it again; so does
    ``stop`` being set (then the return value is None). ``on_process`` is told the cell's process
    when it starts and None when it has ended (so that another thread can stop it). A timeout
    (``timeout``; default: the matrix's ``timeout_s`` as :class:`Timeouts` gives it with nothing
    measured) kills the cell's process, the worker included; the record says which applied
    (``timeout_s``, ``timeout_basis``)."""
    cell_dir = directory / "cells" / cell.slug
    if cell_dir.exists():
        shutil.rmtree(cell_dir)  # leftovers of an earlier attempt
    cell_dir.mkdir(parents=True)
    result_path = cell_dir / "result.json"
    spec = {
        "cell": cell.id,
        "config": cell.config,
        "merge": bool(matrix.config.merge and cell.mergeable),
        "merge_dtype": matrix.config.merge_dtype,
        "result": str(result_path),
    }
    atomic_write_json(cell_dir / "cell.json", spec)
    log_path = cell_dir / "log.txt"
    if timeout is None:
        timeout = Timeouts(matrix.config.timeout_s).for_cell(cell)
    matrix_env = matrix_environment(matrix)
    extra_env = {**matrix_env, **(extra_env or {})}
    t0 = time.monotonic()
    if worker is None:
        outcome = _run_in_process(cell, cell_dir, log_path, python, extra_env, timeout, stop, on_event, on_process)
    else:
        outcome = _run_in_worker(worker, cell, cell_dir, log_path, timeout, stop, on_event, on_process)
    if outcome is None:
        return None
    returncode, timed_out = outcome
    wall = time.monotonic() - t0
    remove_empty_checkpoints(cell.config.get("output_dir"))
    record: dict[str, Any] = {"wall_seconds": round(wall, 1), "returncode": returncode, "log": str(log_path.relative_to(directory))}
    record.update(timeout_s=timeout.seconds(), timeout_basis=timeout.basis)
    record["isolation"] = "process" if worker is None else "worker"
    if worker is not None:
        record["worker_cell"] = worker.cell_index  # 1: this cell paid for starting the worker
    if matrix_env:
        record["env"] = matrix_env
    if returncode == 0 and result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
        record.update(status="ok", metrics=result["metrics"], environment=result["environment"])
    else:
        error = _failure(returncode, log_path, timed_out, timeout.seconds())
        if timed_out and timeout.kind == "default":
            error += f" ({timeout.basis}; timeout_s in the matrix sets another)"
        record.update(status="failed", error=error, oom=_is_oom(error))
    return record


def remove_empty_checkpoints(output_dir: str | Path | None) -> bool:
    """Remove a run's ``checkpoints/`` folder if nothing was saved in it (the HF Trainer creates
    it as its output folder even when it saves no checkpoint); return whether it was removed.
    A folder with anything in it stays."""
    if not output_dir:
        return False
    path = Path(output_dir) / CHECKPOINTS
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        path.rmdir()  # fails, and keeps the folder, unless it is empty
    except OSError:
        return False
    return True


def _run_in_process(cell, cell_dir, log_path, python, extra_env, timeout, stop, on_event, on_process) -> tuple[int, bool] | None:
    """``python -m qpeft.bench CELL.json`` in a session of its own; (exit status, timed out), or
    None when ``stop`` ended it."""
    events: queue.Queue = queue.Queue()
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [python, "-m", "qpeft.bench", str(cell_dir / "cell.json")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=child_environment(extra_env),
            start_new_session=True,
        )
        if on_process is not None:
            on_process(proc)
        reader = threading.Thread(target=_read_events, args=(proc.stdout, log, events), daemon=True)
        reader.start()
        timed_out = False
        try:
            while True:
                if stop is not None and stop.is_set():  # checked first: a cell streaming events must still stop
                    _kill(proc)
                    reader.join(timeout=5)
                    return None
                limit = timeout.seconds()
                if limit is not None and time.monotonic() - t0 > limit and not timed_out:  # so is a timeout
                    timed_out = True
                    _kill(proc)
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    event = None
                if event is not None:
                    timeout.on_event(event)
                    on_event({"type": "progress", "cell": cell.id, **event})
                    continue
                if proc.poll() is not None and not reader.is_alive():
                    break
        except BaseException:
            _kill(proc)
            raise
        finally:
            if on_process is not None:
                on_process(None)
        reader.join(timeout=5)
    return proc.returncode, timed_out


class Worker:
    """A cell process that runs cells one after another (``isolation: worker``).

    ``python -m qpeft.bench --worker`` (:func:`worker_main`) reads one command line per cell on
    its stdin (the cell's ``cell.json`` and ``log.txt``), writes the cell's output to that log,
    sends its progress events on its stdout and ends each cell with an event carrying the cell's
    exit status (0, 1 or 2, as a cell process exits). The process is started for the first cell
    (in a session of its own, its environment as a cell process's) and kept for the next one
    while cells succeed; a failed cell's worker is stopped, and so is one that dies (killed,
    out of memory) or times out: the next cell then starts a fresh one."""

    def __init__(self, python: str = sys.executable, extra_env: dict[str, str] | None = None):
        self.python, self.extra_env = python, extra_env
        self.proc: subprocess.Popen | None = None
        self.output: queue.Queue = queue.Queue()
        #: Cells given to the current process so far (1 while its first cell runs).
        self.cell_index = 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, stderr) -> None:
        """Start a fresh worker process; its output until the first cell goes to ``stderr``."""
        self.stop()
        self.proc = subprocess.Popen(
            [self.python, "-m", "qpeft.bench", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=child_environment(self.extra_env),
            start_new_session=True,
        )
        self.output = queue.Queue()
        self.cell_index = 0
        threading.Thread(target=_read_lines, args=(self.proc.stdout, self.output), daemon=True, name="qpeft-bench-worker-output").start()

    def send(self, command: dict) -> bool:
        """Give the worker its next cell; False when it is no longer there to take it."""
        if not self.alive():
            return False
        try:
            self.proc.stdin.write((json.dumps(command) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: it ended since
            return False
        self.cell_index += 1
        return True

    def stop(self) -> None:
        """Stop the worker process and everything it started."""
        if self.proc is not None:
            _kill(self.proc)
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            self.proc = None

    def close(self) -> None:
        """Let an idle worker end (end of its input), stopping it if it has not within 10 s."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.stop()


def _run_in_worker(worker: Worker, cell, cell_dir, log_path, timeout, stop, on_event, on_process) -> tuple[int, bool] | None:
    """Run a cell in ``worker`` (started here if it is not running); (exit status, timed out),
    or None when ``stop`` ended it. The exit status is the cell's (0, 1, 2) while the worker
    lives, the worker's own (e.g. -9) when it died during the cell."""
    command = {"cell": str(cell_dir / "cell.json"), "log": str(log_path)}
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        if not worker.send(command):  # none yet, or the last one ended while idle
            worker.start(log)
            worker.send(command)  # should it have ended already, its output has ended: handled below
        proc = worker.proc
        if on_process is not None:
            on_process(proc)
        timed_out, returncode = False, None
        try:
            while True:
                if stop is not None and stop.is_set():
                    worker.stop()
                    return None
                limit = timeout.seconds()
                if limit is not None and time.monotonic() - t0 > limit and not timed_out:
                    timed_out = True
                    _kill(proc)  # its output then ends: handled below
                try:
                    line = worker.output.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:  # the worker ended during the cell: killed, or out of memory
                    returncode = proc.wait()
                    break
                event = _parse_event(line)
                if event is not None and event.get("kind") == "cell-end":
                    returncode = int(event["rc"])
                    break
                if event is not None:
                    timeout.on_event(event)
                    on_event({"type": "progress", "cell": cell.id, **event})
                else:
                    log.write(line)
                    log.flush()
        except BaseException:
            worker.stop()
            raise
        finally:
            if on_process is not None:
                on_process(None)
    if returncode != 0 or not worker.alive():
        worker.stop()  # a failed cell's worker is not reused: the next cell starts afresh
    return returncode, timed_out


def _read_lines(stream, lines: queue.Queue) -> None:
    """Every line of a worker's output, then None when it ends."""
    for raw in iter(stream.readline, b""):
        lines.put(raw)
    stream.close()
    lines.put(None)


def _parse_event(raw: bytes) -> dict | None:
    line = raw.decode("utf-8", errors="replace")
    if line.startswith(EVENT_PREFIX):
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line[len(EVENT_PREFIX) :])
            if isinstance(event, dict):
                return event
    return None


def _read_events(stream, log, events: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(EVENT_PREFIX):
            try:
                events.put(json.loads(line[len(EVENT_PREFIX) :]))
                continue
            except json.JSONDecodeError:
                pass
        log.write(raw)
        log.flush()
    stream.close()


def _kill(proc: subprocess.Popen) -> None:
    """Stop a cell process and everything it started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*|error: .+)$")


def _failure(rc: int | None, log_path: Path, timed_out: bool, timeout: float | None) -> str:
    """One line saying why a cell failed: timeout, signal, or the exception that ended it."""
    if timed_out:
        return f"timed out after {timeout:g} s"
    lines = [l.strip() for l in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = " (the system's out-of-memory killer?)" if -rc == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    found = next((l for l in reversed(lines) if _EXCEPTION_LINE.match(l)), None)
    message = found or (lines[-1] if lines else f"exit status {rc}, no output")
    return message.removeprefix("error: ")[:500]


def _is_oom(error: str) -> bool:
    """Whether a cell's error is running out of memory: CUDA's OutOfMemoryError, or on a CPU an
    allocation the operating system refused (torch's "Cannot allocate memory", MemoryError)."""
    e = error.lower()
    return any(
        k in e for k in ("out of memory", "outofmemory", "out-of-memory", "cannot allocate memory", "can't allocate memory", "memoryerror")
    )


# ---------------------------------------------------------------------------- the cell process


SUMMARY_METRICS = (
    "device",
    "device_name",
    "dtype",
    "gradient_checkpointing",
    "load_seconds",
    "weight_memory_gib",
    "bits",
    "peak_allocated_gib",
    "peak_reserved_gib",
    "peak_rss_gib",
    "trainable_params",
    "total_params",
    "trainable_percent",
    "train_steps",
    "train_tokens",
    "train_seconds",
    "tokens_per_s",
    "warmup_steps",
    "tokens_per_s_after_warmup",
    "step_seconds_after_warmup",
    "cpu_seconds_per_step_after_warmup",
    "train_loss",
    "val_tokens",
    "val_loss_before",
    "val_loss_after",
    "val_perplexity_before",
    "val_perplexity_after",
    "reload_max_abs_logit_diff",
    "adapter_bytes",
)


def cell_metrics(summary: dict, merge: dict | None) -> dict:
    """The flat metrics of one cell from the run summary and the merge result."""
    metrics = {k: summary[k] for k in SUMMARY_METRICS if k in summary}
    if summary.get("objective", "lm") != "lm":  # a trainer of another objective: its own held-out metrics
        objective = summary.get("objective_metrics") or {}
        metrics["objective"] = summary["objective"]
        metrics["objective_eval_before"] = objective.get("eval_before")
        metrics["objective_eval_after"] = objective.get("eval_after")
    gen = summary.get("generation") or {}
    metrics["generation_tokens_per_s"] = round(gen["tokens_per_s"], 2) if "tokens_per_s" in gen else None
    metrics["generation_new_tokens"] = gen.get("new_tokens")
    if merge:
        metrics["merge_max_abs_logit_diff"] = merge["max_abs_logit_diff"]
        metrics["merge_base_path_diff"] = merge.get("base_path_diff")
        metrics["merge_seconds"] = merge.get("seconds")
        metrics["merge_dtype"] = merge.get("dtype")
    return metrics


def environment() -> dict:
    """Device, driver and library versions of this process's machine."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for dist in ("qpeft", "transformers", "peft", "accelerate", "bitsandbytes", "gptqmodel", "optimum", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[dist] = importlib.metadata.version(dist)
    if plugins := plugin_packages():
        env["plugins"] = plugins
    threading_env = {
        k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ
    }
    if threading_env:
        env["env"] = threading_env
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            driver=_nvidia_driver(),
        )
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


class _StepEvents:
    """Lifecycle plugin of the cell process: each logged step as a progress event."""

    def __init__(self, emit: Callable[[dict], None]):
        self.emit = emit

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        """Send the step, the planned number of steps, the loss and the tokens seen."""
        self.emit(
            {
                "kind": "step",
                "step": int(step),
                "max_steps": int(max_steps),
                "loss": float(logs.get("loss", float("nan"))),
                "tokens": int(logs.get("tokens", 0)),
            }
        )


def cell_main(argv: list[str] | None = None) -> int:
    """Entry of a cell process (``python -m qpeft.bench CELL.json``): run, merge where asked,
    write the metrics to the spec's ``result`` path. Exit 0 on success, 2 on a qpeft error
    (one line), 1 on a crash (traceback in the log)."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    _cell_process_setup()

    def emit(event: dict) -> None:
        sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
        sys.stdout.flush()

    return _run_spec(spec, emit)


def worker_main() -> int:
    """Entry of a worker process (``python -m qpeft.bench --worker``, ``isolation: worker``):
    one command per line on stdin, ``{"cell": CELL.json, "log": LOG}``, each run as a cell
    process would run it, its output appended to LOG, its progress events on stdout, then a
    ``cell-end`` event with the exit status a cell process would have had. Ends at the end of
    its input. Loads of a base on the CPU come from the worker's :class:`BaseModelCache` after
    the first; each cell records how many of its loads did (``base_loads_from_cache``), where the
    training load came from (``load_from_cache``, ``load_uncached_seconds``), and its peak RSS
    since the cell started (``peak_rss_gib``) with what the worker held then
    (``rss_at_cell_start_gib``, of it ``base_cache_gib`` in cached bases)."""
    import gc

    from .modeling import BaseModelCache, base_model_cache, current_rss_gib, reset_process_peak_rss

    _cell_process_setup()
    events = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the event channel to qpeft bench
    os.dup2(2, 1)  # anything else printed goes to the cell's log

    def emit(event: dict) -> None:
        events.write(EVENT_PREFIX + json.dumps(event) + "\n")
        events.flush()

    _preload_libraries()
    cache = BaseModelCache(max_entries=1)
    with base_model_cache(cache):
        for line in iter(sys.stdin.readline, ""):
            if not line.strip():
                continue
            command = json.loads(line)
            _redirect_output(command["log"])
            gc.collect()
            _trim_heap()
            _empty_cuda_cache()
            cache.clear_loads()
            rss_start = current_rss_gib()
            reset_process_peak_rss()

            def worker_metrics(rss_start=rss_start) -> dict:
                loads = cache.loads
                metrics: dict[str, Any] = {
                    "base_loads": len(loads),
                    "base_loads_from_cache": sum(1 for load in loads if load["cached"]),
                }
                if loads:
                    metrics["load_from_cache"] = loads[0]["cached"]
                    if loads[0]["cached"]:
                        metrics["load_uncached_seconds"] = loads[0]["uncached_seconds"]
                metrics["base_cache_gib"] = round(cache.held_gib(), 4)
                if rss_start is not None:
                    metrics["rss_at_cell_start_gib"] = round(rss_start, 3)
                return metrics

            try:
                spec = json.loads(Path(command["cell"]).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                print(f"error: cannot read {command['cell']}: {exc}", file=sys.stderr, flush=True)
                rc = 2
            else:
                rc = _run_spec(spec, emit, extra_metrics=worker_metrics)
            sys.stdout.flush()
            sys.stderr.flush()
            emit({"kind": "cell-end", "rc": rc})
    return 0


def _preload_libraries() -> None:
    """Import, before any cell, the libraries cells import. Besides moving their import time to
    the worker's start, this keeps import-time state free of cells' objects: gptqmodel (imported
    by peft while it loads a LoRA adapter) keeps the ImportError of its optional llama-cpp
    backend, whose traceback holds every frame that was running the import, with the models in
    their locals, for as long as the process lives."""
    import importlib
    import importlib.util

    from . import orchestrator  # noqa: F401  (torch, transformers)
    from .registry import load_registry

    load_registry()  # qpeft's plugins and any installed ones
    for name in ("peft", "bitsandbytes", "gptqmodel"):
        if importlib.util.find_spec(name) is not None:
            with contextlib.suppress(Exception):  # a cell that needs it reports the error itself
                importlib.import_module(name)


def _trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``), so that a
    worker's next cell does not start with the last one's freed memory still resident."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _cell_process_setup() -> None:
    import logging
    import warnings

    _exit_with_parent()
    os.environ.update({k: v for k, v in child_environment().items() if k not in os.environ})
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    logging.getLogger("torchao").setLevel(logging.ERROR)


def _redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to the end of ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _run_spec(spec: dict, emit: Callable[[dict], None], extra_metrics: Callable[[], dict] | None = None) -> int:
    """Run one cell in this process: run, merge where asked, write the metrics (plus
    ``extra_metrics()``) to the spec's ``result`` path. 0 on success, 2 on a qpeft error (one
    line), 1 on a crash (traceback on stderr)."""
    import gc
    import traceback

    start = time.perf_counter()

    def say(msg: str) -> None:
        text = re.sub(r"\[/?[a-z ]*\]", "", msg)  # rich markup the orchestrator uses
        print(f"{time.perf_counter() - start:7.1f}s {text}", file=sys.stderr, flush=True)
        emit({"kind": "message", "text": text})

    try:
        from . import orchestrator
        from .registry import load_registry

        resolved, registry = orchestrator.prepare(spec["config"], registry=load_registry([_StepEvents(emit)]))
        summary = orchestrator.run(resolved, registry, say=say)
        merge = None
        if spec.get("merge"):
            gc.collect()
            _empty_cuda_cache()
            say("merging the adapter to measure the merge's max |Δlogit|")
            merged_dir = Path(resolved.config.output_dir) / "merged"
            t0 = time.perf_counter()
            merge = orchestrator.merge(
                str(Path(resolved.config.output_dir) / "adapter"),
                str(merged_dir),
                registry,
                force=True,
                dtype=spec.get("merge_dtype", "float32"),
                say=say,
            )
            merge["seconds"] = round(time.perf_counter() - t0, 2)
            shutil.rmtree(merged_dir, ignore_errors=True)  # the Δ is the measurement; the weights are not kept
        metrics = cell_metrics(summary, merge)
        if extra_metrics is not None:
            metrics.update(extra_metrics())
        atomic_write_json(spec["result"], {"cell": spec["cell"], "metrics": metrics, "environment": environment()})
        return 0
    except QpeftError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException:  # noqa: BLE001 - recorded by the parent from this traceback
        traceback.print_exc()
        sys.stderr.flush()
        return 1


def _exit_with_parent() -> None:
    """A cell runs in its own session (so a timeout kills all it started); should ``qpeft bench``
    itself be killed, the cell stops too instead of holding the accelerator for the next run."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="qpeft-bench-parent-watch").start()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(worker_main() if sys.argv[1:] == ["--worker"] else cell_main())

"""The matrix file of ``qpeft bench``: its schema, the expansion of its axes into cells (each
resolved by the run config's own machinery) and ``--only`` / ``--skip`` selection."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import (
    apply_overrides,
    load_config,
    read_yaml,
    resolve,
    validate_options,
    validation_error,
)
from ..errors import ConfigError, QpeftError
from .timeouts import cell_budget

_BACKEND_KINDS = ("quantizer", "peft", "trainer")


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
    from .. import capability_table

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

"""Per-cell timeouts of ``qpeft bench``: a default from the cell's steps and the times measured
on similar cells, or the matrix's ``timeout_s``."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .matrix import Cell


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
        json.dumps(resolved.get("eval"), sort_keys=True, default=str),
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

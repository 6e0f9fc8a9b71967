"""The results file of ``qpeft bench``: one JSON record per cell run, appended atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import QpeftError
from ..io import atomic_write_text, dumps_json

RESULTS_FILE = "results.jsonl"
MATRIX_FILE = "matrix.json"


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

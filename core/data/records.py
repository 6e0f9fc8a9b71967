"""Reading training data: records from files, one at a time, validated row by row.

Formats (``data.format``, detected from the first record's columns when "auto"):

* ``text``: ``{"text": ...}`` or paragraphs of a .txt file; loss on every token, EOS appended.
* ``prompt_response``: ``{"prompt": ..., "response": ...}``; rendered with the chat template
  when the tokenizer has one; loss only on the response (and its closing EOS).
* ``chat``: ``{"messages": [{"role", "content"}, ...]}``; loss only on assistant turns.

JSONL, CSV, text and parquet files and ``datasets`` folders are streamed: a file of any size
is read one record (or one parquet batch) at a time. A ``.json`` file is one JSON document
and is read whole.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

EMBEDDED_DATA = Path(__file__).parent / "embedded"
EMBEDDED_SETS = ("instruct", "text", "preference", "feedback", "prompts")
SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet")


class Row(dict):
    """A record that remembers where it came from: ``number`` is its row in the file, counted
    from 1 (in a JSONL file: its line, blank lines included, as an editor shows it)."""

    number: int = 0


def _row(value, number: int):
    if isinstance(value, dict):
        value = Row(value)
        value.number = number
    return value


def data_sources(cfg) -> tuple[Path, Path | None, str]:
    """(training file, validation file or None, the key naming the validation file in errors)
    for a :class:`qpeft.config.DataConfig`; embedded sets resolve to their shipped files."""
    if cfg.path.startswith("embedded:"):
        name = cfg.path.split(":", 1)[1]
        if name not in EMBEDDED_SETS:
            raise ConfigError("data.path", f"unknown embedded set {name!r}; valid: " + ", ".join(f"embedded:{s}" for s in EMBEDDED_SETS))
        train = EMBEDDED_DATA / f"{name}_train.jsonl"
        if cfg.val_path:  # was once ignored: the embedded set's own val split was used instead
            return train, Path(cfg.val_path).expanduser(), "data.val_path"
        return train, EMBEDDED_DATA / f"{name}_val.jsonl", "data.path"
    train = Path(cfg.path).expanduser()
    if cfg.val_path:
        return train, Path(cfg.val_path).expanduser(), "data.val_path"
    return train, None, "data.path"


def check_source(path: Path, key: str) -> None:
    """Refuse what cannot be read as data before reading it: a missing file, an unsupported
    type, a folder that ``datasets`` did not write."""
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise ConfigError(key, f"{path} is a folder but not one written by datasets' save_to_disk (no dataset_info.json)")
        return
    if path.exists() and not path.is_file():  # stat only: opening a FIFO would block
        raise ConfigError(key, f"{path} is not a regular file (a pipe, device or socket cannot be training data)")
    if not path.is_file():
        raise ConfigError(key, f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(key, f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .parquet or .txt")


def iter_records(path: Path, key: str) -> Iterator[Row]:
    """The records of a local data file or saved dataset folder, in order, each a :class:`Row`
    (anything else is refused naming its row). Raises :class:`ConfigError` naming ``key``, the
    file and the row for what cannot be read, and for a source with no records."""
    check_source(path, key)
    if path.is_dir():
        rows = _saved_dataset_rows(path, key)
    else:
        rows = _file_rows(path, path.suffix.lower(), key)
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise ConfigError(key, f"{path}: no records")


def _file_rows(path: Path, suffix: str, key: str) -> Iterator:
    try:
        if suffix == ".jsonl":
            yield from _jsonl_rows(path, key)
        elif suffix == ".json":
            yield from _json_rows(path, key)
        elif suffix == ".txt":
            yield from _text_rows(path)
        elif suffix == ".csv":
            yield from _csv_rows(path, key)
        else:
            yield from _parquet_rows(path, key)
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path}: not UTF-8 text") from None


def _numbered_or_refused(value, number: int, path: Path, key: str):
    if not isinstance(value, dict):
        raise ConfigError(key, f"{path}: row {number} is {type(value).__name__}, expected an object")
    return _row(value, number)


def _jsonl_rows(path: Path, key: str) -> Iterator[Row]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(key, f"{path}: row {n} is not valid UTF-8 (byte {exc.start + 1} of the line)") from None
            if n == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(key, f"{path}: row {n} is not valid JSON: {exc.msg}") from None
            except RecursionError:
                raise ConfigError(key, f"{path}: row {n} is nested too deeply to be a record") from None
            yield _numbered_or_refused(value, n, path, key)


def _json_rows(path: Path, key: str) -> Iterator[Row]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig") or "[]")
    except json.JSONDecodeError as exc:
        raise ConfigError(key, f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    except RecursionError:
        raise ConfigError(key, f"{path}: nested too deeply to be a list of records") from None
    if isinstance(rows, dict) and "data" in rows:
        rows = rows["data"]
    if not isinstance(rows, list):
        raise ConfigError(key, f"{path}: expected a JSON list of records")
    for n, value in enumerate(rows, 1):
        yield _numbered_or_refused(value, n, path, key)


def _text_rows(path: Path) -> Iterator[Row]:
    """Paragraphs (blocks separated by an empty line), stripped; blank ones skipped."""
    n = 0
    block: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line == "\n":
                text = "".join(block).strip()
                block = []
                if text:
                    n += 1
                    yield _row({"text": text}, n)
            else:
                block.append(line)
    text = "".join(block).strip()
    if text:
        yield _row({"text": text}, n + 1)


def _csv_rows(path: Path, key: str) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for n, row in enumerate(reader, 1):
            if None in row or None in row.values():
                fields = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
                raise ConfigError(
                    key, f"{path}: row {n} (line {reader.line_num}) has {fields} fields, the header has {len(reader.fieldnames)}"
                )
            yield _row(row, n)


def _parquet_rows(path: Path, key: str, batch_rows: int = 1024) -> Iterator[Row]:
    """Rows of a parquet file, one record batch at a time. Arrow gives every row every column
    (None where a row lacks it); qpeft's checks want a missing column to look missing."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(key, f"{path}: reading parquet needs pyarrow (`pip install 'qpeft[data]'`)") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        n = 0
        for batch in batches:
            for r in batch.to_pylist():
                n += 1
                yield _row({k: v for k, v in r.items() if v is not None}, n)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise ConfigError(
            key, f"{path}: not a readable parquet file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


def _saved_dataset_rows(path: Path, key: str, batch_rows: int = 1024) -> Iterator[Row]:
    """Rows of a ``save_to_disk`` folder: memory-mapped by ``datasets``, read a batch at a time."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(key, f"{path} is a saved dataset folder; reading it needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(key, f"{path}: dataset has splits {sorted(ds)}, none named 'train'")
        ds = ds["train"]
    n = 0
    for batch in ds.iter(batch_size=batch_rows):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            n += 1
            yield _row(dict(zip(columns, values)), n)


def detect_format(first: dict, source, key: str) -> str:
    """Pick text / prompt_response / chat from the first record's columns."""
    cols = set(first)
    if "messages" in cols:
        return "chat"
    if {"prompt", "response"} <= cols:
        return "prompt_response"
    if "text" in cols:
        return "text"
    raise ConfigError(
        key, f"{source}: row {getattr(first, 'number', 1)} has columns {sorted(cols)}; expected 'text', 'prompt'+'response' or 'messages'"
    )


REQUIRED = {"text": ("text",), "prompt_response": ("prompt", "response"), "chat": ("messages",)}
#: The roles a chat row may use (case-sensitive: chat templates compare them exactly, so an
#: "Assistant" turn would be rendered as some other speaker and never trained on).
CHAT_ROLES = ("system", "user", "assistant", "tool")


def row_problem(row: dict, fmt: str) -> str | None:
    """What makes ``row`` unusable as ``fmt`` data, or None."""
    for col in REQUIRED[fmt]:
        value = row.get(col)
        want = list if fmt == "chat" else str
        if value is not None and not isinstance(value, want):
            return f"has {col!r} as {type(value).__name__}, expected {'a list of messages' if want is list else 'a string'}"
        if not value:
            return f"has no usable {col!r} (format {fmt})"
    if fmt != "chat":
        return None
    for i, msg in enumerate(row["messages"], 1):
        if not isinstance(msg, dict):
            return f"has message {i} as {type(msg).__name__}, expected an object with 'role' and 'content'"
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str):
            return f"has message {i} with no 'role' string (keys: {sorted(msg)})"
        if role not in CHAT_ROLES:
            if role.strip().lower() in CHAT_ROLES:
                return f"has message {i} with role {role!r}; roles are lower-case: use {role.strip().lower()!r}"
            return f"has message {i} with unknown role {role!r}; valid: {', '.join(CHAT_ROLES)}"
        if not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
            return f"has message {i} with 'content' as {type(content).__name__}, expected a string"
    if not any(m["role"] == "assistant" for m in row["messages"]):
        return "has no assistant turn (loss is taken only on assistant turns; a chat row needs at least one)"
    return None


def check_rows(rows, fmt: str, source, key: str) -> Iterator[Row]:
    """``rows``, each checked by :func:`row_problem`; the first bad one is refused naming its row."""
    for n, row in enumerate(rows, 1):
        problem = row_problem(row, fmt)
        if problem:
            raise ConfigError(key, f"{source}: row {getattr(row, 'number', n)} {problem}")
        yield row


def load_records(cfg) -> tuple[list[dict], list[dict], str]:
    """(train rows, val rows, format) of a :class:`qpeft.config.DataConfig`, as lists in memory
    (for small data and tests; runs read through :mod:`qpeft.data.store` instead)."""
    train_path, val_path, val_key = data_sources(cfg)
    train = list(iter_records(train_path, "data.path"))
    if val_path is not None:
        val = list(iter_records(val_path, val_key))
    else:
        if len(train) < 2:
            raise ConfigError("data.path", f"{cfg.path}: needs at least 2 records to hold one out for validation")
        n_val = held_out_records(len(train), cfg.val_fraction)
        train, val = train[:-n_val], train[-n_val:]
    fmt = cfg.format if cfg.format != "auto" else detect_format(train[0], cfg.path, "data.format")
    train = list(check_rows(train, fmt, cfg.path, "data.path"))
    val = list(check_rows(val, fmt, cfg.val_path or cfg.path, val_key))
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_val_examples:
        val = val[: cfg.max_val_examples]
    return train, val, fmt


def held_out_records(n_records: int, val_fraction: float) -> int:
    """How many records at the end of a file without ``val_path`` are held out for validation."""
    return max(1, int(n_records * val_fraction))

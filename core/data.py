"""Training data: read records, render them, tokenize with loss masks, and batch.

Formats (``data.format``, detected from the columns when "auto"):

* ``text``: ``{"text": ...}`` or lines of a .txt file; loss on every token, EOS appended.
* ``prompt_response``: ``{"prompt": ..., "response": ...}``; rendered with the chat template
  when the tokenizer has one; loss only on the response (and its closing EOS).
* ``chat``: ``{"messages": [{"role", "content"}, ...]}``; loss only on assistant turns.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

EMBEDDED_DATA = Path(__file__).parent / "data"
EMBEDDED_SETS = ("instruct", "text")
IGNORE = -100


class Row(dict):
    """A record that remembers where it came from: ``number`` is its row in the file, counted
    from 1 (in a JSONL file: its line, blank lines included, as an editor shows it)."""

    number: int = 0


def _numbered(rows: list, numbers: list[int] | None = None) -> list:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            row = Row(row)
            row.number = numbers[i] if numbers else i + 1
        out.append(row)
    return out


def _records_from_file(path: Path, key: str) -> list[dict]:
    """Rows of a local data file or saved dataset folder. JSON, JSONL and CSV are read by the
    built-in reader, which keeps every value as written (Arrow would give every message every
    key of every other message, and pandas turns "1" into 1) and names the bad row; parquet is
    read through ``datasets`` when it is installed (the core works without it)."""
    if path.is_dir():
        return _numbered(_records_from_saved_dataset(path, key))
    if not path.is_file():
        raise ConfigError(key, f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".txt", ".csv", ".parquet"):
        raise ConfigError(key, f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .parquet or .txt")
    rows = None
    if suffix == ".parquet" and path.stat().st_size > 0:
        rows = _records_via_datasets(path, suffix)
        rows = None if rows is None else _numbered(rows)
    if rows is None:
        rows = _records_builtin(path, suffix, key)
    if not rows:
        raise ConfigError(key, f"{path}: no records")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ConfigError(key, f"{path}: row {n} is {type(row).__name__}, expected an object")
    return rows


def _records_via_datasets(path: Path, suffix: str) -> list[dict] | None:
    """Rows read by ``datasets.load_dataset``; None when it is not installed or fails."""
    try:
        import datasets
    except ImportError:
        return None
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
    try:
        datasets.disable_progress_bars()
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        rows = ds.to_list()  # decodes the strings: bad UTF-8 fails here
    except Exception:  # noqa: BLE001 - the built-in reader then reports the precise problem
        return None
    if suffix == ".json" and len(rows) == 1 and set(rows[0]) == {"data"} and isinstance(rows[0]["data"], list):
        rows = rows[0]["data"]
    # Arrow gives every row every column (None where a row lacks it); qpeft's checks want
    # a missing column to look missing.
    return [{k: v for k, v in r.items() if v is not None} if isinstance(r, dict) else r for r in rows]


def _records_from_saved_dataset(path: Path, key: str) -> list[dict]:
    if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise ConfigError(key, f"{path} is a folder but not one written by datasets' save_to_disk (no dataset_info.json)")
    try:
        import datasets
    except ImportError:
        raise ConfigError(key, f"{path} is a saved dataset folder; reading it needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(key, f"{path}: dataset has splits {sorted(ds)}, none named 'train'")
        ds = ds["train"]
    rows = ds.to_list()
    if not rows:
        raise ConfigError(key, f"{path}: no records")
    return rows


def _records_builtin(path: Path, suffix: str, key: str) -> list[dict]:
    try:
        if suffix == ".jsonl":
            rows, numbers = [], []
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
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(key, f"{path}: row {n} is not valid JSON: {exc.msg}") from None
                    numbers.append(n)
            return _numbered(rows, numbers)
        if suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8-sig") or "[]")
            except json.JSONDecodeError as exc:
                raise ConfigError(key, f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
            if isinstance(rows, dict) and "data" in rows:
                rows = rows["data"]
            if not isinstance(rows, list):
                raise ConfigError(key, f"{path}: expected a JSON list of records")
        elif suffix == ".txt":
            blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")]
            rows = [{"text": b} for b in blocks if b]
        elif suffix == ".csv":
            rows = []
            with path.open(encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                for n, row in enumerate(reader, 1):
                    if None in row or None in row.values():
                        fields = len(row) - 1 + len(row[None]) if None in row else sum(v is not None for v in row.values())
                        raise ConfigError(
                            key, f"{path}: row {n} (line {reader.line_num}) has {fields} fields, the header has {len(reader.fieldnames)}"
                        )
                    rows.append(row)
        else:
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad files
                raise ConfigError(key, f"{path}: not a readable parquet file ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path}: not UTF-8 text") from None
    return _numbered(rows)


def detect_format(rows: list[dict], source: str, key: str) -> str:
    """Pick text / prompt_response / chat from the first record's columns."""
    cols = set(rows[0])
    if "messages" in cols:
        return "chat"
    if {"prompt", "response"} <= cols:
        return "prompt_response"
    if "text" in cols:
        return "text"
    raise ConfigError(
        key, f"{source}: row {getattr(rows[0], 'number', 1)} has columns {sorted(cols)}; expected 'text', 'prompt'+'response' or 'messages'"
    )


_REQUIRED = {"text": ("text",), "prompt_response": ("prompt", "response"), "chat": ("messages",)}
#: The roles a chat row may use (case-sensitive: chat templates compare them exactly, so an
#: "Assistant" turn would be rendered as some other speaker and never trained on).
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _row_problem(row: dict, fmt: str) -> str | None:
    """What makes ``row`` unusable as ``fmt`` data, or None."""
    for col in _REQUIRED[fmt]:
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


def load_records(cfg) -> tuple[list[dict], list[dict], str]:
    """Return (train rows, val rows, format) for a :class:`qpeft.config.DataConfig`."""
    if cfg.path.startswith("embedded:"):
        name = cfg.path.split(":", 1)[1]
        if name not in EMBEDDED_SETS:
            raise ConfigError("data.path", f"unknown embedded set {name!r}; valid: " + ", ".join(f"embedded:{s}" for s in EMBEDDED_SETS))
        train = _records_from_file(EMBEDDED_DATA / f"{name}_train.jsonl", "data.path")
        if cfg.val_path:  # was ignored: the embedded set's own val split was used instead
            val = _records_from_file(Path(cfg.val_path).expanduser(), "data.val_path")
        else:
            val = _records_from_file(EMBEDDED_DATA / f"{name}_val.jsonl", "data.path")
    else:
        train = _records_from_file(Path(cfg.path).expanduser(), "data.path")
        if cfg.val_path:
            val = _records_from_file(Path(cfg.val_path).expanduser(), "data.val_path")
        else:
            n_val = max(1, int(len(train) * cfg.val_fraction))
            if len(train) < 2:
                raise ConfigError("data.path", f"{cfg.path}: needs at least 2 records to hold one out for validation")
            train, val = train[:-n_val], train[-n_val:]
    fmt = cfg.format if cfg.format != "auto" else detect_format(train, cfg.path, "data.format")
    for rows, key, source in (
        (train, "data.path", cfg.path),
        (val, "data.val_path" if cfg.val_path else "data.path", cfg.val_path or cfg.path),
    ):
        for n, row in enumerate(rows, 1):
            problem = _row_problem(row, fmt)
            if problem:
                raise ConfigError(key, f"{source}: row {getattr(row, 'number', n)} {problem}")
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_val_examples:
        val = val[: cfg.max_val_examples]
    return train, val, fmt


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _chat_ids(tok, messages, add_generation_prompt=False) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode(row: dict, fmt: str, tok, max_length: int | None = None) -> Example:
    """Tokenize one record with labels = input ids where loss is taken, ``-100`` elsewhere;
    cut to ``max_length`` tokens when given."""
    eos = tok.eos_token_id
    has_template = bool(getattr(tok, "chat_template", None))
    if fmt == "text":
        ids = tok(row["text"], add_special_tokens=True)["input_ids"] + [eos]
        labels = list(ids)
    elif fmt == "prompt_response" and has_template:
        ids, labels = _encode_chat(tok, [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}])
    elif fmt == "prompt_response":
        prompt = tok(row["prompt"] + "\n", add_special_tokens=True)["input_ids"]
        answer = tok(row["response"], add_special_tokens=False)["input_ids"] + [eos]
        ids, labels = prompt + answer, [IGNORE] * len(prompt) + answer
    else:
        if not has_template:
            raise ConfigError("data.format", "chat data needs a tokenizer with a chat template")
        ids, labels = _encode_chat(tok, row["messages"])
    return Example(ids[:max_length], labels[:max_length])


def _encode_chat(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Loss only on assistant turns: each turn's span is found by rendering growing prefixes."""
    ids = _chat_ids(tok, messages)
    labels = [IGNORE] * len(ids)
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        start = len(_chat_ids(tok, messages[:i], add_generation_prompt=True))
        end = len(_chat_ids(tok, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize(rows: list[dict], fmt: str, tok, max_length: int, *, too_long: str = "truncate", source: str = "data", say=None) -> list[dict]:
    """Encode every row; apply the ``too_long`` policy ("truncate", "drop" or "error") to rows
    over ``max_length`` tokens; drop rows left with no label after truncation. ``source`` names
    the file in messages; ``say`` (if given) is told which rows were cut or dropped."""
    out, long_rows, empty_rows, cut_rows = [], [], [], []
    for i, row in enumerate(rows, 1):
        n = getattr(row, "number", i)
        row, cut = _cut_long_strings(row, fmt, tok, max_length)
        if cut:
            cut_rows.append(n)
        ex = encode(row, fmt, tok)
        if len(ex.input_ids) > max_length:
            if too_long == "error":
                raise ConfigError(
                    "data.too_long",
                    f"{source}: row {n} has {'more than ' if cut else ''}{len(ex.input_ids)} tokens, more than data.max_length={max_length}; "
                    "raise max_length or set data.too_long to truncate or drop",
                )
            long_rows.append(n)
            if too_long == "drop":
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        if any(l != IGNORE for l in ex.labels):
            out.append({"input_ids": ex.input_ids, "labels": ex.labels})
        else:
            empty_rows.append(n)
    if say and long_rows:
        verb = "dropped" if too_long == "drop" else "truncated to"
        rows = "1 row" if len(long_rows) == 1 else f"{len(long_rows)} rows"
        say(
            f"{source}: {rows} longer than {max_length} tokens {verb}{'' if too_long == 'drop' else f' {max_length}'} "
            f"(row{'' if len(long_rows) == 1 else 's'} {_row_list(long_rows)})"
        )
    if say and cut_rows:
        say(
            f"{source}: {len(cut_rows)} row{'' if len(cut_rows) == 1 else 's'} with a string far longer than {max_length} tokens "
            f"cut to its first {_cut_bound(max_length):,} characters or more before tokenizing (rows {_row_list(cut_rows)})"
        )
    if say and empty_rows:
        say(f"{source}: {len(empty_rows)} rows have no target token left after truncation and were skipped (rows {_row_list(empty_rows)})")
    return out


#: A generous bound on the characters one token covers: a string of more than
#: ``(max_length + 16) * CHARS_PER_TOKEN`` characters is cut to that before it is tokenized
#: (tokenizing a 50 MB row whole took 139 s and 7.9 GiB to keep 48 of its tokens).
CHARS_PER_TOKEN = 32


def _cut_bound(max_length: int) -> int:
    return (max_length + 16) * CHARS_PER_TOKEN


def _cut_string(text: str, tok, max_length: int) -> str:
    """``text``, or a prefix of it that still tokenizes to at least ``max_length + 16`` tokens
    (so the first ``max_length`` tokens, all that is kept, are those of the whole text: a cut
    changes only the last few tokens before it). The prefix grows 4× while it is too short."""
    bound = _cut_bound(max_length)
    while len(text) > bound:
        head = text[:bound]
        if len(tok(head, add_special_tokens=False)["input_ids"]) >= max_length + 16:
            return head
        bound *= 4
    return text


def _cut_long_strings(row: dict, fmt: str, tok, max_length: int) -> tuple[dict, bool]:
    """``row`` with every string longer than :func:`_cut_bound` cut by :func:`_cut_string`
    (the whole record is over ``max_length`` tokens then, and only its start is kept), and
    whether anything was cut."""
    bound = _cut_bound(max_length)
    if fmt == "chat":
        if not any(len(m.get("content") or "") > bound for m in row["messages"]):
            return row, False
        messages = [
            {**m, "content": _cut_string(m["content"], tok, max_length)} if len(m.get("content") or "") > bound else m
            for m in row["messages"]
        ]
        new = {**row, "messages": messages}
        cut = any(a["content"] != b["content"] for a, b in zip(messages, row["messages"]))
    else:
        cols = [c for c in _REQUIRED[fmt] if len(row[c]) > bound]
        if not cols:
            return row, False
        new = {**row, **{c: _cut_string(row[c], tok, max_length) for c in cols}}
        cut = any(new[c] != row[c] for c in cols)
    return new, cut


def _row_list(rows: list[int], limit: int = 5) -> str:
    head = ", ".join(map(str, rows[:limit]))
    return head + (f", … {len(rows) - limit} more" if len(rows) > limit else "")


def pack(data: list[dict], max_length: int) -> list[dict]:
    """Concatenate tokenized documents into rows of at most ``max_length`` tokens.

    Each row gets ``position_ids`` that restart at 0 for every document; given position ids
    and no attention mask, transformers' mask builder (``find_packed_sequence_indices``) makes
    attention block-diagonal, so no token attends across documents. The first token of each
    document is never a target (it would be predicted from the previous document), which is
    also true of an unpacked row. Documents are never split.
    """
    rows: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for d in data:
        n = len(d["input_ids"])
        if ids and len(ids) + n > max_length:
            rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
            ids, labels, pos = [], [], []
        ids.extend(d["input_ids"])
        labels.append(IGNORE)
        labels.extend(d["labels"][1:])
        pos.extend(range(n))
    if ids:
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a batch; padding gets label -100 (masked by position, not id).

    Unpacked rows get an attention mask (0 on padding). Packed rows (with ``position_ids``)
    get no attention mask — that is what makes transformers build per-document masks — and
    their padding is one more "document" whose positions restart at 0 and whose labels are
    all -100, so no real token attends to it.
    """
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    packed = "position_ids" in batch[0]
    extra = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        if packed:
            extra[i, :n] = torch.tensor(b["position_ids"])
            extra[i, n:] = torch.arange(width - n)
        else:
            extra[i, :n] = 1
    key = "position_ids" if packed else "attention_mask"
    return {"input_ids": ids, "labels": labels, key: extra}


def count_input_tokens(batch: dict, pad_id: int) -> int:
    """Non-padding tokens of a collated batch (packed or not)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["input_ids"] != pad_id).sum())


def count_example_tokens(examples: list[dict], pad_id: int) -> int:
    """Non-padding tokens of examples, as :func:`count_input_tokens` counts them once collated, in
    any batching: every token of an unpacked row; the tokens other than ``pad_id`` of a packed row."""
    return sum(sum(1 for t in ex["input_ids"] if t != pad_id) if "position_ids" in ex else len(ex["input_ids"]) for ex in examples)


def count_label_tokens(data: list[dict]) -> int:
    return sum(sum(1 for l in d["labels"] if l != IGNORE) for d in data)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch).

    Every trainer iterates data in this order, so two trainers given the same data and seed
    see the same batches and their loss curves can be compared step by step.
    """
    import torch

    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def ordered_examples(data: list[dict], seed: int, epochs: int) -> list[dict]:
    """``data`` repeated for ``epochs`` epochs, each epoch in :func:`epoch_order`."""
    return [data[i] for e in range(epochs) for i in epoch_order(len(data), seed, e)]


def plan_steps(n_examples: int, per_step: int, epochs: float, max_steps: int | None) -> tuple[int, int]:
    """(optimizer steps, whole epochs of data to lay out) for ``epochs`` or ``max_steps``."""
    import math

    if max_steps:
        return max_steps, math.ceil(max_steps * per_step / n_examples)
    return math.ceil(epochs * n_examples / per_step), math.ceil(epochs)

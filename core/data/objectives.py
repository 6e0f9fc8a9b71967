"""Data for training objectives other than language modelling: preference pairs, unpaired
feedback and prompts scored by reward functions.

A trainer declares the data it consumes (:attr:`qpeft.api.TrainerPlugin.data_kind`, one of
:data:`DATA_KINDS`). For the kinds other than ``"lm"`` qpeft reads every row, checks it (a bad
row fails with :class:`~qpeft.errors.ConfigError` naming the file, the row and the missing
field) and renders it into the rows TRL-style trainers take, all before any weight loads:

* ``preference``: ``{"prompt", "chosen", "rejected"}`` with strings, or chat messages
  (``prompt`` a list of messages, ``chosen``/``rejected`` lists ending with the assistant
  turn); or ``{"chosen", "rejected"}`` conversations alone, whose shared turns before the last
  one are the prompt.
* ``unpaired``: ``{"prompt", "completion", "label"}`` (label true = a desirable completion),
  strings or messages.
* ``prompts``: ``{"prompt", ...}``; every other column (an ``answer``, say) is kept and handed
  to the reward functions.

Rendering: with a tokenizer that has a chat template every row becomes conversational
(``prompt`` = the user turn(s), completions = one assistant message), and the trainer applies
the template exactly as qpeft's supervised data does, so the loss falls on the assistant turn
only; without a template a string prompt gets a newline (as qpeft's ``prompt_response`` rows
do) and chat rows are refused. Rows are small and few for these objectives, so they are held
in memory as lists of dicts, not in a token store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .records import CHAT_ROLES, check_source, data_sources, held_out_records, iter_records

#: What a trainer may consume, and how ``qpeft plugins`` and errors describe it.
DATA_KINDS = {
    "lm": "language-modelling rows: text, prompt/response or messages (loss on the target tokens)",
    "preference": "preference pairs: prompt, chosen, rejected (strings or chat messages)",
    "unpaired": "unpaired feedback: prompt, completion, label (true = desirable)",
    "prompts": "prompts completed by the model and scored by reward functions: prompt plus the columns they read",
}
#: The embedded set a trainer of each kind trains on when the config names no ``data.path``.
EMBEDDED_FOR_KIND = {
    "lm": "embedded:instruct",
    "preference": "embedded:preference",
    "unpaired": "embedded:feedback",
    "prompts": "embedded:prompts",
}
REQUIRED = {"preference": ("chosen", "rejected"), "unpaired": ("prompt", "completion", "label"), "prompts": ("prompt",)}
_LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}  # 1 and 0 equal True and False


@dataclass
class ObjectiveData:
    """Rendered rows of a run whose trainer does not consume language-modelling data."""

    train: list[dict]
    val: list[dict]
    kind: str
    #: "text" (string rows) or "chat" (conversational rows, rendered by the chat template).
    format: str
    #: Row numbers dropped or over ``max_length`` (as ``too_long`` decided), per split.
    long_rows: dict[str, list[int]] = field(default_factory=dict)


def _messages_problem(value, name: str, *, last_assistant: bool) -> str | None:
    if not value:
        return f"has an empty {name!r}"
    for i, msg in enumerate(value, 1):
        if not isinstance(msg, dict):
            return f"has {name!r} message {i} as {type(msg).__name__}, expected an object with 'role' and 'content'"
        if msg.get("role") not in CHAT_ROLES:
            return f"has {name!r} message {i} with role {msg.get('role')!r}; valid: {', '.join(CHAT_ROLES)}"
        if not isinstance(msg.get("content"), str):
            return f"has {name!r} message {i} with 'content' as {type(msg.get('content')).__name__}, expected a string"
    if last_assistant and value[-1]["role"] != "assistant":
        return f"has {name!r} ending with a {value[-1]['role']!r} turn; a completion ends with the assistant's turn"
    return None


def _text_or_messages(row: dict, name: str, *, completion: bool) -> str | None:
    value = row.get(name)
    if value is None or value == "":
        return f"has no {name!r}"
    if isinstance(value, str):
        return None
    if isinstance(value, list):
        return _messages_problem(value, name, last_assistant=completion)
    return f"has {name!r} as {type(value).__name__}, expected a string or a list of chat messages"


def row_problem(row: dict, kind: str) -> str | None:
    """What makes ``row`` unusable as ``kind`` data (naming the missing or bad field), or None."""
    need = REQUIRED[kind]
    missing = [c for c in need if row.get(c) is None]
    if kind == "preference" and "prompt" not in row:
        # the conversational variant without a prompt: the shared turns are the prompt
        if not missing and not all(isinstance(row[c], list) for c in need):
            missing = ["prompt"]
    if missing:
        return f"has no {missing[0]!r} (columns: {sorted(row)}); expected {DATA_KINDS[kind]}"
    if kind == "prompts":
        return _text_or_messages(row, "prompt", completion=False)
    if kind == "unpaired":
        if row["label"] not in _LABELS or isinstance(row["label"], float):
            return f"has 'label' {row['label']!r}; expected true or false"
        return _text_or_messages(row, "prompt", completion=False) or _text_or_messages(row, "completion", completion=True)
    for name in need:
        if problem := _text_or_messages(row, name, completion=True):
            return problem
    if isinstance(row["chosen"], str) != isinstance(row["rejected"], str):
        return "has one of 'chosen' and 'rejected' as a string and the other as messages; use the same form for both"
    if "prompt" in row:
        return _text_or_messages(row, "prompt", completion=False)
    if row["chosen"][:-1] != row["rejected"][:-1]:
        return "has 'chosen' and 'rejected' conversations that differ before their last turn; without a 'prompt' the turns before it are the shared prompt"
    if len(row["chosen"]) < 2:
        return "has a 'chosen' conversation of one turn and no 'prompt'; give the prompt (a user turn) too"
    return None


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def render_row(row: dict, kind: str, tok) -> dict:
    """``row`` (already checked) in the form TRL's trainers take: conversational when ``tok`` has a
    chat template, plain strings otherwise (a string prompt ends with a newline there)."""
    chat = bool(getattr(tok, "chat_template", None))
    if kind == "preference" and "prompt" not in row:
        row = {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}
    completions = {"preference": ("chosen", "rejected"), "unpaired": ("completion",), "prompts": ()}[kind]
    if not chat:
        if any(isinstance(row[c], list) for c in ("prompt", *completions)):
            raise ValueError("chat rows need a tokenizer with a chat template")
        out = {"prompt": row["prompt"] + "\n", **{c: row[c] for c in completions}}
    else:
        out = {"prompt": _as_messages(row["prompt"], "user"), **{c: _as_messages(row[c], "assistant") for c in completions}}
    if kind == "unpaired":
        out["label"] = _LABELS[row["label"]]
    if kind == "prompts":  # the reward functions read the other columns
        out.update({k: v for k, v in row.items() if k != "prompt"})
    return out


def rendered_text(row: dict, tok, completion: str | None = None) -> str:
    """A rendered row's prompt (and ``completion`` column) as the text the model reads."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt + (row[completion] if completion else "")
    messages = prompt + (row[completion] if completion else [])
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=completion is None)


def _length(row: dict, kind: str, tok) -> int:
    cols = {"preference": ("chosen", "rejected"), "unpaired": ("completion",), "prompts": (None,)}[kind]
    return max(len(tok(rendered_text(row, tok, c), add_special_tokens=False)["input_ids"]) for c in cols)


def read_rows(path, kind: str, source: str, key: str, tok, max_length: int, too_long: str) -> tuple[list[dict], list[int]]:
    """Every row of ``path`` checked and rendered; the numbers of rows over ``max_length`` tokens
    (dropped with ``too_long: drop``, refused with ``error``, left to the trainer's truncation
    otherwise, which keeps the start)."""
    rows, long_rows = [], []
    form = None
    for n, row in enumerate(iter_records(path, key), 1):
        number = getattr(row, "number", n)
        if problem := row_problem(row, kind):
            raise ConfigError(key, f"{source}: row {number} {problem}")
        try:
            rendered = render_row(row, kind, tok)
        except ValueError as exc:
            raise ConfigError(key, f"{source}: row {number}: {exc}") from None
        this = "chat" if isinstance(rendered["prompt"], list) else "text"
        if kind == "prompts" and form is not None and set(rendered) != set(rows[0]):
            raise ConfigError(key, f"{source}: row {number} has columns {sorted(rendered)}, row 1 has {sorted(rows[0])}")
        form = form or this
        if _length(rendered, kind, tok) > max_length:
            if too_long == "error":
                raise ConfigError(
                    "data.too_long",
                    f"{source}: row {number} is longer than data.max_length={max_length} tokens; raise max_length or set data.too_long to truncate or drop",
                )
            long_rows.append(number)
            if too_long == "drop":
                continue
        rows.append(rendered)
    return rows, long_rows


def load_objective_data(cfg, kind: str, tok, *, say=None) -> ObjectiveData:
    """Training and validation rows of a :class:`qpeft.config.DataConfig` for a trainer of
    ``kind``, read, checked and rendered (:func:`read_rows`). Without ``val_path`` the last
    ``val_fraction`` of the rows is held out; ``max_*_examples`` count rows from the start."""
    if kind not in REQUIRED:
        raise ConfigError("trainer.name", f"data kind {kind!r} has no reader; valid: {', '.join(REQUIRED)}")
    if cfg.packing:
        raise ConfigError("data.packing", f"{DATA_KINDS[kind].split(':')[0]} are not packed; set data.packing to false")
    train_path, val_path, val_key = data_sources(cfg)
    check_source(train_path, "data.path")
    read = dict(kind=kind, tok=tok, max_length=cfg.max_length, too_long=cfg.too_long)
    train, long_train = read_rows(train_path, source=cfg.path, key="data.path", **read)
    if val_path is not None:
        check_source(val_path, val_key)
        val, long_val = read_rows(val_path, source=cfg.val_path or f"{cfg.path} (validation split)", key=val_key, **read)
    else:
        if len(train) < 2:
            raise ConfigError("data.path", f"{cfg.path}: needs at least 2 rows to hold one out for validation")
        n_val = held_out_records(len(train), cfg.val_fraction)
        train, val, long_val = train[:-n_val], train[-n_val:], []
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_val_examples:
        val = val[: cfg.max_val_examples]
    if not train:
        raise ConfigError("data.path", f"{cfg.path}: no training row is left within data.max_length={cfg.max_length} tokens")
    forms = {"chat" if isinstance(r["prompt"], list) else "text" for r in train + val}
    if say:
        for split, rows in (("training", long_train), ("validation", long_val)):
            if rows:
                verb = "dropped" if cfg.too_long == "drop" else "truncated by the trainer (keeping the start)"
                say(f"{len(rows)} {split} row(s) longer than {cfg.max_length} tokens {verb}: rows {', '.join(map(str, rows[:5]))}")
    return ObjectiveData(train=train, val=val, kind=kind, format=forms.pop(), long_rows={"train": long_train, "val": long_val})


def check_objective_rows(cfg, kind: str, max_rows: int) -> list[str]:
    """``qpeft run --check``: the data files exist and their first ``max_rows`` rows are ``kind``
    rows (no tokenizer is loaded, so nothing is rendered)."""
    import itertools

    train_path, val_path, val_key = data_sources(cfg)
    notes = []
    for path, source, key in ((train_path, cfg.path, "data.path"), (val_path, cfg.val_path or f"{cfg.path} (validation split)", val_key)):
        if path is None:
            continue
        check_source(path, key)
        n = 0
        for n, row in enumerate(itertools.islice(iter_records(path, key), max_rows), 1):
            if problem := row_problem(row, kind):
                raise ConfigError(key, f"{source}: row {getattr(row, 'number', n)} {problem}")
        if not str(source).startswith("embedded:"):
            notes.append(f"{source}: the first {n:,} rows checked ({kind})")
    return notes


def probe_example(row: dict, tok, max_length: int) -> dict:
    """A rendered row's prompt and first completion as one tokenized example (the run's
    reload check compares the trained and reloaded models' logits on it)."""
    from .encode import tokenize

    column = "chosen" if "chosen" in row else "completion" if "completion" in row else None
    return tokenize([{"text": rendered_text(row, tok, column)}], "text", tok, max_length)[0]

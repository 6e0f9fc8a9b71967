"""Tokenizing records: token ids with loss labels (``-100`` where no loss is taken), the
``too_long`` policy, packing and batching."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .records import REQUIRED

IGNORE = -100


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


@dataclass
class Encoded:
    """What :func:`encode_rows` made of some rows: the kept examples as (input ids, labels), and
    the row numbers that were cut before tokenizing, truncated or dropped as too long, or
    skipped for having no target token left."""

    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # the position in ``rows`` of each kept example
    long_rows: list[int] = field(default_factory=list)
    cut_rows: list[int] = field(default_factory=list)
    empty_rows: list[int] = field(default_factory=list)


def encode_rows(rows: list[dict], fmt: str, tok, max_length: int, *, too_long: str = "truncate", source="data") -> Encoded:
    """Encode ``rows``; apply the ``too_long`` policy ("truncate", "drop" or "error") to rows
    over ``max_length`` tokens; skip rows left with no label after truncation. Plain text rows
    are tokenized in one batch call (the fast tokenizer's own threads), with the same ids as
    one call per row."""
    out = Encoded()
    numbered = [(getattr(row, "number", i), *_cut_long_strings(row, fmt, tok, max_length)) for i, row in enumerate(rows, 1)]
    batch = None
    if fmt == "text" and numbered:
        eos = tok.eos_token_id
        batch = [ids + [eos] for ids in tok([r["text"] for _, r, _ in numbered], add_special_tokens=True)["input_ids"]]
    for j, (n, row, cut) in enumerate(numbered):
        if cut:
            out.cut_rows.append(n)
        ex = Example(batch[j], list(batch[j])) if batch is not None else encode(row, fmt, tok)
        if len(ex.input_ids) > max_length:
            if too_long == "error":
                raise ConfigError(
                    "data.too_long",
                    f"{source}: row {n} has {'more than ' if cut else ''}{len(ex.input_ids)} tokens, more than data.max_length={max_length}; "
                    "raise max_length or set data.too_long to truncate or drop",
                )
            out.long_rows.append(n)
            if too_long == "drop":
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        if any(l != IGNORE for l in ex.labels):
            out.examples.append((ex.input_ids, ex.labels))
            out.indices.append(j)
        else:
            out.empty_rows.append(n)
    return out


def report(source, max_length: int, too_long: str, long_rows, cut_rows, empty_rows, say) -> None:
    """Tell ``say`` which rows of ``source`` were truncated, dropped, cut or skipped. Each of the
    three is a list of row numbers, or ``{"first": [the first few], "count": all}``."""
    long_first, n_long = _rows(long_rows)
    cut_first, n_cut = _rows(cut_rows)
    empty_first, n_empty = _rows(empty_rows)
    if n_long:
        verb = "dropped" if too_long == "drop" else "truncated to"
        rows = "1 row" if n_long == 1 else f"{n_long} rows"
        say(
            f"{source}: {rows} longer than {max_length} tokens {verb}{'' if too_long == 'drop' else f' {max_length}'} "
            f"(row{'' if n_long == 1 else 's'} {_row_list(long_first, n_long)})"
        )
    if n_cut:
        say(
            f"{source}: {n_cut} row{'' if n_cut == 1 else 's'} with a string far longer than {max_length} tokens "
            f"cut to its first {_cut_bound(max_length):,} characters or more before tokenizing (rows {_row_list(cut_first, n_cut)})"
        )
    if n_empty:
        say(
            f"{source}: {n_empty} rows have no target token left after truncation and were skipped (rows {_row_list(empty_first, n_empty)})"
        )


def _rows(rows) -> tuple[list[int], int]:
    return (rows["first"], rows["count"]) if isinstance(rows, dict) else (rows, len(rows))


def tokenize(rows: list[dict], fmt: str, tok, max_length: int, *, too_long: str = "truncate", source: str = "data", say=None) -> list[dict]:
    """Encode ``rows`` in memory (:func:`encode_rows`) as a list of ``{"input_ids", "labels"}``;
    ``say`` (if given) is told which rows were cut or dropped. Runs read data through
    :mod:`qpeft.data.store` instead, which keeps the result on disk."""
    enc = encode_rows(rows, fmt, tok, max_length, too_long=too_long, source=source)
    if say:
        report(source, max_length, too_long, enc.long_rows, enc.cut_rows, enc.empty_rows, say)
    return [{"input_ids": ids, "labels": labels} for ids, labels in enc.examples]


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
        cols = [c for c in REQUIRED[fmt] if len(row[c]) > bound]
        if not cols:
            return row, False
        new = {**row, **{c: _cut_string(row[c], tok, max_length) for c in cols}}
        cut = any(new[c] != row[c] for c in cols)
    return new, cut


def _row_list(first: list[int], count: int, limit: int = 5) -> str:
    head = ", ".join(map(str, first[:limit]))
    return head + (f", … {count - limit} more" if count > limit else "")


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

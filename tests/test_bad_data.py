"""Bad data files and bad bench results: each is one ``error: `` line naming the file and
row (or line), exit status 2, no traceback, and no weight loaded; silent surprises (an
ignored ``val_path``, extra CSV fields, chat rows the loss never sees) are errors too."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_bad_files import qpeft, write_config  # noqa: F401 - qpeft is a fixture

from qpeft.config import DataConfig
from qpeft.data import _cut_bound, load_records, tokenize
from qpeft.errors import ConfigError

OK_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(path: Path, rows: list, raw: dict[int, bytes] | None = None) -> str:
    """Rows as JSON lines; ``raw`` replaces line i (0-based) with bytes as given."""
    lines = [json.dumps(r).encode() for r in rows]
    for i, b in (raw or {}).items():
        lines[i] = b
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize(
    "rows, raw, fragment",
    [
        ([{"text": "a"}, {"text": "b"}, {"text": "c"}], {1: b'{"text": "bad \xff\xfe"}'}, "row 2 is not valid UTF-8"),
        ([{"text": "a"}, {"text": ["x", "y"]}, {"text": "c"}], None, "row 2 has 'text' as list, expected a string"),
        ([OK_CHAT, {"messages": "hello"}, OK_CHAT], None, "row 2 has 'messages' as str, expected a list of messages"),
        ([OK_CHAT, {"messages": [1, 2, 3]}, OK_CHAT], None, "row 2 has message 1 as int"),
        ([OK_CHAT, {"messages": [{"role": "user", "content": "hi"}]}, OK_CHAT], None, "row 2 has no assistant turn"),
        (
            [OK_CHAT, {"messages": [{"role": "user", "content": "hi"}, {"role": "Assistant", "content": "yo"}]}, OK_CHAT],
            None,
            "row 2 has message 2 with role 'Assistant'; roles are lower-case: use 'assistant'",
        ),
        (
            [OK_CHAT, {"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}, OK_CHAT],
            None,
            "row 2 has message 1 with unknown role 'human'; valid: system, user, assistant, tool",
        ),
        (
            [OK_CHAT, {"messages": [{"role": "user", "content": 5}, OK_CHAT["messages"][1]]}, OK_CHAT],
            None,
            "row 2 has message 1 with 'content' as int",
        ),
    ],
    ids=["bad-utf8", "list-text", "messages-str", "messages-ints", "no-assistant", "Assistant", "unknown-role", "int-content"],
)
def test_bad_jsonl_row_is_one_error_naming_file_and_row(tmp_path, rows, raw, fragment):
    path = _jsonl(tmp_path / "d.jsonl", rows, raw)
    with pytest.raises(ConfigError) as info:
        load_records(DataConfig(path=path, val_fraction=0.34))
    assert f"{path}: {fragment}" in str(info.value), str(info.value)


def test_row_number_is_the_line_and_survives_the_validation_split(tmp_path, embedded_model_path):
    """datasets counts records from 0 and skips blank lines; qpeft's row is the file's line
    (from 1, what an editor shows), also for rows held out for validation."""
    from qpeft.tokenizer import load_tokenizer

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": ["c"]}\n')
    with pytest.raises(ConfigError, match=r"d.jsonl: row 4 has 'text' as list"):
        load_records(DataConfig(path=str(path)))
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "' + "long " * 200 + '"}\n')
    train, val, fmt = load_records(DataConfig(path=str(path), val_fraction=0.34))
    tok, _ = load_tokenizer(embedded_model_path)
    with pytest.raises(ConfigError, match=r"d.jsonl: row 4 has \d+ tokens"):  # was "row 1" (of the held-out rows)
        tokenize(val, fmt, tok, 16, too_long="error", source=str(path))


def test_bad_utf8_through_the_cli_is_one_line_before_weights(qpeft, tiny_llama_path, tmp_path):  # noqa: F811
    data = _jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(6)], {3: b'{"text": "\xc3\x28"}'})
    cfg = write_config(tmp_path / "c.yaml", tiny_llama_path, tmp_path / "out", data={"path": data})
    result, line, watch = qpeft("run", cfg)
    assert result.exit_code == 2 and f"{data}: row 4 is not valid UTF-8" in line, result.output
    assert watch.loaded == 0


def test_csv_row_with_extra_fields_is_an_error(tmp_path):
    """The built-in reader kept the extra field under the key None; pandas read a first data
    row with one field too many as an index column, shifting every value."""
    path = tmp_path / "d.csv"
    for body, fragment in (
        ("a,b\nc,d,e\nf,g\n", "row 2 (line 3) has 3 fields, the header has 2"),
        ("a,b,c\nd,e\n", "row 1 (line 2) has 3 fields"),
    ):
        path.write_text("prompt,response\n" + body)
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            load_records(DataConfig(path=str(path), val_fraction=0.34))
    path.write_text("prompt,response\n1,2\nc,d\n")
    train, val, _ = load_records(DataConfig(path=str(path), val_fraction=0.34))
    assert train == [{"prompt": "1", "response": "2"}]  # kept as written, not turned into numbers


def test_val_path_is_used_with_embedded_data(tmp_path):
    """data.val_path was ignored when data.path was embedded (its own val split was used)."""
    val = _jsonl(tmp_path / "v.jsonl", [{"prompt": "mine?", "response": "yes"}])
    _, rows, fmt = load_records(DataConfig(path="embedded:instruct", val_path=val))
    assert fmt == "prompt_response" and rows == [{"prompt": "mine?", "response": "yes"}]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt"}])
    with pytest.raises(ConfigError, match=r"data.val_path: .*bad.jsonl: row 1 has no usable 'prompt'"):
        load_records(DataConfig(path="embedded:instruct", val_path=bad))


class _SpyTokenizer:
    """Wraps a tokenizer and records the longest string it was given."""

    def __init__(self, tok):
        self._tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("fmt", ["text", "prompt_response", "chat"])
def test_huge_row_is_cut_before_tokenizing(embedded_model_path, fmt):
    """A 50 MB row took 139 s and 7.9 GiB to keep 48 tokens: strings are now cut to a bound
    derived from max_length first, with a note, and the kept tokens are unchanged."""
    from qpeft.tokenizer import load_tokenizer

    tok, _ = load_tokenizer(embedded_model_path)
    spy = _SpyTokenizer(tok)
    huge = "words of a very long document, " * 150_000  # 4.6 MB
    row = {
        "text": {"text": huge},
        "prompt_response": {"prompt": "Summarise:", "response": huge},
        "chat": {"messages": [{"role": "user", "content": "Summarise:"}, {"role": "assistant", "content": huge}]},
    }[fmt]
    said = []
    t0 = time.perf_counter()
    (ex,) = tokenize([row], fmt, spy, 48, source="big.jsonl", say=said.append)
    assert time.perf_counter() - t0 < 5
    assert len(ex["input_ids"]) == 48
    if fmt != "chat":  # chat goes through apply_chat_template, which the spy does not see
        assert spy.longest <= 4 * _cut_bound(48)
    assert any("cut to its first" in s and "before tokenizing" in s and "(rows 1)" in s for s in said), said
    small = {k: v.replace(huge, huge[:60_000]) if isinstance(v, str) else v for k, v in row.items()}
    if fmt == "chat":
        small = {"messages": [row["messages"][0], {"role": "assistant", "content": huge[:60_000]}]}
    (whole,) = tokenize([small], fmt, tok, 10_000)
    (cut,) = tokenize([small], fmt, tok, 48)
    assert cut["input_ids"] == whole["input_ids"][:48] and cut["labels"] == whole["labels"][:48]


@pytest.mark.parametrize(
    "line, fragment",
    [
        (b"\xff\xfe", "line 2 is not UTF-8 text"),
        (b'{"cell": "b", "st', "line 2 is not valid JSON"),
        (b'{"cell": ["b"], "status": "ok"}', "line 2 has no 'cell' string"),
        (b'{"cell": "b", "status": "ok"}', "line 2 is an ok record without 'labels' and 'metrics' objects"),
        (b"[1, 2]", "line 2 is a JSON list"),
    ],
    ids=["bad-utf8", "torn", "cell-list", "no-labels", "list"],
)
def test_bench_report_on_a_corrupt_results_file(qpeft, tmp_path, line, fragment):  # noqa: F811
    good = json.dumps({"cell": "a", "status": "ok", "labels": {"quantizer": "none"}, "metrics": {}}).encode()
    (tmp_path / "results.jsonl").write_bytes(good + b"\n" + line + b"\n")
    result, err, _ = qpeft("bench", "report", str(tmp_path))
    assert result.exit_code == 2 and f"{tmp_path / 'results.jsonl'}: {fragment}" in err, result.output
    (tmp_path / "results.jsonl").write_bytes(good + b"\n")
    assert qpeft("bench", "report", str(tmp_path))[0].exit_code == 0


@pytest.mark.parametrize("key, value", [("data.max_train_examples", True), ("data.val_fraction", False), ("seed", True)])
def test_boolean_for_a_number_option_is_an_error(key, value):
    """pydantic read ``true`` as 1 for an integer option (``max_train_examples: true`` meant
    one example); a boolean where a number is wanted is now an error naming the key."""
    from qpeft.config import load_config

    section, _, name = key.rpartition(".")
    data = {"quantizer": "none", "peft": "lora", "trainer": "hf"}
    if section:
        data[section] = {name: value}
    else:
        data[name] = value
    with pytest.raises(ConfigError, match=rf"{key}: expected a number, not the boolean {str(value).lower()}"):
        load_config(data)

"""The token store and the lazy datasets trainers read (qpeft.data.store / dataset / schedule):
the same examples as tokenizing in memory, built once and mapped afterwards, keyed by content
(a file rewritten with the same size and time stamp is read again), never half-built, and a
data position that ``--resume`` continues from exactly."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft import orchestrator
from qpeft.checkpoint import MARKER, checkpoint_dir
from qpeft.config import DataConfig
from qpeft.data import (
    EMBEDDED_DATA,
    DataSchedule,
    count_label_tokens,
    load_datasets,
    load_records,
    ordered_examples,
    pack,
    tokenize,
)
from qpeft.data import store as store_module
from qpeft.data.records import _text_rows, iter_records
from qpeft.errors import ConfigError
from qpeft.registry import load_registry


@pytest.fixture(scope="module")
def tok(tiny_llama_path):
    from qpeft.tokenizer import load_tokenizer

    return load_tokenizer(tiny_llama_path)[0]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("QPEFT_CACHE", str(root))
    return root / "tokens"


def _chat_file(tmp_path):
    rows = []
    for line in (EMBEDDED_DATA / "instruct_train.jsonl").read_text().splitlines()[:20]:
        r = json.loads(line)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["response"]},
                ]
            }
        )
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _in_memory(cfg: DataConfig, tok):
    train, val, fmt = load_records(cfg)
    src = cfg.val_path or cfg.path
    return tokenize(train, fmt, tok, cfg.max_length, too_long=cfg.too_long), tokenize(val, fmt, tok, cfg.max_length, source=src)


@pytest.mark.parametrize("source", ["embedded:instruct", "embedded:text", "chat"])
@pytest.mark.parametrize("packing", [False, True])
def test_store_gives_the_examples_of_in_memory_tokenizing(tok, cache, tmp_path, source, packing):
    path = _chat_file(tmp_path) if source == "chat" else source
    cfg = DataConfig(path=path, max_length=64, packing=packing, max_val_examples=None)
    train, val = _in_memory(cfg, tok)
    data = load_datasets(cfg, tok)
    expected = pack(train, cfg.max_length) if packing else train
    assert len(data.train) == len(expected) and list(data.train) == expected
    assert list(data.val) == val
    assert data.train.label_tokens() == count_label_tokens(expected)
    assert data.val.label_tokens() == count_label_tokens(val)
    assert data.train[1:3] == expected[1:3] and data.train[-1] == expected[-1]


def test_worker_processes_build_the_same_store_as_one_process(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "CHUNK_RECORDS", 16)  # many chunks, finishing out of order
    cfg = DataConfig(path="embedded:text", max_length=48)
    folders = []
    for workers in (0, 2):
        monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / f"cache{workers}"))
        data = load_datasets(cfg, tok, workers=workers)
        folders.append(data.train.store.folder)
        assert data.train.store.meta["workers"] == workers
    for name in ("tokens.bin", "targets.bin", "offsets.bin", "records.bin"):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_a_built_store_is_mapped_again_not_rebuilt(tok, cache):
    cfg = DataConfig(path="embedded:text", max_length=32)  # every Hamlet chunk is longer: all truncated
    said = [[], []]
    first = load_datasets(cfg, tok, say=said[0].append)
    second = load_datasets(cfg, tok, say=said[1].append)
    assert any("tokenized" in m for m in said[0]) and not any("tokenized" in m for m in said[1])
    assert any("token store" in m for m in said[1])
    truncated = [m for m in said[0] if "truncated to 32" in m]
    assert truncated and truncated == [m for m in said[1] if "truncated to 32" in m]  # replayed from the store
    assert second.train.store.folder == first.train.store.folder and list(second.train) == list(first.train)


def test_a_file_rewritten_with_the_same_size_and_time_is_read_again(tok, cache, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"row number {i} says hello"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stat = os.stat(path)
    cfg = DataConfig(path=str(path), max_length=32)
    before = load_datasets(cfg, tok)
    changed = [{"text": r["text"].replace("hello", "HELLO")} for r in rows]  # same bytes count
    path.write_text("".join(json.dumps(r) + "\n" for r in changed))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    after = load_datasets(cfg, tok)
    assert after.train.store.key != before.train.store.key
    assert list(after.train) == _in_memory(cfg, tok)[0] != list(before.train)


def test_a_bad_row_is_named_and_leaves_no_store(tok, cache, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n\n{"text": 5}\n')
    with pytest.raises(ConfigError, match=r"data.path: .*d.jsonl: row 4 has 'text' as int"):
        load_datasets(DataConfig(path=str(path), max_length=32), tok)
    leftovers = [p.name for p in cache.iterdir() if not p.name.startswith(".locks")] if cache.exists() else []
    assert leftovers == []


def test_the_store_key_follows_the_tokenizer_and_the_encoding_options(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n')
    spec = store_module.StoreSpec(path, str(path), "data.path", "text", 32, "truncate")
    key = spec.store_key(tok)
    assert spec.store_key(tok) == key
    assert store_module.StoreSpec(path, str(path), "data.path", "text", 33, "truncate").store_key(tok) != key
    assert store_module.StoreSpec(path, str(path), "data.path", "text", 32, "drop").store_key(tok) != key
    original = tok.chat_template
    try:
        tok.chat_template = (original or "") + "{# changed #}"
        assert spec.store_key(tok) != key
    finally:
        tok.chat_template = original


def test_the_schedule_resumes_at_the_stored_position_with_another_number_of_ranks():
    data = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    two_ranks = DataSchedule(data, seed=3, per_rank=2, world=2, max_steps=6)
    position = two_ranks.position(2)  # 8 examples consumed
    assert (position["examples_seen"], position["per_step"]) == (8, 4)
    one_rank = DataSchedule(data, seed=3, per_rank=2, world=1, max_steps=6)
    one_rank.resume(2, position)
    order = ordered_examples(data, 3, 3)
    assert one_rank.step_examples(3) == [order[8], order[9]]  # where the two-rank run stopped
    assert one_rank.step_examples(4) == [order[10], order[11]]  # into the second epoch's order
    assert order[10:20] != order[0:10] and sorted(e["input_ids"][0] for e in order[10:20]) == list(range(10))


def test_the_schedule_equals_the_laid_out_order_of_every_trainer():
    data = [{"input_ids": [i], "labels": [i]} for i in range(7)]
    s = DataSchedule(data, seed=0, per_rank=3, world=1, epochs=2.0)
    laid_out = list(ordered_examples(data, 0, 2))
    steps = [e for step in range(1, s.max_steps + 1) for e in s.step_examples(step)]
    assert steps == [laid_out[i % len(laid_out)] for i in range(len(steps))]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab \n\r\t", max_size=60))
def test_text_files_stream_into_the_paragraphs_of_a_whole_read(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("t") / "d.txt"
    path.write_bytes(text.encode())
    whole = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")]
    assert [r["text"] for r in _text_rows(path)] == [b for b in whole if b]


def test_parquet_is_read_in_batches_with_missing_columns_missing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": f"p{i}", "response": f"r{i}"} if i % 3 else {"prompt": f"p{i}", "response": f"r{i}", "extra": "x"} for i in range(2500)
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    got = list(iter_records(path, "data.path"))
    assert got == rows and [r.number for r in got[:3]] == [1, 2, 3]


@pytest.mark.parametrize("trainer", ["native", "hf"])
def test_resume_refuses_data_that_changed_since_the_checkpoint(tiny_config, tmp_path, cache, trainer):
    path = tmp_path / "d.jsonl"
    lines = (EMBEDDED_DATA / "instruct_train.jsonl").read_text().splitlines()[:16]
    path.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(
        data={"path": str(path), "max_length": 64, "max_val_examples": 2},
        trainer={"name": trainer, "options": {"batch_size": 2, "max_steps": 2, "save_steps": 1}},
        evaluate=False,
        generate={"max_new_tokens": 2},
    )
    registry = load_registry()
    orchestrator.run(*orchestrator.prepare(cfg, registry=registry)[:1], registry)
    marker = json.loads((checkpoint_dir(tmp_path / "run", 2) / MARKER).read_text())
    assert marker["data_position"]["examples_seen"] == 4
    path.write_text("\n".join(lines[:-1] + [lines[0]]) + "\n")  # one row replaced
    with pytest.raises(ConfigError, match=r"--resume: the training data differ"):
        orchestrator.run(*orchestrator.prepare(cfg, registry=registry)[:1], registry, resume=True)

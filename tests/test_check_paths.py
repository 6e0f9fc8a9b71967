"""`qpeft run CFG --check` validates every file the config names without loading a weight or
tokenizing: a missing or unreadable data file, a bad row, a missing or broken model folder fail
with the one line a real run would print (exit 2), in seconds rather than 11–40 s into the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from qpeft.data.records import SUFFIXES
from qpeft.errors import ConfigError
from qpeft.preflight import CHECK_ROWS, check_data

ROWS = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(20)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check(tmp_path, **config):
    """`qpeft run CFG --check` in a subprocess (stdout and stderr apart, as a user sees them)."""
    cfg = {"quantizer": "none", "peft": "lora", "trainer": "hf", "model": {"device": "cpu"}, "output_dir": str(tmp_path / "run")}
    for key, value in config.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qpeft", "run", str(path), "--check"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    return proc, time.perf_counter() - t0


def _refused(proc, key: str, *words: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "config ok" not in proc.stdout
    return lines[0]


def _bad_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", ROWS[:5])
    with path.open("a") as f:
        f.write('{"prompt": "q", "response": \n')
    return str(path)


def _fifo(tmp_path):
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return str(path)


def _chat_without_assistant(tmp_path):
    return str(_write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]))


CASES = {
    "missing data file": (lambda t: str(t / "nope.jsonl"), "data.path", ("data file not found", "nope.jsonl")),
    "malformed JSONL row": (_bad_jsonl, "data.path", ("row 6", "not valid JSON")),
    "unsupported suffix": (lambda t: str(_write_jsonl(t / "train.tsv", ROWS)), "data.path", ("unsupported file type '.tsv'",)),
    "FIFO as data": (_fifo, "data.path", ("not a regular file",)),
    "row the run refuses": (_chat_without_assistant, "data.path", ("row 1", "no assistant turn")),
    "one record, nothing to hold out": (lambda t: str(_write_jsonl(t / "one.jsonl", ROWS[:1])), "data.path", ("at least 2 records",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_refuses_bad_data_files(tmp_path, case):
    make, key, words = CASES[case]
    proc, seconds = _check(tmp_path, data__path=make(tmp_path))
    _refused(proc, key, *words)
    assert seconds < 30, seconds
    assert not (tmp_path / "run").exists()


def test_check_refuses_a_bad_validation_file(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    proc, _ = _check(tmp_path, data__path=str(train), data__val_path=str(tmp_path / "val.jsonl"))
    _refused(proc, "data.val_path", "data file not found")
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": "only text"}])  # not the training file's format
    proc, _ = _check(tmp_path, data__path=str(train), data__val_path=str(val))
    _refused(proc, "data.val_path", "row 1", "no usable 'prompt'")


def test_check_refuses_missing_and_broken_model_folders(tmp_path, tiny_llama_path):
    proc, _ = _check(tmp_path, model={"name_or_path": str(tmp_path / "no-such-model"), "device": "cpu"})
    _refused(proc, "model.name_or_path", "model folder not found")
    proc, _ = _check(tmp_path, model={"name_or_path": "./relative-missing", "device": "cpu"})
    _refused(proc, "model.name_or_path", "model folder not found")
    # A hub id that is not in the local cache while downloads are off (the default).
    proc, _ = _check(tmp_path, model={"name_or_path": "no-such-org/no-such-model", "device": "cpu"})
    _refused(proc, "model.name_or_path", "QPEFT_ALLOW_HUB=1")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_path, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc, _ = _check(tmp_path, model={"name_or_path": str(broken), "device": "cpu"})
    assert proc.returncode == 2 and "truncated or corrupt" in proc.stderr, proc.stderr

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", weights.name):
        shutil.copy(os.path.join(tiny_llama_path, f), no_tokenizer / f)
    proc, _ = _check(tmp_path, model={"name_or_path": str(no_tokenizer), "device": "cpu"})
    assert proc.returncode == 2 and "has no tokenizer" in proc.stderr, proc.stderr


def test_check_accepts_good_files_and_says_what_it_read(tmp_path, tiny_llama_path):
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    proc, seconds = _check(tmp_path, data__path=str(train), model={"name_or_path": tiny_llama_path, "device": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert "config ok" in proc.stdout
    assert f"{train}: all 20 records checked (prompt_response)" in proc.stdout, proc.stdout
    assert "generate.prompt is the quickstart's" in proc.stdout  # item 7: own data, default prompt
    assert not (tmp_path / "run").exists()
    assert seconds < 30


def test_check_reads_a_bounded_number_of_rows(tmp_path):
    """A bad row past the first CHECK_ROWS rows is the run's to report (naming the row):
    `--check` reads a bounded prefix of each file, whatever its size."""
    from qpeft.config import DataConfig

    path = _write_jsonl(tmp_path / "train.jsonl", ROWS[:6])
    with path.open("a") as f:
        f.write("not json\n")
    cfg = DataConfig(path=str(path))
    notes = check_data(cfg, max_rows=5)
    assert notes == [f"{path}: the first 5 records checked (prompt_response)"]
    with pytest.raises(ConfigError, match="row 7 is not valid JSON"):
        check_data(cfg, max_rows=10)
    assert CHECK_ROWS >= 1000 and ".jsonl" in SUFFIXES

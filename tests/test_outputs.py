"""Outputs: never lose or mix a user's files.

One ``qpeft run`` per output folder at a time; temporaries of a live writer are never
cleaned up (whatever its PID says); ``output_dir`` never overlaps the run's inputs and never
replaces files qpeft did not write; ``~`` and ``$VARS`` mean one path for every consumer;
``qpeft merge --force`` replaces only a merge output of qpeft. Refusals are one line, exit
status 2, before any weight is loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_bad_files
from test_bad_files import clone, write_config

from qpeft.config import load_config
from qpeft.io import atomic_dir, atomic_write_text

qpeft = test_bad_files.qpeft  # the CLI fixture: one error line, no traceback

HOLD_LOCK = r"""
import sys, time
from pathlib import Path
from qpeft.io import folder_lock
with folder_lock(sys.argv[1], "qpeft run"):
    Path(sys.argv[2]).write_text("held")
    time.sleep(600)
"""

HOLD_TEMP = r"""
import sys, time
from pathlib import Path
from qpeft.io import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "a.txt").write_text("live writer")
    Path(sys.argv[2]).write_text(str(tmp))
    time.sleep(600)
"""


def _start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen, mark: Path) -> str:
    deadline = time.monotonic() + 60
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the helper process did not start"
        time.sleep(0.05)
    return mark.read_text()


def _stop(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


# ---------------------------------------------------------------------------- one writer per folder


def test_second_run_into_a_locked_output_dir_fails_at_once(qpeft, tiny_llama_path, tmp_path):
    out = tmp_path / "out"
    holder = _start(HOLD_LOCK, str(out), str(tmp_path / "mark"))
    try:
        _wait(holder, tmp_path / "mark")
        result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", tiny_llama_path, out))
        assert result.exit_code == 2, result.output[-2000:]
        assert str(out) in line and f"pid {holder.pid}" in line and "qpeft run" in line, line
        assert watch.loaded == 0
        assert not (out / "adapter").exists() and not (out / "resolved_config.yaml").exists()
    finally:
        _stop(holder)
    # the holder was killed: its lock went with it, and the next run takes the folder
    result, line, _ = qpeft("run", write_config(tmp_path / "c.yaml", tiny_llama_path, out))
    assert result.exit_code == 0, result.output[-2000:]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "lock or temp files left behind"


def test_cleanup_never_removes_a_live_writers_temp_whatever_its_pid(tmp_path):
    """A writer in another PID namespace (a container) or on another machine sharing the
    file system has a PID that looks dead here: its temporary must survive the next write."""
    target = tmp_path / "adapter"
    writer = _start(HOLD_TEMP, str(target), str(tmp_path / "mark"))
    try:
        tmp = Path(_wait(writer, tmp_path / "mark"))
        elsewhere = tmp.with_name(f".adapter.qpeft-{2**31 - 7}-x.tmp")  # a PID no process here has
        os.rename(tmp, elsewhere)  # the writer's lock stays with the folder
        atomic_write_text(tmp_path / "adapter.json", "x")  # other targets: untouched anyway
        with atomic_dir(target) as new:
            (new / "a.txt").write_text("second writer")
        assert (elsewhere / "a.txt").read_text() == "live writer", "a live writer's temporary folder was removed"
    finally:
        _stop(writer)
    with atomic_dir(target) as new:  # now its writer is dead: cleaned up
        (new / "a.txt").write_text("third")
    assert not elsewhere.exists()


# ---------------------------------------------------------------------------- overlap and foreign files


def _data(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"example number {i} of a small file"}) + "\n" for i in range(12)))
    return str(path)


@pytest.mark.parametrize("case", ["model-folder", "inside-model-folder", "data-in-checkpoints", "data-is-summary"])
def test_output_dir_overlapping_an_input_is_refused(qpeft, tiny_llama_path, tmp_path, case):
    model = clone(tiny_llama_path, tmp_path / "model")
    out = tmp_path / "out"
    data = {"path": "embedded:instruct"}
    if case == "model-folder":
        out = model
    elif case == "inside-model-folder":
        out = model / "runs"
    elif case == "data-in-checkpoints":
        data = {"path": _data(out / "checkpoints" / "train.jsonl")}
    else:
        data = {"path": _data(out / "summary.json")}
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", str(model), out, data=data))
    assert result.exit_code == 2, result.output[-2000:]
    assert line.startswith("error: output_dir: ") and str(out) in line, line
    assert watch.loaded == 0
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize("name", ["adapter", "summary.json", "resolved_config.yaml"])
def test_files_qpeft_did_not_write_are_not_replaced(qpeft, tiny_llama_path, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / name
    if name == "adapter":
        theirs.mkdir()
        (theirs / "adapter_model.safetensors").write_bytes(b"someone else's adapter")
        (theirs / "adapter_config.json").write_text("{}")
    else:
        theirs.write_text('{"mine": true}\n')
    snapshot = sorted((str(p), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", tiny_llama_path, out))
    assert result.exit_code == 2, result.output[-2000:]
    assert f"{theirs} " in line and "did not write it" in line, line
    assert watch.loaded == 0
    assert sorted((str(p), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == snapshot


def test_tilde_and_variables_mean_one_path_everywhere(qpeft, tiny_llama_path, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("QPEFT_TEST_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    base = {"quantizer": "none", "peft": "lora", "trainer": "hf"}
    assert load_config({**base, "output_dir": "~/r"}).output_dir == str(home / "r")
    assert load_config({**base, "output_dir": "${QPEFT_TEST_RUNS}/a"}).output_dir == str(tmp_path / "runs" / "a")
    assert load_config({**base, "data": {"path": "~/d.jsonl"}}).data.path == str(home / "d.jsonl")
    for bad, why in (("~", "your home folder"), ("/", "the root folder"), ("$QPEFT_TEST_UNSET_VAR/x", "is not set")):
        result, line, watch = qpeft("run", write_config(tmp_path / "bad.yaml", tiny_llama_path, Path(bad)))
        assert result.exit_code == 2 and line.startswith("error: output_dir: ") and why in line, line
    # a real run (with an hf checkpoint) writes everything under $HOME, nothing under ./~
    trainer = {"name": "hf", "options": {"max_steps": 2, "batch_size": 2, "save_steps": 1}}
    result, _, _ = qpeft("run", write_config(tmp_path / "c.yaml", tiny_llama_path, Path("~/run"), trainer=trainer))
    assert result.exit_code == 0, result.output[-2000:]
    assert not (tmp_path / "~").exists()
    assert (home / "run" / "summary.json").is_file() and (home / "run" / "adapter" / "qpeft.json").is_file()
    assert sorted(p.name for p in (home / "run" / "checkpoints").iterdir())[-1] == "checkpoint-2"
    result, _, _ = qpeft("run", write_config(tmp_path / "c.yaml", tiny_llama_path, Path("~/run"), trainer=trainer), "--resume")
    said = "".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 0 and "resumingfrom" in said and "checkpoint-2" in said, result.output[-2000:]


# ---------------------------------------------------------------------------- merge --force


@pytest.fixture(scope="module")
def trained(tiny_llama_path, tmp_path_factory):
    from typer.testing import CliRunner

    from qpeft import cli

    root = tmp_path_factory.mktemp("merge-force")
    result = CliRunner().invoke(cli.app, ["run", write_config(root / "c.yaml", tiny_llama_path, root / "run")])
    assert result.exit_code == 0, result.output[-2000:]
    return root, root / "run" / "adapter"


@pytest.mark.parametrize("case", ["base-model", "adapter", "folder-above-adapter", "regular-file", "device-node", "foreign-folder"])
def test_merge_force_replaces_only_a_merge_output(qpeft, trained, tiny_llama_path, tmp_path, case):
    root, adapter = trained
    model = clone(tiny_llama_path, tmp_path / "model")
    out = {
        "base-model": model,
        "adapter": adapter,
        "folder-above-adapter": adapter.parent,
        "regular-file": tmp_path / "notes.txt",
        "device-node": Path("/dev/null"),
        "foreign-folder": tmp_path / "mine",
    }[case]
    if case == "regular-file":
        out.write_text("my notes")
    if case == "foreign-folder":
        out.mkdir()
        (out / "config.json").write_text("{}")
    before = sorted((str(p), p.read_bytes()) for p in [*model.rglob("*"), *adapter.rglob("*"), out] if p.is_file())
    args = ["merge", "--adapter", str(adapter), "--out", str(out), "--force", "--set", f"model.name_or_path={model}"]
    result, line, watch = qpeft(*args)
    assert result.exit_code == 2, result.output[-2000:]
    assert str(out) in line and ("overlaps" in line or "refusing to replace it" in line), line
    assert watch.loaded == 0
    assert out.exists() and sorted((str(p), p.read_bytes()) for p in [*model.rglob("*"), *adapter.rglob("*"), out] if p.is_file()) == before


def test_merge_force_replaces_its_own_output(qpeft, trained, tmp_path):
    _, adapter = trained
    out = tmp_path / "merged"
    for _ in range(2):
        result, line, _ = qpeft("merge", "--adapter", str(adapter), "--out", str(out), "--force")
        assert result.exit_code == 0, result.output[-2000:]
        assert (out / "qpeft_merge.json").is_file()

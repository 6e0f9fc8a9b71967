"""Fault injection: ``kill -9`` during training and during the adapter save, a
full disk during the save, and kills at every step of qpeft's atomic writer.

Afterwards every earlier output must be intact (byte for byte), nothing half-written may be
where a later run or ``qpeft generate`` reads, and a later run must work (and clean up what
the killed one left under hidden temporary names). Kills are real ``SIGKILL``s of real
processes; the process under test parks itself at the chosen point (a lifecycle hook, or a
wrapper around qpeft's own save) and the test kills it there. Disk full is real: the kernel
answers ENOSPC (a file that is ``/dev/full``) or EFBIG (``RLIMIT_FSIZE``), or, in-process,
``os.write`` raises ENOSPC after writing part of the data.

Elsewhere: kill -9 while a training checkpoint is written and ``--resume`` afterwards
(tests/test_packing_resume.py), kill -9 and out-of-memory in a ``qpeft bench`` cell
(tests/test_bench_faults.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers.utils import logging as transformers_logging

from qpeft.io import WriteError, atomic_dir, atomic_write_text

# Let transformers attach its log handler to the real stderr now: set up inside a CliRunner
# invocation it would keep that invocation's (later closed) stream.
transformers_logging.get_logger("transformers")
REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(root: Path) -> list[str]:
    """Hidden leftovers, less the lock file of a killed run (the kernel released its lock;
    the next run takes it and removes it)."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".qpeft.lock")


def start(code: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def kill_when(proc: subprocess.Popen, mark: Path, timeout: float) -> str:
    """Wait until ``proc`` writes ``mark`` (it then parks itself), then SIGKILL it."""
    deadline = time.monotonic() + timeout
    while not mark.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before the fault point:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("fault point not reached in time")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return mark.read_text()


# ---------------------------------------------------------------------------- the atomic writer, in small processes

WRITER = r"""
import os, sys, time
from pathlib import Path
import qpeft.io as io

target, point, mark = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

def park(tag):
    mark.write_text(tag)
    while True:
        time.sleep(1)

class Os:  # qpeft.io's view of the os module, with a fault point on one call
    def __getattr__(self, name):
        return getattr(os, name)
    def write(self, fd, data):
        if point == "file-mid-write":
            os.write(fd, bytes(data[: len(data) // 2]))
            park(point)
        return os.write(fd, data)
    def replace(self, src, dst):
        os.replace(src, dst)
        if point == "dir-moved-aside" and ".qpeft-old-" in str(dst):
            park(point)

io.os = Os()
if point == "dir-moved-aside":
    io._exchange = lambda a, b: False  # as where renameat2 is missing (macOS, old kernels)
if point == "dir-before-swap":  # the new folder is complete and flushed; the swap is next
    io._exchange = lambda a, b: park(point)
if point == "dir-after-swap":
    real = io._exchange
    def exchange(a, b):
        assert real(a, b)
        park(point)
    io._exchange = exchange

if point == "file-mid-write":
    io.atomic_write_text(target, "new " * 10000)
else:
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new a")
        if point == "dir-body":
            (tmp / "b.txt").write_text("new b, half")
            park(point)
        (tmp / "b.txt").write_text("new b")
"""

DIR_POINTS = ["dir-body", "dir-before-swap", "dir-after-swap", "dir-moved-aside"]


@pytest.mark.parametrize("point", DIR_POINTS + ["file-mid-write"])
def test_kill_at_each_step_of_the_atomic_writer(tmp_path, point):
    target = tmp_path / ("summary.json" if point.startswith("file") else "adapter")
    if point.startswith("file"):
        atomic_write_text(target, "old")
    else:
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("old a")
            (tmp / "b.txt").write_text("old b")
    before = target.read_text() if target.is_file() else snapshot(target)

    mark = tmp_path / "mark"
    assert kill_when(start(WRITER, str(target), point, str(mark), cwd=tmp_path), mark, 60) == point
    leftovers = [n for n in hidden(tmp_path)]
    assert leftovers, "the killed writer left nothing behind: the fault point was not inside the write"

    if point == "dir-after-swap":  # the new folder was complete and in place; the old one awaits deletion
        assert snapshot(target) == {"a.txt": hashlib.sha256(b"new a").hexdigest(), "b.txt": hashlib.sha256(b"new b").hexdigest()}
    elif point == "dir-moved-aside":  # only without renameat2: the old folder is aside until the next write
        assert not target.exists()
    else:  # the old output, byte for byte
        assert (target.read_text() if target.is_file() else snapshot(target)) == before

    # The next write of the same target puts back / cleans up whatever the dead writer left.
    if point.startswith("file"):
        atomic_write_text(target, "next")
        assert target.read_text() == "next"
    else:
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("next")
        assert snapshot(target) == {"a.txt": hashlib.sha256(b"next").hexdigest()}
    assert hidden(tmp_path) == [], hidden(tmp_path)


def test_moved_aside_folder_is_restored_before_a_refused_write(tmp_path):
    """Fallback path: the old folder a killed writer moved aside comes back at the next write,
    even if that write then fails."""
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    mark = tmp_path / "mark"
    kill_when(start(WRITER, str(target), "dir-moved-aside", str(mark), cwd=tmp_path), mark, 60)
    assert not target.exists()
    with pytest.raises(RuntimeError), atomic_dir(target):
        raise RuntimeError("the next writer fails too")
    assert (target / "a.txt").read_text() == "old" and hidden(tmp_path) == []


# ---------------------------------------------------------------------------- disk full


def test_enospc_in_atomic_write_text(tmp_path, monkeypatch):
    """os.write writes part of the text, then the disk is full."""
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    real_write = os.write

    def write(fd, data):
        real_write(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(WriteError) as exc:
        atomic_write_text(target, "x" * 100_000)
    monkeypatch.undo()
    msg = str(exc.value)
    assert (
        msg
        == f"could not write {target}: No space left on device (errno 28); the previous {target} is unchanged; free some space and run again"
    )
    assert target.read_text() == "old" and hidden(tmp_path) == []


def test_enospc_inside_atomic_dir_names_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        atomic_write_text(tmp / "qpeft.json", "old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(
        WriteError, match=rf"could not write {target}: No space left on device \(errno 28\); the previous {target} is unchanged"
    ):
        with atomic_dir(target) as tmp:
            atomic_write_text(tmp / "qpeft.json", "new")
    monkeypatch.undo()
    assert (target / "qpeft.json").read_text() == "old" and hidden(tmp_path) == []


FSIZE = r"""
import resource, signal, sys
import numpy as np
from safetensors.numpy import save_file
from qpeft.io import atomic_dir
from qpeft.errors import QpeftError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
try:
    with atomic_dir(sys.argv[1]) as tmp:
        save_file({"w": np.zeros(1_000_000, dtype=np.float32)}, str(tmp / "adapter_model.safetensors"))
except QpeftError as exc:
    print(exc)
"""


def test_file_size_limit_in_the_rust_safetensors_writer(tmp_path):
    """The kernel refuses the write (EFBIG) inside safetensors' Rust code, not Python's."""
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", FSIZE, str(target)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.strip()
        == f"could not write {target}: File too large (errno 27); the previous {target} is unchanged; free some space and run again"
    )
    assert (target / "adapter_model.safetensors").read_bytes() == b"old" and hidden(tmp_path) == []


# ---------------------------------------------------------------------------- kill -9 and disk full in a real `qpeft run`

DRIVER = r"""
import os, signal, sys, time
from pathlib import Path

def audit(event, args):  # qpeft needs no network for a local model
    if event in ("socket.connect", "socket.getaddrinfo"):
        sys.stderr.write(f"NETWORK {event}\n")
        raise RuntimeError("network access at run time")
sys.addaudithook(audit)

fault, mark = os.environ.get("QPEFT_TEST_FAULT", ""), os.environ.get("QPEFT_TEST_MARK", "")

def park(tag):
    Path(mark).write_text(tag)
    while True:
        time.sleep(1)

from qpeft import cli, hookimpl
from qpeft.plugins import peft_lora

if fault == "train":
    class ParkAtStep:
        @hookimpl
        def qpeft_on_step_end(self, step, max_steps, logs, ctx):
            if step >= 2:
                park(f"training step {step} of {max_steps}")
    registry = cli._registry
    cli._registry = lambda extra=(): registry([*extra, ParkAtStep()])
elif fault == "save":
    save = peft_lora.Lora.save
    def parking_save(self, model, out_dir):
        save(self, model, out_dir)
        park("adapter written into its temporary folder")
    peft_lora.Lora.save = parking_save

sys.argv = ["qpeft", *sys.argv[1:]]
cli.main()
"""


def write_run_config(tmp_path: Path, model: str, out: Path, steps: int) -> Path:
    cfg = {
        "model": {"name_or_path": model, "device": "cpu"},
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4}},
        "trainer": {"name": "hf", "options": {"max_steps": steps, "batch_size": 2, "lr": 1e-2, "scheduler": "constant"}},
        "data": {"max_train_examples": 8, "max_val_examples": 2, "max_length": 64},
        "output_dir": str(out),
        "evaluate": False,
        "generate": {"max_new_tokens": 2},
    }
    path = tmp_path / f"run-{steps}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def run_to_end(config: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", DRIVER, "run", str(config)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert "NETWORK" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def earlier_run(tiny_llama_path, tmp_path_factory):
    """A complete ``qpeft run`` (3 steps) whose outputs the faults below must not damage."""
    root = tmp_path_factory.mktemp("faults")
    out = root / "out"
    run_to_end(write_run_config(root, tiny_llama_path, out, 3), root)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and hidden(out) == []
    return root, out


def _earlier(out: Path) -> dict:
    return {**{f"adapter/{k}": v for k, v in snapshot(out / "adapter").items()}, "summary.json": snapshot(out)["summary.json"]}


def _adapter_still_loads(out: Path, registry) -> None:
    from qpeft import orchestrator

    result = orchestrator.generate(str(out / "adapter"), "Hi", registry, ["model.device=cpu"], max_new_tokens=2)
    assert result["new_tokens"] > 0


@pytest.fixture(scope="module")
def registry():
    from qpeft.registry import load_registry

    return load_registry()


def test_kill_during_training_keeps_earlier_outputs(earlier_run, tiny_llama_path, registry):
    root, out = earlier_run
    before = _earlier(out)
    mark = root / "mark-train"
    proc = start(
        DRIVER,
        "run",
        str(write_run_config(root, tiny_llama_path, out, 200)),
        env={"QPEFT_TEST_FAULT": "train", "QPEFT_TEST_MARK": str(mark)},
        cwd=root,
    )
    assert kill_when(proc, mark, 600).startswith("training step 2 of 200")
    assert _earlier(out) == before
    assert hidden(out) == [], hidden(out)
    # resolved_config.yaml describes the run that was started last (written atomically at its start)
    import yaml

    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["trainer"]["options"]["max_steps"] == 200
    _adapter_still_loads(out, registry)


def test_kill_during_adapter_save_then_a_later_run_works(earlier_run, tiny_llama_path, registry):
    root, out = earlier_run
    before = _earlier(out)
    mark = root / "mark-save"
    config = write_run_config(root, tiny_llama_path, out, 2)
    proc = start(DRIVER, "run", str(config), env={"QPEFT_TEST_FAULT": "save", "QPEFT_TEST_MARK": str(mark)}, cwd=root)
    kill_when(proc, mark, 600)
    assert _earlier(out) == before  # the previous adapter and summary, byte for byte
    left = hidden(out)
    assert len(left) == 1 and left[0].startswith(".adapter.qpeft-") and left[0].endswith(".tmp"), left
    assert (out / left[0] / "adapter_model.safetensors").is_file()  # complete, but never renamed into place
    _adapter_still_loads(out, registry)

    result = cli_run(config)  # the next run replaces the adapter and removes the dead run's temp folder
    assert result.exit_code == 0, result.output[-3000:]
    assert hidden(out) == [], hidden(out)
    assert _earlier(out) != before
    assert json.loads((out / "summary.json").read_text())["train_steps"] == 2
    _adapter_still_loads(out, registry)


def cli_run(config: Path):
    """``qpeft run CONFIG`` in this process (cheaper than a new one when nothing is killed)."""
    from typer.testing import CliRunner

    from qpeft import cli

    return CliRunner().invoke(cli.app, ["run", str(config)])


def test_disk_full_during_adapter_save(earlier_run, tiny_llama_path, monkeypatch):
    from qpeft.plugins import peft_lora

    root, out = earlier_run
    before = _earlier(out)
    save = peft_lora.Lora.save

    def save_on_a_full_disk(self, model, out_dir):
        # The kernel answers ENOSPC to every write of peft's adapter config.
        os.symlink("/dev/full", os.path.join(out_dir, "adapter_config.json"))
        save(self, model, out_dir)

    monkeypatch.setattr(peft_lora.Lora, "save", save_on_a_full_disk)
    result = cli_run(write_run_config(root, tiny_llama_path, out, 1))
    assert result.exit_code == 2, result.output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: could not write {out / 'adapter'}: No space left on device (errno 28); the previous {out / 'adapter'} is unchanged; free some space and run again"
    ], result.stderr[-2000:]
    assert "Traceback" not in result.output
    assert _earlier(out) == before and hidden(out) == []

"""Faults inside ``qpeft bench``: the whole bench process group killed with SIGKILL while a cell
runs, a cell that runs out of memory, and a cell that hangs. Earlier results stay intact, the
interrupted cell runs again on the next invocation, an out-of-memory cell is recorded as such
while the others go on, and a hung cell is stopped at its default timeout."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from qpeft import bench

sys.path.insert(0, str(REPO / "benchmarks"))
import make_random_model  # noqa: E402


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory, embedded_model_path) -> str:
    return make_random_model.build("tiny", tmp_path_factory.mktemp("random") / "tiny", dtype="float32", device="cpu")


def _matrix(tmp_path, model, axes, steps=3):
    base = {
        "model": model,
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4, "alpha": 8}},
        "trainer": {
            "name": "native",
            "options": {"batch_size": 2, "max_steps": steps, "lr": 1e-3, "scheduler": "constant", "loss": "full"},
        },
        "data": {"path": "embedded:text", "max_length": 32, "max_train_examples": 6, "max_val_examples": 2},
        "generate": {"max_new_tokens": 2, "chat_template": False},
    }
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({"name": "faults", "base": base, "axes": axes}, sort_keys=False))
    return str(path)


def _records(out):
    return bench.read_records(out)


def test_kill_9_of_the_bench_during_a_cell_keeps_results_and_resumes(random_tiny, tmp_path):
    matrix = _matrix(tmp_path, random_tiny, {"trainer.options.max_steps": {"short": 2, "long": 400}})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpeft", "bench", matrix, "--out", str(out), "--no-report"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        # wait until the first cell is recorded and the second one is training
        while time.time() < deadline:
            recs = _records(out) if (out / bench.RESULTS_FILE).exists() else []
            if len(recs) == 1 and (out / "cells" / "long" / "run").exists():
                break
            assert proc.poll() is None, "bench ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("the second cell never started")
        time.sleep(3)
        before = (out / bench.RESULTS_FILE).read_bytes()
        os.killpg(proc.pid, signal.SIGKILL)  # the bench and its running cell, at once
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (out / bench.RESULTS_FILE).read_bytes() == before  # the finished cell's record, untouched
    (first,) = _records(out)
    assert first["status"] == "ok"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # The next invocation skips the finished cell and runs the interrupted one (shortened: the
    # override changes its config, so it counts as a new cell with the same place in the matrix).
    counts = bench.run_matrix(matrix, out_dir=out, overrides=["trainer.options.max_steps=2"], only=["*long*"])
    assert counts["ok"] == 1 and counts["failed"] == 0
    assert [r["status"] for r in _records(out)] == ["ok", "ok"]


def test_out_of_memory_cell_is_recorded_and_the_others_go_on(random_tiny, tmp_path):
    # batch 16384 × 32 tokens × 32,000 vocabulary: the float32 logits alone would be 67 GB, more
    # than this machine has, so the allocation fails for real (no memory is actually used up).
    matrix = _matrix(tmp_path, random_tiny, {"trainer.options.batch_size": {"small": 2, "huge": 16384}}, steps=2)
    counts = bench.run_matrix(matrix, out_dir=tmp_path / "out")
    by = {r["cell"]: r for r in _records(tmp_path / "out")}
    assert counts["ok"] == 1 and counts["failed"] == 1, by
    huge = next(r for c, r in by.items() if "huge" in c)
    assert huge["status"] == "failed" and huge["oom"] is True, huge
    small = next(r for c, r in by.items() if "small" in c)
    assert small["status"] == "ok"


def test_sigterm_of_side_by_side_bench_stops_every_running_cell(random_tiny, tmp_path):
    """`qpeft bench --gpus 0,1` stopped by SIGTERM (as `timeout` does) while two cells run at once:
    both cell processes end, neither is recorded (they run next time), no temporary file is left."""
    matrix = _matrix(tmp_path, random_tiny, {"trainer.options.max_steps": {"a": 400, "b": 401}})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpeft", "bench", matrix, "--out", str(out), "--no-report", "--gpus", "0,1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not all((out / "cells" / c / "run").exists() for c in ("a", "b")):
            assert proc.poll() is None, "bench ended before both cells started"
            time.sleep(0.5)
        assert all((out / "cells" / c / "run").exists() for c in ("a", "b")), "the two cells did not run side by side"
        # this test's cells only (processes of other tests may still be running)
        pids = [
            int(p)
            for p in subprocess.run(["pgrep", "-f", f"qpeft.bench {out}/cells/.*cell.json"], capture_output=True, text=True).stdout.split()
        ]
        assert len(pids) >= 2
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    def alive(pid):  # a zombie waiting for this container's init to reap it has ended
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    time.sleep(1)
    assert not [p for p in pids if alive(p)], [(p, Path(f"/proc/{p}/cmdline").read_bytes()[:200]) for p in pids if alive(p)]
    assert not (out / bench.RESULTS_FILE).exists() or _records(out) == []
    assert not [p for p in out.rglob("*.tmp")]


HANG_PLUGIN = """
import sys
import time
from pathlib import Path

from qpeft import hookimpl


@hookimpl
def qpeft_on_step_end(step, max_steps, logs, ctx):
    if Path(ctx.output_dir).parent.name == "hang":  # the cell whose folder is cells/hang/
        print("qpeft-test-hang: hanging at step", step, file=sys.stderr, flush=True)
        time.sleep(3600)
"""


def _installed_plugin(site: Path, name: str, code: str) -> Path:
    """A plugin package as pip installs it (a module and a dist-info naming its entry point)."""
    site.mkdir()
    (site / f"{name}.py").write_text(textwrap.dedent(code))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[qpeft]\n{name} = {name}\n")
    return site


@pytest.mark.slow  # the hung cell waits out its timeout (60 s, the least a default gives)
def test_hung_cell_is_stopped_at_its_default_timeout_and_the_next_cell_runs(random_tiny, tmp_path):
    """No ``timeout_s`` in the matrix. The first cell gets the generous first-cell default and
    finishes; the second hangs in training (an installed lifecycle plugin sleeps in its first
    step) and is stopped at the default the first cell's times give it, recorded as timed out
    with the timeout that applied; the third cell still runs. The plan prints the timeout."""
    matrix = _matrix(tmp_path, random_tiny, {"seed": {"ok": 0, "hang": 1, "next": 2}})
    out = tmp_path / "out"
    site = _installed_plugin(tmp_path / "site", "qpeft_test_hang", HANG_PLUGIN)
    env = {
        **os.environ,
        "COLUMNS": "300",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p),
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "qpeft", "bench", matrix, "--out", str(out), "--no-report"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        start_new_session=True,
    )
    took = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "timeout per cell: 1980 s (default: 1800 s + 3 steps × 60 s, no similar cell measured yet)" in " ".join(output.split())
    by = {r["labels"]["seed"]: r for r in _records(out)}
    assert [by[k]["status"] for k in ("ok", "hang", "next")] == ["ok", "failed", "ok"], by
    assert by["ok"]["timeout_s"] == 1980 and by["ok"]["timeout_basis"].endswith("no similar cell measured yet")
    hung = by["hang"]
    limit = hung["timeout_s"]
    expected = max(
        bench.TIMEOUT_MIN_S,
        math.ceil(bench.TIMEOUT_FACTOR * by["ok"]["wall_seconds"]),  # ok's fixed part + its steps, same budget
    )
    assert abs(limit - expected) <= bench.TIMEOUT_FACTOR * 0.2 + 1, (limit, expected)
    assert hung["timeout_basis"].startswith("default: 4 × (") and "as measured on seed=ok" in hung["timeout_basis"]
    assert hung["error"].startswith(f"timed out after {limit:g} s (default: 4 × ("), hung["error"]
    assert "timeout_s in the matrix sets another" in hung["error"]
    assert limit <= hung["wall_seconds"] < limit + 20, hung
    assert "qpeft-test-hang: hanging at step 1" in (out / hung["log"]).read_text()
    assert by["next"]["timeout_basis"].startswith("default: 4 × (")
    assert not subprocess.run(["pgrep", "-f", f"qpeft.bench {out}/cells/"], capture_output=True).stdout  # nothing left running
    print(
        f"cells: ok {by['ok']['wall_seconds']} s, hang stopped at {hung['wall_seconds']} s (timeout {limit} s), next {by['next']['wall_seconds']} s; {took:.0f} s in all"
    )

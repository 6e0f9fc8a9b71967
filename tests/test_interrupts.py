"""Ctrl-C: the CLI says what an interrupt left behind, and a run's adapter and summary are
written as one result (an interrupt never leaves a new adapter beside an older summary).

``test_ctrl_c_at_every_stage`` starts ``python -m qpeft run`` in a session of its own, waits for
the line that marks a stage, and sends SIGINT to the whole process group (as a terminal's Ctrl-C
does, so helper processes such as a tokenizing pool get it too). The stage the signal lands in is
made long enough to be hit (a big data file, a big validation set, many steps, a long generation).
The lines keyed on are ``STAGE_LINES``; keep them (or these patterns) when changing the output."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qpeft import orchestrator
from qpeft.registry import load_registry

INTERRUPTED = "interrupted: finished outputs are intact; partial ones were not written"
#: Seconds from the SIGINT to the exit of ``qpeft run``, whatever stage it came in.
EXIT_BOUND_S = 10


def test_ctrl_c_prints_what_it_left_and_exits_130(tiny_config, tmp_path):
    cfg = tiny_config(quantizer="none", trainer={"name": "native", "options": {"batch_size": 2, "max_steps": 10_000}}, evaluate=False)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpeft", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        if "trainable parameters" in line or time.monotonic() > deadline:
            break
    time.sleep(2)  # inside the training loop
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode == 130, out[-2000:]
    assert INTERRUPTED in out, out[-2000:]
    assert "Traceback" not in out
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_interrupt_during_the_save_leaves_adapter_and_summary_of_one_run(tiny_config, tmp_path, monkeypatch):
    registry = load_registry()
    cfg = tiny_config(quantizer="none", evaluate=False)
    first = orchestrator.run(*orchestrator.prepare(cfg, registry=registry))
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text())["stage"] == "complete"

    lora = registry.get("peft", "lora")
    real_save = type(lora).save

    def save_then_ctrl_c(self, model, directory):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the adapter is being written
        return real_save(self, model, directory)

    monkeypatch.setattr(type(lora), "save", save_then_ctrl_c)
    cfg["trainer"]["options"]["max_steps"] = 3  # a different result than the first run
    with pytest.raises(KeyboardInterrupt):
        orchestrator.run(*orchestrator.prepare(cfg, registry=registry))
    summary = json.loads((out / "summary.json").read_text())
    meta = json.loads((out / "adapter" / "qpeft.json").read_text())
    assert summary["stage"] == "saved" and summary["train_steps"] == 3 != first["train_steps"]
    assert meta["run_id"] == summary["run_id"] and meta["training"]["train_loss"] == summary["train_loss"], "adapter and summary differ"


#: Python run with ``python -c``: Ctrl-C (a KeyboardInterrupt) at a point before any command runs.
BEFORE_THE_COMMAND = {
    # while ``python -m qpeft`` imports its command line (typer loading)
    "imports": """
        import runpy, sys

        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == "typer":
                    raise KeyboardInterrupt

        sys.meta_path.insert(0, CtrlC())
        sys.argv = ["qpeft", "run", "config.yaml"]
        runpy.run_module("qpeft", run_name="__main__", alter_sys=True)
    """,
    # while typer parses the arguments (it turns a KeyboardInterrupt into a silent exit 130)
    "parsing": """
        import sys

        import typer.core

        from qpeft import cli

        def ctrl_c(*args, **kwargs):
            raise KeyboardInterrupt

        typer.core.TyperGroup.parse_args = ctrl_c
        sys.argv = ["qpeft", "run", "config.yaml"]
        cli.main()
    """,
}


@pytest.mark.parametrize("where", list(BEFORE_THE_COMMAND))
def test_ctrl_c_before_the_command_runs(where, tmp_path):
    """Ctrl-C before qpeft's command runs (its modules importing, typer parsing the arguments):
    the "interrupted" line and exit status 130, no traceback."""
    code = textwrap.dedent(BEFORE_THE_COMMAND[where])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert INTERRUPTED in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------------------- Ctrl-C at every stage

#: The output lines the stages are recognised by (loosely, so that wording can change). The
#: signal is sent when the line appears, i.e. at the start of the stage that follows it.
STAGE_LINES = {
    "run_start": r"\bmodel\b.*\bon (cpu|cuda)\b",  # "model PATH on cpu (float32); quantizer …": tokenizer loading next
    "tokenizer": r"\bpad token\b|\btokeniz",  # "pad token: reused …": data reading and tokenizing next
    "data": r"\bdata\b.*\b\d[\d,]* train(ing)?\b",  # "data PATH (text): N train / M val examples": base loading next
    "base": r"\bloaded base\b|\bbase loaded\b",  # "loaded base in 0.1s, …": perplexity before next
    "first_step": r"^qpeft-test-hook: step 1 logged",  # printed by this test's lifecycle plugin
    "trained": r"\btrained \d+ steps\b",  # perplexity after next
    "perplexity_after": r"\bperplexity after\b",  # saving next
    "saved": r"\bsaved adapter\b",  # reload on a fresh base, then generation
    "generating": r"\bgenerating up to\b",  # after the reload check: generation next
}
#: Lines that end each long stage: the signal must have come before them.
END_LINES = {
    "data": STAGE_LINES["data"],
    "perplexity_before": r"\bperplexity before\b",
    "training": STAGE_LINES["trained"],
    "perplexity_after": STAGE_LINES["perplexity_after"],
    "generate": r"\bgeneration\b",  # the summary table's row, printed after the generation
}

# stage: (line to wait for, seconds to wait after it, what makes the stage long, end line it must precede)
STAGES = {
    "tokenizer_loading": ("run_start", 0.0, "data", None),
    "data_tokenizing": ("tokenizer", 0.3, "data", "data"),
    "base_loading": ("data", 0.0, "eval", None),
    "perplexity_before": ("base", 0.3, "eval", "perplexity_before"),
    "training": ("first_step", 0.3, "steps", "training"),
    "perplexity_after": ("trained", 0.3, "eval", "perplexity_after"),
    "saving": ("perplexity_after", 0.0, "generate", None),
    "reload": ("saved", 0.0, "generate", None),
    "generate": ("generating", 0.5, "generate", "generate"),
}

HOOK_PLUGIN = """
import sys

from qpeft import hookimpl


@hookimpl
def qpeft_on_step_end(step, max_steps, logs, ctx):
    if step == 1:
        print("qpeft-test-hook: step 1 logged", file=sys.stderr, flush=True)
"""


def _words(rnd: random.Random, n: int) -> str:
    vocab = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jolly buyer".split()
    return " ".join(rnd.choice(vocab) for _ in range(n))


def _data_file(path: Path, rows: int) -> Path:
    """A JSONL text file; its rows differ from every other run's (no tokenized cache applies)."""
    rnd = random.Random()
    nonce = f"{os.getpid()}-{time.time_ns()}"
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"text": f"{_words(rnd, 30)} {nonce} {i}"}) + "\n")
    return path


def _plugin_site(root: Path) -> Path:
    """An installed lifecycle plugin (a module and a dist-info with its entry point, as pip leaves
    it) that prints a line when the first training step is logged."""
    site = root / "site"
    site.mkdir()
    (site / "qpeft_test_hook.py").write_text(textwrap.dedent(HOOK_PLUGIN))
    info = site / "qpeft_test_hook-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qpeft-test-hook\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qpeft]\nqpeft_test_hook = qpeft_test_hook\n")
    return site


def _stage_config(model: str, tmp_path: Path, long: str) -> dict:
    rows = 30_000 if long == "data" else 400
    val_rows = 160 if long == "eval" else 8  # an evaluation of ~1 s even on a 16-core host
    return {
        # On the CPU everywhere: the stages are sized to last long enough there (on a GPU the
        # evaluation stage ends before the signal arrives); Ctrl-C handling is the CPU process's.
        "model": {"name_or_path": model, "device": "cpu", "dtype": "float32"},
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4, "alpha": 8}},
        "trainer": {
            "name": "native",
            "options": {"batch_size": 2, "max_steps": 100_000 if long == "steps" else 2, "lr": 1e-3, "scheduler": "constant"},
        },
        "data": {
            "path": str(_data_file(tmp_path / "data.jsonl", rows)),
            "max_length": 32,
            "val_fraction": min(0.5, val_rows / rows + 0.001),
            "max_val_examples": val_rows,
            "max_train_examples": None if long == "data" else 64,
        },
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "generate": {"max_new_tokens": 1500 if long == "generate" else 4, "chat_template": False},
    }


def _wait_for_children(pid: int, seconds: float) -> None:
    """Wait until ``pid`` has child processes (Linux), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                return
        except OSError:
            return
        time.sleep(0.02)


def _snapshot(out: Path) -> dict[str, bytes]:
    """adapter/ and summary.json of an output folder, file by file."""
    files = [out / "summary.json", *sorted((out / "adapter").rglob("*"))]
    return {str(p.relative_to(out)): p.read_bytes() for p in files if p.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tiny_llama_path, tmp_path_factory) -> Path:
    """The outputs of a complete earlier run, copied into each test's output folder."""
    root = tmp_path_factory.mktemp("earlier")
    cfg = _stage_config(tiny_llama_path, root, "none")
    orchestrator.run(*orchestrator.prepare(cfg, registry=load_registry()))
    return Path(cfg["output_dir"])


@pytest.mark.slow  # a process each (~10 s on 2 cores, most of it imports)
@pytest.mark.parametrize("stage", list(STAGES))
def test_ctrl_c_at_every_stage(stage, tiny_llama_path, earlier_run, tmp_path):
    """SIGINT to ``qpeft run``'s process group at STAGE: exit status 130 within EXIT_BOUND_S,
    the "interrupted" line, no traceback, and the output folder holds the earlier run's adapter
    and summary untouched or this run's pair (one run_id), nothing half-written."""
    key, delay, long, must_precede = STAGES[stage]
    cfg = _stage_config(tiny_llama_path, tmp_path, long)
    out = Path(cfg["output_dir"])
    shutil.copytree(earlier_run, out)
    before = _snapshot(out)
    old_id = json.loads(before["summary.json"])["run_id"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    site = _plugin_site(tmp_path)
    env = {
        **os.environ,
        "COLUMNS": "200",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p),
        "QPEFT_CACHE": str(tmp_path / "cache"),  # this run's token store is not left in the user's cache
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpeft", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group: the signal reaches it and its helpers only
    )
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for raw in iter(proc.stdout.readline, b""):
            lines.put(raw.decode("utf-8", "replace"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    pattern = re.compile(STAGE_LINES[key])
    try:
        deadline = time.monotonic() + 180
        while True:
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, f"qpeft run ended before {key!r}:\n" + "".join(seen)[-3000:]
            seen.append(line)
            if pattern.search(line.strip()):
                break
        time.sleep(delay)
        if stage == "data_tokenizing":  # a tokenizing pool: when its workers have just started
            _wait_for_children(proc.pid, 5.0)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole foreground group
        rc = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    text = "".join(seen)
    tail = text[-3000:]
    assert rc == 130, tail
    assert INTERRUPTED in text, tail
    assert "Traceback" not in text, tail
    assert took < EXIT_BOUND_S, f"exited {took:.1f} s after the SIGINT\n{tail}"
    cut = next(i for i, l in enumerate(seen) if pattern.search(l.strip()))
    if must_precede is not None:  # the signal came inside the (long) stage, not after it
        assert not any(re.search(END_LINES[must_precede], l) for l in seen[cut + 1 :]), f"the SIGINT came after {stage}:\n{tail}"

    # The output folder: the earlier run's pair untouched, or this run's (one run_id).
    now = _snapshot(out)
    if now != before:
        summary = json.loads(now["summary.json"])
        meta = json.loads(now["adapter/qpeft.json"])
        assert summary["run_id"] == meta["run_id"] != old_id, "adapter and summary of different runs"
        assert summary["stage"] in ("saved", "complete")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".qpeft-")], list(out.iterdir())
    assert not (out / ".qpeft.lock").exists()
    print(f"{stage}: SIGINT after {seen[cut].strip()[:60]!r} +{delay}s; exit 130 after {took:.2f} s")

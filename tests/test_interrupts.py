"""Ctrl-C: the CLI says what an interrupt left behind, and a run's adapter and summary are
written as one result (an interrupt never leaves a new adapter beside an older summary)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qpeft import orchestrator
from qpeft.registry import load_registry


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
    assert "interrupted: finished outputs are intact; partial ones were not written" in out, out[-2000:]
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

"""Where a run's first seconds go: command start → run start → model loaded → first optimizer
step done. The run summary's ``timeline`` (``startup_s``, ``imports_s``, ``data_s``, ``load_s``, ``setup_s``,
``first_step_s``, ``to_first_step_s``) comes from here; docs/performance.md has measurements."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

#: ``time.perf_counter()`` at the start of the ``qpeft`` command's process (set by the CLI), or
#: None when qpeft runs inside another program (then ``startup_s`` is not known).
COMMAND_START: float | None = None


def process_age() -> float | None:
    """Seconds since this process started (from /proc on Linux, 10 ms resolution), or None."""
    try:
        stat = Path("/proc/self/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(uptime - started, 0.0)


def mark_command_start() -> None:
    """Record when the command's process started (the interpreter's own start-up included);
    where that is unknown, now."""
    global COMMAND_START
    now = time.perf_counter()
    COMMAND_START = now - (process_age() or 0.0)


class Timeline:
    """Marks of one run: ``mark(name)`` at each phase boundary, and :meth:`first_optimizer_step`
    around training, which records when the first optimizer step of any trainer finished."""

    def __init__(self, command_start: float | None = None):
        self.command_start = command_start
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    @contextlib.contextmanager
    def first_optimizer_step(self) -> Iterator[None]:
        """Inside the block, the end of the first ``torch.optim.Optimizer.step`` (any optimizer:
        the native loop's, the HF Trainer's, bitsandbytes' 8-bit ones) is marked ``first_step``;
        on CUDA the device is synchronised once then, so the mark is when the step really ended."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def hook(optimizer, args, kwargs) -> None:
            if "first_step" in self.marks:
                return
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.mark("first_step")  # the hook stays until the block ends: removing it here would
            # change the hook dict torch is iterating over

        handle = register_optimizer_step_post_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def summary(self) -> dict:
        """Phase lengths in seconds (None where a mark is missing): ``startup_s`` command start →
        run start (the CLI, plugin registry, config; torch's import to resolve the device),
        ``imports_s`` → transformers, peft and bitsandbytes imported, ``data_s`` → model load
        starts (tokenizer, data), ``load_s`` the base model's load, ``setup_s`` →
        training starts (evaluation before training, k-bit preparation, the adapter),
        ``first_step_s`` → first optimizer step done (the trainer's set-up, compilation, one
        step), ``to_first_step_s`` command start (else run start) → first optimizer step done."""
        m = self.marks

        def span(a: str | None, b: str) -> float | None:
            start = self.command_start if a is None else m.get(a)
            return round(m[b] - start, 3) if start is not None and b in m else None

        to_first = span(None, "first_step") if self.command_start is not None else span("run", "first_step")
        return {
            "startup_s": span(None, "run"),
            "imports_s": span("run", "imported"),
            "data_s": span("imported", "load"),
            "load_s": span("load", "loaded"),
            "setup_s": span("loaded", "train"),
            "first_step_s": span("train", "first_step"),
            "to_first_step_s": to_first,
            "from": "command" if self.command_start is not None else "run",
        }

"""Running a matrix: the plan (what is done, what to run again), cells in processes of their own
or in workers, side by side on several GPUs, timeouts, and the record of each cell."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import CHECKPOINTS
from ..errors import ConfigError
from ..io import atomic_write_json, folder_lock
from .cell import EVENT_PREFIX
from .environment import child_environment, matrix_environment, qpeft_commit
from .matrix import Cell, Matrix, expand, load_matrix, select
from .records import MATRIX_FILE, append_record, latest_records, read_records
from .timeouts import CellTimeout, Timeouts

Event = Callable[[dict], None]


def _no_event(event: dict) -> None:
    pass


def output_directory(matrix: Matrix, out_dir: str | Path | None = None) -> Path:
    """Where results go: ``--out``, else the matrix's ``output_dir``, else ``runs/bench/<name>``."""
    return Path(out_dir or matrix.config.output_dir or f"runs/bench/{matrix.config.name}")


def plan(cells: list[Cell], latest: dict[str, dict], rerun: set[str], retry_failed: bool) -> list[tuple[Cell, str]]:
    """(cell, action) with action "run", "done" (a matching finished record exists) or
    "unsupported"."""
    actions = []
    for cell in cells:
        prev = latest.get(cell.id)
        if cell.status == "unsupported":
            action = "unsupported"
        elif cell.id in rerun:
            action = "run"
        elif (
            prev
            and prev.get("fingerprint") == cell.fingerprint
            and (prev.get("status") == "ok" or (prev.get("status") == "failed" and not retry_failed))
        ):
            action = "done"
        else:
            action = "run"
        actions.append((cell, action))
    return actions


def run_matrix(
    matrix_path: str | Path,
    *,
    out_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    only: list[str] | tuple[str, ...] = (),
    rerun: list[str] | tuple[str, ...] = (),
    retry_failed: bool = False,
    dry_run: bool = False,
    stop_after_s: float | None = None,
    on_event: Event = _no_event,
    command: str = "",
    registry=None,
    python: str = sys.executable,
    gpus: list[str] | tuple[str, ...] = (),
    isolation: str | None = None,
) -> dict:
    """Expand the matrix, record unsupported cells, run the others (one process each, or one
    worker process for all: ``isolation``, default the matrix's); return counts and the results
    folder. ``overrides`` (``--set``) apply to every cell after the matrix's own ``set``;
    ``only`` selects cells, ``rerun`` runs finished cells again, ``retry_failed`` runs failed
    ones again; ``stop_after_s`` starts no cell after that long.
    ``gpus``: run cells side by side, one per listed GPU (its ``CUDA_VISIBLE_DEVICES``), each GPU
    taking the next cell when its cell ends; records are appended one at a time as cells end."""
    from ..registry import load_registry

    # Ask NVML, not the CUDA runtime, whether a GPU exists: this process then holds no CUDA
    # context (and no accelerator memory) while its cells run.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    matrix = load_matrix(matrix_path, overrides)
    if isolation is not None:
        if isolation not in ("process", "worker"):
            raise ConfigError("--isolation", f"{isolation!r}; valid: process, worker")
        matrix.config.isolation = isolation
    registry = registry or load_registry()
    directory = output_directory(matrix, out_dir)
    cells = expand(matrix, registry, directory)
    selected = select(cells, only, "--only")
    forced = {c.id for c in select(cells, rerun, "--rerun")} if rerun else set()
    counts = {"cells": len(cells), "selected": len(selected), "ok": 0, "failed": 0, "unsupported": 0, "done": 0, "not_started": 0}

    def announce(actions, timeouts: Timeouts):
        on_event(
            {
                "type": "plan",
                "directory": str(directory),
                "matrix": matrix.config.name,
                "timeout_s": matrix.config.timeout_s,
                "cells": [
                    {
                        "cell": c.id,
                        "labels": c.labels,
                        "action": a,
                        "reason": c.reason,
                        **({"timeout": timeouts.for_cell(c).describe()} if a == "run" else {}),
                    }
                    for c, a in actions
                ],
            }
        )

    if dry_run:
        records = read_records(directory)
        actions = plan(selected, latest_records(records), forced, retry_failed)
        timeouts = Timeouts(matrix.config.timeout_s, cells, records)
        announce(actions, timeouts)
        return {
            "directory": str(directory),
            "actions": [(c.id, a, c.reason) for c, a in actions],
            "timeouts": {c.id: timeouts.for_cell(c).describe() for c, a in actions if a == "run"},
            **counts,
        }

    started = time.monotonic()
    with folder_lock(directory, "qpeft bench"):  # one qpeft bench (or run) per results folder
        records = read_records(directory)
        latest = latest_records(records)
        actions = plan(selected, latest, forced, retry_failed)
        timeouts = Timeouts(matrix.config.timeout_s, cells, records)
        announce(actions, timeouts)
        to_run, index = sum(1 for _, a in actions if a == "run"), 0
        atomic_write_json(
            directory / MATRIX_FILE,
            {
                "name": matrix.config.name,
                "description": matrix.config.description,
                "matrix_file": str(matrix.path),
                "axes": {k: [label for label, _ in pairs] for k, pairs in matrix.axes.items()},
                "cells": [c.id for c in cells],
                "base": matrix.base,
            },
        )
        commit = qpeft_commit()

        def finish(cell: Cell, outcome: dict) -> None:
            record = {**_base_record(cell, matrix, command, commit), **outcome}
            append_record(directory, record)
            counts[record["status"]] += 1
            timeouts.learn(cell, record)  # a finished cell's times set the default timeout of similar cells
            on_event({"type": "end", "cell": cell.id, "labels": cell.labels, "record": record})

        def too_late() -> bool:
            return stop_after_s is not None and time.monotonic() - started > stop_after_s

        side_by_side: list[Cell] = []  # with gpus: run after the loop, several at once
        worker = Worker(python, matrix_environment(matrix)) if matrix.config.isolation == "worker" and not gpus else None
        try:
            for cell, action in actions:
                prev = latest.get(cell.id)
                if action == "unsupported":
                    counts["unsupported"] += 1
                    if not (prev and prev.get("status") == "unsupported" and prev.get("reason") == cell.reason):
                        record = _base_record(cell, matrix, command, commit)
                        record.update(status="unsupported", reason=cell.reason)
                        append_record(directory, record)
                    on_event({"type": "unsupported", "cell": cell.id, "labels": cell.labels, "reason": cell.reason})
                    continue
                if action == "done":
                    counts["done"] += 1
                    on_event({"type": "done", "cell": cell.id, "labels": cell.labels, "record": prev})
                    continue
                if gpus:
                    side_by_side.append(cell)
                    continue
                if too_late():
                    counts["not_started"] += 1
                    continue
                index += 1
                timeout = timeouts.for_cell(cell)
                on_event(
                    {
                        "type": "start",
                        "cell": cell.id,
                        "labels": cell.labels,
                        "index": index,
                        "total": to_run,
                        "timeout": timeout.describe(),
                    }
                )
                finish(cell, run_cell(cell, matrix, directory, on_event=on_event, python=python, worker=worker, timeout=timeout))
        finally:
            if worker is not None:
                worker.close()
        if side_by_side:
            _run_side_by_side(side_by_side, list(gpus), matrix, directory, on_event, python, finish, too_late, counts, to_run, timeouts)
    return {"directory": str(directory), **counts}


def _run_side_by_side(pending, gpus, matrix, directory, on_event, python, finish, too_late, counts, total, timeouts) -> None:
    """Run ``pending`` cells on several GPUs at once: one worker thread per GPU takes the next cell
    and runs it in its own process with that GPU visible (``isolation: worker``: in that GPU's
    worker process). Events and records go through one lock, so the display and ``results.jsonl``
    see one cell at a time. An interrupt stops every running cell (recording nothing for them, as
    in a sequential run) and re-raises."""
    lock = threading.Lock()
    stop = threading.Event()
    running: dict[str, subprocess.Popen] = {}  # GPU -> its cell's process
    queue_ = list(pending)
    started = [0]
    errors: list[BaseException] = []

    def locked_event(event: dict) -> None:
        with lock:
            on_event(event)

    def worker(gpu: str) -> None:
        def track(proc: subprocess.Popen | None) -> None:
            if proc is None:
                running.pop(gpu, None)
            else:
                running[gpu] = proc

        cell_env = {**matrix_environment(matrix), "CUDA_VISIBLE_DEVICES": gpu}
        cell_worker = Worker(python, cell_env) if matrix.config.isolation == "worker" else None
        try:
            while not stop.is_set():
                with lock:
                    if not queue_:
                        return
                    if too_late():
                        counts["not_started"] += len(queue_)
                        queue_.clear()
                        return
                    cell = queue_.pop(0)
                    started[0] += 1
                    timeout = timeouts.for_cell(cell)
                    on_event(
                        {
                            "type": "start",
                            "cell": cell.id,
                            "labels": cell.labels,
                            "index": started[0],
                            "total": total,
                            "gpu": gpu,
                            "timeout": timeout.describe(),
                        }
                    )
                outcome = run_cell(
                    cell,
                    matrix,
                    directory,
                    on_event=locked_event,
                    python=python,
                    extra_env={"CUDA_VISIBLE_DEVICES": gpu},
                    stop=stop,
                    on_process=track,
                    worker=cell_worker,
                    timeout=timeout,
                )
                if outcome is None or stop.is_set():  # stopped by an interrupt: no record, the cell runs next time
                    return
                with lock:
                    finish(cell, outcome)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            stop.set()
        finally:
            if cell_worker is not None:
                cell_worker.close()

    threads = [threading.Thread(target=worker, args=(gpu,), name=f"qpeft-bench-gpu{gpu}") for gpu in gpus]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except BaseException:
        stop.set()
        for proc in list(running.values()):  # stop them from here too, whatever the workers are doing
            _kill(proc)
        for t in threads:
            t.join(timeout=30)
        raise
    if errors:
        raise errors[0]


def _base_record(cell: Cell, matrix: Matrix, command: str, commit: str | None) -> dict:
    return {
        "cell": cell.id,
        "labels": cell.labels,
        "matrix": matrix.config.name,
        "fingerprint": cell.fingerprint,
        "overrides": cell.overrides,
        "command": command,
        "qpeft_version": __version__,
        "qpeft_commit": commit,
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_cell(
    cell: Cell,
    matrix: Matrix,
    directory: Path,
    *,
    on_event: Event = _no_event,
    python: str = sys.executable,
    extra_env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
    on_process: Callable[[subprocess.Popen | None], None] | None = None,
    worker: Worker | None = None,
    timeout: CellTimeout | None = None,
) -> dict | None:
    """Run one cell in a fresh process, or in ``worker`` (``isolation: worker``); return its
    record (status "ok" or "failed").

    The process's stderr goes to ``cells/<slug>/log.txt``; its stdout carries progress events
    (lines starting with ``@qpeft-bench``) that are passed to ``on_event``. An interrupt of this
    process stops the cell and records nothing, so the next run starts it again; so does
    ``stop`` being set (then the return value is None). ``on_process`` is told the cell's process
    when it starts and None when it has ended (so that another thread can stop it). A timeout
    (``timeout``; default: the matrix's ``timeout_s`` as :class:`Timeouts` gives it with nothing
    measured) kills the cell's process, the worker included; the record says which applied
    (``timeout_s``, ``timeout_basis``)."""
    cell_dir = directory / "cells" / cell.slug
    if cell_dir.exists():
        shutil.rmtree(cell_dir)  # leftovers of an earlier attempt
    cell_dir.mkdir(parents=True)
    result_path = cell_dir / "result.json"
    spec = {
        "cell": cell.id,
        "config": cell.config,
        "merge": bool(matrix.config.merge and cell.mergeable),
        "merge_dtype": matrix.config.merge_dtype,
        "result": str(result_path),
    }
    atomic_write_json(cell_dir / "cell.json", spec)
    log_path = cell_dir / "log.txt"
    if timeout is None:
        timeout = Timeouts(matrix.config.timeout_s).for_cell(cell)
    matrix_env = matrix_environment(matrix)
    extra_env = {**matrix_env, **(extra_env or {})}
    t0 = time.monotonic()
    if worker is None:
        outcome = _run_in_process(cell, cell_dir, log_path, python, extra_env, timeout, stop, on_event, on_process)
    else:
        outcome = _run_in_worker(worker, cell, cell_dir, log_path, timeout, stop, on_event, on_process)
    if outcome is None:
        return None
    returncode, timed_out = outcome
    wall = time.monotonic() - t0
    remove_empty_checkpoints(cell.config.get("output_dir"))
    record: dict[str, Any] = {"wall_seconds": round(wall, 1), "returncode": returncode, "log": str(log_path.relative_to(directory))}
    record.update(timeout_s=timeout.seconds(), timeout_basis=timeout.basis)
    record["isolation"] = "process" if worker is None else "worker"
    if worker is not None:
        record["worker_cell"] = worker.cell_index  # 1: this cell paid for starting the worker
    if matrix_env:
        record["env"] = matrix_env
    if returncode == 0 and result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
        record.update(status="ok", metrics=result["metrics"], environment=result["environment"])
    else:
        error = _failure(returncode, log_path, timed_out, timeout.seconds())
        if timed_out and timeout.kind == "default":
            error += f" ({timeout.basis}; timeout_s in the matrix sets another)"
        record.update(status="failed", error=error, oom=_is_oom(error))
    return record


def remove_empty_checkpoints(output_dir: str | Path | None) -> bool:
    """Remove a run's ``checkpoints/`` folder if nothing was saved in it (the HF Trainer creates
    it as its output folder even when it saves no checkpoint); return whether it was removed.
    A folder with anything in it stays."""
    if not output_dir:
        return False
    path = Path(output_dir) / CHECKPOINTS
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        path.rmdir()  # fails, and keeps the folder, unless it is empty
    except OSError:
        return False
    return True


def _run_in_process(cell, cell_dir, log_path, python, extra_env, timeout, stop, on_event, on_process) -> tuple[int, bool] | None:
    """``python -m qpeft.bench CELL.json`` in a session of its own; (exit status, timed out), or
    None when ``stop`` ended it."""
    events: queue.Queue = queue.Queue()
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [python, "-m", "qpeft.bench", str(cell_dir / "cell.json")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=child_environment(extra_env),
            start_new_session=True,
        )
        if on_process is not None:
            on_process(proc)
        reader = threading.Thread(target=_read_events, args=(proc.stdout, log, events), daemon=True)
        reader.start()
        timed_out = False
        try:
            while True:
                if stop is not None and stop.is_set():  # checked first: a cell streaming events must still stop
                    _kill(proc)
                    reader.join(timeout=5)
                    return None
                limit = timeout.seconds()
                if limit is not None and time.monotonic() - t0 > limit and not timed_out:  # so is a timeout
                    timed_out = True
                    _kill(proc)
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    event = None
                if event is not None:
                    timeout.on_event(event)
                    on_event({"type": "progress", "cell": cell.id, **event})
                    continue
                if proc.poll() is not None and not reader.is_alive():
                    break
        except BaseException:
            _kill(proc)
            raise
        finally:
            if on_process is not None:
                on_process(None)
        reader.join(timeout=5)
    return proc.returncode, timed_out


class Worker:
    """A cell process that runs cells one after another (``isolation: worker``).

    ``python -m qpeft.bench --worker`` (:func:`worker_main`) reads one command line per cell on
    its stdin (the cell's ``cell.json`` and ``log.txt``), writes the cell's output to that log,
    sends its progress events on its stdout and ends each cell with an event carrying the cell's
    exit status (0, 1 or 2, as a cell process exits). The process is started for the first cell
    (in a session of its own, its environment as a cell process's) and kept for the next one
    while cells succeed; a failed cell's worker is stopped, and so is one that dies (killed,
    out of memory) or times out: the next cell then starts a fresh one."""

    def __init__(self, python: str = sys.executable, extra_env: dict[str, str] | None = None):
        self.python, self.extra_env = python, extra_env
        self.proc: subprocess.Popen | None = None
        self.output: queue.Queue = queue.Queue()
        #: Cells given to the current process so far (1 while its first cell runs).
        self.cell_index = 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, stderr) -> None:
        """Start a fresh worker process; its output until the first cell goes to ``stderr``."""
        self.stop()
        self.proc = subprocess.Popen(
            [self.python, "-m", "qpeft.bench", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=child_environment(self.extra_env),
            start_new_session=True,
        )
        self.output = queue.Queue()
        self.cell_index = 0
        threading.Thread(target=_read_lines, args=(self.proc.stdout, self.output), daemon=True, name="qpeft-bench-worker-output").start()

    def send(self, command: dict) -> bool:
        """Give the worker its next cell; False when it is no longer there to take it."""
        if not self.alive():
            return False
        try:
            self.proc.stdin.write((json.dumps(command) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: it ended since
            return False
        self.cell_index += 1
        return True

    def stop(self) -> None:
        """Stop the worker process and everything it started."""
        if self.proc is not None:
            _kill(self.proc)
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            self.proc = None

    def close(self) -> None:
        """Let an idle worker end (end of its input), stopping it if it has not within 10 s."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.stop()


def _run_in_worker(worker: Worker, cell, cell_dir, log_path, timeout, stop, on_event, on_process) -> tuple[int, bool] | None:
    """Run a cell in ``worker`` (started here if it is not running); (exit status, timed out),
    or None when ``stop`` ended it. The exit status is the cell's (0, 1, 2) while the worker
    lives, the worker's own (e.g. -9) when it died during the cell."""
    command = {"cell": str(cell_dir / "cell.json"), "log": str(log_path)}
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        if not worker.send(command):  # none yet, or the last one ended while idle
            worker.start(log)
            worker.send(command)  # should it have ended already, its output has ended: handled below
        proc = worker.proc
        if on_process is not None:
            on_process(proc)
        timed_out, returncode = False, None
        try:
            while True:
                if stop is not None and stop.is_set():
                    worker.stop()
                    return None
                limit = timeout.seconds()
                if limit is not None and time.monotonic() - t0 > limit and not timed_out:
                    timed_out = True
                    _kill(proc)  # its output then ends: handled below
                try:
                    line = worker.output.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:  # the worker ended during the cell: killed, or out of memory
                    returncode = proc.wait()
                    break
                event = _parse_event(line)
                if event is not None and event.get("kind") == "cell-end":
                    returncode = int(event["rc"])
                    break
                if event is not None:
                    timeout.on_event(event)
                    on_event({"type": "progress", "cell": cell.id, **event})
                else:
                    log.write(line)
                    log.flush()
        except BaseException:
            worker.stop()
            raise
        finally:
            if on_process is not None:
                on_process(None)
    if returncode != 0 or not worker.alive():
        worker.stop()  # a failed cell's worker is not reused: the next cell starts afresh
    return returncode, timed_out


def _read_lines(stream, lines: queue.Queue) -> None:
    """Every line of a worker's output, then None when it ends."""
    for raw in iter(stream.readline, b""):
        lines.put(raw)
    stream.close()
    lines.put(None)


def _parse_event(raw: bytes) -> dict | None:
    line = raw.decode("utf-8", errors="replace")
    if line.startswith(EVENT_PREFIX):
        with contextlib.suppress(json.JSONDecodeError):
            event = json.loads(line[len(EVENT_PREFIX) :])
            if isinstance(event, dict):
                return event
    return None


def _read_events(stream, log, events: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(EVENT_PREFIX):
            try:
                events.put(json.loads(line[len(EVENT_PREFIX) :]))
                continue
            except json.JSONDecodeError:
                pass
        log.write(raw)
        log.flush()
    stream.close()


def _kill(proc: subprocess.Popen) -> None:
    """Stop a cell process and everything it started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*|error: .+)$")


def _failure(rc: int | None, log_path: Path, timed_out: bool, timeout: float | None) -> str:
    """One line saying why a cell failed: timeout, signal, or the exception that ended it."""
    if timed_out:
        return f"timed out after {timeout:g} s"
    lines = [l.strip() for l in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = " (the system's out-of-memory killer?)" if -rc == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    found = next((l for l in reversed(lines) if _EXCEPTION_LINE.match(l)), None)
    message = found or (lines[-1] if lines else f"exit status {rc}, no output")
    return message.removeprefix("error: ")[:500]


def _is_oom(error: str) -> bool:
    """Whether a cell's error is running out of memory: CUDA's OutOfMemoryError, or on a CPU an
    allocation the operating system refused (torch's "Cannot allocate memory", MemoryError)."""
    e = error.lower()
    return any(
        k in e for k in ("out of memory", "outofmemory", "out-of-memory", "cannot allocate memory", "can't allocate memory", "memoryerror")
    )

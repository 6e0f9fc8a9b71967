"""The cell process (``python -m qpeft.bench CELL.json``) and the worker process (``python -m
qpeft.bench --worker``): run one cell's config (and merge), emit progress events, write its metrics."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import QpeftError
from ..hookspecs import hookimpl
from ..io import atomic_write_json
from .environment import child_environment, environment

EVENT_PREFIX = "@qpeft-bench "

SUMMARY_METRICS = (
    "device",
    "device_name",
    "dtype",
    "gradient_checkpointing",
    "load_seconds",
    "weight_memory_gib",
    "bits",
    "peak_allocated_gib",
    "peak_reserved_gib",
    "peak_rss_gib",
    "trainable_params",
    "total_params",
    "trainable_percent",
    "train_steps",
    "train_tokens",
    "train_seconds",
    "tokens_per_s",
    "warmup_steps",
    "tokens_per_s_after_warmup",
    "step_seconds_after_warmup",
    "cpu_seconds_per_step_after_warmup",
    "train_loss",
    "val_tokens",
    "val_loss_before",
    "val_loss_after",
    "val_perplexity_before",
    "val_perplexity_after",
    "reload_max_abs_logit_diff",
    "adapter_bytes",
)


def cell_metrics(summary: dict, merge: dict | None) -> dict:
    """The flat metrics of one cell from the run summary and the merge result."""
    metrics = {k: summary[k] for k in SUMMARY_METRICS if k in summary}
    if summary.get("objective", "lm") != "lm":  # a trainer of another objective: its own held-out metrics
        objective = summary.get("objective_metrics") or {}
        metrics["objective"] = summary["objective"]
        metrics["objective_eval_before"] = objective.get("eval_before")
        metrics["objective_eval_after"] = objective.get("eval_after")
    gen = summary.get("generation") or {}
    metrics["generation_tokens_per_s"] = round(gen["tokens_per_s"], 2) if "tokens_per_s" in gen else None
    metrics["generation_new_tokens"] = gen.get("new_tokens")
    from .quality import cell_eval_metrics

    metrics.update(cell_eval_metrics(summary))
    if merge:
        metrics["merge_max_abs_logit_diff"] = merge["max_abs_logit_diff"]
        metrics["merge_base_path_diff"] = merge.get("base_path_diff")
        metrics["merge_seconds"] = merge.get("seconds")
        metrics["merge_dtype"] = merge.get("dtype")
    return metrics


class _StepEvents:
    """Lifecycle plugin of the cell process: each logged step as a progress event."""

    def __init__(self, emit: Callable[[dict], None]):
        self.emit = emit

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        """Send the step, the planned number of steps, the loss and the tokens seen."""
        self.emit(
            {
                "kind": "step",
                "step": int(step),
                "max_steps": int(max_steps),
                "loss": float(logs.get("loss", float("nan"))),
                "tokens": int(logs.get("tokens", 0)),
            }
        )


def cell_main(argv: list[str] | None = None) -> int:
    """Entry of a cell process (``python -m qpeft.bench CELL.json``): run, merge where asked,
    write the metrics to the spec's ``result`` path. Exit 0 on success, 2 on a qpeft error
    (one line), 1 on a crash (traceback in the log)."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    _cell_process_setup()

    def emit(event: dict) -> None:
        sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
        sys.stdout.flush()

    return _run_spec(spec, emit)


def worker_main() -> int:
    """Entry of a worker process (``python -m qpeft.bench --worker``, ``isolation: worker``):
    one command per line on stdin, ``{"cell": CELL.json, "log": LOG}``, each run as a cell
    process would run it, its output appended to LOG, its progress events on stdout, then a
    ``cell-end`` event with the exit status a cell process would have had. Ends at the end of
    its input. Loads of a base on the CPU come from the worker's :class:`BaseModelCache` after
    the first; each cell records how many of its loads did (``base_loads_from_cache``), where the
    training load came from (``load_from_cache``, ``load_uncached_seconds``), and its peak RSS
    since the cell started (``peak_rss_gib``) with what the worker held then
    (``rss_at_cell_start_gib``, of it ``base_cache_gib`` in cached bases)."""
    import gc

    from ..modeling import BaseModelCache, base_model_cache, current_rss_gib, reset_process_peak_rss

    _cell_process_setup()
    events = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the event channel to qpeft bench
    os.dup2(2, 1)  # anything else printed goes to the cell's log

    def emit(event: dict) -> None:
        events.write(EVENT_PREFIX + json.dumps(event) + "\n")
        events.flush()

    _preload_libraries()
    cache = BaseModelCache(max_entries=1)
    with base_model_cache(cache):
        for line in iter(sys.stdin.readline, ""):
            if not line.strip():
                continue
            command = json.loads(line)
            _redirect_output(command["log"])
            gc.collect()
            _trim_heap()
            _empty_cuda_cache()
            cache.clear_loads()
            rss_start = current_rss_gib()
            reset_process_peak_rss()

            def worker_metrics(rss_start=rss_start) -> dict:
                loads = cache.loads
                metrics: dict[str, Any] = {
                    "base_loads": len(loads),
                    "base_loads_from_cache": sum(1 for load in loads if load["cached"]),
                }
                if loads:
                    metrics["load_from_cache"] = loads[0]["cached"]
                    if loads[0]["cached"]:
                        metrics["load_uncached_seconds"] = loads[0]["uncached_seconds"]
                metrics["base_cache_gib"] = round(cache.held_gib(), 4)
                if rss_start is not None:
                    metrics["rss_at_cell_start_gib"] = round(rss_start, 3)
                return metrics

            try:
                spec = json.loads(Path(command["cell"]).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                print(f"error: cannot read {command['cell']}: {exc}", file=sys.stderr, flush=True)
                rc = 2
            else:
                rc = _run_spec(spec, emit, extra_metrics=worker_metrics)
            sys.stdout.flush()
            sys.stderr.flush()
            emit({"kind": "cell-end", "rc": rc})
    return 0


def _preload_libraries() -> None:
    """Import, before any cell, the libraries cells import. Besides moving their import time to
    the worker's start, this keeps import-time state free of cells' objects: gptqmodel (imported
    by peft while it loads a LoRA adapter) keeps the ImportError of its optional llama-cpp
    backend, whose traceback holds every frame that was running the import, with the models in
    their locals, for as long as the process lives."""
    import importlib
    import importlib.util

    from .. import orchestrator  # noqa: F401  (torch, transformers)
    from ..registry import load_registry

    load_registry()  # qpeft's plugins and any installed ones
    for name in ("peft", "bitsandbytes", "gptqmodel"):
        if importlib.util.find_spec(name) is not None:
            with contextlib.suppress(Exception):  # a cell that needs it reports the error itself
                importlib.import_module(name)


def _trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``), so that a
    worker's next cell does not start with the last one's freed memory still resident."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _cell_process_setup() -> None:
    import logging
    import warnings

    _exit_with_parent()
    os.environ.update({k: v for k, v in child_environment().items() if k not in os.environ})
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    logging.getLogger("torchao").setLevel(logging.ERROR)


def _redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to the end of ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _run_spec(spec: dict, emit: Callable[[dict], None], extra_metrics: Callable[[], dict] | None = None) -> int:
    """Run one cell in this process: run, merge where asked, write the metrics (plus
    ``extra_metrics()``) to the spec's ``result`` path. 0 on success, 2 on a qpeft error (one
    line), 1 on a crash (traceback on stderr)."""
    import gc
    import traceback

    start = time.perf_counter()

    def say(msg: str) -> None:
        text = re.sub(r"\[/?[a-z ]*\]", "", msg)  # rich markup the orchestrator uses
        print(f"{time.perf_counter() - start:7.1f}s {text}", file=sys.stderr, flush=True)
        emit({"kind": "message", "text": text})

    try:
        from .. import orchestrator
        from ..registry import load_registry

        resolved, registry = orchestrator.prepare(spec["config"], registry=load_registry([_StepEvents(emit)]))
        summary = orchestrator.run(resolved, registry, say=say)
        merge = None
        if spec.get("merge"):
            gc.collect()
            _empty_cuda_cache()
            say("merging the adapter to measure the merge's max |Δlogit|")
            merged_dir = Path(resolved.config.output_dir) / "merged"
            t0 = time.perf_counter()
            merge = orchestrator.merge(
                str(Path(resolved.config.output_dir) / "adapter"),
                str(merged_dir),
                registry,
                force=True,
                dtype=spec.get("merge_dtype", "float32"),
                say=say,
            )
            merge["seconds"] = round(time.perf_counter() - t0, 2)
            shutil.rmtree(merged_dir, ignore_errors=True)  # the Δ is the measurement; the weights are not kept
        metrics = cell_metrics(summary, merge)
        if extra_metrics is not None:
            metrics.update(extra_metrics())
        atomic_write_json(spec["result"], {"cell": spec["cell"], "metrics": metrics, "environment": environment()})
        return 0
    except QpeftError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException:  # noqa: BLE001 - recorded by the parent from this traceback
        traceback.print_exc()
        sys.stderr.flush()
        return 1


def _exit_with_parent() -> None:
    """A cell runs in its own session (so a timeout kills all it started); should ``qpeft bench``
    itself be killed, the cell stops too instead of holding the accelerator for the next run."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="qpeft-bench-parent-watch").start()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

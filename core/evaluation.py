"""Running a run's evaluators (the config's ``eval`` list) before and after training.

Each evaluator is an :class:`qpeft.api.EvaluatorPlugin`; this module calls it on the model in
eval mode, with the network closed (:func:`no_network`: an evaluator that reaches for a hub
fails at once with one line instead of hanging), and gathers what it measured into the run
summary's ``eval`` section::

    "eval": {"<label>": {"evaluator": "lm-eval", "primary": "qpeft_docs_mc/acc",
                         "higher_is_better": {...}, "before": {...}, "after": {...},
                         "seconds": {"before": 1.2, "after": 1.1}, "files": [...]}}
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .api import EvalResult
from .errors import QpeftError

STAGES = ("before", "after")


class NetworkBlocked(ConnectionError):
    """Raised by :func:`no_network` when code tries to reach another host."""


def eval_dir(ctx, label: str) -> Path:
    """The folder where the evaluator stored as ``label`` writes its files (under the run's output)."""
    return Path(ctx.output_dir) / "eval" / label


def _local(host: Any) -> bool:
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Inside the block, resolving or connecting to any host but this machine's loopback raises
    :class:`NetworkBlocked` at once (no DNS wait, no connect timeout). Libraries that would
    download a data set, a metric or a tokenizer then fail on their first request."""
    real_getaddrinfo, real_connect, real_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def refuse(host, port=None):
        raise NetworkBlocked(f"qpeft evaluates offline: a connection to {host}:{port} was refused (no network during evaluation)")

    def getaddrinfo(host, port, *args, **kwargs):
        if not _local(host):
            refuse(host, port)
        return real_getaddrinfo(host, port, *args, **kwargs)

    def _check(self, address):
        if isinstance(address, tuple) and self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            refuse(*address[:2])

    def connect(self, address):
        _check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        _check(self, address)
        return real_connect_ex(self, address)

    socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
    try:
        yield
    finally:
        socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = real_getaddrinfo, real_connect, real_connect_ex


def network_cause(exc: BaseException) -> BaseException | None:
    """The :class:`NetworkBlocked` in ``exc``'s chain of causes, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NetworkBlocked):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _check_result(result: Any, label: str) -> EvalResult:
    if not isinstance(result, EvalResult):
        raise QpeftError(f"evaluator {label!r} returned {type(result).__name__}, not a qpeft.api.EvalResult")
    for key, value in result.metrics.items():
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        if not isinstance(key, str) or not ok:
            raise QpeftError(f"evaluator {label!r}: metric {key!r} is {value!r}; metrics are numbers (or None)")
        if isinstance(value, float) and not math.isfinite(value):
            result.metrics[key] = None
    if result.primary is not None and result.primary not in result.metrics:
        raise QpeftError(f"evaluator {label!r}: its primary metric {result.primary!r} is not among its metrics {sorted(result.metrics)}")
    return result


def run_evaluators(evaluators: list, model, tokenizer, data, ctx, stage: str, results: dict, say: Callable[[str], None]) -> dict:
    """Run every evaluator (:class:`qpeft.config.ResolvedEval`) on ``model`` at ``stage``
    ("before" or "after" training) and merge what each measured into ``results`` (the summary's
    ``eval`` section, returned).

    Before training a failing evaluator stops the run (nothing was trained yet); after training it
    is recorded (``error``) and the run goes on to save the adapter it trained.
    """
    for ev in evaluators:
        entry = results.setdefault(
            ev.label, {"evaluator": ev.plugin.name, "primary": None, "higher_is_better": {}, "before": None, "after": None, "seconds": {}}
        )
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            with no_network():
                result = _check_result(
                    ev.plugin.evaluate(model, tokenizer, ev.options, ctx, stage=stage, data=data, out_dir=eval_dir(ctx, ev.label)), ev.label
                )
        except Exception as exc:
            blocked = network_cause(exc)
            line = str(blocked) if blocked else (str(exc).strip().splitlines() or [""])[0]
            if not blocked and not isinstance(exc, QpeftError):
                line = f"{type(exc).__name__}: {line}"
            message = f"eval {ev.label!r} ({ev.plugin.name}) {stage} training: {line}"
            if stage == "before":
                if isinstance(exc, QpeftError) or blocked:
                    raise QpeftError(message) from None
                raise
            entry["error"] = message
            ctx.notes.append(message)
            say(f"[yellow]{message}[/]")
            continue
        finally:
            model.train(was_training)
        entry[stage] = dict(result.metrics)
        entry["seconds"][stage] = round(time.perf_counter() - t0, 2)
        entry["primary"] = result.primary
        entry["higher_is_better"] = dict(result.higher_is_better)
        if result.files:
            entry["files"] = sorted({*entry.get("files", []), *map(str, result.files)})
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in result.metrics.items())
        say(f"eval {ev.label} {stage} training: {shown}")
    return results


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def primary_value(entry: dict, stage: str = "after") -> float | None:
    """The primary metric of one ``eval`` entry of a summary at ``stage``, or None."""
    metrics = entry.get(stage) or {}
    return metrics.get(entry.get("primary")) if entry.get("primary") else None

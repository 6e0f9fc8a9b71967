"""Experiment trackers during a run: start the ones the config names, register their lifecycle
hooks for the run, finish them (FINISHED or FAILED) however the run ends.

Tracker plugins (:class:`qpeft.api.TrackerPlugin`) share the helpers here, so that TensorBoard,
MLflow and W&B record the same names: ``train/<key>`` for each numeric value a trainer reports
after a step (``loss``, ``tokens``, ``learning_rate``, ...), ``eval/<metric>`` for the
evaluation results (at step 0 before training, at the last step after it) and ``run/<key>`` for
the run summary's other numbers (throughput, memory, parameter counts).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .context import RunContext

#: Summary keys of the form ``<metric>_before`` / ``<metric>_after`` recorded as ``eval/<metric>``
#: at step 0 and at the last step.
_BEFORE_AFTER = re.compile(r"(?P<metric>.+)_(?P<when>before|after)$")


def is_number(value) -> bool:
    """A finite int or float that is not a bool (what trackers can plot)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten(data, prefix: str = "") -> dict[str, object]:
    """Nested dicts (and lists) as one level of ``a.b.0.c`` keys."""
    out: dict[str, object] = {}
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
    if items is None:
        return {prefix: data}
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def step_metrics(logs: dict) -> dict[str, float]:
    """``train/<key>`` for every number a trainer reported after a step."""
    return {f"train/{k}": float(v) for k, v in logs.items() if is_number(v)}


def summary_metrics(summary: dict) -> list[tuple[str, float, int]]:
    """``(name, value, step)`` for the numbers of a run summary: evaluation results as
    ``eval/<metric>`` (``val_perplexity_before`` at step 0, ``..._after`` at the last step; an
    ``eval`` section, whatever evaluators put there, flattened at the last step) and the other
    top-level numbers as ``run/<key>`` at the last step."""
    last = int(summary.get("train_steps") or 0)
    out: list[tuple[str, float, int]] = []
    for key, value in summary.items():
        if key == "eval" or key.startswith("eval_"):
            for name, v in flatten(value, key).items():
                if is_number(v):
                    out.append((f"eval/{name.removeprefix('eval.')}", float(v), last))
            continue
        if not is_number(value):
            continue
        m = _BEFORE_AFTER.match(key)
        if m and key.startswith("val_"):
            out.append((f"eval/{m['metric']}", float(value), 0 if m["when"] == "before" else last))
        else:
            out.append((f"run/{key}", float(value), last))
    return out


def in_output_dir(path: str, ctx: RunContext) -> Path:
    """``path`` as given when absolute, else under the run's output folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(ctx.output_dir) / p


@contextmanager
def tracking(resolved, registry, say: Callable[[str], None]) -> Iterator[list]:
    """Start every tracker ``resolved.trackers`` names and register its hooks; on leaving,
    unregister them and finish each with "FINISHED", or "FAILED" when the run raised
    (an interrupt included). A tracker that fails to start stops the run before any weight
    loads; one that fails to finish is reported and the others still finish."""
    ctx = RunContext(
        config=resolved.config,
        device=resolved.device,
        dtype=resolved.dtype,
        output_dir=resolved.config.output_dir,
        hooks=registry.hooks,
    )
    config = resolved.to_dict()
    started: list = []
    status = "FAILED"
    try:
        for plugin, options in resolved.trackers:
            session = plugin.start(options, config, ctx)
            started.append((plugin, session))
            registry.pm.register(session, name=f"qpeft-tracker-{plugin.name}")
            where = getattr(session, "where", "")
            say(f"tracker {plugin.name}" + (f": {where}" if where else ""))
        yield started
        status = "FINISHED"
    finally:
        for plugin, session in reversed(started):
            if registry.pm.is_registered(session):
                registry.pm.unregister(session)
            try:
                plugin.finish(session, status)
            except Exception as exc:  # the run's own result (or error) matters more
                say(f"[yellow]tracker {plugin.name} did not finish cleanly: {type(exc).__name__}: {exc}[/]")

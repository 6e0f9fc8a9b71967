"""Quality axes of a bench report: each evaluator's metrics (the run config's ``eval`` list) as
columns, and Pareto plots of quality against peak memory and against training tokens/s with
the Pareto-optimal cells marked.

A cell's record holds its evaluators' after-training metrics as flat ``eval.<label>.<metric>``
keys and how to read them in ``eval_meta`` (:func:`cell_eval_metrics`). The report's quality
axis is the primary metric of the first evaluator whose primary metric is higher-is-better
(an accuracy), else the first primary metric (e.g. perplexity, lower is better).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_PARETO_MEMORY = "pareto_quality_vs_memory.png"
PLOT_PARETO_SPEED = "pareto_quality_vs_tokens_per_s.png"
QUALITY_JSON = "quality.json"


def cell_eval_metrics(summary: dict) -> dict:
    """A run summary's ``eval`` section as flat bench metrics: ``eval.<label>.<metric>`` (after
    training), ``eval.<label>.<metric>.before`` and ``eval_meta`` (primary metric and direction
    of each column)."""
    flat: dict[str, Any] = {}
    meta: dict[str, dict] = {}
    for label, entry in (summary.get("eval") or {}).items():
        better = entry.get("higher_is_better") or {}
        for stage in ("after", "before"):
            for metric, value in (entry.get(stage) or {}).items():
                key = f"eval.{label}.{metric}" + (".before" if stage == "before" else "")
                flat[key] = value
                if stage == "after":
                    meta[key] = {
                        "label": label,
                        "evaluator": entry.get("evaluator"),
                        "metric": metric,
                        "higher_is_better": better.get(metric),
                        "primary": metric == entry.get("primary"),
                    }
        if entry.get("error"):
            flat[f"eval.{label}.error"] = entry["error"]
    if meta:
        flat["eval_meta"] = meta
    return flat


def quality_columns(rows: list[dict]) -> list[tuple[str, dict]]:
    """``(metric key, meta)`` of every after-training eval metric of the successful cells, in
    first-seen order; counts (no direction) only when primary."""
    columns: dict[str, dict] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for key, info in (r.get("metrics", {}).get("eval_meta") or {}).items():
            if key not in columns and (info.get("higher_is_better") is not None or info.get("primary")):
                columns[key] = info
    return list(columns.items())


def quality_axis(rows: list[dict]) -> tuple[str, dict] | None:
    """The metric the Pareto plots put on their quality axis (see the module docstring), or None."""
    primaries = [(k, m) for k, m in quality_columns(rows) if m.get("primary") and m.get("higher_is_better") is not None]
    for key, info in primaries:
        if info["higher_is_better"]:
            return key, info
    return primaries[0] if primaries else None


def pareto_front(points: list[tuple[float, float]], x_higher: bool, y_higher: bool) -> list[bool]:
    """For each point, whether no other point is at least as good on both axes and better on one."""

    def better_eq(a, b, higher):
        return a >= b if higher else a <= b

    def strictly(a, b, higher):
        return a > b if higher else a < b

    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            better_eq(ox, x, x_higher) and better_eq(oy, y, y_higher) and (strictly(ox, x, x_higher) or strictly(oy, y, y_higher))
            for j, (ox, oy) in enumerate(points)
            if j != i
        )
        flags.append(not dominated)
    return flags


def _tokens_per_s(m: dict) -> float | None:
    return m.get("tokens_per_s_after_warmup") if m.get("tokens_per_s_after_warmup") is not None else m.get("tokens_per_s")


def _memory(m: dict) -> tuple[float | None, str]:
    if m.get("peak_reserved_gib") is not None:
        return m["peak_reserved_gib"], "peak reserved GPU memory during training (GiB)"
    return m.get("weight_memory_gib"), "base model weight memory (GiB; on CPU a process's peak RSS is mostly libraries)"


def frontiers(rows: list[dict]) -> dict:
    """Per cell: its quality value and whether it is Pareto-optimal against memory and against
    tokens/s (what the plots mark and ``quality.json`` holds)."""
    axis = quality_axis(rows)
    out: dict[str, Any] = {"quality_metric": axis[0] if axis else None, "higher_is_better": axis[1]["higher_is_better"] if axis else None}
    out["columns"] = [{"key": k, **m} for k, m in quality_columns(rows)]
    cells = {}
    if axis:
        key, info = axis
        ok = [r for r in rows if r.get("status") == "ok" and r.get("metrics", {}).get(key) is not None]
        mem = [(r, _memory(r["metrics"])[0], r["metrics"][key]) for r in ok]
        mem = [(r, x, y) for r, x, y in mem if x is not None]
        speed = [(r, _tokens_per_s(r["metrics"]), r["metrics"][key]) for r in ok]
        speed = [(r, x, y) for r, x, y in speed if x is not None]
        for r in ok:
            cells[r["cell"]] = {"quality": r["metrics"][key], "pareto_memory": False, "pareto_tokens_per_s": False}
        for r, flag in zip([p[0] for p in mem], pareto_front([(x, y) for _, x, y in mem], False, info["higher_is_better"])):
            cells[r["cell"]]["pareto_memory"] = flag
        for r, flag in zip([p[0] for p in speed], pareto_front([(x, y) for _, x, y in speed], True, info["higher_is_better"])):
            cells[r["cell"]]["pareto_tokens_per_s"] = flag
    out["cells"] = cells
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict], axes: list[str], axis_title) -> list[str]:
    """The report's quality section (empty when no cell ran an evaluator)."""
    columns = quality_columns(rows)
    if not columns:
        return []
    front = frontiers(rows)
    header = [axis_title(a) for a in axes] + [
        f"{m['label']}: {m['metric']} {'↑' if m['higher_is_better'] else '↓' if m['higher_is_better'] is False else ''}".strip()
        for _, m in columns
    ]
    header += ["Pareto (memory)", "Pareto (tokens/s)"]
    lines = [
        "## Quality",
        "",
        "Each evaluator's metrics after training (the run config's `eval` list; ↑ higher is better, ↓ lower). "
        + (
            f"The Pareto columns and plots use `{front['quality_metric']}`: ★ marks a cell that no other cell beats on both "
            "quality and memory (or quality and training tokens/s)."
            if front["quality_metric"]
            else ""
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        if r.get("status") != "ok":
            continue
        m = r.get("metrics", {})
        flags = front["cells"].get(r["cell"], {})
        values = [str(r.get("labels", {}).get(a, "")).replace("|", "\\|") for a in axes] + [_fmt(m.get(k)) for k, _ in columns]
        values += ["★" if flags.get("pareto_memory") else "", "★" if flags.get("pareto_tokens_per_s") else ""]
        lines.append("| " + " | ".join(values) + " |")
    lines.append("")
    return lines


def pareto_plots(rows: list[dict], directory: Path, title: str) -> list[str]:
    """Quality vs memory and quality vs training tokens/s, Pareto-optimal cells ringed and joined."""
    axis = quality_axis(rows)
    if axis is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, info = axis
    higher = info["higher_is_better"]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("metrics", {}).get(key) is not None]
    written = []
    for filename, xfun, x_higher, xlabel in (
        (PLOT_PARETO_MEMORY, lambda m: _memory(m)[0], False, _memory(ok[0]["metrics"])[1] if ok else ""),
        (PLOT_PARETO_SPEED, _tokens_per_s, True, "training tokens/s after warm-up"),
    ):
        pts = [(r, xfun(r["metrics"]), r["metrics"][key]) for r in ok]
        pts = [(r, x, y) for r, x, y in pts if x is not None]
        if not pts:
            continue
        flags = pareto_front([(x, y) for _, x, y in pts], x_higher, higher)
        fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
        ax.scatter([x for _, x, _ in pts], [y for _, _, y in pts], s=40, color="0.55", zorder=2, label="cell")
        best = sorted((x, y) for (_, x, y), f in zip(pts, flags) if f)
        ax.scatter(
            [x for x, _ in best],
            [y for _, y in best],
            s=140,
            facecolors="none",
            edgecolors="red",
            linewidths=1.8,
            zorder=3,
            label="Pareto-optimal",
        )
        ax.plot([x for x, _ in best], [y for _, y in best], color="red", linewidth=1, alpha=0.6, zorder=1)
        for (r, x, y), f in zip(pts, flags):
            tag = "/".join(str(v) for v in r.get("labels", {}).values())
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color="black" if f else "0.45")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{info['label']}: {info['metric']} after training ({'higher' if higher else 'lower'} is better)")
        better = ("up" if higher else "down") + (" and right" if x_higher else " and left")
        ax.set_title(
            f"quality vs {'training throughput' if x_higher else 'memory'}: Pareto front ({better} is better)\n{title}", fontsize=10
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(directory / filename)
        plt.close(fig)
        written.append(filename)
    return written

"""``qpeft bench report DIR``: the newest record of every cell in ``DIR/results.jsonl`` as a
Markdown table (``report.md``), a CSV (``results.csv``) and two PNG plots (matplotlib):
memory vs training tokens/s (peak reserved memory on CUDA, the base model's weight memory on
CPU, where a process's peak RSS is mostly libraries), and validation perplexity vs base weight
memory."""

from __future__ import annotations

import csv
import io
import json
import shlex
from pathlib import Path
from typing import Any

from ..errors import QpeftError
from ..io import atomic_write_json, atomic_write_text
from .cell import SUMMARY_METRICS
from .matrix import axis_title
from .records import MATRIX_FILE, RESULTS_FILE, latest_records, read_records

REPORT_MD = "report.md"
REPORT_CSV = "results.csv"
PLOT_SPEED = "memory_vs_tokens_per_s.png"
PLOT_QUALITY = "quality_vs_memory.png"

ENV_ROWS = (
    ("gpu", "GPU"),
    ("gpu_memory_gib", "GPU memory (GiB)"),
    ("driver", "NVIDIA driver"),
    ("cuda", "CUDA (torch build)"),
    ("cpu", "CPU"),
    ("cpu_count", "CPU cores"),
    ("torch_threads", "torch threads"),
    ("platform", "platform"),
    ("python", "Python"),
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("bitsandbytes", "bitsandbytes"),
    ("gptqmodel", "gptqmodel"),
    ("optimum", "optimum"),
    ("qpeft", "qpeft"),
    ("plugins", "plugin packages (their libraries)"),
    ("env", "environment variables"),
)

METRIC_NOTES = """\
* **tokens/s**: training tokens (non-padding) per second after warm-up: the first fifth of the
  logged steps (1 to 10) is left out; **step s** is the mean optimizer-step time over the same steps.
* **peak memory**: on CUDA, `torch.cuda.max_memory_allocated` / `max_memory_reserved` during
  training; on CPU, the cell process's peak RSS (loading included). In a worker (`isolation:
  worker`) it is the worker's peak RSS since the cell started, which includes what the worker
  held then (`rss_at_cell_start_gib` in the CSV: its libraries and the base it keeps, `base_cache_gib`).
  Peak RSS counts the whole process — Python, torch and the other libraries, the data, activations,
  the optimizer — so on a small model it hides what quantization saves (an NF4 cell can show a
  higher peak RSS than an unquantized one): compare **weights** for that.
* **grad ckpt**: gradient checkpointing (on unless the method or quantizer cannot use it, or the config turns it off).
* **weights**: memory held by the loaded base model's parameters and buffers (what quantization shrinks).
* **load s**: loading (and quantizing) the base model; "(cache)": in a worker, a copy of the
  base the worker kept from its first load of it (that load's time: `load_uncached_seconds` in the CSV).
* **wall s**: the cell from start to record; in a worker, the first cell of each worker process
  (`worker_cell` 1) includes starting it and importing the libraries.
* **val ppl**: validation perplexity on the label tokens, before and after training.
* **gen tok/s**: greedy generation with the saved adapter reloaded on a fresh quantized base.
* **adapter MiB**: the saved adapter folder on disk (safetensors + configs).
* **merge Δ**: max |Δlogit| between the merged full-precision model and the adapter on its
  quantized base ("n/m": the method or quantizer cannot merge). The floor, where not 0, is the
  same distance between the quantized and the full-precision base without an adapter: LLM.int8
  (`bnb-8bit`) also quantizes activations, so its adapter-on-quantized-base reference cannot be
  reproduced by any full-precision model.
"""


def load(directory: str | Path) -> tuple[dict, list[dict]]:
    """The matrix description (``matrix.json``, may be empty) and the newest record of each
    cell, in the matrix's cell order (cells of earlier matrix versions after them)."""
    directory = Path(directory)
    if not (directory / RESULTS_FILE).is_file():
        raise QpeftError(f"{directory} has no {RESULTS_FILE}: run `qpeft bench MATRIX.yaml --out {directory}` first")
    meta: dict = {}
    if (directory / MATRIX_FILE).is_file():
        try:
            meta = json.loads((directory / MATRIX_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
    records = read_records(directory, strict=True)
    latest = latest_records(records)
    order = [c for c in meta.get("cells", []) if c in latest]
    order += [c for c in latest if c not in order]
    rows = [latest[c] for c in order]
    for row in rows:
        row["_commands"] = sorted({r.get("command", "") for r in records if r["cell"] == row["cell"] and r.get("command")})
    return meta, rows


def _axes(meta: dict, rows: list[dict]) -> list[str]:
    keys = list(meta.get("axes", {}))
    for r in rows:
        keys += [k for k in r.get("labels", {}) if k not in keys]
    return keys


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _ppl(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def _tokens_per_s(m: dict) -> float | None:
    return m.get("tokens_per_s_after_warmup") if m.get("tokens_per_s_after_warmup") is not None else m.get("tokens_per_s")


def _peak_text(m: dict, rss_suffix: bool = True) -> str:
    if m.get("peak_allocated_gib") is not None:
        return f"{m['peak_allocated_gib']:.2f} / {m.get('peak_reserved_gib', 0):.2f}"
    if m.get("peak_rss_gib") is not None:
        return f"{m['peak_rss_gib']:.2f}" + (" (RSS)" if rss_suffix else "")
    return "–"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _on_cuda(ok: list[dict]) -> bool:
    return any(r.get("metrics", {}).get("peak_reserved_gib") is not None for r in ok)


def memory_axis(rows: list[dict]) -> tuple[str, str]:
    """What the memory-vs-throughput plot puts on its x axis: (metric key, axis label)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if _on_cuda(ok):
        return "peak_reserved_gib", "peak reserved GPU memory during training (GiB)"
    return "weight_memory_gib", "base model weight memory: every tensor it holds, as its quantizer counts it (GiB)"


def plot_captions(rows: list[dict]) -> dict[str, str]:
    """One sentence per plot saying exactly what it shows."""
    key, _ = memory_axis(rows)
    if key == "weight_memory_gib":
        speed = (
            "Training tokens/s after warm-up against the base model's weight memory (parameters and buffers, "
            "the `weights GiB` column). On CPU the process's peak RSS (`peak RSS GiB`) is mostly Python, torch "
            "and the other libraries, so it would hide what quantization saves; it is in the table, not the plot."
        )
    else:
        speed = "Training tokens/s after warm-up against the peak reserved GPU memory during training (`max_memory_reserved`)."
    quality = "Validation perplexity after training against the base model's weight memory (parameters and buffers)."
    from .quality import PLOT_PARETO_MEMORY, PLOT_PARETO_SPEED, quality_axis

    axis = quality_axis(rows)
    pareto = f"`{axis[0]}` (after training)" if axis else ""
    return {
        PLOT_SPEED: speed,
        PLOT_QUALITY: quality,
        PLOT_PARETO_MEMORY: f"{pareto} against memory; ringed and joined: the Pareto-optimal cells (no other cell has both less memory and better quality).",
        PLOT_PARETO_SPEED: f"{pareto} against training tokens/s; ringed and joined: the Pareto-optimal cells (no other cell is both faster and better).",
    }


def selection(meta: dict, rows: list[dict]) -> dict | None:
    """When the folder holds results for only some of the matrix's cells (``--only``): how many
    of how many, and the ``--only`` terms of the commands that produced them; else None."""
    cells = meta.get("cells") or []
    have = [r["cell"] for r in rows if r["cell"] in set(cells)]
    if not cells or len(have) >= len(cells):
        return None
    terms: list[str] = []
    for r in rows:
        for command in r.get("_commands") or [r.get("command") or ""]:
            try:
                words = shlex.split(command)
            except ValueError:
                continue
            for i, word in enumerate(words):
                term = words[i + 1] if word == "--only" and i + 1 < len(words) else word[7:] if word.startswith("--only=") else None
                if term and term not in terms:
                    terms.append(term)
    return {"cells": len(have), "of": len(cells), "only": terms}


def markdown(meta: dict, rows: list[dict], plots: list[str], directory: Path, plot_note: str = "") -> str:
    """The report as Markdown."""
    axes = _axes(meta, rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") == "failed"]
    unsupported = [r for r in rows if r.get("status") == "unsupported"]
    name = meta.get("name") or (rows[0].get("matrix") if rows else "") or directory.name
    part = selection(meta, rows)
    lines = [f"# qpeft bench: {name}" + (f" ({part['cells']} of {part['of']} cells)" if part else ""), ""]
    if part:
        how = (
            "selected with " + " and ".join(f"`--only {shlex.quote(t)}`" for t in part["only"])
            if part["only"]
            else "the others were not run into this folder"
        )
        rest = part["of"] - part["cells"]
        text = (
            f"**This report covers {part['cells']} of the matrix's {part['of']} cells** ({how}); "
            f"{'the other one has' if rest == 1 else f'the other {rest} have'} no result here."
        )
        if meta.get("description"):
            lines += [text + " The matrix's own description, which speaks of all its cells:", ""]
            lines += ["> " + " ".join(meta["description"].split()), ""]
        else:
            lines += [text, ""]
    elif meta.get("description"):
        lines += [meta["description"].strip(), ""]
    commands = []
    for r in rows:
        commands += [c for c in r["_commands"] if c not in commands]
    if commands:
        lines += ["Produced by:", "", "```bash", *commands, f"qpeft bench report {directory}", "```", ""]
    lines += [f"{len(rows)} cell{'' if len(rows) == 1 else 's'}: {len(ok)} ok, {len(failed)} failed, {len(unsupported)} not supported.", ""]
    in_workers = [r for r in ok + failed if r.get("isolation") == "worker"]
    if in_workers:
        starts = sum(1 for r in in_workers if r.get("worker_cell") == 1)
        where = "all" if len(in_workers) == len(ok + failed) else f"{len(in_workers)} (the others each in a fresh process)"
        plural = "s" if starts != 1 else ""
        lines += [f"Cells run: {len(ok + failed)}, {where} in worker processes (`isolation: worker`, {starts} worker start{plural}).", ""]

    timed = [r for r in ok + failed if "timeout_s" in r]
    if timed:
        values = sorted({r["timeout_s"] for r in timed if isinstance(r["timeout_s"], (int, float))})
        span = "none" if not values else f"{values[0]:g} s" if len(values) == 1 else f"{values[0]:g}–{values[-1]:g} s"
        defaults = sum(1 for r in timed if str(r.get("timeout_basis", "")).startswith("default"))
        why = (
            "the default, derived from each cell's own budget and the times of similar cells (`timeout_s` in the matrix sets one)"
            if defaults == len(timed)
            else "the matrix's `timeout_s`"
            if not defaults
            else f"{defaults} cells the default derived from their budget, the others the matrix's `timeout_s`"
        )
        n_out = sum(1 for r in failed if str(r.get("error", "")).startswith("timed out"))
        lines += [f"Per-cell timeout: {span} ({why}; each cell's in results.csv); {n_out} timed out.", ""]

    envs = [r.get("environment") or {} for r in ok]
    if envs:
        lines += ["## Environment", "", "| | |", "|---|---|"]
        for key, title in ENV_ROWS:
            values = sorted({str(e[key]) for e in envs if e.get(key) is not None})
            if values:
                lines.append(f"| {title} | {_md_escape(', '.join(values))} |")
        commits = sorted({r.get("qpeft_commit") for r in ok if r.get("qpeft_commit")})
        if commits:
            lines.append(f"| qpeft commit | {', '.join(commits)} |")
        devices = sorted({f"{r['metrics'].get('device')} ({r['metrics'].get('dtype')})" for r in ok})
        lines += [f"| device (dtype) | {', '.join(devices)} |", ""]

    if ok or failed:
        on_cuda = any(r.get("metrics", {}).get("peak_allocated_gib") is not None for r in ok)
        peak_title = "peak alloc / reserved GiB" if on_cuda else "peak RSS GiB"
        header = [
            *map(axis_title, axes),
            "status",
            "tokens/s",
            "step s",
            peak_title,
            "grad ckpt",
            "weights GiB",
            "load s",
            "trainable",
            "val ppl before → after",
            "gen tok/s",
            "adapter MiB",
            "merge Δ",
            "wall s",
        ]
        lines += ["## Results", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in ok + failed:
            labels = [_md_escape(r.get("labels", {}).get(a, "")) for a in axes]
            if r.get("status") != "ok":
                err = "OOM" if r.get("oom") else "failed"
                lines.append(
                    "| "
                    + " | ".join(labels + [f"**{err}**"] + ["–"] * (len(header) - len(axes) - 2) + [_fmt(r.get("wall_seconds"), ".0f")])
                    + " |"
                )
                continue
            m = r.get("metrics", {})
            trainable = m.get("trainable_params")
            trainable_text = f"{trainable / 1e6:.2f} M ({m.get('trainable_percent', 0):.2f}%)" if trainable else "–"
            ppl = f"{_ppl(m.get('val_perplexity_before'))} → {_ppl(m.get('val_perplexity_after'))}"
            if m.get("objective"):  # dpo, kto, grpo, ...: the objective's held-out metrics instead of a perplexity
                ppl = objective_text(m.get("objective_eval_before") or {}, m.get("objective_eval_after") or {})
            adapter = m.get("adapter_bytes")
            merge = _fmt(m.get("merge_max_abs_logit_diff"), ".2e") if "merge_max_abs_logit_diff" in m else "n/m"
            if m.get("merge_base_path_diff"):
                merge += f" (floor {m['merge_base_path_diff']:.2g})"
            lines.append(
                "| "
                + " | ".join(
                    labels
                    + [
                        "ok",
                        _fmt(_tokens_per_s(m), ".1f"),
                        _fmt(m.get("step_seconds_after_warmup"), ".3g"),
                        _peak_text(m, rss_suffix=on_cuda),
                        _fmt(m.get("gradient_checkpointing")),
                        _fmt(m.get("weight_memory_gib"), ".3f") + (f" ({m['bits']:g}-bit)" if m.get("bits") else ""),
                        _fmt(m.get("load_seconds"), ".1f") + (" (cache)" if m.get("load_from_cache") else ""),
                        trainable_text,
                        ppl,
                        _fmt(m.get("generation_tokens_per_s"), ".1f"),
                        _fmt(adapter / 2**20 if adapter else None, ".2f"),
                        merge,
                        _fmt(r.get("wall_seconds"), ".0f"),
                    ]
                )
                + " |"
            )
        lines.append("")
    if unsupported:
        lines += [
            "## Not supported",
            "",
            "Refused by the capability checks before loading any weight (not failures).",
            "",
            "| cell | reason |",
            "|---|---|",
        ]
        lines += [f"| {_md_escape(r['cell'])} | {_md_escape(r.get('reason', ''))} |" for r in unsupported]
        lines.append("")
    if failed:
        lines += ["## Failed", "", "| cell | error | log |", "|---|---|---|"]
        lines += [f"| {_md_escape(r['cell'])} | {_md_escape(r.get('error', ''))} | `{r.get('log', '')}` |" for r in failed]
        lines.append("")
    from .quality import markdown as quality_markdown

    lines += quality_markdown(rows, axes, axis_title)
    if plots or plot_note:
        lines += ["## Plots", ""]
        captions = plot_captions(rows)
        for p in plots:
            lines += [f"![{p}]({p})", ""]
            if captions.get(p):
                lines += [captions[p], ""]
        if plot_note:
            lines += [plot_note, ""]
    lines += ["## What the columns mean", "", METRIC_NOTES]
    return "\n".join(lines)


def csv_text(meta: dict, rows: list[dict]) -> str:
    """One CSV row per cell: labels, status, every metric, the environment."""
    axes = _axes(meta, rows)
    metric_keys = list(SUMMARY_METRICS)
    for r in rows:
        metric_keys += [k for k in r.get("metrics", {}) if k not in metric_keys and k != "eval_meta"]
    env_keys: list[str] = []
    for r in rows:
        env_keys += [k for k in r.get("environment", {}) if k not in env_keys]
    columns = [
        "cell",
        *map(axis_title, axes),
        "status",
        "reason",
        "error",
        "oom",
        "wall_seconds",
        "timeout_s",
        "timeout_basis",
        *metric_keys,
        *(f"env.{k}" for k in env_keys),
        "qpeft_commit",
        "command",
        "recorded_at",
        "log",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        row = {
            "cell": r["cell"],
            **{axis_title(k): v for k, v in r.get("labels", {}).items()},
            "status": r.get("status"),
            "reason": r.get("reason"),
            "error": r.get("error"),
            "oom": r.get("oom"),
            "wall_seconds": r.get("wall_seconds"),
            "timeout_s": r.get("timeout_s"),
            "timeout_basis": r.get("timeout_basis"),
            **r.get("metrics", {}),
            **{f"env.{k}": v for k, v in r.get("environment", {}).items()},
            "qpeft_commit": r.get("qpeft_commit"),
            "command": r.get("command"),
            "recorded_at": r.get("recorded_at"),
            "log": r.get("log"),
        }
        writer.writerow(row)
    return buf.getvalue()


def _style_axes(axes: list[str]) -> tuple[str | None, str | None]:
    """The axis shown by colour (the quantizer's, else the first) and by marker (the PEFT method's, else the next)."""
    by_title = {axis_title(a): a for a in axes}
    color = by_title.get("quantizer", axes[0] if axes else None)
    rest = [a for a in axes if a != color]
    marker = by_title.get("peft") if by_title.get("peft") in rest else (rest[0] if rest else None)
    return color, marker


def plots(meta: dict, rows: list[dict], directory: Path) -> list[str]:
    """Write the two PNG plots; return their file names (none when no cell succeeded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return []
    axes = _axes(meta, rows)
    color_axis, marker_axis = _style_axes(axes)
    palette = plt.get_cmap("tab10").colors
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    colors = {v: palette[i % len(palette)] for i, v in enumerate(dict.fromkeys(r["labels"].get(color_axis) for r in ok))}
    shapes = {v: markers[i % len(markers)] for i, v in enumerate(dict.fromkeys(r["labels"].get(marker_axis) for r in ok))}
    others = [a for a in axes if a not in (color_axis, marker_axis)]
    name = meta.get("name") or directory.name
    device = ", ".join(
        sorted(
            {str(r.get("environment", {}).get("gpu") or r.get("environment", {}).get("cpu") or r["metrics"].get("device_name")) for r in ok}
        )
    )

    def draw(filename: str, xy, xlabel: str, ylabel: str, title: str, logy: bool = False) -> str | None:
        points = [(r, *xy(r["metrics"])) for r in ok]
        points = [(r, x, y) for r, x, y in points if x is not None and y is not None]
        if not points:
            return None
        fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
        tags: dict[tuple, list[str]] = {}  # cells at the same point (e.g. trainers with equal results) share one label
        for r, x, y in points:
            ax.scatter(
                [x],
                [y],
                s=60,
                color=colors[r["labels"].get(color_axis)],
                marker=shapes[r["labels"].get(marker_axis)],
                edgecolors="black",
                linewidths=0.5,
                zorder=3,
            )
            tag = "/".join(r["labels"].get(a, "") for a in others)
            if tag:
                tags.setdefault((f"{x:.6g}", f"{y:.6g}"), [x, y]).append(tag)
        for x, y, *names in tags.values():
            ax.annotate(", ".join(dict.fromkeys(names)), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color="0.25")
        if logy:
            ys = [y for _, _, y in points]
            if min(ys) > 0 and max(ys) / min(ys) > 10:
                ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{name} on {device}", fontsize=10)
        ax.grid(True, alpha=0.3)
        handles = [Line2D([], [], marker="o", linestyle="", color=c, label=f"{axis_title(color_axis)}={v}") for v, c in colors.items()]
        if marker_axis:
            handles += [
                Line2D([], [], marker=m, linestyle="", color="0.4", label=f"{axis_title(marker_axis)}={v}") for v, m in shapes.items()
            ]
        ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.8)
        fig.tight_layout()
        fig.savefig(directory / filename)
        plt.close(fig)
        return filename

    mem_key, mem_label = memory_axis(rows)
    mem_title = "weight memory" if mem_key == "weight_memory_gib" else "peak GPU memory"
    written = [
        draw(
            PLOT_SPEED,
            lambda m: (m.get(mem_key), _tokens_per_s(m)),
            mem_label,
            "training tokens/s after warm-up",
            f"{mem_title} vs training throughput (up and left is better)",
        ),
        draw(
            PLOT_QUALITY,
            lambda m: (m.get("weight_memory_gib"), m.get("val_perplexity_after")),
            "base model weight memory (GiB)",
            "validation perplexity after training",
            "quality vs memory (down and left is better)",
            logy=True,
        ),
    ]
    return [w for w in written if w]


def write_report(directory: str | Path) -> dict:
    """Write ``report.md``, ``results.csv``, the PNG plots and ``report.html`` (the same report in
    one self-contained page, :mod:`qpeft.html_report`) into ``directory``; return their paths."""
    directory = Path(directory)
    meta, rows = load(directory)
    note = ""
    try:
        pngs = plots(meta, rows, directory)
    except ImportError:
        pngs, note = [], "(plots need matplotlib: `pip install 'qpeft[bench]'`, then run `qpeft bench report` again)"
    from . import quality

    front = quality.frontiers(rows)
    if not note and front["quality_metric"]:
        pngs += quality.pareto_plots(rows, directory, meta.get("name") or directory.name)
    atomic_write_json(directory / quality.QUALITY_JSON, front)
    atomic_write_text(directory / REPORT_CSV, csv_text(meta, rows))
    text = markdown(meta, rows, pngs, directory, note)
    atomic_write_text(directory / REPORT_MD, text)
    from ..html_report import write_bench_html

    return {
        "html": write_bench_html(meta, rows, text, directory),
        "markdown": str(directory / REPORT_MD),
        "csv": str(directory / REPORT_CSV),
        "plots": [str(directory / p) for p in pngs],
        "cells": len(rows),
        "note": note,
    }


#: The objective metrics a report shows (TRL's names), with their short labels.
OBJECTIVE_SHOWN = {"rewards/accuracies": "acc", "rewards/margins": "margin", "reward": "reward"}


def objective_text(before: dict, after: dict) -> str:
    """A non-SFT objective's held-out metrics, before → after training (e.g. ``acc 0 → 0.94, margin 0 → 1.36``)."""
    parts = [f"{label} {_fmt(before.get(k), '.3g')} → {_fmt(after.get(k), '.3g')}" for k, label in OBJECTIVE_SHOWN.items() if k in after]
    return ", ".join(parts) or "–"

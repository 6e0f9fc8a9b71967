"""Render the measured LoRA-init and PEFT-method tables of docs/methods.md from `qpeft bench`
results (nothing typed by hand), and keep a copy of the results next to them.

    OMP_NUM_THREADS=1 nice qpeft bench configs/bench/lora_init_cpu.yaml
    OMP_NUM_THREADS=1 nice qpeft bench configs/bench/methods_cpu.yaml
    python benchmarks/methods_table.py            # --init DIR --methods DIR to read other runs

Writes benchmarks/results/lora_init_cpu.json and methods_cpu.json (the newest record of every
cell, unsupported ones with their reason) and replaces the text between the
``<!-- measured:lora-init -->`` / ``<!-- measured:methods -->`` markers of docs/methods.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

from qpeft.bench.report import load
from qpeft.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "methods.md"


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown CPU")


def _ppl(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def _keep(rows: list[dict]) -> list[dict]:
    """The fields the tables use, per cell (the raw records stay in the bench folder)."""
    keep = ("cell", "labels", "status", "reason", "error", "command", "qpeft_commit", "recorded_at", "metrics")
    return [{k: r[k] for k in keep if k in r} for r in rows]


def _why(row: dict) -> str:
    text = row.get("reason") or row.get("error") or row.get("status", "")
    return re.sub(r"\s+", " ", str(text)).replace("|", "/")


def init_table(rows: list[dict]) -> str:
    """quantizer × init: held-out perplexity of the base, at init, after training."""
    cells: dict[tuple[str, str], dict] = {}
    for r in rows:
        lab = r["labels"]
        cells.setdefault((lab["quantizer"], lab["peft.options.init"]), {})[lab["trainer"]] = r
    lines = [
        "| quantizer | init | base ppl | ppl at init | ppl after training | train loss | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for (quant, init), by_stage in cells.items():
        at, tr = by_stage.get("at-init"), by_stage.get("trained")
        if (at or tr)["status"] == "unsupported":
            lines.append(f"| {quant} | {init} | | | | | refused: {_why(at or tr)} |")
            continue
        if not (at and at["status"] == "ok" and tr and tr["status"] == "ok"):
            bad = next(r for r in (at, tr) if r and r["status"] != "ok")
            lines.append(f"| {quant} | {init} | | | | | {bad['status']}: {_why(bad)} |")
            continue
        ma, mt = at["metrics"], tr["metrics"]
        lines.append(
            f"| {quant} | {init} | {_ppl(ma.get('val_perplexity_before'))} | {_ppl(ma.get('val_perplexity_after'))} | "
            f"{_ppl(mt.get('val_perplexity_after'))} | {mt.get('train_loss', 0):.3f} | |"
        )
    return "\n".join(lines) + "\n"


def methods_table(rows: list[dict]) -> str:
    """method: perplexity before/after, trainable parameters, adapter bytes, tokens/s."""
    lines = [
        "| method | ppl before | ppl after | trainable params | adapter bytes | tokens/s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["labels"]["peft"]
        if r["status"] != "ok":
            lines.append(f"| {name} | | | | | | {r['status']}: {_why(r)} |")
            continue
        m = r["metrics"]
        lines.append(
            f"| {name} | {_ppl(m.get('val_perplexity_before'))} | {_ppl(m.get('val_perplexity_after'))} | "
            f"{m['trainable_params']:,} | {m['adapter_bytes']:,} | {m['tokens_per_s']:.1f} | |"
        )
    return "\n".join(lines) + "\n"


def _provenance(rows: list[dict], results: str, cpu: str) -> str:
    commits = sorted({r.get("qpeft_commit", "?") for r in rows if r.get("qpeft_commit")})
    dates = sorted(r.get("recorded_at", "") for r in rows if r.get("recorded_at"))
    commands = sorted({r.get("command", "") for r in rows if r.get("command")})
    return (
        f"Measured on {cpu} (2 cores shared with other jobs, `OMP_NUM_THREADS=1`, niced: tokens/s are "
        f"indicative only), qpeft {', '.join(commits)}, {dates[0][:10] if dates else '?'}; command: "
        f"{'; '.join(f'`{c}`' for c in commands)}; raw: [{results}](../{results}).\n\n"
    )


def replace_between(text: str, marker: str, body: str) -> str:
    start, end = f"<!-- measured:{marker} -->", f"<!-- /measured:{marker} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{DOC} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", default="runs/bench/lora_init_cpu", help="qpeft bench folder of configs/bench/lora_init_cpu.yaml")
    ap.add_argument("--methods", default="runs/bench/methods_cpu", help="qpeft bench folder of configs/bench/methods_cpu.yaml")
    args = ap.parse_args(argv)
    cpu = _cpu()
    text = DOC.read_text(encoding="utf-8")
    for marker, folder, render, name in (
        ("lora-init", args.init, init_table, "lora_init_cpu"),
        ("methods", args.methods, methods_table, "methods_cpu"),
    ):
        if not (Path(folder) / "results.jsonl").is_file():
            print(f"{folder}: no results, {marker} table left as it is")
            continue
        _, rows = load(folder)
        results = f"benchmarks/results/{name}.json"
        atomic_write_text(REPO / results, json.dumps({"cpu": cpu, "cells": _keep(rows)}, indent=1) + "\n")
        text = replace_between(text, marker, _provenance(rows, results, cpu) + render(rows))
        print(f"{marker}: {len(rows)} cells from {folder} -> {results}")
    atomic_write_text(DOC, text)


if __name__ == "__main__":
    main()

"""``qpeft bench report`` from hand-written records (no model, no cell process): what the memory
plot puts on its axis on CPU and on CUDA and says so, and a report of an ``--only`` selection
says how many of the matrix's cells it covers instead of repeating the matrix's "every cell"."""

from __future__ import annotations

import json

import pytest

from qpeft import bench
from qpeft.bench import report as bench_report

pytest.importorskip("matplotlib")

CELLS = [f"quantizer={q},peft=lora" for q in ("none", "bnb-8bit", "bnb-nf4", "bnb-fp4")]
DESCRIPTION = "Every supported quantizer × PEFT method cell on the embedded SmolLM2-135M."


def _record(quantizer: str, *, weights: float, peak: float, cuda: bool = False, command: str = "qpeft bench m.yaml") -> dict:
    metrics = {"weight_memory_gib": weights, "tokens_per_s_after_warmup": 100.0, "val_perplexity_after": 20.0}
    if cuda:
        metrics.update(peak_allocated_gib=peak * 0.8, peak_reserved_gib=peak, device="cuda")
    else:
        metrics.update(peak_rss_gib=peak, device="cpu")
    return {
        "cell": f"quantizer={quantizer},peft=lora",
        "labels": {"quantizer": quantizer, "peft": "lora"},
        "status": "ok",
        "metrics": metrics,
        "environment": {"gpu": "NVIDIA H100 80GB HBM3"} if cuda else {"cpu": "AMD EPYC"},
        "command": command,
    }


def _folder(tmp_path, records: list[dict], cells: list[str] = CELLS):
    (tmp_path / bench.MATRIX_FILE).write_text(
        json.dumps({"name": "smoke", "description": DESCRIPTION, "axes": {"quantizer": [], "peft": ["lora"]}, "cells": cells})
    )
    for r in records:
        bench.append_record(tmp_path, r)
    return tmp_path


@pytest.fixture
def scatter_points(monkeypatch) -> dict[str, list]:
    """The x values and x label of every plot drawn, by the plot's title's first line."""
    from matplotlib.axes import Axes

    drawn: dict[str, list] = {}
    current: list = []
    real_scatter, real_xlabel, real_title = Axes.scatter, Axes.set_xlabel, Axes.set_title

    def scatter(self, x, y, *args, **kwargs):
        current.extend(x)
        return real_scatter(self, x, y, *args, **kwargs)

    def set_xlabel(self, label, *args, **kwargs):
        current.append(("label", label))
        return real_xlabel(self, label, *args, **kwargs)

    def set_title(self, title, *args, **kwargs):
        drawn[title.splitlines()[0]] = list(current)
        current.clear()
        return real_title(self, title, *args, **kwargs)

    monkeypatch.setattr(Axes, "scatter", scatter)
    monkeypatch.setattr(Axes, "set_xlabel", set_xlabel)
    monkeypatch.setattr(Axes, "set_title", set_title)
    return drawn


def test_cpu_memory_plot_shows_weight_memory_not_peak_rss(tmp_path, scatter_points):
    # As measured on CPU: NF4's peak RSS (1.60) above no quantization's (1.55), its weights a third.
    out = _folder(tmp_path, [_record("none", weights=0.50, peak=1.55), _record("bnb-nf4", weights=0.155, peak=1.60)], CELLS[::2])
    result = bench_report.write_report(out)
    assert [p.rsplit("/", 1)[-1] for p in result["plots"]] == [bench_report.PLOT_SPEED, bench_report.PLOT_QUALITY]
    (speed_title,) = [t for t in scatter_points if "throughput" in t]
    assert speed_title.startswith("weight memory")
    *xs, label = scatter_points[speed_title]
    assert xs == [0.50, 0.155] and label == ("label", "base model weight memory: every tensor it holds, as its quantizer counts it (GiB)")
    md = (out / bench_report.REPORT_MD).read_text()
    # The report says what the plot shows, and why peak RSS is not it; the table keeps peak RSS.
    assert "against the base model's weight memory" in md and "peak RSS (`peak RSS GiB`) is mostly Python" in md
    assert "| peak RSS GiB |" in md and "| 1.60 |" in md
    assert "an NF4 cell can show a higher peak RSS than an unquantized one" in " ".join(md.split())


def test_cuda_memory_plot_shows_peak_reserved(tmp_path, scatter_points):
    out = _folder(tmp_path, [_record("none", weights=12.55, peak=17.5, cuda=True), _record("bnb-nf4", weights=3.5, peak=8.6, cuda=True)])
    bench_report.write_report(out)
    (speed_title,) = [t for t in scatter_points if "throughput" in t]
    *xs, label = scatter_points[speed_title]
    assert xs == [17.5, 8.6] and label == ("label", "peak reserved GPU memory during training (GiB)")
    md = (out / bench_report.REPORT_MD).read_text()
    assert "against the peak reserved GPU memory" in md and "| peak alloc / reserved GiB |" in md


def test_report_of_an_only_selection_says_which_cells_it_covers(tmp_path):
    command = "qpeft bench m.yaml --only 'quantizer=bnb-*' --only=quantizer=none"
    records = [_record(q, weights=0.2, peak=1.5, command=command) for q in ("none", "bnb-nf4")]
    out = _folder(tmp_path, records)
    bench_report.write_report(out)
    md = (out / bench_report.REPORT_MD).read_text()
    first = md.splitlines()[0]
    assert first == "# qpeft bench: smoke (2 of 4 cells)"
    assert "**This report covers 2 of the matrix's 4 cells** (selected with `--only 'quantizer=bnb-*'` and `--only quantizer=none`)" in md
    assert "the other 2 have no result here" in md
    # The matrix's "every supported cell" is quoted as the matrix's, not stated of this report.
    assert f"which speaks of all its cells:\n\n> {DESCRIPTION}" in md
    assert f"\n{DESCRIPTION}" not in md.replace(f"> {DESCRIPTION}", "")
    assert "2 cells: 2 ok, 0 failed, 0 not supported." in md


def test_report_of_every_cell_keeps_the_description(tmp_path):
    out = _folder(tmp_path, [_record(q, weights=0.2, peak=1.5) for q in ("none", "bnb-8bit", "bnb-nf4", "bnb-fp4")])
    bench_report.write_report(out)
    md = (out / bench_report.REPORT_MD).read_text()
    assert md.startswith(f"# qpeft bench: smoke\n\n{DESCRIPTION}\n") and "This report covers" not in md
    assert bench_report.selection(json.loads((out / bench.MATRIX_FILE).read_text()), bench_report.load(out)[1]) is None


def test_selection_without_only_says_the_others_were_not_run(tmp_path):
    meta = {"cells": CELLS}
    rows = [{"cell": CELLS[0], "_commands": ["qpeft bench m.yaml --stop-after 10"]}]
    assert bench_report.selection(meta, rows) == {"cells": 1, "of": 4, "only": []}
    md = bench_report.markdown(meta, rows, [], tmp_path)
    assert "(the others were not run into this folder); the other 3 have no result here." in md

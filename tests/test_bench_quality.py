"""Quality axes of ``qpeft bench``: evaluator metrics as report columns, Pareto plots with the
Pareto-optimal cells marked; a real CPU matrix on the tiny Llama with perplexity and lm-eval."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from qpeft import bench
from qpeft.bench import quality as bench_quality
from qpeft.bench import report as bench_report

pytest.importorskip("matplotlib")


def test_pareto_front():
    # (memory, accuracy): less memory and more accuracy are better
    points = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.7), (0.5, 0.2)]
    assert bench_quality.pareto_front(points, x_higher=False, y_higher=True) == [True, True, False, False, True]
    # (tokens/s, perplexity): faster and lower are better
    assert bench_quality.pareto_front([(10, 5.0), (20, 6.0), (5, 7.0)], x_higher=True, y_higher=False) == [True, True, False]


def test_cell_eval_metrics_flatten_the_summary():
    summary = {
        "eval": {
            "lm-eval": {
                "evaluator": "lm-eval",
                "primary": "t/acc",
                "higher_is_better": {"t/acc": True},
                "before": {"t/acc": 0.25, "t/samples": 8},
                "after": {"t/acc": 0.5, "t/samples": 8},
            }
        }
    }
    flat = bench_quality.cell_eval_metrics(summary)
    assert flat["eval.lm-eval.t/acc"] == 0.5 and flat["eval.lm-eval.t/acc.before"] == 0.25
    assert flat["eval_meta"]["eval.lm-eval.t/acc"]["primary"] is True
    assert flat["eval_meta"]["eval.lm-eval.t/samples"]["higher_is_better"] is None


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_cpu_bench_matrix_report_has_quality_columns_and_pareto_plots(tiny_llama_path, tmp_path):
    pytest.importorskip("lm_eval")
    base = {
        "model": {"name_or_path": tiny_llama_path, "device": "cpu"},
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4, "alpha": 8}},
        "trainer": {"name": "native", "options": {"batch_size": 2, "max_steps": 2, "lr": 1e-2, "scheduler": "constant"}},
        "data": {"path": "embedded:text", "max_length": 32, "max_train_examples": 4, "max_val_examples": 2},
        "gradient_checkpointing": False,
        "generate": {"max_new_tokens": 2, "chat_template": False},
        "eval": ["perplexity", {"name": "lm-eval", "options": {"limit": 4}}],
    }
    matrix = {"name": "quality", "base": base, "axes": {"peft.options.r": [2, 8]}, "merge": False, "isolation": "worker"}
    out = tmp_path / "out"
    counts = bench.run_matrix(_write(tmp_path / "m.yaml", matrix), out_dir=out)
    assert counts.get("ok") == 2, counts
    result = bench_report.write_report(out)
    names = [p.rsplit("/", 1)[-1] for p in result["plots"]]
    assert bench_quality.PLOT_PARETO_MEMORY in names and bench_quality.PLOT_PARETO_SPEED in names
    assert all((out / n).stat().st_size > 1000 for n in names)
    md = (out / "report.md").read_text()
    assert "## Quality" in md and "lm-eval: python_topics_mc/acc ↑" in md and "perplexity: perplexity ↓" in md
    quality = json.loads((out / bench_quality.QUALITY_JSON).read_text())
    assert quality["quality_metric"] == "eval.lm-eval.python_topics_mc/acc" and quality["higher_is_better"] is True
    records = {r["cell"]: r for r in bench.latest_records(bench.read_records(out)).values()}
    assert set(quality["cells"]) == set(records)
    # the marks are the Pareto front of the recorded numbers
    cells = sorted(records)
    pts = [(records[c]["metrics"]["weight_memory_gib"], records[c]["metrics"]["eval.lm-eval.python_topics_mc/acc"]) for c in cells]
    assert [quality["cells"][c]["pareto_memory"] for c in cells] == bench_quality.pareto_front(pts, False, True)
    assert sum("★" in line for line in md.splitlines() if line.startswith("| ")) >= 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert all(0 <= float(r["eval.lm-eval.python_topics_mc/acc"]) <= 1 and float(r["eval.perplexity.perplexity"]) > 1 for r in rows)
    assert "eval_meta" not in rows[0]

"""qpeft bench on a tiny random Llama (the 7B builder's tiny shape): matrix expansion, cells
refused by capabilities listed with the reason, a crashing cell recorded while the others go
on, resume, --only/--rerun, the JSONL results file, the report; and the random-model builder."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from typer.testing import CliRunner

import qpeft
from qpeft import bench, orchestrator
from qpeft.bench.report import PLOT_QUALITY, PLOT_SPEED
from qpeft.cli import app
from qpeft.errors import ConfigError, QpeftError
from qpeft.registry import load_registry

sys.path.insert(0, str(REPO / "benchmarks"))
import make_random_model

REGISTRY = load_registry()


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory, embedded_model_path) -> str:
    """The builder's tiny shape: Llama-2's layout and 32,000-token vocabulary, 2 small layers."""
    return make_random_model.build("tiny", tmp_path_factory.mktemp("random") / "tiny", dtype="float32", device="cpu")


def _base(model: str) -> dict:
    return {
        "model": model,
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4, "alpha": 8}},
        "trainer": {"name": "native", "options": {"batch_size": 2, "max_steps": 3, "lr": 1e-3, "scheduler": "constant"}},
        "data": {"path": "embedded:text", "max_length": 32, "max_train_examples": 6, "max_val_examples": 2},
        # prefix tuning cannot use gradient checkpointing: its cells are refused by resolve()
        "gradient_checkpointing": True,
        "generate": {"max_new_tokens": 2, "chat_template": False},
    }


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------------------- the builder


def test_random_model_builder(random_tiny, tmp_path):
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(random_tiny)
    tok = AutoTokenizer.from_pretrained(random_tiny)
    assert cfg.vocab_size == len(tok) == 32000 and not cfg.tie_word_embeddings
    ids = tok("Résumé: the quick brown fox — 日本語 ✓", add_special_tokens=False)["input_ids"]
    assert max(ids) < 32000 and tok.decode(ids) == "Résumé: the quick brown fox — 日本語 ✓"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).count("<|im_start|>") >= 2
    # Llama-2-7B's shape: 6.74 B parameters (counted on the meta device, nothing allocated).
    with torch.device("meta"):
        big = LlamaForCausalLM(LlamaConfig(**make_random_model.SHAPES["llama-2-7b"], tie_word_embeddings=False))
    assert sum(p.numel() for p in big.parameters()) == 6_738_415_616
    # A second build of the same spec is a no-op.
    before = os.stat(os.path.join(random_tiny, "model.safetensors")).st_mtime_ns
    make_random_model.build("tiny", random_tiny, dtype="float32", device="cpu")
    assert os.stat(os.path.join(random_tiny, "model.safetensors")).st_mtime_ns == before


# ---------------------------------------------------------------------------- expansion


def test_expansion_overrides_and_capability_skips(random_tiny, tmp_path):
    matrix = {
        "name": "expand",
        "base": _base(random_tiny),
        "set": ["trainer.options.lr=0.002"],
        "axes": {
            "quantizer": ["none", {"name": "bnb-nf4", "options": {"double_quant": False}}],
            "peft": ["lora", "prefix"],
            "trainer.name": ["hf", "native"],
            "trainer.options.batch_size": {"b1": 1},
        },
        "exclude": [{"quantizer": "bnb-nf4", "trainer": "native"}],
    }
    m = bench.load_matrix(_write(tmp_path / "m.yaml", matrix))
    cells = bench.expand(m, REGISTRY, tmp_path / "out")
    assert [c.id for c in cells] == [
        "quantizer=none,peft=lora,trainer=hf,trainer.options.batch_size=b1",
        "quantizer=none,peft=lora,trainer=native,trainer.options.batch_size=b1",
        "quantizer=none,peft=prefix,trainer=hf,trainer.options.batch_size=b1",
        "quantizer=none,peft=prefix,trainer=native,trainer.options.batch_size=b1",
        "quantizer=bnb-nf4,peft=lora,trainer=hf,trainer.options.batch_size=b1",
        "quantizer=bnb-nf4,peft=prefix,trainer=hf,trainer.options.batch_size=b1",
    ]
    for c in cells:
        trainer = c.config["trainer"]
        # switching trainer.name keeps the shared options; set and axis values both apply
        assert trainer["options"]["batch_size"] == 1 and trainer["options"]["lr"] == 0.002 and trainer["options"]["max_steps"] == 3
        assert c.config["output_dir"].endswith(f"cells/{c.slug}/run")
        if c.labels["peft"] == "prefix":
            assert c.status == "unsupported"
            # the reason is resolve()'s own: the same error `qpeft run` gives for that config
            with pytest.raises(ConfigError) as exc:
                orchestrator.prepare(c.config, registry=REGISTRY)
            assert c.reason == str(exc.value) and "gradient checkpointing" in c.reason
        else:
            assert c.status == "pending" and c.mergeable and c.reason == ""
    assert cells[4].config["quantizer"] == {"name": "bnb-nf4", "options": {"double_quant": False}}
    assert cells[4].labels["quantizer"] == "bnb-nf4"  # a backend with options is labelled by its name


def test_shipped_matrices_expand(tmp_path):
    """configs/bench/: the CPU smoke matrix is every supported cell of its own quantizer and
    method axes; the H100 matrix, moved to the CPU by --set overrides, is 12 cells with
    checkpointing as resolved."""
    matrix = bench.load_matrix(REPO / "configs/bench/cpu_smoke.yaml")
    smoke = bench.expand(matrix, REGISTRY, tmp_path / "s")
    from qpeft import capability_table

    quantizers = {c.labels["quantizer"] for c in smoke}
    methods = {c.labels["peft"] for c in smoke}
    assert quantizers == {"none", "bnb-8bit", "bnb-nf4", "bnb-fp4"} and methods == {"lora", "prefix", "adapters"}
    supported = {
        (c.quantizer, c.peft) for c in capability_table.table(REGISTRY) if c.train and c.quantizer in quantizers and c.peft in methods
    }
    assert {(c.labels["quantizer"], c.labels["peft"]) for c in smoke} == supported
    assert len(smoke) == 2 * len(supported) and all(c.status == "pending" and c.device == "cpu" for c in smoke)
    assert sum(c.mergeable for c in smoke) == 8

    h100 = bench.load_matrix(REPO / "configs/bench/h100.yaml", ["model.device=cpu", "model.dtype=float32"])
    cells = bench.expand(h100, REGISTRY, tmp_path / "h")
    assert len(cells) == 12 and all(c.status == "pending" for c in cells)
    assert {c.labels["trainer.name"] for c in cells if c.labels["peft"] != "lora"} == {"hf"}
    for c in cells:
        assert c.config["trainer"]["options"]["batch_size"] == 4 and c.config["data"]["max_length"] == 1024
        resolved = orchestrator.prepare(c.config, registry=REGISTRY)[0]
        assert resolved.grad_checkpointing == (c.labels["peft"] != "prefix")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"axis": {"quantizer": ["none"]}}, "axis: unknown key 'axis'"),
        ({"axes": {"quantizer": ["none", "bnb-nf5"]}}, "axes.quantizer[bnb-nf5]: quantizer.name: unknown quantizer 'bnb-nf5'"),
        ({"axes": {"trainer.options.batch_sise": [2]}}, "axes.trainer.options.batch_sise[2]: trainer.options.batch_sise: unknown key"),
        ({"axes": {"peft": []}}, "axes.peft: has no values"),
        ({"axes": {"output_dir": ["a", "b"]}}, "axes.output_dir: cannot be an axis"),
        ({"exclude": [{"trainer": "hf"}]}, "exclude[0]: unknown axis 'trainer'; axes: quantizer"),
        ({"base": "missing.yaml"}, "base: config file not found"),
    ],
)
def test_bad_matrix_exits_2_naming_the_key(change, message, random_tiny, tmp_path):
    matrix = {"name": "bad", "base": _base(random_tiny), "axes": {"quantizer": ["none"]}}
    matrix.update(change)
    result = CliRunner().invoke(app, ["bench", _write(tmp_path / "m.yaml", matrix), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / bench.RESULTS_FILE).exists()


# ---------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def matrix_file(random_tiny, tmp_path_factory) -> str:
    """model {tiny, broken} × peft {lora, prefix}: one cell runs, one crashes at load time (its
    safetensors file is cut short), two are refused by capabilities."""
    d = tmp_path_factory.mktemp("bench")
    broken = d / "broken-model"
    shutil.copytree(random_tiny, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    matrix = {
        "name": "tiny",
        "base": _base(random_tiny),
        "axes": {"model": {"tiny": random_tiny, "broken": str(broken)}, "peft": ["lora", "prefix"]},
    }
    return _write(d / "matrix.yaml", matrix)


def _lines(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / bench.RESULTS_FILE).read_text().splitlines()]


def test_run_resume_select_and_report(matrix_file, tmp_path):
    out = tmp_path / "results"
    events: list[dict] = []
    counts = bench.run_matrix(matrix_file, out_dir=out, on_event=events.append)
    assert (counts["ok"], counts["failed"], counts["unsupported"]) == (1, 1, 2)
    assert [e["cell"] for e in events if e["type"] == "start"] == ["model=tiny,peft=lora", "model=broken,peft=lora"]
    steps = [e for e in events if e["type"] == "progress" and e.get("kind") == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and steps[0]["max_steps"] == 3  # live progress from the cell process

    records = _lines(out)
    by_cell = {r["cell"]: r for r in records}
    assert list(by_cell) == ["model=tiny,peft=lora", "model=tiny,peft=prefix", "model=broken,peft=lora", "model=broken,peft=prefix"]
    ok = by_cell["model=tiny,peft=lora"]
    assert ok["status"] == "ok", ok
    m = ok["metrics"]
    assert m["tokens_per_s_after_warmup"] > 0 and m["step_seconds_after_warmup"] > 0 and m["warmup_steps"] == 1
    assert m["peak_rss_gib"] > 0 and m["weight_memory_gib"] > 0 and m["load_seconds"] >= 0
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["val_perplexity_before"] > 0 and m["val_perplexity_after"] > 0 and m["val_loss_before"] > 0
    assert m["generation_tokens_per_s"] > 0 and m["adapter_bytes"] > 0
    assert m["merge_max_abs_logit_diff"] < 1e-3  # full-precision base: the merge is exact to float error
    assert ok["environment"]["torch"] and ok["environment"]["peft"] and ok["environment"]["cpu_count"] >= 1
    # qpeft's own version and commit (the matrix file lies outside any repository here).
    assert ok["qpeft_version"] == qpeft.__version__ and ok["qpeft_commit"] == bench.qpeft_commit(), ok
    assert m["bits"] is None  # quantizer none: full precision
    crashed = by_cell["model=broken,peft=lora"]
    assert crashed["status"] == "failed" and "model.safetensors" in crashed["error"] and crashed["returncode"] != 0
    assert (out / crashed["log"]).is_file()
    for cell in ("model=tiny,peft=prefix", "model=broken,peft=prefix"):
        assert by_cell[cell]["status"] == "unsupported" and "gradient checkpointing" in by_cell[cell]["reason"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "cells" / "tiny__lora" / "run" / "merged").exists()  # merged weights are not kept

    # The same command again (the CLI): nothing runs, nothing is appended.
    result = CliRunner().invoke(app, ["bench", matrix_file, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "0 ok, 0 failed, 2 not supported, 2 finished before" in text, text
    assert "tiny · prefix: not supported: gradient_checkpointing" in text and "broken · lora: finished before (failed)" in text
    assert len(_lines(out)) == 4

    # Selection, dry: --only narrows, --retry-failed and --rerun bring finished cells back.
    def dry(**kw):
        return {cid: action for cid, action, _ in bench.run_matrix(matrix_file, out_dir=out, dry_run=True, **kw)["actions"]}

    assert dry(only=["model=broken"]) == {"model=broken,peft=lora": "done", "model=broken,peft=prefix": "unsupported"}
    assert dry(only=["model=broken,peft=lora"], retry_failed=True) == {"model=broken,peft=lora": "run"}
    assert dry(only=["*tiny*lora*"], rerun=["*"]) == {"model=tiny,peft=lora": "run"}
    with pytest.raises(QpeftError, match="unknown axis 'size'"):
        dry(only=["size=1"])
    with pytest.raises(QpeftError, match="matches no cell"):
        dry(only=["model=huge"])
    # A changed config makes its earlier record stale: that cell runs again.
    data = yaml.safe_load(Path(matrix_file).read_text())
    data["base"]["trainer"]["options"]["lr"] = 2e-3
    changed = _write(tmp_path / "changed.yaml", data)
    stale = {cid: a for cid, a, _ in bench.run_matrix(changed, out_dir=out, dry_run=True)["actions"]}
    assert stale["model=tiny,peft=lora"] == "run" and stale["model=tiny,peft=prefix"] == "unsupported"

    # --only + --rerun for real: only that cell runs (it crashes again); its new record is appended and wins.
    events.clear()
    counts = bench.run_matrix(matrix_file, out_dir=out, only=["model=broken"], rerun=["peft=lora"], on_event=events.append)
    assert [e["cell"] for e in events if e["type"] == "start"] == ["model=broken,peft=lora"]
    assert counts["failed"] == 1 and counts["unsupported"] == 1 and counts["ok"] == 0
    lines = _lines(out)
    assert len(lines) == 5 and lines[-1]["cell"] == "model=broken,peft=lora" and lines[-1]["recorded_at"] >= lines[2]["recorded_at"]
    assert bench.latest_records(lines)["model=broken,peft=lora"] == lines[-1]

    # The report: Markdown, CSV and plots name every cell.
    result = CliRunner().invoke(app, ["bench", "report", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "| tiny | lora | ok |" in md and "| broken | lora | **failed** |" in md
    assert "model=tiny,peft=prefix" in md and "model=broken,peft=lora" in md and "## Not supported" in md
    assert "Per-cell timeout: 1980 s (the default, derived from each cell's own budget" in md and "0 timed out" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rows[0]["timeout_s"] == "1980" and rows[0]["timeout_basis"].startswith("default: 1800 s + 3 steps × 60 s")
    assert [r["cell"] for r in rows] == list(by_cell) and [r["status"] for r in rows] == ["ok", "unsupported", "failed", "unsupported"]
    assert float(rows[0]["tokens_per_s_after_warmup"]) > 0 and rows[0]["model"] == "tiny" and rows[0]["env.torch"]
    for png in (PLOT_SPEED, PLOT_QUALITY):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in md


def test_a_run_leaves_no_empty_checkpoints_folder_and_no_lock_file(random_tiny, tmp_path):
    # The HF Trainer creates run/checkpoints/ as its output folder even when it saves nothing.
    base = _base(random_tiny)
    base["trainer"] = {"name": "hf", "options": {"batch_size": 2, "max_steps": 2, "lr": 1e-3}}
    matrix = {"name": "clean", "base": base, "axes": {"peft": ["lora"]}, "merge": False, "isolation": "worker"}
    out = tmp_path / "out"
    counts = bench.run_matrix(_write(tmp_path / "m.yaml", matrix), out_dir=out)
    assert counts["ok"] == 1
    run = out / "cells" / "lora" / "run"
    assert (run / "adapter").is_dir() and not (run / "checkpoints").exists()
    assert not [p for p in out.rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert not [p for p in out.rglob("*") if p.name.endswith(".lock")]  # released normally: the lock files are gone


def test_remove_empty_checkpoints_keeps_a_folder_with_anything_in_it(tmp_path):
    assert not bench.remove_empty_checkpoints(tmp_path) and not bench.remove_empty_checkpoints(None)  # none there
    (tmp_path / "checkpoints").mkdir()
    assert bench.remove_empty_checkpoints(tmp_path) and not (tmp_path / "checkpoints").exists()
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    assert not bench.remove_empty_checkpoints(tmp_path) and (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (tmp_path / "checkpoints").rename(tmp_path / "kept")
    (tmp_path / "checkpoints").symlink_to(other)  # a link is not followed, nor removed
    assert not bench.remove_empty_checkpoints(tmp_path) and other.is_dir()


def test_timeout_kills_the_cell_and_is_recorded(random_tiny, tmp_path):
    matrix = {"name": "slow", "base": _base(random_tiny), "axes": {"peft": ["lora"]}, "timeout_s": 1}
    counts = bench.run_matrix(_write(tmp_path / "m.yaml", matrix), out_dir=tmp_path / "out")
    assert counts["failed"] == 1
    (record,) = _lines(tmp_path / "out")
    assert record["status"] == "failed" and record["error"] == "timed out after 1 s" and record["wall_seconds"] < 30


@pytest.mark.parametrize(
    "value, message",
    [
        (True, "timeout_s: expected a number of seconds"),
        (-5, "timeout_s: expected a number of seconds (0: no timeout)"),
        (".inf", "timeout_s: "),
        ("soon", "timeout_s: "),
    ],
)
def test_bad_timeout_is_an_error_naming_the_key(value, message, random_tiny, tmp_path):
    matrix = {"name": "t", "base": _base(random_tiny), "axes": {"peft": ["lora"]}, "timeout_s": value}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(matrix, sort_keys=False).replace("'.inf'", ".inf"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        bench.load_matrix(path)


def test_default_timeout_is_derived_from_each_cells_budget(random_tiny, tmp_path, monkeypatch):
    """``timeout_s`` left out: each cell's timeout comes from what it is asked to do (steps,
    tokens per step) and from what a finished similar cell measured; a number, 0 or null in the
    matrix sets or removes it; ``--list`` and the plan show it."""
    base = _base(random_tiny)
    base["gradient_checkpointing"] = "auto"
    base["trainer"]["options"].pop("max_steps")
    axes = {
        "trainer.options": {
            "s3": {"max_steps": 3, "batch_size": 2},
            "s30": {"max_steps": 30, "batch_size": 4},  # twice the tokens a step
            "epochs": {"epochs": 2, "batch_size": 2},  # 2 × 6 examples / 2 a step: 6 steps
        },
        "data.max_train_examples": {"n6": 6, "all": None},
    }
    path = _write(
        tmp_path / "m.yaml", {"name": "t", "base": base, "axes": axes, "exclude": [{"options": ["s3", "s30"], "max_train_examples": "all"}]}
    )
    m = bench.load_matrix(path)
    assert m.config.timeout_s == "auto"
    cells = {c.slug: c for c in bench.expand(m, REGISTRY, tmp_path / "out")}
    assert {k: c.budget["steps"] for k, c in cells.items()} == {"s3__n6": 3, "s30__n6": 30, "epochs__n6": 6, "epochs__all": None}
    first, more, epochs, unknown = (cells[k] for k in ("s3__n6", "s30__n6", "epochs__n6", "epochs__all"))
    assert more.budget["tokens_per_step"] == 2 * first.budget["tokens_per_step"] == 4 * 32

    timeouts = bench.Timeouts("auto", list(cells.values()), [])
    t = timeouts.for_cell(first)  # nothing measured: the generous allowance
    assert t.seconds() == bench.FIRST_CELL_FIXED_S + 3 * bench.FIRST_CELL_STEP_S == 1980
    assert t.describe() == "1980 s (default: 1800 s + 3 steps × 60 s, no similar cell measured yet)"
    assert timeouts.for_cell(epochs).seconds() == 1800 + 6 * 60
    t = timeouts.for_cell(unknown)  # steps known only once training reports them
    assert t.seconds() == 1800 and "until training reports its steps" in t.describe()
    t.on_event({"kind": "message", "text": "loading"})
    t.on_event({"kind": "step", "step": 1, "max_steps": 5, "loss": 1.0, "tokens": 64})
    assert t.seconds() == 1800 + 5 * 60 and t.describe().startswith("2100 s (")

    # The first cell finished in 20 s, 2 of them training 3 steps: similar cells get 4 × that,
    # rescaled to their steps and tokens a step, and at least TIMEOUT_MIN_S.
    record = {"cell": first.id, "status": "ok", "fingerprint": first.fingerprint, "wall_seconds": 20.0}
    record["metrics"] = {"train_seconds": 2.0, "train_steps": 3}
    timeouts.learn(first, record)
    assert timeouts.for_cell(first).seconds() == max(bench.TIMEOUT_MIN_S, 4 * (18 + 3 * 2 / 3)) == 80
    t = timeouts.for_cell(more)
    assert t.seconds() == math.ceil(4 * (18 + 30 * 2 * 2 / 3)) == 232
    assert t.basis == f"default: 4 × (18.0 s + 30 steps × 1.33 s) as measured on {first.id}"
    # The same from results.jsonl (a record of the same config), as a resumed bench reads it.
    assert bench.Timeouts("auto", list(cells.values()), [record]).for_cell(more).seconds() == 232
    assert bench.Timeouts("auto", list(cells.values()), [{**record, "fingerprint": "stale"}]).for_cell(more).seconds() == 1800 + 30 * 60
    assert bench.Timeouts("auto", list(cells.values()), [{**record, "status": "failed"}]).for_cell(more).seconds() == 1800 + 30 * 60
    # A cell of another group (here: another sequence length) is not measured by this one.
    other = bench.expand(bench.load_matrix(path, ["data.max_length=64"]), REGISTRY, tmp_path / "out")[0]
    assert timeouts.for_cell(other).seconds() == 1980

    # The matrix sets or removes it.
    for value, seconds, basis in ((7, 7.0, "timeout_s in the matrix"), (0, None, "off"), (None, None, "off")):
        data = yaml.safe_load(Path(path).read_text())
        data["timeout_s"] = value
        m = bench.load_matrix(_write(tmp_path / "m2.yaml", data))
        t = bench.Timeouts(m.config.timeout_s, [], []).for_cell(first)
        assert t.seconds() == seconds and basis in t.basis

    # --list shows each cell's timeout. The CLI's consoles are made at import, with the width
    # the environment had then (COLUMNS=80 if a test set it first): widen them for this check.
    from qpeft import cli

    for c in (cli.console, cli.out):
        monkeypatch.setattr(c, "_width", 300)
        monkeypatch.setattr(c, "_height", 25)
    result = CliRunner().invoke(app, ["bench", path, "--list", "--out", str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "1980 s (default: 1800 s + 3 steps × 60 s" in result.output and "3600 s (default" in result.output


# ---------------------------------------------------------------------------- the results file


def test_records_name_qpeft_own_commit_and_the_plugin_packages(monkeypatch):
    """Issue 21: records named the commit of the repository holding the matrix file, and no
    plugin package; now qpeft's own checkout and every plugin distribution with its libraries."""
    import subprocess

    monkeypatch.delenv("QPEFT_COMMIT", raising=False)
    if not Path(qpeft.__file__).resolve().is_relative_to(REPO):
        pytest.skip("qpeft is not imported from this checkout")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert bench.qpeft_commit().removesuffix("+dirty") == head
    monkeypatch.setenv("QPEFT_COMMIT", "abc1234")
    assert bench.qpeft_commit() == "abc1234"
    from importlib.metadata import version

    assert f"qpeft-torchao {version('qpeft-torchao')} (torchao {version('torchao')})" in bench.plugin_packages()


def test_append_is_atomic_and_reader_skips_a_torn_line(tmp_path, monkeypatch):
    bench.append_record(tmp_path, {"cell": "a", "status": "ok"})
    before = (tmp_path / bench.RESULTS_FILE).read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        bench.append_record(tmp_path, {"cell": "b", "status": "ok"})
    monkeypatch.undo()
    assert (tmp_path / bench.RESULTS_FILE).read_bytes() == before  # the old file, whole
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # A file torn by some other writer: the half line is skipped, appends go on after it.
    with open(tmp_path / bench.RESULTS_FILE, "a") as f:
        f.write('{"cell": "c", "sta')
    bench.append_record(tmp_path, {"cell": "d", "status": "failed"})
    assert [r["cell"] for r in bench.read_records(tmp_path)] == ["a", "d"]


def test_failure_reasons(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    reason = bench._failure(1, log, False, None)
    assert reason.startswith("torch.OutOfMemoryError: CUDA out of memory") and bench._is_oom(reason)
    assert bench._failure(-9, log, False, None).startswith("killed by SIGKILL")
    log.write_text("  12.0s loading\nerror: data.path: data file not found: x.jsonl\n")
    assert bench._failure(2, log, False, None) == "data.path: data file not found: x.jsonl"


def test_cells_side_by_side_one_per_listed_gpu(random_tiny, tmp_path):
    """`qpeft bench --gpus 0,1`: two worker slots take cells as they free up, each cell process
    sees only its slot's GPU (CUDA_VISIBLE_DEVICES, recorded in its environment), every cell is
    recorded exactly once, and a second run finds them all finished. (On this CPU machine the
    GPU ids are only labels: the point is the scheduling and the records.)"""
    matrix = {
        "name": "sbs",
        "base": _base(random_tiny),
        "axes": {"trainer.name": ["hf", "native"], "peft": ["lora", "adapters"]},
        "exclude": [{"trainer": "hf", "peft": "adapters"}],
    }
    path = _write(tmp_path / "m.yaml", matrix)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = CliRunner().invoke(app, ["bench", "run", path, "--out", str(out), "--gpus", "0,1", "--no-report"], env=env)
    assert res.exit_code == 0, res.output
    records = _lines(out)
    assert sorted(r["cell"] for r in records) == sorted(
        c for c in ("trainer=hf,peft=lora", "trainer=native,peft=lora", "trainer=native,peft=adapters")
    )
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    seen = [r["environment"]["env"]["CUDA_VISIBLE_DEVICES"] for r in records]
    assert set(seen) == {"0", "1"}, seen
    again = bench.run_matrix(path, out_dir=out, gpus=["0", "1"])
    assert again["done"] == 3 and again["ok"] == 0 and len(_lines(out)) == 3

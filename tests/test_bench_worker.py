"""``isolation: worker`` of ``qpeft bench``: one process runs cell after cell. Its cells give the
same numbers as cells in fresh processes (loads after the first are copies of the untouched
base the worker keeps, and the records say so); a cell that crashes, runs out of memory, is
killed or times out is recorded as failed and the next cell runs in a fresh worker; an
interrupt records nothing and leaves no process behind. Also the base-model cache itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from qpeft import bench, orchestrator
from qpeft.modeling import BaseModelCache, base_model_cache, logits_for, peak_memory_gib, reset_process_peak_rss
from qpeft.registry import load_registry

sys.path.insert(0, str(REPO / "benchmarks"))
import make_random_model  # noqa: E402

REGISTRY = load_registry()


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory, embedded_model_path) -> str:
    """Llama-2's layout with 2 small layers (widths multiples of 128: bitsandbytes runs on it)."""
    return make_random_model.build("tiny", tmp_path_factory.mktemp("random") / "tiny", dtype="float32", device="cpu")


def _matrix(tmp_path, model, axes, *, steps=2, name="matrix.yaml", **top):
    base = {
        "model": model,
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4, "alpha": 8}},
        "trainer": {"name": "native", "options": {"batch_size": 2, "max_steps": steps, "lr": 1e-3, "scheduler": "constant"}},
        "data": {"path": "embedded:text", "max_length": 32, "max_train_examples": 6, "max_val_examples": 2},
        "generate": {"max_new_tokens": 2, "chat_template": False},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "worker", "base": base, "axes": axes, **top}, sort_keys=False))
    return str(path)


def _by_cell(out) -> dict[str, dict]:
    return {r["cell"]: r for r in bench.read_records(out)}


def _children(name: str) -> list[int]:
    """This process's child processes whose command line contains ``name``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and name in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:  # a zombie waiting to be reaped has ended
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_cells_match_fresh_processes_and_say_where_loads_came_from(random_tiny, tmp_path, monkeypatch):
    """quantizer {none, bnb-nf4} × peft {lora, adapters}, once one process per cell, once in a
    worker: the same losses, perplexities, reload and merge Δ; in the worker only the first
    load of each base reads (and quantizes) the checkpoint, and the records count the copies.
    The matrix's ``env`` reaches the cells of both (and is recorded)."""
    axes = {"quantizer": ["none", "bnb-nf4"], "peft": ["lora", "adapters"]}
    matrix = _matrix(tmp_path, random_tiny, axes, env={"OMP_WAIT_POLICY": "PASSIVE"})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # identical reductions in both runs
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    process = bench.run_matrix(matrix, out_dir=tmp_path / "process")
    worker = bench.run_matrix(matrix, out_dir=tmp_path / "worker", isolation="worker")
    assert process["ok"] == worker["ok"] == 4
    fresh, reused = _by_cell(tmp_path / "process"), _by_cell(tmp_path / "worker")
    assert list(fresh) == list(reused)
    for cell, r in reused.items():
        f = fresh[cell]
        assert f["isolation"] == "process" and r["isolation"] == "worker"
        for rec in (f, r):
            assert rec["env"] == {"OMP_WAIT_POLICY": "PASSIVE"} and rec["environment"]["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
        m, n = r["metrics"], f["metrics"]
        for key in (
            "train_loss",
            "val_loss_before",
            "val_loss_after",
            "reload_max_abs_logit_diff",
            "weight_memory_gib",
            "trainable_params",
        ):
            assert m[key] == n[key], (cell, key, m[key], n[key])
        assert m["generation_new_tokens"] == n["generation_new_tokens"]
        if "merge_max_abs_logit_diff" in n:
            assert m["merge_max_abs_logit_diff"] == pytest.approx(n["merge_max_abs_logit_diff"], abs=1e-6)
            assert m["merge_base_path_diff"] == n["merge_base_path_diff"]
        assert "load_from_cache" not in n and "base_loads" not in n  # process cells: nothing cached
        assert m["peak_rss_gib"] > 0 and m["rss_at_cell_start_gib"] > 0
    # One worker ran all four cells (none of them failed).
    assert [r["worker_cell"] for r in reused.values()] == [1, 2, 3, 4]
    none_lora, none_adapters = reused["quantizer=none,peft=lora"]["metrics"], reused["quantizer=none,peft=adapters"]["metrics"]
    nf4_lora, nf4_adapters = reused["quantizer=bnb-nf4,peft=lora"]["metrics"], reused["quantizer=bnb-nf4,peft=adapters"]["metrics"]
    # train, reload check, merge reference: 3 loads; the first read from the files, the others copies
    assert (none_lora["base_loads"], none_lora["base_loads_from_cache"], none_lora["load_from_cache"]) == (3, 2, False)
    assert (none_adapters["base_loads"], none_adapters["base_loads_from_cache"], none_adapters["load_from_cache"]) == (2, 2, True)
    assert none_adapters["load_uncached_seconds"] > 0
    # a new quantizer: its first load quantizes, then copies
    assert (nf4_lora["base_loads"], nf4_lora["base_loads_from_cache"], nf4_lora["load_from_cache"]) == (3, 2, False)
    assert (nf4_adapters["base_loads_from_cache"], nf4_adapters["load_from_cache"]) == (2, True)
    assert 0 < nf4_adapters["base_cache_gib"] < none_adapters["base_cache_gib"]  # one base kept: the quantized one


def test_failed_cells_are_recorded_and_the_next_cell_gets_a_fresh_worker(random_tiny, tmp_path):
    """A cell that cannot load its model (a qpeft error), one that runs out of memory (a crash
    with a traceback): each recorded as failed as with a process per cell, and the cell after it
    runs, ok, in a fresh worker (worker_cell 1 again)."""
    broken = tmp_path / "broken-model"
    shutil.copytree(random_tiny, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    # batch 16384 × 32 tokens × 32,000 vocabulary: float32 logits of 67 GB, more than this machine
    # has, so the allocation fails for real (nothing is used up).
    axes = {
        "model": {"a": random_tiny, "broken": str(broken), "b": random_tiny},
        "trainer.options.batch_size": {"small": 2, "huge": 16384},
    }
    exclude = [{"model": m, "trainer.options.batch_size": "huge"} for m in ("broken", "b")]
    matrix = _matrix(tmp_path, random_tiny, axes, exclude=exclude)
    out = tmp_path / "out"
    counts = bench.run_matrix(matrix, out_dir=out, isolation="worker")
    by = _by_cell(out)
    assert [(c, r["status"], r["worker_cell"]) for c, r in by.items()] == [
        ("model=a,trainer.options.batch_size=small", "ok", 1),
        ("model=a,trainer.options.batch_size=huge", "failed", 2),
        ("model=broken,trainer.options.batch_size=small", "failed", 1),
        ("model=b,trainer.options.batch_size=small", "ok", 1),
    ], by
    assert (counts["ok"], counts["failed"]) == (2, 2)
    oom = by["model=a,trainer.options.batch_size=huge"]
    assert oom["oom"] is True and oom["returncode"] == 1 and (out / oom["log"]).is_file()
    load_error = by["model=broken,trainer.options.batch_size=small"]
    assert load_error["returncode"] == 2 and "model.safetensors" in load_error["error"] and not load_error["oom"]
    # Each cell's log holds its own output only.
    ok_log = (out / by["model=b,trainer.options.batch_size=small"]["log"]).read_text()
    assert "trained 2 steps" in ok_log and "truncated or corrupt" not in ok_log and "allocate" not in ok_log
    assert "trained" not in (out / load_error["log"]).read_text()
    assert not _children("qpeft.bench --worker")  # the last worker ended with the run


def test_killed_worker_fails_its_cell_and_the_next_cell_runs(random_tiny, tmp_path):
    """SIGKILL of the worker during a cell (as the system's out-of-memory killer would): that cell
    is recorded as killed, the next one runs in a fresh worker and is ok."""
    matrix = _matrix(tmp_path, random_tiny, {"trainer.options.max_steps": {"first": 2, "long": 100000, "after": 2}})
    out = tmp_path / "out"
    events: list[dict] = []
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(bench.run_matrix(matrix, out_dir=out, isolation="worker", on_event=events.append))
    )
    thread.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not any(
            e.get("cell") == "trainer.options.max_steps=long" and e.get("kind") == "step" and e["step"] >= 2 for e in list(events)
        ):
            assert thread.is_alive(), "the bench ended before the long cell trained"
            time.sleep(0.3)
        (worker,) = _children("qpeft.bench --worker")
        os.kill(worker, signal.SIGKILL)
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive()
    by = _by_cell(out)
    assert [(r["status"], r["worker_cell"]) for r in by.values()] == [("ok", 1), ("failed", 2), ("ok", 1)], by
    killed = by["trainer.options.max_steps=long"]
    assert killed["error"].startswith("killed by SIGKILL") and killed["returncode"] == -signal.SIGKILL
    assert (result["ok"], result["failed"]) == (2, 1)
    assert not _alive(worker)


@pytest.mark.parametrize("isolation", ["process", "worker"])
def test_timeout_stops_a_cell_that_streams_progress(isolation, random_tiny, tmp_path):
    """A cell still training at its timeout is stopped even while its steps stream in (a tiny
    model logs a step every few milliseconds) and recorded as timed out; in a worker, the next
    cell starts a fresh one."""
    matrix = _matrix(tmp_path, random_tiny, {"trainer.options.max_steps": {"long": 100000, "next": 100001}}, timeout_s=20)
    out = tmp_path / "out"
    counts = bench.run_matrix(matrix, out_dir=out, isolation=isolation)
    assert counts["failed"] == 2
    for record in bench.read_records(out):
        assert (record["error"], record["isolation"], record.get("worker_cell")) == (
            "timed out after 20 s",
            isolation,
            1 if isolation == "worker" else None,
        ), record
        assert record["wall_seconds"] < 40, record
    assert not _children("qpeft.bench")


def test_sigterm_stops_the_workers_and_records_nothing(random_tiny, tmp_path):
    """`qpeft bench --isolation worker --gpus 0,1` stopped by SIGTERM while both workers run a
    cell: no record, no temporary file, and both worker processes end."""
    matrix = _matrix(tmp_path, random_tiny, {"trainer.options.max_steps": {"a": 100000, "b": 100001}})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qpeft", "bench", matrix, "--out", str(out), "--no-report", "--gpus", "0,1", "--isolation", "worker"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        logs = [out / "cells" / c / "log.txt" for c in ("a", "b")]
        while time.time() < deadline and not all(p.is_file() and "trainable parameters" in p.read_text() for p in logs):
            assert proc.poll() is None, "bench ended before both cells trained"
            time.sleep(0.5)
        workers = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid), "-f", "qpeft.bench --worker"], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1)
    assert not [p for p in workers if _alive(p)]
    assert not (out / bench.RESULTS_FILE).exists() or bench.read_records(out) == []
    assert not list(out.rglob("*.tmp"))


def test_isolation_is_a_matrix_option(random_tiny, tmp_path):
    matrix = bench.load_matrix(_matrix(tmp_path, random_tiny, {"peft": ["lora"]}, isolation="worker"))
    assert matrix.config.isolation == "worker"
    from qpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="isolation"):
        bench.load_matrix(_matrix(tmp_path, random_tiny, {"peft": ["lora"]}, isolation="thread"))
    with pytest.raises(ConfigError, match="--isolation"):
        bench.run_matrix(_matrix(tmp_path, random_tiny, {"peft": ["lora"]}), out_dir=tmp_path / "o", isolation="thread")


# ---------------------------------------------------------------------------- the base cache


@pytest.mark.parametrize("quantizer", ["none", "bnb-8bit", "bnb-nf4"])
def test_cached_base_is_a_fresh_load(quantizer, tiny_llama_path, tmp_path):
    """A load from the cache is a deep copy of the kept, untouched model: its tensors and logits
    are those of a fresh load, even after an earlier copy ran forward passes (bitsandbytes repacks
    4-bit weights on an AVX512-BF16 CPU's first eval forward), and it shares no memory."""
    import torch

    cfg = {"model": tiny_llama_path, "quantizer": quantizer, "peft": "lora", "trainer": "hf", "output_dir": str(tmp_path / "run")}
    resolved, registry = orchestrator.prepare(cfg, registry=REGISTRY)
    ctx = orchestrator._context(resolved, registry)
    q, opts = resolved.quantizer, resolved.quantizer_options
    fresh = q.load(tiny_llama_path, opts, ctx, training=False)  # no cache active
    probe = {"input_ids": list(range(5, 37)), "labels": list(range(5, 37))}
    reference = logits_for(fresh, probe, 0)
    cache = BaseModelCache()
    with base_model_cache(cache):
        first = q.load(tiny_llama_path, opts, ctx, training=False)
        logits_for(first, probe, 0)  # forward passes on the first copy...
        second = q.load(tiny_llama_path, opts, ctx, training=False)
    assert [load["cached"] for load in cache.loads] == [False, True]
    assert cache.loads[1]["uncached_seconds"] == cache.loads[0]["seconds"]
    assert torch.equal(logits_for(second, probe, 0), reference)  # ...leave the kept model as loaded
    fresh_state, copy_state = fresh.state_dict(), second.state_dict()
    assert fresh_state.keys() == copy_state.keys()
    assert all(torch.equal(fresh_state[k], copy_state[k]) for k in fresh_state)
    kept_state = next(iter(cache.entries.values()))[0].state_dict()  # held: 4-bit state dicts pack some tensors on the fly
    assert not {t.data_ptr() for t in kept_state.values() if t.numel()} & {t.data_ptr() for t in copy_state.values() if t.numel()}
    assert (second.get_output_embeddings().weight is second.get_input_embeddings().weight) == (
        fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight
    )
    assert 0 < cache.held_gib() < 1


def test_cache_keys(tiny_llama_path, tmp_path):
    """Different quantizer options, dtype or files: a different base. Loads the cache cannot copy
    faithfully (other quantization configs, remote code, GPUs) are not cached at all."""
    from transformers import BitsAndBytesConfig, GPTQConfig

    cfg = {"model": tiny_llama_path, "quantizer": "none", "peft": "lora", "trainer": "hf", "output_dir": str(tmp_path / "run")}
    resolved, registry = orchestrator.prepare(cfg, registry=REGISTRY)
    ctx = orchestrator._context(resolved, registry)
    cache = BaseModelCache()
    import torch

    plain = cache.key(tiny_llama_path, ctx, {"dtype": torch.float32})
    nf4 = cache.key(
        tiny_llama_path,
        ctx,
        {"dtype": torch.float32, "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")},
    )
    fp4 = cache.key(
        tiny_llama_path,
        ctx,
        {"dtype": torch.float32, "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")},
    )
    bf16 = cache.key(tiny_llama_path, ctx, {"dtype": torch.bfloat16})
    assert len({plain, nf4, fp4, bf16}) == 4 and None not in {plain, nf4, fp4, bf16}
    assert cache.key(tiny_llama_path, ctx, {"dtype": torch.float32, "quantization_config": GPTQConfig(bits=4)}) is None
    assert cache.key("some/hub-id", ctx, {"dtype": torch.float32}) is None
    ctx.device = "cuda"
    assert cache.key(tiny_llama_path, ctx, {"dtype": torch.float32}) is None


def test_peak_rss_since_reset():
    """After reset_process_peak_rss, the CPU peak is this process's peak since then."""
    buf = bytearray(400 * 2**20)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    before = peak_memory_gib("cpu")["peak_rss_gib"]
    del buf
    assert reset_process_peak_rss()
    after = peak_memory_gib("cpu")["peak_rss_gib"]
    assert after < before - 0.3

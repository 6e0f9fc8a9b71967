"""Quantized bases cached on disk (qpeft.quantized_cache): the second load of a base is read
from the cache instead of quantized again (counted) and gives the same logits as a fresh
quantization; a damaged entry is detected, never trusted, and rebuilt; the cache can be off."""

import json
from pathlib import Path

import pytest
import torch

from qpeft import orchestrator, quantized_cache
from qpeft.registry import load_registry

pytest.importorskip("hqq")


class _Counting:
    """Counts calls of the real ``load`` (quantizing) of a quantizer plugin; the library runs."""

    def __init__(self, plugin, monkeypatch):
        self.calls = 0
        real = plugin.load

        def load(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(plugin, "load", load)


def _setup(tiny_config, tmp_path, monkeypatch, cache=None, quantizer=None):
    cfg = tiny_config(quantizer=quantizer or {"name": "hqq", "options": {"nbits": 4, "group_size": 64}})
    cfg["model"]["quantized_cache"] = str(tmp_path / "qcache") if cache is None else cache
    resolved, registry = orchestrator.prepare(cfg, registry=load_registry())
    ctx = orchestrator._context(resolved, registry)
    count = _Counting(resolved.quantizer, monkeypatch)
    return resolved, ctx, count


def _load(resolved, ctx, path):
    return quantized_cache.load_base(resolved.quantizer, path, resolved.quantizer_options, ctx, training=True)


def _logits(model):
    ids = torch.arange(4, 40).reshape(2, 18)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_second_load_hits_the_cache_with_the_same_logits(tiny_config, tiny_llama_path, tmp_path, monkeypatch):
    resolved, ctx, count = _setup(tiny_config, tmp_path, monkeypatch)
    first = _load(resolved, ctx, tiny_llama_path)
    assert count.calls == 1 and any(n.startswith("quantized base cached at") for n in ctx.notes)
    entries = list((tmp_path / "qcache").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("hqq-")
    second = _load(resolved, ctx, tiny_llama_path)
    assert count.calls == 1, "the second load quantized again"
    assert any(n.startswith("quantized base from cache") for n in ctx.notes)
    fresh = resolved.quantizer.load(tiny_llama_path, resolved.quantizer_options, ctx, training=True)
    assert torch.equal(_logits(second), _logits(fresh))
    assert torch.equal(_logits(first), _logits(fresh))
    # other options are another entry
    other = resolved.quantizer_options.model_copy(update={"nbits": 8})
    quantized_cache.load_base(resolved.quantizer, tiny_llama_path, other, ctx, training=True)
    assert count.calls == 3 and len(list((tmp_path / "qcache").iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_entry_is_rebuilt_never_trusted(tiny_config, tiny_llama_path, tmp_path, monkeypatch, damage):
    resolved, ctx, count = _setup(tiny_config, tmp_path, monkeypatch)
    want = _logits(_load(resolved, ctx, tiny_llama_path))
    (entry,) = (tmp_path / "qcache").iterdir()
    weights = entry / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte of tensor data changed
        weights.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    else:
        (entry / quantized_cache.MANIFEST).write_text("{")
    again = _load(resolved, ctx, tiny_llama_path)
    assert count.calls == 2, "a damaged entry was trusted"
    assert any("not trusted" in n for n in ctx.notes)
    assert torch.equal(_logits(again), want)
    key = quantized_cache.cache_key(resolved.quantizer, tiny_llama_path, resolved.quantizer_options, ctx)
    assert quantized_cache.verify_entry(entry, key) is None  # rebuilt
    _load(resolved, ctx, tiny_llama_path)
    assert count.calls == 2


def test_cache_off_and_uncacheable_quantizers(tiny_config, tiny_llama_path, tmp_path, monkeypatch):
    resolved, ctx, count = _setup(tiny_config, tmp_path, monkeypatch, cache=False)
    _load(resolved, ctx, tiny_llama_path)
    _load(resolved, ctx, tiny_llama_path)
    assert count.calls == 2 and not (tmp_path / "qcache").exists()
    # full precision and bitsandbytes (quantized while loading) are never cached
    for name in ("none", "bnb-nf4"):
        r, c, _ = _setup(tiny_config, tmp_path, monkeypatch, quantizer=name)
        assert quantized_cache.cache_key(r.quantizer, tiny_llama_path, r.quantizer_options, c) is None


def test_key_follows_the_base_content(tiny_config, tiny_llama_path, tmp_path, monkeypatch):
    import shutil

    resolved, ctx, _ = _setup(tiny_config, tmp_path, monkeypatch)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_path, copy)
    key = quantized_cache.cache_key(resolved.quantizer, tiny_llama_path, resolved.quantizer_options, ctx)
    assert quantized_cache.cache_key(resolved.quantizer, str(copy), resolved.quantizer_options, ctx) == key  # same content
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (copy / "config.json").write_text(json.dumps(cfg))
    assert quantized_cache.cache_key(resolved.quantizer, str(copy), resolved.quantizer_options, ctx)["base"] != key["base"]
    assert key["versions"]["hqq"] and key["versions"]["torch"]


def test_run_reload_reads_the_base_its_training_load_cached(tiny_config, tmp_path):
    cfg = tiny_config(quantizer={"name": "hqq", "options": {"nbits": 4, "group_size": 64}})
    cfg["model"]["quantized_cache"] = str(tmp_path / "qcache")
    cfg["trainer"] = {"name": "native", "options": {"batch_size": 2, "max_steps": 1}}
    cfg["evaluate"] = False
    cfg["generate"]["max_new_tokens"] = 2
    resolved, registry = orchestrator.prepare(cfg, registry=load_registry())
    summary = orchestrator.run(resolved, registry)
    notes = summary["notes"]
    assert any(n.startswith("quantized base cached at") for n in notes)
    assert any(n.startswith("quantized base from cache") for n in notes)
    assert summary["reload_max_abs_logit_diff"] <= 1e-4
    assert Path(tmp_path / "qcache").is_dir()


@pytest.mark.parametrize("quantizer", ["hqq", "torchao-int8"])
def test_merge_reads_the_cached_base(quantizer, tiny_config, tmp_path, monkeypatch):
    """`qpeft merge` loads its reference base from the cache the run filled (no quantization), and
    the merged model saves and loads. Regression: torchao's pre-quantized load records a
    conversion with no reverse, and save_pretrained of the merged model raised NotImplementedError
    (transformers 5.23) until qpeft.modeling.forget_load_conversions."""
    if quantizer.startswith("torchao"):
        pytest.importorskip("torchao")
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "qcache"
    cfg = tiny_config(quantizer=quantizer, evaluate=False, generate={"max_new_tokens": 2})
    cfg["model"]["quantized_cache"] = str(cache)
    cfg["trainer"] = {"name": "native", "options": {"batch_size": 2, "max_steps": 1, "lr": 3e-3}}
    cfg["data"].update(path="embedded:text", max_train_examples=4)
    registry = load_registry()
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    orchestrator.run(resolved, reg)
    assert len(list(cache.iterdir())) == 1
    count = _Counting(registry.get("quantizer", quantizer), monkeypatch)
    result = orchestrator.merge(
        str(tmp_path / "run" / "adapter"), str(tmp_path / "merged"), registry, overrides=[f"model.quantized_cache={cache}"]
    )
    assert count.calls == 0, "the merge quantized the base again"
    assert result["max_abs_logit_diff"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not hasattr(merged.config, "quantization_config")

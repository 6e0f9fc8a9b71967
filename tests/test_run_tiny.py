"""The whole `qpeft run` flow on a tiny random Llama with real bitsandbytes, peft and Trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qpeft import orchestrator
from qpeft.errors import ConfigError, QpeftError
from qpeft.registry import load_registry

from conftest import tol


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def nf4_run(tiny_llama_path, tmp_path_factory, registry):
    out = tmp_path_factory.mktemp("nf4run")
    cfg = {
        "model": {"name_or_path": tiny_llama_path},
        "quantizer": {"name": "bnb-nf4"},
        "peft": {"name": "lora", "options": {"r": 8, "alpha": 16}},
        "trainer": {"name": "hf", "options": {"batch_size": 4, "max_steps": 8, "lr": 3e-3, "scheduler": "constant"}},
        "data": {"path": "embedded:instruct", "max_length": 96, "max_train_examples": 8, "max_val_examples": 4},
        "output_dir": str(out),
        "generate": {"max_new_tokens": 8},
    }
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    return orchestrator.run(resolved, reg), out


def test_run_trains_and_summarises(nf4_run):
    s, _ = nf4_run
    assert s["train_steps"] == 8 and s["train_tokens"] > 0 and s["tokens_per_s"] > 0
    losses = [h["loss"] for h in s["loss_history"]]
    assert min(losses[-3:]) < losses[0], losses  # 8 epochs over 8 examples: it must fit them
    assert s["val_perplexity_before"] > 0 and s["val_perplexity_after"] > 0
    assert 0 < s["trainable_percent"] < 100
    assert s["weight_memory_gib"] > 0 and any(v > 0 for k, v in s.items() if k.startswith("peak_"))


def test_adapter_is_peft_format_safetensors_with_metadata(nf4_run):
    s, out = nf4_run
    adapter = out / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "qpeft.json", "resolved_config.yaml"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    meta = json.loads((adapter / "qpeft.json").read_text())
    assert meta["quantizer"]["name"] == "bnb-nf4" and meta["peft"]["options"]["r"] == 8
    assert (out / "resolved_config.yaml").is_file() and json.loads((out / "summary.json").read_text())["train_steps"] == 8
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_reload_reproduces_trained_logits(nf4_run):
    s, _ = nf4_run
    assert s["reload_max_abs_logit_diff"] < tol(s["dtype"], 1e-4, 5e-2)


def test_lora_targets_all_linear_but_head(nf4_run):
    s, _ = nf4_run
    note = next(n for n in s["notes"] if n.startswith("lora targets"))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in note
    assert "lm_head" not in note


def test_generate_cli_rebuilds_base_from_metadata(nf4_run):
    _, out = nf4_run
    proc = subprocess.run(
        [sys.executable, "-m", "qpeft", "generate", "--adapter", str(out / "adapter"), "--prompt", "Hi", "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr and "bnb-nf4" in proc.stderr


def test_merge_into_dequantized_weights(nf4_run, registry, tmp_path):
    s, out = nf4_run
    result = orchestrator.merge(str(out / "adapter"), str(tmp_path / "merged"), registry)
    assert result["merge_source"] == "dequantize"
    assert result["max_abs_logit_diff"] < tol(s["dtype"], 1e-3, 1e-1), result
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with pytest.raises(QpeftError, match="exists; pass --force"):
        orchestrator.merge(str(out / "adapter"), str(tmp_path / "merged"), registry)


def test_unknown_target_module_lists_candidates(tiny_config, registry):
    cfg = tiny_config(peft={"name": "lora", "options": {"target_modules": ["qkv_proj"]}}, quantizer="none", evaluate=False)
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    with pytest.raises(ConfigError, match=r"peft.options.target_modules: no module named 'qkv_proj'.*candidates: down_proj, gate_proj"):
        orchestrator.run(resolved, reg)


def test_not_an_adapter_folder(tmp_path, registry):
    with pytest.raises(QpeftError, match="not an adapter folder"):
        orchestrator.generate(str(tmp_path), "x", registry)

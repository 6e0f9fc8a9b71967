"""A saved adapter is portable and explains itself: ``adapter_config.json`` names the base as
another machine can resolve it (never qpeft's cache), ``qpeft.json`` adds a fingerprint of the
base's files, README.md is a model card (what, on what, with which quantizer, results, how to
load it), plain peft still loads it, and ``qpeft generate`` resolves it. A run on a tiny
validation split says its perplexity means little."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from qpeft import orchestrator
from qpeft.adapter_source import base_fingerprint, check_base_fingerprint, read_adapter_metadata, trusted_run_sections
from qpeft.registry import load_registry

ROWS = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(20)]


@pytest.fixture(scope="module")
def own_data_run(tiny_llama_path, tmp_path_factory):
    """A run on a user's 20-row file (18 train / 2 validation), the default prompt kept."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = tmp_path_factory.mktemp("own-data")
    data = work / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = {
        "model": {"name_or_path": tiny_llama_path, "device": "cpu"},
        "quantizer": {"name": "none"},
        "peft": {"name": "lora", "options": {"r": 4, "alpha": 8}},
        "trainer": {"name": "hf", "options": {"batch_size": 4, "max_steps": 2, "lr": 1e-3, "scheduler": "constant"}},
        "data": {"path": str(data), "max_length": 64},
        "output_dir": str(work / "run"),
        "generate": {"max_new_tokens": 4},
    }
    old = os.umask(0o022)
    try:
        t0 = time.perf_counter()
        resolved, registry = orchestrator.prepare(cfg, registry=load_registry())
        summary = orchestrator.run(resolved, registry)
        print(f"tiny own-data run: {time.perf_counter() - t0:.1f} s")
    finally:
        os.umask(old)
    return summary, work / "run" / "adapter", data, tiny_llama_path


def test_adapter_config_names_a_portable_base(own_data_run):
    _, adapter, _, base = own_data_run
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    meta = json.loads((adapter / "qpeft.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(base).resolve()) == meta["base_model"]
    assert ".cache/qpeft" not in cfg["base_model_name_or_path"]
    fp = meta["base_model_fingerprint"]
    assert fp["scheme"] == "qpeft-sampled-v1" and len(fp["sha256"]) == 64 and fp["weight_files"] >= 1
    assert fp == base_fingerprint(base)  # stable: the same files give the same fingerprint


def test_model_card_says_what_was_trained_and_how_to_load_it(own_data_run):
    summary, adapter, data, base = own_data_run
    card = (adapter / "README.md").read_text()
    assert stat.S_IMODE((adapter / "README.md").stat().st_mode) == 0o644  # follows the umask
    for text in (
        "lora (r=4, alpha=8",
        f"{summary['trainable_params']:,} of {summary['total_params']:,}",
        f"`{data}`",
        f"{summary['train_data']['documents']:,} (",
        "| quantizer | none",
        f"final loss {summary['train_loss']:.4g}",
        f"{summary['val_perplexity_after']:.4g}",
        f"on {summary['val_tokens']:,} target tokens",
        "qpeft generate --adapter",
        "PeftModel.from_pretrained(base",
        f"base_model: {Path(base).resolve()}",
    ):
        assert text in card, f"{text!r} not in the card:\n{card}"
    assert "[More Information Needed]" not in card  # peft's empty template is gone


def test_plain_peft_and_qpeft_generate_load_it(own_data_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, adapter, _, base_path = own_data_run
    base = AutoModelForCausalLM.from_pretrained(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(adapter))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()

    result = orchestrator.generate(str(adapter), "What is 2 plus 2?", load_registry(), max_new_tokens=3)
    assert result["new_tokens"] >= 1

    # Another copy of the base resolves the same; a different base is named as such.
    other = tmp_path / "other-base"
    shutil.copytree(base_path, other)
    meta = read_adapter_metadata(adapter)
    assert check_base_fingerprint(meta, str(other)) is None
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(cfg))
    note = check_base_fingerprint(meta, str(other))
    assert note and "differs from the one this adapter was trained on" in note


def test_tiny_validation_split_is_noted(own_data_run):
    summary, _, _, _ = own_data_run
    notes = " ".join(summary["notes"])
    assert summary["val_tokens"] < 200
    assert f"the validation split is 2 example(s) with {summary['val_tokens']} target tokens" in notes
    assert "means little" in notes
    assert "generate.prompt is the quickstart's" in notes


def test_embedded_base_is_recorded_by_its_name(tmp_path, tiny_llama_path, embedded_model_path):
    """An adapter trained on the embedded model names it ``smollm2`` (which `qpeft generate`
    resolves on any machine with qpeft), not the cache folder peft loaded it from."""
    from qpeft.io import atomic_dir
    from qpeft.orchestrator import record_base

    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": embedded_model_path, "r": 4}))
        record_base(tmp, "smollm2")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "smollm2" and cfg["r"] == 4
    # plain-peft metadata (no qpeft.json) naming the embedded model is accepted by the allow-list
    sections, notes = trusted_run_sections(read_adapter_metadata(tmp_path / "adapter"), tmp_path / "adapter", set())
    assert sections["model"] == {"name_or_path": "smollm2"} and not notes
    assert base_fingerprint(embedded_model_path)["weight_files"] >= 1

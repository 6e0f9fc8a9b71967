"""``qpeft merge --requantize`` (issue 21): the re-quantized model is saved, loaded back from disk
and verified by logits; its options come from a config, the adapter or ``--requantize-set``; a
quantizer that cannot save its models is refused before any weight loads; a model that does not
round-trip is an error that leaves nothing behind. Also: the merged model's config pads with its
saved tokenizer's pad id."""

import importlib.util
import json
import types

import pytest
import torch
import yaml
from test_conformance import PackedInt4, SavesLikeTransformers

import qpeft
from qpeft import orchestrator
from qpeft.errors import ConfigError, QpeftError
from qpeft.registry import load_registry
from qpeft.testing import save_tiny_llama, tiny_tokenizer

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")


def _registry():
    mod = types.ModuleType("kit_requantize")
    mod.qpeft_register_quantizers = qpeft.hookimpl(lambda register: [register(PackedInt4()), register(SavesLikeTransformers())])
    return load_registry((mod,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA adapter (quantizer none, 2 steps) on a tiny Llama whose tokenizer pads with EOS,
    so qpeft picks another pad token (the unknown token) than the model's config names."""
    root = tmp_path_factory.mktemp("requantize")
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    model_path = save_tiny_llama(tok, root / "model", tie_word_embeddings=False)
    cfg = {
        "model": {"name_or_path": model_path, "device": "cpu", "dtype": "float32"},
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4, "alpha": 8}},
        "trainer": {"name": "native", "options": {"batch_size": 2, "max_steps": 2, "lr": 1e-2}},
        "data": {"path": "embedded:text", "max_length": 32, "max_train_examples": 4, "max_val_examples": 1},
        "output_dir": str(root / "run"),
        "evaluate": False,
        "generate": {"max_new_tokens": 1, "chat_template": False},
    }
    registry = _registry()
    resolved, registry = orchestrator.prepare(cfg, registry=registry)
    summary = orchestrator.run(resolved, registry)
    assert summary["pad_token"]["action"] == "reused", summary["pad_token"]
    return root, registry


@needs_bnb
def test_requantize_saves_verifies_and_takes_options(trained):
    root, registry = trained
    conf = root / "rq.yaml"
    conf.write_text(yaml.safe_dump({"quantizer": {"name": "bnb-4bit", "options": {"double_quant": False}}}))
    out = root / "merged"
    result = orchestrator.merge(
        str(root / "run" / "adapter"), str(out), registry, requantize=str(conf), requantize_options=["quant_type=fp4"]
    )
    rq = result["requantized"]
    assert rq["quantizer"] == "bnb-4bit" and rq["options"]["quant_type"] == "fp4" and rq["options"]["double_quant"] is False
    assert rq["reload_max_abs_logit_diff"] <= 1e-3 and rq["logit_rel_err_vs_merged"] < 0.5, rq
    folder = root / "merged-bnb-4bit"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is False
    # Both saved models pad with their saved tokenizer's pad id (qpeft chose <unk>, not EOS).
    for path in (out, folder):
        cfg = json.loads((path / "config.json").read_text())
        tok = json.loads((path / "tokenizer_config.json").read_text())
        pad_id = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"][tok["pad_token"]]
        assert tok["pad_token"] == "<unk>" and cfg["pad_token_id"] == pad_id == 0, (path, cfg["pad_token_id"])
    # What a user does with it: plain transformers, no qpeft.
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"


def test_requantize_refuses_a_quantizer_that_cannot_save_before_loading(trained, monkeypatch):
    root, registry = trained
    out = root / "merged-refused"
    monkeypatch.setattr(orchestrator, "load_for_inference", lambda *a, **k: pytest.fail("a weight was loaded"))
    with pytest.raises(QpeftError, match=r"'kit-packed-int4' cannot save quantized models \(capabilities.saves_quantized"):
        orchestrator.merge(str(root / "run" / "adapter"), str(out), registry, requantize="kit-packed-int4")
    with pytest.raises(ConfigError, match=r"--requantize-set.codes"):
        orchestrator.merge(
            str(root / "run" / "adapter"), str(out), registry, requantize="kit-saves-like-transformers", requantize_options=["codes=x"]
        )
    assert not out.exists() and not (root / "merged-refused-kit-packed-int4").exists()


def test_requantize_that_does_not_round_trip_fails_and_leaves_nothing(trained):
    """The issue's bug: a quantizer whose save_pretrained folder transformers loads with random
    linear layers exited 0. Now the reload is verified; neither folder is written."""
    root, registry = trained
    out = root / "merged-broken"
    with pytest.raises(QpeftError, match=r"--requantize kit-saves-like-transformers: the saved model does not load back .*lacks"):
        orchestrator.merge(str(root / "run" / "adapter"), str(out), registry, requantize="kit-saves-like-transformers")
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(("merged-broken", ".merged-broken"))]
    assert leftovers == [], leftovers

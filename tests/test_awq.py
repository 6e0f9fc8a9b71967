"""The ``awq`` quantizer beyond the conformance kit (tests/test_conformance.py::TestAwq): an AWQ
checkpoint named by ``model.name_or_path`` loads without quantizing again, gptqmodel's folding of
the AWQ scales into the norms (why the merge goes into the dequantized weights, not the
original ones), refusals before loading, and the kit on CUDA."""

import pytest
import torch

from qpeft import orchestrator
from qpeft.errors import ConfigError
from qpeft.registry import load_registry
from qpeft.testing import QuantizerConformance, tiny_model_path

pytest.importorskip("gptqmodel")

SMALL = {"group_size": 64, "num_calibration_samples": 8, "calibration_max_length": 64}


def _context(cfg):
    resolved, registry = orchestrator.prepare(cfg, registry=load_registry())
    return resolved, orchestrator._context(resolved, registry)


def _logits(model):
    ids = torch.arange(4, 40).reshape(2, 18)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_awq_checkpoint_loads_by_name_or_path_and_merges_into_dequantized_weights(tiny_config, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from qpeft.plugins.quant_awq import Awq

    resolved, ctx = _context(tiny_config(quantizer={"name": "awq", "options": SMALL}))
    plugin, opts = resolved.quantizer, resolved.quantizer_options
    model = plugin.load(tiny_model_path(), opts, ctx, training=True)
    plugin.save_quantized(model, str(tmp_path / "q"), opts, ctx)
    want = _logits(model)

    # gptqmodel folds the activation scales into the RMSNorms before the quantized layers: an
    # adapter trained on this model sees scaled inputs, so it cannot be added to the original weights.
    original = AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32)
    norm = "model.layers.0.input_layernorm.weight"
    assert (model.state_dict()[norm].float() - original.state_dict()[norm]).abs().max() > 1e-2

    def no_quantizing(*a, **k):
        raise AssertionError("the AWQ checkpoint was quantized again")

    monkeypatch.setattr(Awq, "_quantize", no_quantizing)
    again = plugin.load(str(tmp_path / "q"), opts, ctx, training=True)
    assert {type(m).__name__ for m in again.modules() if hasattr(m, "qweight")} == {"AwqTorchLinear"}
    assert torch.equal(_logits(again), want)
    # the dequantized float model computes what the AWQ model computes (float16 matmul there)
    full = plugin.full_precision_model(again, str(tmp_path / "q"), opts, ctx)
    assert not any(hasattr(m, "qweight") for m in full.modules())
    rel = float((_logits(full) - want).norm() / want.norm())
    assert rel < 1e-2, rel


def test_group_size_that_does_not_divide_the_layers_is_refused(tiny_config, tmp_path):
    import json
    import shutil

    bad = tmp_path / "wide"
    shutil.copytree(tiny_model_path(), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 320  # 320 = 2.5 x 128
    (bad / "config.json").write_text(json.dumps(cfg))
    resolved, ctx = _context(tiny_config(quantizer={"name": "awq", "options": {"group_size": 128}}))
    with pytest.raises(ConfigError, match=r"quantizer.options.group_size: 128 does not divide the input widths \[320\]"):
        resolved.quantizer.load(str(bad), resolved.quantizer_options, ctx, training=True)


def test_dora_and_missing_calibration_are_refused_before_loading(tiny_config):
    watch = __import__("conftest").WeightWatch()
    registry = load_registry([watch])
    cfg = tiny_config(quantizer="awq", peft={"name": "lora", "options": {"use_dora": True}})
    with pytest.raises(ConfigError, match="peft.options.use_dora: peft's LoRA layer for AWQ"):
        orchestrator.prepare(cfg, registry=registry)
    cfg = tiny_config(quantizer={"name": "awq", "options": {"calibration": "/nonexistent/calib.jsonl"}})
    with pytest.raises(ConfigError, match="quantizer.options.calibration: /nonexistent/calib.jsonl does not exist"):
        orchestrator.prepare(cfg, registry=registry)
    assert watch.loaded == 0


@pytest.mark.gpu
class TestGpuKitAwq(QuantizerConformance):
    quantizer = "awq"
    device = "cuda"
    options = SMALL
    backend_modules = ("gptqmodel",)

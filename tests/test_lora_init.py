"""LoRA ``init`` options: PiSSA/OLoRA rewrite the base weights, so qpeft saves them converted to a
plain LoRA (rank 2r) against the original weights; the converted adapter reloads on a fresh
base and merges with the trained model's logits. What qpeft cannot do is refused before loading."""

import json

import pytest

from qpeft import orchestrator
from qpeft.errors import ConfigError
from qpeft.registry import load_registry

REGISTRY = load_registry()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_init_saves_a_converted_adapter_that_reloads_and_merges(init, tiny_config, tmp_path):
    cfg = tiny_config(
        quantizer="none",
        peft={"name": "lora", "options": {"r": 4, "alpha": 8, "init": init}},
        trainer={"name": "hf", "options": {"batch_size": 4, "max_steps": 3, "lr": 3e-3, "scheduler": "constant"}},
        evaluate=False,
    )
    cfg["data"].update(max_train_examples=4, max_length=64)
    cfg["generate"]["max_new_tokens"] = 2
    s = orchestrator.run(*orchestrator.prepare(cfg, registry=REGISTRY))
    losses = [h["loss"] for h in s["loss_history"]]
    assert losses[-1] < losses[0], losses
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 8, saved["r"]  # converted: rank 2r against the original weights
    # The reload rebuilt the original base and loaded the converted adapter with plain peft.
    assert s["reload_max_abs_logit_diff"] < 1e-3, s["reload_max_abs_logit_diff"]
    result = orchestrator.merge(str(adapter), str(tmp_path / "merged"), REGISTRY)
    assert result["max_abs_logit_diff"] < 1e-3, result


@pytest.mark.parametrize("quantizer", ["bnb-nf4", "bnb-8bit"])
def test_base_rewriting_init_is_refused_on_quantized_bases(quantizer, tiny_config):
    with pytest.raises(ConfigError, match="peft.options.init.*rewrites the base weights"):
        orchestrator.prepare(tiny_config(quantizer=quantizer, peft={"name": "lora", "options": {"init": "pissa"}}), registry=REGISTRY)


@pytest.mark.parametrize("init,why", [("corda", "calibration")])
def test_unimplemented_inits_are_refused_naming_why(init, why, tiny_config):
    with pytest.raises(ConfigError, match=why):
        orchestrator.prepare(tiny_config(peft={"name": "lora", "options": {"init": init}}), registry=REGISTRY)


def test_gaussian_init_reaches_peft(tiny_config):
    from transformers import AutoModelForCausalLM

    from qpeft.context import RunContext
    from qpeft.plugins.peft_lora import Lora, LoraOptions
    from qpeft.testing import tiny_model_path

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    resolved, _ = orchestrator.prepare(tiny_config(quantizer="none"), registry=REGISTRY)
    ctx = RunContext(config=resolved.config, device="cpu", dtype="float32", output_dir="unused")
    pm = Lora().attach(model, LoraOptions(r=4, init="gaussian"), ctx)
    assert pm.peft_config["default"].init_lora_weights == "gaussian"
    a = next(p for n, p in pm.named_parameters() if "lora_A" in n)
    assert abs(float(a.std()) - 1 / 4) < 0.05  # peft's gaussian init: normal(0, 1/r), not Kaiming-uniform

"""The fast bitsandbytes training paths: int8 weights multiplied by dequantize-then-matmul
(``bnb-8bit`` ``matmul: dequantize``) and preparation without the float32 upcast. Both must be
exact with respect to the quantized weights: logits and LoRA gradients equal a float32
reference model built from the dequantized weights."""

from __future__ import annotations

import pytest

from qpeft.context import RunContext
from qpeft.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _ctx(tiny_llama_path, dtype="float32"):
    from qpeft.config import RunConfig

    cfg = RunConfig.model_validate({"model": {"name_or_path": tiny_llama_path}, "quantizer": "none", "peft": "lora", "trainer": "hf"})
    return RunContext(config=cfg, device="cpu", dtype=dtype, output_dir="/tmp/unused")


def _lora(model, seed=0):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return m


def _grads_and_logits(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, out.logits.detach()


def test_int8_dequantize_matmul_is_exact_and_trains_lora(registry, tiny_llama_path):
    import torch
    from transformers import AutoModelForCausalLM

    plugin = registry.get("quantizer", "bnb-8bit")
    ctx = _ctx(tiny_llama_path)
    opts = plugin.Options(matmul="dequantize")
    q = plugin.load(tiny_llama_path, opts, ctx, training=True)
    q = plugin.prepare_for_training(q, opts, ctx, grad_checkpointing=False)
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))

    # Reference: a float32 model holding exactly the dequantized int8 weights.
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    deq = {
        k: v
        for k, v in plugin.full_precision_model(plugin.load(tiny_llama_path, opts, ctx, training=True), tiny_llama_path, opts, ctx)
        .state_dict()
        .items()
    }
    ref.load_state_dict({k: deq[k].float() for k in ref.state_dict()}, strict=True)

    gq, lq = _grads_and_logits(_lora(q), ids)
    gr, lr = _grads_and_logits(_lora(ref), ids)
    assert (lq - lr).abs().max().item() < 1e-4
    assert gq.keys() == gr.keys() and gq
    for k in gq:
        err = ((gq[k] - gr[k]).norm() / gr[k].norm()).item()
        assert err < 1e-4, (k, err)


def test_int8_matmul_differs_from_the_dequantized_reference(registry, tiny_llama_path):
    """Control: LLM.int8's own matmul (activations quantized too) is measurably not exact,
    so the test above could fail."""
    import torch

    plugin = registry.get("quantizer", "bnb-8bit")
    ctx = _ctx(tiny_llama_path)
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plugin.load(tiny_llama_path, plugin.Options(matmul="int8"), ctx, training=True)(input_ids=ids).logits
        b = plugin.load(tiny_llama_path, plugin.Options(matmul="dequantize"), ctx, training=True)(input_ids=ids).logits
    assert (a - b).abs().max().item() > 1e-3


@pytest.mark.parametrize("upcast", [True, False])
def test_prepare_upcast_switch(registry, tiny_llama_path, upcast):
    import torch

    plugin = registry.get("quantizer", "bnb-nf4")
    ctx = _ctx(tiny_llama_path, dtype="bfloat16")
    opts = plugin.Options(upcast_non_quantized=upcast, compute_dtype="float32")
    model = plugin.load(tiny_llama_path, opts, ctx, training=True)
    model = plugin.prepare_for_training(model, opts, ctx, grad_checkpointing=True)
    norm = model.model.norm.weight
    assert norm.dtype == (torch.float32 if upcast else torch.bfloat16)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing

"""Regression: bitsandbytes' 4-bit CPU inference repacking corrupts LoRA gradients and
dequantization after one eval-mode forward (docs/architecture.md, library facts). bnb enables it only on
AVX512-BF16 CPUs (Intel Xeon with AMX, AMD Zen 4); on other CPUs these tests emulate such a
CPU by setting the flag bnb derives from it.

How the corruption shows differs: where the instruction set is real, the repacked weights go
through ``gemv_4bit``, which has no autograd kernel, so no gradient flows back through any
4-bit layer and upstream LoRA weights get none (``grad is None``); where it is emulated, the
packed weights reach the generic dequantize path and the gradients are wrong (~100%)."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from qpeft.config import load_config, resolve  # noqa: E402
from qpeft.context import RunContext  # noqa: E402
from qpeft.registry import load_registry  # noqa: E402


def _lora_grads_vs_reference(model, ref, batch):
    """Max relative error of LoRA gradients on ``model`` against the same LoRA on ``ref``
    (infinite where ``model`` gives a LoRA weight no gradient at all)."""
    from peft import LoraConfig, get_peft_model

    grads = []
    for m in (model, ref):
        torch.manual_seed(0)
        pm = get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
        pm.train()
        pm(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert all(g is not None for g in grads[1].values()), "the float32 reference must give every LoRA weight a gradient"
    return max(
        float("inf") if grads[0][n] is None else float((grads[0][n] - grads[1][n]).abs().max() / grads[1][n].abs().max()) for n in grads[1]
    )


@pytest.fixture()
def setup(tiny_llama_path, tmp_path):
    reg = load_registry()
    cfg = load_config({"model": tiny_llama_path, "quantizer": "bnb-nf4", "peft": "lora", "trainer": "hf", "output_dir": str(tmp_path)})
    resolved = resolve(cfg, reg, device="cpu")
    ctx = RunContext(config=cfg, device="cpu", dtype="float32", output_dir=str(tmp_path))
    plugin, opts = resolved.quantizer, resolved.quantizer_options
    batch = {"input_ids": torch.randint(3, 500, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    return plugin, opts, ctx, batch, tiny_llama_path


def _emulate_avx512bf16(model):
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True


def _reference_from(model, path):
    """A float32 Llama whose linear weights are the dequantized 4-bit weights."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    deq = {
        n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    for n, m in ref.named_modules():
        if n in deq:
            m.weight.data.copy_(deq[n])
    return ref


def _eval_forward(model, batch):
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()


def test_unguarded_bnb_corrupts_gradients_after_eval(setup):
    """Documents the library bug: if this starts failing, bnb fixed it and the guard may go."""
    plugin, opts, ctx, batch, path = setup
    model = plugin.load(path, opts, ctx, training=False)  # no guard
    ref = _reference_from(model, path)
    _emulate_avx512bf16(model)
    _eval_forward(model, batch)
    assert _lora_grads_vs_reference(model, ref, batch) > 0.1


def test_guard_keeps_gradients_correct_after_eval(setup):
    plugin, opts, ctx, batch, path = setup
    model = plugin.load(path, opts, ctx, training=True)  # guard applied at load
    ref = _reference_from(model, path)
    _eval_forward(model, batch)
    assert _lora_grads_vs_reference(model, ref, batch) < 1e-3


def test_guard_prevents_repacking(setup):
    plugin, opts, ctx, batch, path = setup
    model = plugin.load(path, opts, ctx, training=True)
    _eval_forward(model, batch)
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
    )


def test_guard_undoes_repacking_that_already_happened(setup):
    """bnb's inverse repacking is lossy (absmax went through bfloat16), hence the guard above
    prevents the switch at load; undoing a switch restores training within bf16 rounding."""
    plugin, opts, ctx, batch, path = setup
    model = plugin.load(path, opts, ctx, training=False)
    before = {
        n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    _emulate_avx512bf16(model)
    _eval_forward(model, batch)
    plugin.ensure_training_kernels(model, opts)
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
            after = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            assert float((after - before[n]).abs().max() / before[n].abs().max()) < 2**-7, n
    ref = _reference_from(model, path)
    assert _lora_grads_vs_reference(model, ref, batch) < 1e-3

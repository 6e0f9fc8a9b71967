"""The same flows on a CUDA device (skipped on CPU machines; run on GPU machines by scripts/gpu/test.sh)."""

import pytest
import torch

from qpeft import orchestrator
from qpeft.registry import load_registry

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.mark.parametrize("quantizer", ["bnb-nf4", "bnb-8bit", "none"])
def test_gpu_run_trains_saves_reloads(quantizer, tiny_config, registry):
    cfg = tiny_config(quantizer=quantizer, model={"name_or_path": tiny_config()["model"]["name_or_path"], "device": "cuda"})
    cfg["trainer"]["options"]["max_steps"] = 8
    cfg["data"]["max_train_examples"] = 8
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    assert resolved.device == "cuda" and resolved.dtype == "bfloat16"
    s = orchestrator.run(resolved, reg)
    losses = [h["loss"] for h in s["loss_history"]]
    assert min(losses[-3:]) < losses[0], losses
    assert s["peak_allocated_gib"] > 0
    # bf16 compute: a reload must reproduce the trained model up to bf16 kernel noise
    assert s["reload_max_abs_logit_diff"] < 5e-2, s["reload_max_abs_logit_diff"]


def test_gpu_nf4_lora_gradients_match_dequantized_reference(tiny_llama_path, tmp_path, registry):
    import bitsandbytes as bnb
    from test_bnb_guard import _lora_grads_vs_reference
    from transformers import AutoModelForCausalLM

    cfg = {
        "model": {"name_or_path": tiny_llama_path, "device": "cuda", "dtype": "float32"},
        "quantizer": "bnb-nf4",
        "peft": "lora",
        "trainer": "hf",
        "output_dir": str(tmp_path),
    }
    resolved, _ = orchestrator.prepare(cfg, registry=registry)
    ctx = orchestrator._context(resolved, registry)
    model = resolved.quantizer.load(tiny_llama_path, resolved.quantizer_options, ctx, training=True)
    batch = {
        "input_ids": torch.randint(3, 500, (2, 16), device="cuda"),
        "attention_mask": torch.ones(2, 16, dtype=torch.long, device="cuda"),
    }
    model.eval()
    with torch.no_grad():
        model(**batch)
    resolved.quantizer.ensure_training_kernels(model, resolved.quantizer_options)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).cuda()
    deq = {
        n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    for n, m in ref.named_modules():
        if n in deq:
            m.weight.data.copy_(deq[n])
    assert _lora_grads_vs_reference(model, ref, batch) < 1e-2


def test_gpu_gptq_inference_load_of_embedded_model(embedded_model_path, registry, tmp_path):
    """The embedded SmolLM2 (576-wide layers) quantized with group 128 loads for inference on CUDA
    (gptqmodel's own choice, Marlin, refuses those layers) and gives finite logits."""
    pytest.importorskip("gptqmodel")
    cfg = {
        "model": {"name_or_path": embedded_model_path, "device": "cuda", "dtype": "bfloat16"},
        "quantizer": "gptq",
        "peft": "lora",
        "trainer": "hf",
        "output_dir": str(tmp_path),
    }
    resolved, _ = orchestrator.prepare(cfg, registry=registry)
    ctx = orchestrator._context(resolved, registry)
    model = resolved.quantizer.load(embedded_model_path, resolved.quantizer_options, ctx, training=False)
    assert any("not divisible by group 128" in n for n in ctx.notes), ctx.notes
    with torch.no_grad():
        logits = model(input_ids=torch.randint(3, 500, (1, 16), device="cuda")).logits
    assert torch.isfinite(logits).all()


# The conformance kit (issue 21's checks included: bf16, hf trainer, inference path, quantized
# save/reload, accounting) on CUDA, float32 comparisons as on the CPU.
from qpeft.testing import QuantizerConformance  # noqa: E402


class TestGpuKitNone(QuantizerConformance):
    quantizer = "none"
    device = "cuda"
    backend_modules = ()


class TestGpuKitNF4(QuantizerConformance):
    quantizer = "bnb-nf4"
    device = "cuda"
    backend_modules = ("bitsandbytes",)


class TestGpuKit8bit(QuantizerConformance):
    quantizer = "bnb-8bit"
    device = "cuda"
    backend_modules = ("bitsandbytes",)
    option_grid = {"matmul": ["int8", "dequantize"]}
    merge_tolerance = 5e-2  # as on the CPU (tests/test_conformance.py): LLM.int8 quantizes activations


def _needs(module: str):
    return pytest.mark.skipif(__import__("importlib").util.find_spec(module) is None, reason=f"{module} is not installed")


@_needs("hqq")
class TestGpuKitHqq(QuantizerConformance):
    quantizer = "hqq"
    device = "cuda"
    backend_modules = ("hqq",)
    memory_slack = 1.55  # as on the CPU (tests/test_conformance.py): float32 scale and zero per group
    logit_tolerance = 0.75
    option_grid = {"nbits": [8, 4, 2]}


@_needs("torchao")
class TestGpuKitTorchaoInt8(QuantizerConformance):
    quantizer = "torchao-int8"
    device = "cuda"
    backend_modules = ("torchao",)


@_needs("torchao")
class TestGpuKitTorchaoFloat8(QuantizerConformance):
    quantizer = "torchao-float8"
    device = "cuda"
    backend_modules = ("torchao",)


# torchao-int4 needs bfloat16 (its CUDA layout); the kit compares in float32, so the int4 path is
# covered by the quickstart on CUDA (scripts/gpu/test.sh's QUICKSTART_QUANTIZERS) instead.

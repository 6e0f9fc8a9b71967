"""Every bitsandbytes quantizer on the embedded real model (SmolLM2-135M): weight memory drops by
the expected factor and held-out perplexity stays within a measured bound of the ``none``
reference. GPTQ is measured on this model by benchmarks/quantizers.py only (quantizing it takes
~7-17 minutes on 2 CPU cores); the tiny-model tests and the conformance kit cover its gradients.

Bounds, from docs/quantizers.md (Hamlet val split, 5,017 tokens, CPU): int8 +1.2%, NF4 +24%,
FP4 +30% over `none`. Here a 512-token slice of the same held-out text is used (to stay fast),
so the bounds carry margin: int8 ≤ +5%, 4-bit ≤ +45%, and never below `none` by more than 2%.
Memory: quantized linear weights are 1/4 (8-bit) or ~1/8 (4-bit) of float32, while the
embedding (tied output head, 28 M of 135 M parameters) stays full precision: int8 ≤ 0.45×,
4-bit ≤ 0.35× of `none`'s weight memory.
"""

from __future__ import annotations

import pytest

from qpeft import orchestrator
from qpeft.config import load_config
from qpeft.data import load_records, tokenize
from qpeft.modeling import evaluate_perplexity, release_model, weight_memory_gib
from qpeft.registry import load_registry
from qpeft.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # end to end on the embedded model

BOUNDS = {"bnb-8bit": (0.45, 1.05), "bnb-nf4": (0.35, 1.45), "bnb-fp4": (0.35, 1.45)}


@pytest.fixture(scope="module")
def setup(embedded_model_path):
    registry = load_registry()
    tok, _ = load_tokenizer(embedded_model_path)
    cfg = load_config(
        {
            "quantizer": "none",
            "peft": "lora",
            "trainer": "hf",
            "data": {"path": "embedded:text", "max_val_examples": None, "max_length": 256},
        }
    )
    _, val_rows, fmt = load_records(cfg.data)
    val, n = [], 0
    for ex in tokenize(val_rows, fmt, tok, 256):
        val.append(ex)
        n += len(ex["input_ids"])
        if n >= 512:
            break
    return registry, tok, val


def _measure(name, setup, embedded_model_path):
    registry, tok, val = setup
    resolved, reg = orchestrator.prepare(
        {"model": {"name_or_path": embedded_model_path, "device": "cpu"}, "quantizer": name, "peft": "lora", "trainer": "hf"},
        registry=registry,
    )
    ctx = orchestrator._context(resolved, reg)
    model = resolved.quantizer.load(embedded_model_path, resolved.quantizer_options, ctx, training=False)
    ppl = evaluate_perplexity(model, val, tok.pad_token_id)["perplexity"]
    mem = weight_memory_gib(model)
    release_model(model)
    return mem, ppl


@pytest.fixture(scope="module")
def reference(setup, embedded_model_path):
    return _measure("none", setup, embedded_model_path)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_memory_and_perplexity_vs_none(name, setup, reference, embedded_model_path):
    mem_ref, ppl_ref = reference
    mem, ppl = _measure(name, setup, embedded_model_path)
    max_mem, max_ppl = BOUNDS[name]
    assert mem <= max_mem * mem_ref, (name, mem, mem_ref)
    assert 0.98 * ppl_ref <= ppl <= max_ppl * ppl_ref, (name, ppl, ppl_ref)

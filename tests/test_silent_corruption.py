"""Silent-corruption guards (docs/architecture.md, library facts) not covered elsewhere, and a check that every
trap in docs/reliability.md's table points at a regression test that exists.

* Merge after an eval forward on a 4-bit base: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit
  weights for an inference kernel on the first eval forward, and undoing that is lossy. The
  merge computes its reference logits with an eval forward, so the merged weights must not
  come from the repacked ones. This CPU has no AVX512-BF16: the test sets the capability
  flag bitsandbytes derives from the CPU, as tests/test_bnb_guard.py does.
* accelerate's mixed-precision ``prepare`` leaves an autocast wrapper on ``model.forward``
  after training; every later forward (evaluation, reload check, merge) would silently run
  in bfloat16. Trainers call :func:`qpeft.modeling.release_model`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nf4_adapter(tiny_llama_path, tmp_path_factory):
    """A LoRA adapter (random, non-zero) with qpeft metadata saying it was trained on bnb-nf4."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("nf4-adapter")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)).save_pretrained(out)
    (out / "qpeft.json").write_text(
        json.dumps(
            {
                "model": {"name_or_path": tiny_llama_path, "device": "cpu", "dtype": "float32"},
                "quantizer": {"name": "bnb-nf4", "options": {}},
                "peft": {"name": "lora", "options": {}},
            }
        )
    )
    return out


def _merged_weights(adapter, out, registry):
    from safetensors.torch import load_file

    from qpeft import orchestrator

    result = orchestrator.merge(str(adapter), str(out), registry, overrides=["model.device=cpu"])
    return result, load_file(str(out / "model.safetensors"))


def test_merge_after_eval_forward_on_4bit(nf4_adapter, tiny_llama_path, tmp_path, monkeypatch):
    """On AVX512-BF16 CPUs an eval forward repacks 4-bit weights, and undoing it is lossy. The
    merge's reference runs on the training kernels, so the merge never repacks; and a base that
    was repacked before it reached ``full_precision_model`` is quantized again from the
    original weights, so the dequantized weights are exactly those of a base never repacked."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    from qpeft.config import load_config, resolve
    from qpeft.context import RunContext
    from qpeft.registry import load_registry

    registry = load_registry()
    _, expected = _merged_weights(nf4_adapter, tmp_path / "plain", registry)

    # An AVX512-BF16 CPU: Linear4bit reads the capability when it is built, at load.
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    repacked = []
    real = bnb.nn.Linear4bit.forward

    def watch(self, x):
        out = real(self, x)
        repacked.append(bool(getattr(self.weight.quant_state, "packing_format_for_cpu", False)))
        return out

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", watch)
    _, merged = _merged_weights(nf4_adapter, tmp_path / "avx512", registry)
    assert repacked and not any(repacked), "the merge ran a 4-bit layer on the inference kernel"
    assert merged.keys() == expected.keys()
    worst = max(float((merged[k] - expected[k]).abs().max()) for k in expected)
    assert worst == 0.0, f"merged weights differ by up to {worst} on an AVX512-BF16 CPU"

    # The second guard: a base repacked by an earlier eval forward.
    cfg = load_config({"model": tiny_llama_path, "quantizer": "bnb-nf4", "peft": "lora", "trainer": "hf", "output_dir": str(tmp_path)})
    resolved = resolve(cfg, registry, device="cpu")
    ctx = RunContext(config=cfg, device="cpu", dtype="float32", output_dir=str(tmp_path))
    plugin, opts = resolved.quantizer, resolved.quantizer_options

    def full_precision(eval_forward_first: bool) -> dict:
        model = plugin.load(tiny_llama_path, opts, ctx, training=False)
        if eval_forward_first:
            repacked.clear()
            with torch.no_grad():
                model.eval()(input_ids=torch.tensor([[5, 6, 7, 8]]))
            assert any(repacked), "the emulated CPU did not repack: the test no longer exercises the trap"
        return {k: v.clone() for k, v in plugin.full_precision_model(model, tiny_llama_path, opts, ctx).state_dict().items()}

    clean, after_eval = full_precision(False), full_precision(True)
    worst = max(float((after_eval[k] - clean[k]).abs().max()) for k in clean)
    assert worst == 0.0, f"dequantized weights differ by up to {worst} after an eval forward"
    # (The logits of the emulated inference kernel are not checked: this CPU lacks the real one.)


def test_autocast_wrapper_left_by_accelerate_is_removed():
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpeft.modeling import release_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    )
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        fp32 = model(input_ids=ids).logits
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # an earlier Trainer in this process fixed mixed_precision="no"
    try:
        prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    finally:
        AcceleratorState._reset_state(True)  # the singleton would leak bf16 into later Trainers
    with torch.no_grad():
        wrapped = prepared(input_ids=ids).logits
    assert (wrapped.float() - fp32).abs().max() > 1e-4, "accelerate no longer wraps forward in autocast"
    release_model(prepared)
    with torch.no_grad():
        released = model(input_ids=ids).logits
    assert torch.equal(released, fp32)


def test_every_trap_in_reliability_doc_has_an_existing_test():
    """Each row of the silent-corruption table names tests as ``tests/FILE.py::NAME``: they exist."""
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    section = text.split("## Silent-corruption guards", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| trap") and "---" not in line]
    assert len(rows) >= 8
    for row in rows:
        refs = re.findall(r"tests/(\w+\.py)::(\w+)", row)
        assert refs, f"no test named in: {row}"
        for file, name in refs:
            source = (REPO / "tests" / file).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"tests/{file}::{name} does not exist"

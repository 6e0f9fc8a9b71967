"""The native trainer's speed options change speed, not the result: torch.compile of the decoder
layers (CPU and GPU), liger-kernel's fused RMSNorm/SwiGLU/rotary kernels and fused AdamW (GPU),
each against the eager / stock run on the same data and seed."""

import pytest

from qpeft import orchestrator
from qpeft.errors import ConfigError
from qpeft.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _run(tiny_config, registry, tmp_path, name, quantizer="none", device="cpu", peft="lora", **opts):
    cfg = tiny_config(
        quantizer=quantizer,
        peft=peft,
        trainer={"name": "native", "options": {"batch_size": 4, "max_steps": 5, "lr": 3e-3, "scheduler": "constant", **opts}},
        evaluate=False,
        output_dir=str(tmp_path / name),
        gradient_checkpointing="auto" if peft == "prefix" else True,
    )
    cfg["model"]["device"] = device
    cfg["data"]["max_train_examples"] = 12
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    s = orchestrator.run(resolved, reg)
    return [h["loss"] for h in s["loss_history"]], s["notes"]


def test_liger_on_without_cuda_is_a_config_error(tiny_config, registry):
    cfg = tiny_config(trainer={"name": "native", "options": {"liger": "on"}})
    cfg["model"]["device"] = "cpu"
    with pytest.raises(ConfigError) as e:
        orchestrator.prepare(cfg, registry=registry)
    assert "trainer.options.liger" in str(e.value) and ("CUDA" in str(e.value) or "not installed" in str(e.value))


def test_compiled_layers_train_like_eager(tiny_config, registry, tmp_path):
    eager, notes_e = _run(tiny_config, registry, tmp_path, "eager")
    compiled, notes_c = _run(tiny_config, registry, tmp_path, "compiled", compile=True)
    assert any("torch.compile on 2 decoder layers" in n for n in notes_c) and not any("compile" in n for n in notes_e)
    assert compiled[-1] < compiled[0]
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-4 * abs(eager[0]), (eager, compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("quantizer", ["bnb-nf4", "none"])
def test_gpu_liger_kernels_train_like_stock_modules(tiny_config, registry, tmp_path, quantizer):
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    rope = modeling_llama.apply_rotary_pos_emb
    stock, notes_s = _run(tiny_config, registry, tmp_path, "stock", quantizer, "cuda", liger="off")
    liger, notes_l = _run(tiny_config, registry, tmp_path, "liger", quantizer, "cuda", liger="on")
    assert any("liger-kernel RMSNorm" in n for n in notes_l) and not any("liger" in n for n in notes_s)
    assert modeling_llama.apply_rotary_pos_emb is rope  # transformers' globals are put back after training
    # bf16 compute: the fused kernels round differently, step losses stay within bf16 noise
    assert max(abs(a - b) for a, b in zip(stock, liger)) <= 2e-2 * abs(stock[0]), (stock, liger)


@pytest.mark.gpu
def test_gpu_fused_adamw_matches_foreach(tiny_config, registry, tmp_path):
    fused, notes = _run(tiny_config, registry, tmp_path, "fused", "bnb-nf4", "cuda", liger="off")
    plain, _ = _run(tiny_config, registry, tmp_path, "plain", "bnb-nf4", "cuda", liger="off", optim="adamw_torch")
    assert any("fused AdamW" in n for n in notes)
    assert max(abs(a - b) for a, b in zip(fused, plain)) <= 2e-2 * abs(plain[0]), (fused, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("quantizer", ["bnb-nf4", "bnb-8bit"])
def test_gpu_compiled_layers_train_like_eager(tiny_config, registry, tmp_path, quantizer):
    eager, _ = _run(tiny_config, registry, tmp_path, "eager", quantizer, "cuda", liger="off", compile=False)
    compiled, notes = _run(tiny_config, registry, tmp_path, "compiled", quantizer, "cuda", liger="off", compile=True)
    assert any("torch.compile" in n for n in notes)
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 2e-2 * abs(eager[0]), (eager, compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("quantizer,peft", [("gptq", "lora"), ("bnb-8bit", "lora"), ("bnb-nf4", "prefix"), ("bnb-nf4", "adapters")])
def test_gpu_compile_auto_trains_every_kind_of_run(tiny_config, registry, tmp_path, quantizer, peft):
    """`compile: auto` turns on for CUDA runs of >= 50 steps: every quantizer and method must still
    train, and the compiled run's first steps equal the eager run's (bf16 noise)."""
    if quantizer == "gptq":
        pytest.importorskip("gptqmodel")
    auto, notes = _run(tiny_config, registry, tmp_path, "auto", quantizer, "cuda", peft, max_steps=50, liger="off")
    eager, _ = _run(tiny_config, registry, tmp_path, "eager", quantizer, "cuda", peft, max_steps=50, liger="off", compile=False)
    assert any("torch.compile" in n for n in notes), notes
    assert all(x == x for x in auto) and min(auto[-5:]) < auto[0], auto
    assert max(abs(a - b) for a, b in zip(eager[:5], auto[:5])) <= 2e-2 * abs(eager[0]), (eager[:5], auto[:5])

"""The whole `qpeft run` flow on a tiny random Llama with real bitsandbytes, peft and Trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tol
from safetensors.torch import load_file

from qpeft import orchestrator
from qpeft.errors import ConfigError, QpeftError
from qpeft.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def nf4_run(tiny_llama_path, tmp_path_factory, registry):
    out = tmp_path_factory.mktemp("nf4run")
    cfg = {
        "model": {"name_or_path": tiny_llama_path},
        "quantizer": {"name": "bnb-nf4"},
        "peft": {"name": "lora", "options": {"r": 8, "alpha": 16}},
        "trainer": {"name": "hf", "options": {"batch_size": 4, "max_steps": 8, "lr": 3e-3, "scheduler": "constant"}},
        "data": {"path": "embedded:instruct", "max_length": 96, "max_train_examples": 8, "max_val_examples": 4},
        "output_dir": str(out),
        "generate": {"max_new_tokens": 8},
    }
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    return orchestrator.run(resolved, reg), out


def test_run_trains_and_summarises(nf4_run):
    s, _ = nf4_run
    assert s["train_steps"] == 8 and s["train_tokens"] > 0 and s["tokens_per_s"] > 0
    losses = [h["loss"] for h in s["loss_history"]]
    assert min(losses[-3:]) < losses[0], losses  # 8 epochs over 8 examples: it must fit them
    assert s["val_perplexity_before"] > 0 and s["val_perplexity_after"] > 0
    assert 0 < s["trainable_percent"] < 100
    assert s["weight_memory_gib"] > 0 and any(v > 0 for k, v in s.items() if k.startswith("peak_"))


def test_adapter_is_peft_format_safetensors_with_metadata(nf4_run):
    s, out = nf4_run
    adapter = out / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "qpeft.json", "resolved_config.yaml"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    meta = json.loads((adapter / "qpeft.json").read_text())
    assert meta["quantizer"]["name"] == "bnb-nf4" and meta["peft"]["options"]["r"] == 8
    assert (out / "resolved_config.yaml").is_file() and json.loads((out / "summary.json").read_text())["train_steps"] == 8
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_reload_reproduces_trained_logits(nf4_run):
    s, _ = nf4_run
    assert s["reload_max_abs_logit_diff"] < tol(s["dtype"], 1e-4, 5e-2)


def test_lora_targets_all_linear_but_head(nf4_run):
    s, _ = nf4_run
    note = next(n for n in s["notes"] if n.startswith("lora targets"))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in note
    assert "lm_head" not in note


def test_generate_cli_rebuilds_base_from_metadata(nf4_run):
    _, out = nf4_run
    proc = subprocess.run(
        [sys.executable, "-m", "qpeft", "generate", "--adapter", str(out / "adapter"), "--prompt", "Hi", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr and "bnb-nf4" in proc.stderr


def test_merge_into_dequantized_weights(nf4_run, registry, tmp_path):
    s, out = nf4_run
    result = orchestrator.merge(str(out / "adapter"), str(tmp_path / "merged"), registry)
    assert result["merge_source"] == "dequantize"
    assert result["max_abs_logit_diff"] < tol(s["dtype"], 1e-3, 1e-1), result
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with pytest.raises(QpeftError, match="exists; pass --force"):
        orchestrator.merge(str(out / "adapter"), str(tmp_path / "merged"), registry)


def test_merge_reference_runs_on_the_training_kernels(nf4_run, registry):
    """The merge is verified against the adapter on the kernels it was trained on. bnb's CPU
    inference kernel on AVX512-BF16 CPUs (emulated here where the CPU lacks it) repacks the
    4-bit weights with bf16-rounded scales: 2.8e-3 to 6.4e-3 in logits, which failed merges
    of correct weights on those CPUs."""
    import bitsandbytes as bnb
    import torch

    from qpeft.modeling import logits_for

    _, out = nf4_run
    resolved = orchestrator.resolve_from_adapter(out / "adapter", registry)
    ctx = orchestrator._context(resolved, registry)
    probe = torch.arange(3, 40).tolist()

    if resolved.device != "cpu":
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs")

    def repacked_after_forward(**kw) -> bool:
        model = orchestrator.load_for_inference(out / "adapter", resolved, registry, ctx, **kw)
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        if not kw:  # what bnb does on an AVX512-BF16 CPU
            for m in layers:
                m.support_avx512bf16_for_cpu = True
        logits_for(model, {"input_ids": probe, "labels": probe}, 0)
        return any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)

    assert repacked_after_forward(), "bnb no longer repacks on AVX512-BF16 CPUs: the merge reference guard may go"
    assert not repacked_after_forward(training_kernels=True)


def test_unknown_target_module_lists_candidates(tiny_config, registry):
    cfg = tiny_config(peft={"name": "lora", "options": {"target_modules": ["qkv_proj"]}}, quantizer="none", evaluate=False)
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    with pytest.raises(ConfigError, match=r"peft.options.target_modules: no module named 'qkv_proj'.*candidates: down_proj, gate_proj"):
        orchestrator.run(resolved, reg)


def test_not_an_adapter_folder(tmp_path, registry):
    with pytest.raises(QpeftError, match="not an adapter folder"):
        orchestrator.generate(str(tmp_path), "x", registry)


def _qpeft_model(adapter, registry, overrides=()):
    resolved = orchestrator.resolve_from_adapter(adapter, registry, overrides)
    ctx = orchestrator._context(resolved, registry)
    return orchestrator.load_for_inference(Path(adapter), resolved, registry, ctx)


def _plain_logits(model, ids):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float().cpu()


def test_qpeft_lora_loads_in_plain_peft(nf4_run, registry, tiny_llama_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = nf4_run
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).to(device), out / "adapter"
    )
    ours = _qpeft_model(str(out / "adapter"), registry, ["quantizer=none", "model.dtype=float32"])
    assert torch.allclose(_plain_logits(plain, ids.to(device)), _plain_logits(ours, ids.to(device)), atol=1e-5)


def test_plain_peft_adapter_loads_in_qpeft(tiny_llama_path, registry, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    plain = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain.save_pretrained(tmp_path / "plain")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = _plain_logits(plain, ids)
    ours = _qpeft_model(str(tmp_path / "plain"), registry, ["model.dtype=float32", "model.device=cpu"])
    assert torch.allclose(_plain_logits(ours, ids), expected, atol=1e-5)
    out = orchestrator.generate(str(tmp_path / "plain"), "Hi", registry, ["model.device=cpu"], max_new_tokens=3)
    assert out["new_tokens"] > 0


def test_adapter_for_another_base_is_a_clear_error(nf4_run, registry, tmp_path, tiny_llama_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _, out = nf4_run
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
    )
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_llama_path).save_pretrained(tmp_path / "other")
    with pytest.raises(QpeftError, match=r"does not load on base .*other.*size mismatch"):
        _qpeft_model(str(out / "adapter"), registry, [f"model={tmp_path / 'other'}"])


def test_truncated_adapter_is_a_clear_error(nf4_run, registry, tmp_path):
    import shutil

    _, out = nf4_run
    bad = tmp_path / "bad"
    shutil.copytree(out / "adapter", bad)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QpeftError, match=r"adapter_model.safetensors is truncated or corrupt"):
        _qpeft_model(str(bad), registry)
    (bad / "qpeft.json").write_text("{not json")
    with pytest.raises(QpeftError, match=r"qpeft.json is corrupt"):
        _qpeft_model(str(bad), registry)


def test_qpeft_prefix_loads_in_plain_peft(tiny_config, registry, tiny_llama_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(
        quantizer="none",
        peft={"name": "prefix", "options": {"num_virtual_tokens": 4}},
        evaluate=False,
        model={"name_or_path": tiny_llama_path, "device": "cpu"},
    )
    cfg["trainer"]["options"].update(max_steps=2, lr=3e-2)
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    orchestrator.run(resolved, reg)
    adapter = Path(cfg["output_dir"]) / "adapter"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32), adapter)
    ours = _qpeft_model(str(adapter), registry, ["model.device=cpu"])
    assert torch.allclose(_plain_logits(plain, ids), _plain_logits(ours, ids), atol=1e-5)


def test_merge_then_requantize(nf4_run, registry, tmp_path):
    import json as _json

    from transformers import AutoModelForCausalLM

    s, out = nf4_run
    result = orchestrator.merge(str(out / "adapter"), str(tmp_path / "m"), registry, requantize="bnb-nf4")
    rq = result["requantized"]
    assert rq["quantizer"] == "bnb-nf4" and rq["out_dir"].endswith("m-bnb-nf4")
    # Re-quantizing the merged float32 weights to NF4 costs quantization error, reported, finite.
    assert 0 < rq["max_abs_logit_diff_vs_merged"] < 5
    cfg = _json.loads((tmp_path / "m-bnb-nf4" / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    AutoModelForCausalLM.from_pretrained(tmp_path / "m-bnb-nf4", device_map={"": "cuda" if s["device"] == "cuda" else "cpu"})
    with pytest.raises(ConfigError, match=r"--requantize: unknown quantizer 'bnb-nf5'"):
        orchestrator.merge(str(out / "adapter"), str(tmp_path / "m2"), registry, requantize="bnb-nf5")

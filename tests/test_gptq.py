"""GPTQ quantizer plugin (``gptq``): quantize a tiny random Llama once, then check memory,
logits, LoRA gradients after an eval forward (the silent-corruption regression of
docs/architecture.md, library facts), the save/reload cache, and the config checks.

The model is built here (not with conftest's SmolLM2 tokenizer) so the module needs neither
the embedded model nor a hub: a 512-token byte-level BPE is trained on qpeft's embedded text.
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum.gptq")

import torch  # noqa: E402

from qpeft.config import load_config, resolve, validate_options  # noqa: E402
from qpeft.context import RunContext  # noqa: E402
from qpeft.errors import ConfigError  # noqa: E402
from qpeft.modeling import find_linear_targets  # noqa: E402
from qpeft.plugins import quant_gptq  # noqa: E402
from qpeft.plugins.peft_lora import Lora, LoraOptions  # noqa: E402
from qpeft.plugins.quant_gptq import Gptq, GptqOptions  # noqa: E402
from qpeft.registry import load_registry  # noqa: E402

PROJ = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
FAST = {"num_calibration_samples": 8, "calibration_max_length": 128}


def opts(**kw) -> GptqOptions:
    return GptqOptions(**{**FAST, **kw})


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private qpeft cache for this module (QPEFT_CACHE)."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("qpeft-cache")
    mp.setenv("QPEFT_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    """A 2-layer random Llama (hidden 128, MLP 256, vocab 512) with a small BPE tokenizer."""
    from qpeft.testing import save_tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(512)
    return save_tiny_llama(tok, tmp_path_factory.mktemp("tiny-llama-gptq"), tie_word_embeddings=False)


@pytest.fixture(scope="module")
def ctx(tiny_path, tmp_path_factory):
    cfg = load_config({"model": tiny_path, "quantizer": "gptq", "peft": "lora", "trainer": "hf"})
    return RunContext(config=cfg, device="cpu", dtype="float32", output_dir=str(tmp_path_factory.mktemp("out")))


@pytest.fixture(scope="module")
def quantized(cache, tiny_path, ctx):
    """The plugin's quantized model (training kernels), quantized once for the module."""
    ctx.notes.clear()
    t0 = time.perf_counter()
    model = Gptq().load(tiny_path, opts(), ctx, training=True)
    seconds = time.perf_counter() - t0
    notes = list(ctx.notes)
    print(f"\n[gptq] quantize+load {seconds:.1f}s; notes: {notes}")
    return model, seconds, notes


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(4, 512, (2, 24), generator=g), "attention_mask": torch.ones(2, 24, dtype=torch.long)}


def fp_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def quant_layers(model) -> dict:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {n.replace(".base_layer", ""): m for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}


def dequantized_reference(model, path):
    """A float32 Llama whose linear weights are the GPTQ model's dequantized weights."""
    ref = fp_model(path)
    with torch.no_grad():
        for name, q in quant_layers(model).items():
            ref.get_submodule(name).weight.copy_(q.dequantize_weight().T.float())
    return ref


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def attach_lora(model, ctx):
    """qpeft's LoRA on every linear layer, with deterministic nonzero lora_A and lora_B (so
    gradients flow into lora_A as well)."""
    pm = Lora().attach(model, LoraOptions(r=4, alpha=8), ctx)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def lora_grads(pm, batch) -> dict:
    pm.zero_grad(set_to_none=True)
    pm.train()
    pm(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def max_rel_err(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys() and got
    return max(float((got[n] - ref[n]).norm() / ref[n].norm()) for n in ref)


def eval_forward(model, batch):
    """What evaluation (perplexity before training) does: one no-grad forward in eval mode."""
    model.eval()
    with torch.no_grad():
        model(**batch)


# ---------------------------------------------------------------------------- registration, targets


def test_registered_through_entry_points():
    plugin = load_registry().get("quantizer", "gptq")
    assert plugin.capabilities.merge_source == "original"
    from qpeft.capability_table import layer_refusal

    # IA3 has no GPTQ layer in peft 0.21: refused from the declared layer kinds
    assert layer_refusal(plugin, load_registry().get("peft", "ia3"))


def test_linear_targets_found_on_gptq_layers(quantized):
    model, _, _ = quantized
    layers = quant_layers(model)
    assert len(layers) == 14 and {type(m).__name__ for m in layers.values()} == {"TorchLinear"}
    assert not any(isinstance(m, torch.nn.Linear) for m in layers.values())
    assert find_linear_targets(model) == PROJ  # QuantLinear classes count as linear; lm_head does not


# ---------------------------------------------------------------------------- (1) memory


def test_quantize_shrinks_weight_memory(quantized, tiny_path, cache):
    model, seconds, notes = quantized
    fp = fp_model(tiny_path)
    q_bytes = sum(b.numel() * b.element_size() for m in quant_layers(model).values() for b in m.buffers())
    fp_bytes = sum(fp.get_submodule(n).weight.numel() * 4 for n in quant_layers(model))
    print(
        f"\n[gptq] linear weights {fp_bytes} B fp32 -> {q_bytes} B GPTQ ({q_bytes / fp_bytes:.3f}); "
        f"model footprint {fp.get_memory_footprint()} -> {model.get_memory_footprint()} B; quantize {seconds:.1f}s"
    )
    assert q_bytes < 0.16 * fp_bytes  # 4 bit/weight + fp16 scales + int32 g_idx: measured 0.144
    assert model.get_memory_footprint() < 0.5 * fp.get_memory_footprint()  # embeddings/head stay fp32
    assert any("quantized" in n and "cached at" in n for n in notes)
    cached = list((cache / "gptq").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert not list(cached[0].glob("*.bin"))
    saved = json.loads((cached[0] / "config.json").read_text())["quantization_config"]
    assert saved["bits"] == 4 and saved["dataset"] is None  # the calibration set is not written to config.json


# ---------------------------------------------------------------------------- (2) logits


def test_logits_close_to_full_precision(quantized, tiny_path, batch):
    model, _, _ = quantized
    lq = logits(model, batch)
    lf = logits(fp_model(tiny_path), batch)
    lref = logits(dequantized_reference(model, tiny_path), batch)
    kernel_err = float((lq - lref).abs().max())
    quant_rel = float((lq - lf).norm() / lf.norm())
    quant_max = float((lq - lf).abs().max())
    print(
        f"\n[gptq] logits vs fp32: max |d| {quant_max:.4f} (max |logit| {lf.abs().max():.3f}), "
        f"rel L2 {quant_rel:.4f}; vs dequantized-weight reference: max |d| {kernel_err:.2e}"
    )
    # The kernel computes exactly what its dequantized weights say...
    assert kernel_err < 1e-4
    # ...and 4-bit GPTQ of random weights moves logits by ~17% (measured rel 0.16, max 0.19).
    assert quant_rel < 0.25 and quant_max < 0.35


# ---------------------------------------------------------------------------- (3) corruption regression


@pytest.mark.parametrize("kernel", ["auto", "torch_aten"])
def test_lora_gradients_correct_after_eval_forward(kernel, cache, quantized, tiny_path, ctx, batch):
    """With the guard: an eval forward before training leaves LoRA gradients exact."""
    plugin, o = Gptq(), opts(kernel=kernel)
    model = plugin.load(tiny_path, o, ctx, training=True)
    kinds = {type(m).__name__ for m in quant_layers(model).values()}
    assert kinds == ({"TorchLinear"} if kernel == "auto" else {"TorchAtenLinear"})
    ref = dequantized_reference(model, tiny_path)
    model = plugin.prepare_for_training(model, o, ctx, grad_checkpointing=True)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())
    pm, pr = attach_lora(model, ctx), attach_lora(ref, ctx)

    eval_forward(pm, batch)
    plugin.ensure_training_kernels(pm, o)  # what the orchestrator calls after evaluating
    assert not any(quant_gptq._is_latched(m) for m in quant_layers(pm).values())
    got, want = lora_grads(pm, batch), lora_grads(pr, batch)
    assert all(want[n].abs().max() > 0 for n in want if "lora_A" in n)
    err = max_rel_err(got, want)
    print(f"\n[gptq] kernel {kernel}: LoRA grad max rel err after eval forward (guarded) {err:.2e}")
    assert err < 1e-4


def test_unguarded_torch_aten_corrupts_gradients_and_guard_restores(cache, quantized, tiny_path, ctx, batch):
    """gptqmodel's own behaviour (what `backend="auto"` gives for 4-bit on CPU): one eval
    forward latches TorchAtenLinear to its no-grad int4pack kernel and LoRA gradients are
    ~100% wrong, silently. ensure_training_kernels then restores the layers exactly."""
    plugin, o = Gptq(), opts(kernel="torch_aten")
    model = plugin.load(tiny_path, o, ctx, training=False)  # inference load: nothing pinned
    assert {type(m).__name__ for m in quant_layers(model).values()} == {"TorchAtenLinear"}
    ref = dequantized_reference(model, tiny_path)
    pm, pr = attach_lora(model, ctx), attach_lora(ref, ctx)
    want = lora_grads(pr, batch)

    eval_forward(pm, batch)
    assert all(quant_gptq._is_latched(m) for m in quant_layers(pm).values())
    bad = max_rel_err(lora_grads(pm, batch), want)
    print(f"\n[gptq] torch_aten unguarded: LoRA grad max rel err after eval forward {bad:.3f}")
    assert bad > 0.5  # measured 1.03

    plugin.ensure_training_kernels(pm, o)
    assert not any(quant_gptq._is_latched(m) for m in quant_layers(pm).values())
    good = max_rel_err(lora_grads(pm, batch), want)
    print(f"[gptq] torch_aten after ensure_training_kernels (restored from checkpoint): {good:.2e}")
    assert good < 1e-4


# ---------------------------------------------------------------------------- (4) save / reload


def test_cached_checkpoint_reloads_with_identical_logits(quantized, cache, tiny_path, ctx, batch):
    model, seconds, _ = quantized
    before = logits(model, batch)
    (folder,) = list((cache / "gptq").iterdir())

    ctx.notes.clear()
    t0 = time.perf_counter()
    again = Gptq().load(tiny_path, opts(), ctx, training=True)
    reload_s = time.perf_counter() - t0
    assert any("loaded cached" in n for n in ctx.notes) and not any(n.startswith("gptq: quantized") for n in ctx.notes)
    from_path = Gptq().load("/nonexistent-not-read", opts(quantized_path=str(folder)), ctx, training=True)
    d_cache = float((logits(again, batch) - before).abs().max())
    d_path = float((logits(from_path, batch) - before).abs().max())
    # The inference kernel (int4pack ATen, bf16 activations) is close but not identical.
    fast = Gptq().load(tiny_path, opts(), ctx, training=False)
    assert {type(m).__name__ for m in quant_layers(fast).values()} == {"TorchAtenLinear"}
    d_fast = float((logits(fast, batch) - before).abs().max())
    print(
        f"\n[gptq] reload from cache {reload_s:.1f}s (quantize {seconds:.1f}s): max |d| {d_cache:.1e}; "
        f"quantized_path {d_path:.1e}; inference kernel {d_fast:.1e}"
    )
    assert d_cache == 0.0 and d_path == 0.0
    assert d_fast < 0.05


def test_v1_checkpoint_loads_and_latched_layers_restore(quantized, cache, tiny_path, ctx, batch, tmp_path):
    """Most published GPTQ checkpoints use the v1 format (``checkpoint_format: gptq``, zero
    points stored minus one); gptqmodel converts them to v2 in memory, and so must the guard
    when it restores a latched layer from such a checkpoint."""
    from gptqmodel.utils.model import hf_convert_gptq_v2_to_v1_format

    model, _, _ = quantized
    want = logits(model, batch)
    fresh = Gptq().load(tiny_path, opts(), ctx, training=True)  # cache hit; converted in place below
    fresh, converted = hf_convert_gptq_v2_to_v1_format(fresh, True, 4, type(next(iter(quant_layers(fresh).values()))), "gptq_v2", None)
    assert converted
    fresh.config.quantization_config.format = "gptq"
    fresh.save_pretrained(tmp_path / "v1", safe_serialization=True)
    assert json.loads((tmp_path / "v1" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"

    o = opts(quantized_path=str(tmp_path / "v1"), kernel="torch_aten")
    v1 = Gptq().load("/nonexistent-not-read", o, ctx, training=False)
    assert float((logits(v1, batch) - want).abs().max()) < 0.05  # int4pack kernel, bf16 activations; latches
    assert all(quant_gptq._is_latched(m) for m in quant_layers(v1).values())
    Gptq().ensure_training_kernels(v1, o)
    v1.train()
    with torch.no_grad():
        restored = v1(**batch).logits.float()
    assert float((restored - want).abs().max()) == 0.0


def test_full_precision_model_is_the_original(quantized, tiny_path, ctx):
    model, _, _ = quantized
    full = Gptq().full_precision_model(model, tiny_path, opts(), ctx)
    orig = fp_model(tiny_path)
    for name, p in orig.state_dict().items():
        assert torch.equal(full.state_dict()[name], p)


# ---------------------------------------------------------------------------- checks (no weights)


def _check(ctx, **kw):
    Gptq().check(opts(**kw), ctx)


def test_check_refuses_what_the_config_can_tell(ctx, tmp_path):
    with pytest.raises(ConfigError) as e:
        _check(ctx, calibration=str(tmp_path / "missing.jsonl"))
    assert e.value.key == "quantizer.options.calibration" and "embedded" in e.value.message
    (tmp_path / "cal.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unsupported file type"):
        _check(ctx, calibration=str(tmp_path / "cal.csv"))
    with pytest.raises(ConfigError) as e:
        _check(ctx, bits=3, kernel="torch_aten")
    assert e.value.key == "quantizer.options.kernel" and "3-bit" in e.value.message and "torch" in e.value.message
    with pytest.raises(ConfigError, match="runs on cuda"):
        _check(ctx, kernel="marlin")
    with pytest.raises(ConfigError, match="group_size"):
        _check(ctx, kernel="torch_aten", group_size=256)
    with pytest.raises(ConfigError) as e:
        _check(ctx, quantized_path=str(tmp_path / "nope"))
    assert e.value.key == "quantizer.options.quantized_path"
    _check(ctx, bits=3)  # torch kernel: fine
    _check(ctx, bits=8, group_size=-1, act_order=True, sym=False)


def test_options_validation():
    plugin = Gptq()
    for bad, key in (({"bits": 5}, "bits"), ({"group_size": 100}, "group_size"), ({"kernel": "cuda"}, "kernel"), ({"bitz": 4}, "bitz")):
        with pytest.raises(ConfigError) as e:
            validate_options(plugin, bad, "quantizer.options")
        assert e.value.key == f"quantizer.options.{key}"


def test_check_refuses_dora(tiny_path, tmp_path):
    cfg = load_config({"model": tiny_path, "quantizer": "gptq", "peft": {"name": "lora", "options": {"use_dora": True}}, "trainer": "hf"})
    with pytest.raises(ConfigError) as e:
        resolve(cfg, load_registry(), device="cpu")
    assert e.value.key == "peft.options.use_dora"


def test_resolve_reports_missing_calibration(tiny_path):
    cfg = load_config(
        {
            "model": tiny_path,
            "quantizer": {"name": "gptq", "options": {"calibration": "/no/such/file.jsonl"}},
            "peft": "lora",
            "trainer": "hf",
        }
    )
    with pytest.raises(ConfigError) as e:
        resolve(cfg, load_registry(), device="cpu")
    assert e.value.key == "quantizer.options.calibration"


def test_missing_library_names_the_extra(ctx, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        _check(ctx)
    assert e.value.key == "quantizer.name" and "pip install 'qpeft[gptq]'" in e.value.message


def test_inference_only_kernel_refused_for_training_before_loading(ctx):
    with pytest.raises(ConfigError, match="inference-only"):
        Gptq().load("/nonexistent-not-read", opts(kernel="marlin"), ctx, training=True)


# ---------------------------------------------------------------------------- calibration and cache key


def test_calibration_texts(tmp_path):
    assert len(quant_gptq.calibration_texts(opts(num_calibration_samples=5))) == 5
    assert len(quant_gptq.calibration_texts(opts(num_calibration_samples=10_000))) == 150 + 67  # all embedded rows
    (tmp_path / "c.txt").write_text("first block\n\nsecond block\n\n\n")
    assert sorted(quant_gptq.calibration_texts(opts(calibration=str(tmp_path / "c.txt")))) == ["first block", "second block"]
    (tmp_path / "c.jsonl").write_text('{"prompt": "Q", "response": "A"}\n{"text": "T"}\n')
    assert sorted(quant_gptq.calibration_texts(opts(calibration=str(tmp_path / "c.jsonl")))) == ["Q\nA", "T"]


def test_cache_key_follows_options(cache, tiny_path, ctx):
    key = quant_gptq.cache_dir
    assert key(tiny_path, opts(), ctx) == key(tiny_path, opts(kernel="torch_aten", save_quantized=True), ctx)
    assert key(tiny_path, opts(), ctx) != key(tiny_path, opts(bits=8), ctx)
    assert key(tiny_path, opts(), ctx) != key(tiny_path, opts(num_calibration_samples=9), ctx)
    assert key(tiny_path, opts(), ctx).parent == cache / "gptq"


def test_marlin_refusal_is_avoided_for_layers_the_group_does_not_divide(embedded_model_path):
    """Regression (H100): optimum gives every layer one kernel class, gptqmodel's CUDA "auto" picks
    Marlin, and Marlin refuses SmolLM2's 576-wide layers with group 128 at load. qpeft spots
    such widths from config.json and loads with the torch kernel (GPU side: tests/test_gpu.py)."""
    assert quant_gptq.indivisible_in_features(embedded_model_path, 128) == [576]
    assert quant_gptq.indivisible_in_features(embedded_model_path, 64) == []
    assert quant_gptq.indivisible_in_features(embedded_model_path, -1) == []

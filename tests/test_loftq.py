"""LoRA ``init: loftq`` through the quantizer contract (``QuantizerPlugin.dequantized_weight``):
after the init, quantized base + adapter is closer to the full-precision weights, layer by layer,
and the model's logits closer to the float model's than with a zero-update init; the adapter is
peft's ``replace_lora_weights_loftq`` result (cross-checked on bnb-nf4); a third-party quantizer
implementing the hook gets LoftQ too, and quantizers without it are refused before loading."""

from __future__ import annotations

import pytest
import torch
from conftest import tol

from qpeft import hookimpl, orchestrator
from qpeft.api import Capabilities, QuantizerPlugin
from qpeft.checkpoint_weights import CheckpointWeights
from qpeft.errors import ConfigError
from qpeft.modeling import freeze, load_causal_lm
from qpeft.registry import load_registry

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
REGISTRY = load_registry()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _attached(cfg, registry=REGISTRY):
    """(peft model, float model, resolved run, ctx) for ``cfg``, as ``qpeft run`` builds them."""
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    ctx = orchestrator._context(resolved, reg)
    path = cfg["model"]["name_or_path"]
    model = resolved.quantizer.load(path, resolved.quantizer_options, ctx, training=True)
    model = resolved.quantizer.prepare_for_training(model, resolved.quantizer_options, ctx, grad_checkpointing=False)
    return resolved.peft.attach(model, resolved.peft_options, ctx), resolved, ctx


def _layer_errors(pm, quant, q_opts, path):
    """Per LoRA layer: (||W - Q||, ||W - (Q + scale * B @ A)||), W from the checkpoint."""
    from peft.tuners.lora import LoraLayer

    weights = CheckpointWeights(path)
    out = {}
    for name, module in pm.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        deq = quant.dequantized_weight(module.get_base_layer(), q_opts).float().cpu()
        w = weights.get(name.removeprefix("base_model.model.") + ".weight").float()
        delta = module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight)
        out[name] = (float((w - deq).norm()), float((w - deq - delta.detach().float().cpu()).norm()))
    return out


def _ids(tok):
    return tok("The quick brown fox jumps over the lazy dog, and then it sleeps. " * 6, return_tensors="pt").input_ids[:, :64]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


def _kl(p_logits, q_logits) -> float:
    """KL(p || q) per token, of the next-token distributions."""
    p = p_logits.log_softmax(-1)
    return float((p.exp() * (p - q_logits.log_softmax(-1))).sum(-1).mean())


@pytest.mark.parametrize("quantizer", ["bnb-nf4", "hqq", "torchao-int8"])
def test_loftq_reduces_every_layers_error_and_moves_the_model_towards_float(quantizer, tiny_config, tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = _ids(AutoTokenizer.from_pretrained(tiny_llama_path))
    float_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama_path), ids)
    results = {}
    for init in ("gaussian", "loftq"):
        cfg = tiny_config(quantizer=quantizer, peft={"name": "lora", "options": {"r": 16, "alpha": 32, "init": init}})
        pm, resolved, ctx = _attached(cfg)
        results[init] = _logits(pm, ids)
        if init == "loftq":
            errors = _layer_errors(pm, resolved.quantizer, resolved.quantizer_options, tiny_llama_path)
            assert len(errors) == 14  # 2 layers x (q, k, v, o, gate, up, down)
            for name, (before, after) in errors.items():
                assert after < 0.95 * before, (name, before, after)
            assert any("lora init loftq: 14 quantized layers" in n for n in ctx.notes), ctx.notes
    # gaussian starts with B = 0: the quantized base itself
    dist = {k: float((v - float_logits).norm()) for k, v in results.items()}
    kl = {k: _kl(float_logits, v) for k, v in results.items()}
    assert dist["loftq"] < 0.9 * dist["gaussian"], dist
    assert kl["loftq"] < kl["gaussian"], kl


def _peft_model(cfg, r, alpha):
    """A plain peft LoRA (all projections) on a bnb-nf4 base of ``cfg``'s model."""
    from peft import LoraConfig, get_peft_model

    resolved, reg = orchestrator.prepare(cfg, registry=REGISTRY)
    plugin, opts = resolved.quantizer, resolved.quantizer_options
    model = plugin.load(cfg["model"]["name_or_path"], opts, orchestrator._context(resolved, reg), training=True)
    freeze(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)), plugin, opts


def _lora_weights(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}


def test_loftq_matches_peft_replace_lora_weights_loftq_on_nf4(tiny_config, tiny_llama_path, monkeypatch):
    """The cross-check: same A and B as peft's own implementation (scale 1, where peft is right).

    peft 0.21.2 computes on a hard-coded "cuda" (or "xpu") device, so on a CPU-only machine its
    function raises; the test maps that one device string to the CPU to run peft's real code."""
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    from qpeft.plugins.peft_lora import loftq_initialise

    ours, plugin, opts = _peft_model(tiny_config(), r=8, alpha=8)
    loftq_initialise(ours, plugin, opts, tiny_llama_path)
    theirs, _, _ = _peft_model(tiny_config(), r=8, alpha=8)
    if torch.cuda.is_available():
        replace_lora_weights_loftq(theirs, model_path=tiny_llama_path)
    else:
        with pytest.raises((AssertionError, RuntimeError)):  # peft's hard-coded CUDA device
            replace_lora_weights_loftq(theirs, model_path=tiny_llama_path)
        to = torch.Tensor.to

        def cuda_to_cpu(self, *args, **kwargs):
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return to(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", cuda_to_cpu)
        replace_lora_weights_loftq(theirs, model_path=tiny_llama_path)
        monkeypatch.undo()
    a, b = _lora_weights(ours), _lora_weights(theirs)
    assert a.keys() == b.keys() and len(a) == 28
    for name in a:
        torch.testing.assert_close(a[name], b[name].to(a[name].device), rtol=1e-4, atol=1e-5, msg=name)


def test_peft_loftq_ignores_the_lora_scale_and_qpeft_does_not(tiny_config, tiny_llama_path, monkeypatch):
    """Dependency bug (peft 0.21.2): replace_lora_weights_loftq sets B @ A to the residual's
    rank-r part without dividing by scale = alpha / r, so at alpha = 2r (qpeft's default) base +
    adapter overshoots by exactly the correction and ||W - (Q + 2 B A)|| = ||W - Q||: no gain.
    qpeft's guard divides by sqrt(scale) on both factors."""
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    from qpeft.plugins.peft_lora import loftq_initialise

    theirs, plugin, opts = _peft_model(tiny_config(), r=8, alpha=16)
    to = torch.Tensor.to
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: to(t, *a, **{**k, "device": "cpu"} if k.get("device") == "cuda" else k))
    replace_lora_weights_loftq(theirs, model_path=tiny_llama_path)
    monkeypatch.undo()
    ours, _, _ = _peft_model(tiny_config(), r=8, alpha=16)
    loftq_initialise(ours, plugin, opts, tiny_llama_path)
    for name, (before, after) in _layer_errors(theirs, plugin, opts, tiny_llama_path).items():
        assert after == pytest.approx(before, rel=1e-3), (name, before, after)  # peft: no reduction
    for name, (before, after) in _layer_errors(ours, plugin, opts, tiny_llama_path).items():
        assert after < 0.95 * before, (name, before, after)


class _RoundToNearest(QuantizerPlugin):
    """A third-party-style 4-bit quantizer: per-row absmax round-to-nearest, the float
    weight replaced by codes × scale (simulated), with the LoftQ hook."""

    name = "test-rtn4"
    capabilities = Capabilities(merge_source="dequantize", bits=4, linear_layers="float")

    def load(self, model_path, options, ctx, *, training):
        model = load_causal_lm(model_path, ctx)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    scale = module.weight.abs().amax(1, keepdim=True) / 7
                    module.register_buffer("rtn_codes", (module.weight / scale).round().clamp(-8, 7).to(torch.int8))
                    module.register_buffer("rtn_scale", scale)
                    module.weight.copy_(module.rtn_codes * scale)
        return model

    def prepare_for_training(self, model, options, ctx, *, grad_checkpointing):
        freeze(model)
        return model

    def dequantized_weight(self, module, options):
        codes = getattr(module, "rtn_codes", None)
        return None if codes is None else codes.float() * module.rtn_scale


class _RoundToNearestWithoutHook(_RoundToNearest):
    name = "test-rtn4-nohook"
    dequantized_weight = QuantizerPlugin.dequantized_weight


class _Plugin:
    @hookimpl
    def qpeft_register_quantizers(self, register):
        register(_RoundToNearest())
        register(_RoundToNearestWithoutHook())


def test_a_third_party_quantizer_with_the_hook_gets_loftq(tiny_config, tiny_llama_path):
    reg = load_registry([_Plugin()])
    cfg = tiny_config(quantizer="test-rtn4", peft={"name": "lora", "options": {"r": 8, "alpha": 16, "init": "loftq"}})
    pm, resolved, _ = _attached(cfg, reg)
    errors = _layer_errors(pm, resolved.quantizer, resolved.quantizer_options, tiny_llama_path)
    assert len(errors) == 14
    for name, (before, after) in errors.items():
        assert after < 0.95 * before, (name, before, after)
    with pytest.raises(ConfigError, match=r"peft.options.init.*dequantized_weight.*quantizers that do: .*bnb-nf4.*hqq.*torchao-int8"):
        orchestrator.prepare(tiny_config(quantizer="test-rtn4-nohook", peft={"name": "lora", "options": {"init": "loftq"}}), registry=reg)


@pytest.mark.parametrize("quantizer", ["none", "gptq"])
def test_loftq_is_refused_before_loading_on_quantizers_without_the_hook(quantizer, tiny_config):
    with pytest.raises(ConfigError, match=f"peft.options.init.*quantizer '{quantizer}' to expose"):
        orchestrator.prepare(tiny_config(quantizer=quantizer, peft={"name": "lora", "options": {"init": "loftq"}}), registry=REGISTRY)


def test_loftq_with_dora_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="use_dora"):
        orchestrator.prepare(tiny_config(peft={"name": "lora", "options": {"init": "loftq", "use_dora": True}}), registry=REGISTRY)


def test_loftq_run_trains_saves_reloads_and_merges(tiny_config, tmp_path):
    cfg = tiny_config(peft={"name": "lora", "options": {"r": 8, "alpha": 16, "init": "loftq"}}, evaluate=False)
    cfg["trainer"]["options"]["max_steps"] = 3
    cfg["generate"]["max_new_tokens"] = 2
    s = orchestrator.run(*orchestrator.prepare(cfg, registry=REGISTRY))
    assert any("lora init loftq" in n for n in s["notes"]), s["notes"]
    losses = [h["loss"] for h in s["loss_history"]]
    assert losses[-1] < losses[0], losses
    assert s["reload_max_abs_logit_diff"] < tol(s["dtype"], 1e-3, 5e-2)
    result = orchestrator.merge(str(tmp_path / "run" / "adapter"), str(tmp_path / "merged"), REGISTRY)
    assert result["max_abs_logit_diff"] < tol(s["dtype"], 1e-3, 1e-1), result


#: r 2, rho 1: the random model's layer inputs are nearly isotropic, so more components take peft's
#: EVA many passes to converge (74 passes, 40 s, at r 4, rho 2)
EVA = {"r": 2, "alpha": 4, "init": "eva", "eva_batches": 2, "eva_tau": 0.9, "eva_rho": 1.0}


@pytest.mark.parametrize("quantizer", ["bnb-nf4", "none"])
def test_eva_starts_a_at_principal_directions_of_the_layer_inputs(quantizer, tiny_config):
    from peft.tuners.lora import LoraLayer

    from qpeft.data import load_datasets
    from qpeft.tokenizer import load_tokenizer

    cfg = tiny_config(quantizer=quantizer, peft={"name": "lora", "options": EVA})
    resolved, reg = orchestrator.prepare(cfg, registry=REGISTRY)
    ctx = orchestrator._context(resolved, reg)
    ctx.tokenizer, _ = load_tokenizer(cfg["model"]["name_or_path"])
    ctx.train_data = load_datasets(resolved.config.data, ctx.tokenizer).train
    model = resolved.quantizer.load(cfg["model"]["name_or_path"], resolved.quantizer_options, ctx, training=True)
    model = resolved.quantizer.prepare_for_training(model, resolved.quantizer_options, ctx, grad_checkpointing=False)
    pm = resolved.peft.attach(model, resolved.peft_options, ctx)
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14
    for m in layers:
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        torch.testing.assert_close(
            (a @ a.T).float().cpu(), torch.eye(a.shape[0]), atol=tol(ctx.dtype, 1e-4, 2e-2), rtol=0
        )  # PCA components
        assert not b.any()
    assert any(n.startswith("lora init eva: 2 batches") for n in ctx.notes), ctx.notes
    assert pm.peft_config["default"].init_lora_weights is True  # saved as a plain LoRA


def test_eva_run_on_nf4_trains_saves_and_reloads(tiny_config):
    cfg = tiny_config(peft={"name": "lora", "options": EVA}, evaluate=False)
    cfg["trainer"]["options"]["max_steps"] = 3
    cfg["generate"]["max_new_tokens"] = 2
    s = orchestrator.run(*orchestrator.prepare(cfg, registry=REGISTRY))
    assert any(n.startswith("lora init eva") for n in s["notes"]), s["notes"]
    losses = [h["loss"] for h in s["loss_history"]]
    assert losses[-1] < losses[0], losses
    assert s["reload_max_abs_logit_diff"] < tol(s["dtype"], 1e-3, 5e-2)


def test_eva_is_refused_for_trainers_of_other_data(tiny_config):
    with pytest.raises(ConfigError, match="peft.options.init.*'eva' analyses"):
        orchestrator.prepare(tiny_config(peft={"name": "lora", "options": {"init": "eva"}}, trainer={"name": "dpo"}), registry=REGISTRY)


class _WrongDequantized(_RoundToNearest):
    name = "test-rtn4-wrong"

    def dequantized_weight(self, module, options):
        deq = super().dequantized_weight(module, options)
        return None if deq is None else deq * 1.01  # 1% off what the layer applies


class _KitPlugin:
    @hookimpl
    def qpeft_register_quantizers(self, register):
        register(_RoundToNearest())
        register(_WrongDequantized())


def test_kit_checks_the_hook_against_what_the_layers_apply():
    from qpeft.testing import ConformanceError, QuantizerChecker

    good = QuantizerChecker("test-rtn4", plugins=(_KitPlugin(),), require_entry_point=False)
    assert good.check_dequantized_weight()["quantized_layers"] == 14
    bad = QuantizerChecker("test-rtn4-wrong", plugins=(_KitPlugin(),), require_entry_point=False)
    with pytest.raises(ConformanceError, match="differs from the weight the layer applies"):
        bad.check_dequantized_weight()


def test_eva_that_does_not_converge_stops_naming_eva_tau(tiny_config, monkeypatch):
    """peft's EVA cycles over the batches until every layer converged, with no limit of its own;
    qpeft stops it after EVA_MAX_CYCLES passes (0 here: at the first pass)."""
    from qpeft.data import load_datasets
    from qpeft.errors import QpeftError
    from qpeft.plugins import peft_lora
    from qpeft.tokenizer import load_tokenizer

    monkeypatch.setattr(peft_lora, "EVA_MAX_CYCLES", 0)
    cfg = tiny_config(quantizer="none", peft={"name": "lora", "options": EVA})
    resolved, reg = orchestrator.prepare(cfg, registry=REGISTRY)
    ctx = orchestrator._context(resolved, reg)
    ctx.tokenizer, _ = load_tokenizer(cfg["model"]["name_or_path"])
    ctx.train_data = load_datasets(resolved.config.data, ctx.tokenizer).train
    model = resolved.quantizer.load(cfg["model"]["name_or_path"], resolved.quantizer_options, ctx, training=True)
    with pytest.raises(QpeftError, match="did not converge in 0 passes.*eva_tau"):
        resolved.peft.attach(model, resolved.peft_options, ctx)

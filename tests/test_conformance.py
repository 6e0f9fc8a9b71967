"""The conformance kit (qpeft.testing) on every built-in quantizer, and the kit catching
plugins that are broken in the ways it exists to find."""

import subprocess
import sys
import types

import pytest
import torch

import qpeft
from qpeft.api import Capabilities, QuantizerPlugin
from qpeft.plugins.quant_none import NoQuantizer
from qpeft.testing import ConformanceError, QuantizerChecker, QuantizerConformance


def _needs(module: str):
    return pytest.mark.skipif(__import__("importlib").util.find_spec(module) is None, reason=f"{module} is not installed")


class TestNone(QuantizerConformance):
    quantizer = "none"
    backend_modules = ()  # no backend library


@_needs("bitsandbytes")
class TestBnbNF4(QuantizerConformance):
    quantizer = "bnb-nf4"
    backend_modules = ("bitsandbytes",)


@_needs("bitsandbytes")
class TestBnbFP4(QuantizerConformance):
    quantizer = "bnb-fp4"
    backend_modules = ("bitsandbytes",)


@_needs("bitsandbytes")
class TestBnb4bit(QuantizerConformance):
    quantizer = "bnb-4bit"
    options = {"quant_type": "fp4", "double_quant": False}
    option_grid = {"quant_type": ["nf4", "fp4"], "double_quant": [True, False]}
    backend_modules = ("bitsandbytes",)


@_needs("bitsandbytes")
class TestBnb8bit(QuantizerConformance):
    quantizer = "bnb-8bit"
    # LLM.int8 also quantizes activations in its inference path (and runs fp16 on CPU), so the
    # adapter on its quantized base differs from the float merged model by that: measured
    # 6.3e-3 here, with 1.1e-2 between the quantized and float32 bases before any merge.
    merge_tolerance = 5e-2
    option_grid = {"matmul": ["int8", "dequantize"]}
    backend_modules = ("bitsandbytes",)


@_needs("gptqmodel")
class TestGptq(QuantizerConformance):
    quantizer = "gptq"
    # Kept small: GPTQ quantizes the tiny model once (cached under <qpeft cache>/gptq).
    options = {"num_calibration_samples": 8, "calibration_max_length": 64}
    # 4-bit GPTQ of random weights moves logits by ~17% (tests/test_gptq.py).
    option_grid = {"bits": [4, 8]}  # the width is an option: bits(options) must follow it
    backend_modules = ("gptqmodel",)


# ---------------------------------------------------------------------------- the kit finds bugs


def _module(name: str, *plugins) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.qpeft_register_quantizers = qpeft.hookimpl(lambda register: [register(p) for p in plugins])
    return mod


def _checker(plugin, **kw) -> QuantizerChecker:
    return QuantizerChecker(plugin.name, plugins=(_module(f"kit_{plugin.name}", plugin),), require_entry_point=False, **kw)


def _latch_after_eval(linear) -> None:
    """Make ``linear`` switch, like gptqmodel's TorchAtenLinear, to a no-grad inference path on
    its first eval-mode forward and stay there."""
    plain, latched = linear.forward, []

    def forward(x):
        if not linear.training:
            latched.append(True)
        if latched:
            with torch.no_grad():
                return plain(x)
        return plain(x)

    linear.forward = forward


class LatchingQuantizer(NoQuantizer):
    name = "kit-latching"

    def load(self, model_path, options, ctx, *, training):
        model = super().load(model_path, options, ctx, training=training)
        for layer in model.model.layers:
            _latch_after_eval(layer.mlp.down_proj)
        return model


class OverclaimingQuantizer(NoQuantizer):
    name = "kit-overclaiming"
    capabilities = Capabilities(bits=4)


class NoFullPrecision(QuantizerPlugin):
    name = "kit-no-full-precision"
    api_version = 1
    description = "declares merges from dequantized weights but cannot provide them"
    capabilities = Capabilities(merge_source="dequantize", bits=None)

    def load(self, model_path, options, ctx, *, training):
        return NoQuantizer().load(model_path, options, ctx, training=training)


class RefusesMerges(NoQuantizer):
    name = "kit-refuses-merges"
    capabilities = Capabilities(merge_source="none")


def test_kit_catches_gradients_lost_after_an_eval_forward():
    checker = _checker(LatchingQuantizer())
    try:
        with pytest.raises(ConformanceError, match=r"\[kit-latching\] LoRA gradients differ"):
            checker.check_lora_gradients()
    finally:
        checker.close()


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None, reason="bitsandbytes")
def test_kit_catches_unguarded_bnb_cpu_repacking():
    """bnb's 4-bit CPU repacking on AVX512-BF16 CPUs (emulated; tests/test_bnb_guard.py) with
    qpeft's guard disabled: the kit's gradient check fails."""
    import bitsandbytes as bnb

    from qpeft.plugins.quant_bnb import BnbNF4

    class Unguarded(BnbNF4):
        name = "kit-unguarded-nf4"

        def load(self, model_path, options, ctx, *, training):
            model = super().load(model_path, options, ctx, training=False)
            self.ensure_training_kernels(model, options)
            return model

        def ensure_training_kernels(self, model, options):
            for m in model.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = True  # what bnb sets on such CPUs

    checker = _checker(Unguarded())
    try:
        with pytest.raises(ConformanceError, match=r"LoRA gradients differ .* relative error"):
            checker.check_lora_gradients()
    finally:
        checker.close()


def test_kit_catches_bits_that_do_not_match_the_storage():
    checker = _checker(OverclaimingQuantizer())
    try:
        with pytest.raises(ConformanceError, match=r"capabilities.bits=4 expects"):
            checker.check_memory()
    finally:
        checker.close()


def test_kit_catches_merge_source_without_full_precision_weights():
    checker = _checker(NoFullPrecision())
    try:
        with pytest.raises(ConformanceError, match=r"full_precision_model\(\) is not implemented"):
            checker.check_registration()
    finally:
        checker.close()


def test_kit_accepts_a_clear_merge_refusal():
    checker = _checker(RefusesMerges())
    try:
        result = checker.check_merge()
    finally:
        checker.close()
    assert result["merge"] == "refused" and "kit-refuses-merges" in result["reason"], result


def test_kit_requires_the_entry_point_for_packages():
    checker = QuantizerChecker("kit-overclaiming", plugins=(_module("kit_in_process", OverclaimingQuantizer()),))
    with pytest.raises(ConformanceError, match=r"registered in-process only.*entry-points"):
        checker.check_registration()


def test_kit_imports_without_pytest_or_torch():
    code = (
        "import sys; sys.modules['pytest'] = None; import qpeft.testing; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

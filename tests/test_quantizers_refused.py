"""Quantizers that cannot run on this device are refused before any weight loads, naming the
reason (torchao-int4 and fp8 on CPU), and run on a GPU (marked ``gpu``)."""

import pytest

from qpeft import orchestrator
from qpeft.errors import ConfigError
from qpeft.registry import load_registry


@pytest.mark.parametrize(
    "quantizer, reason",
    [
        # a run trains, and no trainer trains on torchao-int4 (on any device): that refusal comes first
        ("torchao-int4", r"trainer.name: trainer 'native' does not work with quantizer 'torchao-int4': torch has no derivative"),
        ("fp8", r"quantizer.name: quantizer 'fp8' does not run on cpu; it supports: cuda"),
    ],
)
def test_refused_on_cpu_before_loading(quantizer, reason, tiny_config):
    pytest.importorskip("torchao")
    from conftest import WeightWatch

    watch = WeightWatch()
    cfg = tiny_config(quantizer=quantizer)
    cfg["trainer"]["name"] = "native"  # torchao-int4 refuses the Trainer-based trainers first
    cfg["model"]["device"] = "cpu"
    with pytest.raises(ConfigError, match=reason):
        orchestrator.prepare(cfg, registry=load_registry([watch]))
    assert watch.loaded == 0


def test_fp8_refusal_reasons():
    from qpeft.plugins.quant_fp8 import refusal

    assert "no CPU float8 matmul" in refusal("cpu", None, True)
    assert "8.9" in refusal("cuda", (8, 0), True)
    assert "kernels" in refusal("cuda", (9, 0), False) and "Hub" in refusal("cuda", (9, 0), False)
    assert refusal("cuda", (9, 0), True) is None


@pytest.mark.gpu
@pytest.mark.parametrize("quantizer, dtype", [("torchao-int8", "bfloat16"), ("torchao-float8", "bfloat16")])
def test_torchao_trains_on_gpu(quantizer, dtype, tiny_config):
    pytest.importorskip("torchao")
    cfg = tiny_config(quantizer=quantizer, evaluate=False)
    cfg["model"].update(device="cuda", dtype=dtype)
    cfg["trainer"]["options"]["max_steps"] = 4
    resolved, reg = orchestrator.prepare(cfg, registry=load_registry())
    s = orchestrator.run(resolved, reg)
    losses = [h["loss"] for h in s["loss_history"]]
    assert losses[-1] < losses[0], losses
    assert s["reload_max_abs_logit_diff"] < 5e-2


# The conformance kit on CUDA for the new quantizers that run there (float32 comparisons as on
# the CPU; skipped without a GPU).
from qpeft.testing import QuantizerConformance  # noqa: E402


@pytest.mark.gpu
class TestGpuKitHqq(QuantizerConformance):
    quantizer = "hqq"
    device = "cuda"
    memory_slack = 1.55  # scales and zero points per group in float32, as on the CPU
    backend_modules = ("hqq",)


@pytest.mark.gpu
class TestGpuKitTorchaoInt8(QuantizerConformance):
    quantizer = "torchao-int8"
    device = "cuda"
    backend_modules = ("torchao",)


@pytest.mark.gpu
class TestGpuKitTorchaoFloat8(QuantizerConformance):
    quantizer = "torchao-float8"
    device = "cuda"
    backend_modules = ("torchao",)

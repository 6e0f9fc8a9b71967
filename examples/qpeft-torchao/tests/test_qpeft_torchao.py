"""qpeft-torchao's own tests: qpeft's conformance kit on the quantizer (per-row and per-group
scales), and the regression test of the memory-footprint guard.

    pip install ./examples/qpeft-torchao "pytest>=8"
    python -m pytest -q examples/qpeft-torchao/tests
"""

from qpeft.testing import QuantizerConformance, tiny_model_path


class TestTorchaoInt8(QuantizerConformance):
    quantizer = "example-torchao-int8"
    option_grid = {"granularity": ["per_row", "per_tensor"]}  # each loads with bits(options) = 8


class TestTorchaoInt8PerGroup(QuantizerConformance):
    quantizer = "example-torchao-int8"
    options = {"granularity": "per_group", "group_size": 32}
    # One float32 scale and an int8 zero point per 32 weights: 8 + 40/32 bits per weight,
    # 0.29 of float32 measured, within the kit's default slack (bits / 32 x 1.3 + 0.01 = 0.335).


def test_memory_footprint_guard(tmp_path):
    """transformers' get_memory_footprint counts a torchao weight at its logical float size, so
    qpeft would report no memory saved; the plugin makes the model count its int8 storage.
    If the first assertion fails, transformers fixed it and the guard may go."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from qpeft.config import load_config, resolve
    from qpeft.context import RunContext
    from qpeft.registry import load_registry

    path = tiny_model_path()
    cfg = load_config({"model": path, "quantizer": "example-torchao-int8", "peft": "lora", "trainer": "hf"})
    r = resolve(cfg, load_registry(), device="cpu")
    ctx = RunContext(config=cfg, device="cpu", dtype="float32", output_dir=str(tmp_path))
    model = r.quantizer.load(path, r.quantizer_options, ctx, training=True)
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).get_memory_footprint()
    assert PreTrainedModel.get_memory_footprint(model) == fp32
    assert model.get_memory_footprint() < 0.55 * fp32

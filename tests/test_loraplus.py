"""LoRA+ (``trainer.options.loraplus_lr_ratio``) in both trainers: with plain SGD, a constant
schedule and no clipping, one step from B = 0 moves each LoRA B matrix by lr × ratio × its
gradient, so B after a run with ratio 4 is exactly 4 × B after the same run without LoRA+."""

import pytest
from safetensors.torch import load_file

from qpeft import orchestrator
from qpeft.errors import ConfigError
from qpeft.registry import load_registry

REGISTRY = load_registry()


def _b_after_one_step(tiny_config, tmp_path, trainer, ratio):
    options = {"batch_size": 2, "max_steps": 1, "lr": 1e-2, "scheduler": "constant", "optim": "sgd", "max_grad_norm": 0}
    if ratio:
        options["loraplus_lr_ratio"] = ratio
    cfg = tiny_config(
        quantizer="none", trainer={"name": trainer, "options": options}, evaluate=False, output_dir=str(tmp_path / f"run{ratio}")
    )
    cfg["data"].update(max_train_examples=2, max_length=64)
    cfg["generate"]["max_new_tokens"] = 1
    orchestrator.run(*orchestrator.prepare(cfg, registry=REGISTRY))
    weights = load_file(str(tmp_path / f"run{ratio}" / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in weights.items() if "lora_B" in k}, {k: v for k, v in weights.items() if "lora_A" in k}


@pytest.mark.parametrize("trainer", ["hf", "native"])
def test_lora_b_matrices_get_the_higher_learning_rate(trainer, tiny_config, tmp_path):
    b_plus, a_plus = _b_after_one_step(tiny_config, tmp_path, trainer, 4.0)
    b_base, a_base = _b_after_one_step(tiny_config, tmp_path, trainer, None)
    assert b_plus and set(b_plus) == set(b_base)
    moved = [k for k in b_base if b_base[k].abs().max() > 0]
    assert moved, "no B matrix moved in one step"
    for k in moved:
        ratio = float(b_plus[k].abs().sum() / b_base[k].abs().sum())
        assert abs(ratio - 4.0) < 1e-3, (k, ratio)
    for k in a_base:  # A keeps the base learning rate (and, from B = 0, gets no gradient)
        assert (a_plus[k] - a_base[k]).abs().max() < 1e-6, k


def test_loraplus_without_lora_b_is_refused(tiny_config):
    cfg = tiny_config(
        quantizer="none", peft={"name": "prompt"}, trainer={"name": "native", "options": {"max_steps": 1, "loraplus_lr_ratio": 8}}
    )
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        orchestrator.run(*orchestrator.prepare(cfg, registry=REGISTRY))

"""DPO end to end on the embedded SmolLM2-135M (slow): held-out reward accuracy above chance
after a few steps, the adapter saves, reloads exactly and generates."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.slow


def test_dpo_on_the_embedded_model(tmp_path, embedded_model_path):
    from qpeft import orchestrator

    cfg = {
        "model": {"name_or_path": "smollm2", "device": "cpu", "dtype": "float32"},
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
        "trainer": {"name": "dpo", "options": {"batch_size": 2, "max_steps": 3, "lr": 2e-3, "scheduler": "constant"}},
        "data": {"path": "embedded:preference", "max_length": 80, "max_val_examples": 4},
        "output_dir": str(tmp_path / "dpo"),
        "gradient_checkpointing": False,
        "generate": {"max_new_tokens": 8},
    }
    resolved, registry = orchestrator.prepare(cfg)
    s = orchestrator.run(resolved, registry)
    after = s["objective_metrics"]["eval_after"]
    assert after["rewards/accuracies"] > 0.5 and after["rewards/margins"] > 0, s["objective_metrics"]
    assert s["reload_max_abs_logit_diff"] <= 1e-4
    assert s["generation"]["new_tokens"] >= 1

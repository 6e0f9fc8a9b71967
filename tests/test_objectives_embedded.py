"""Each objective end to end on the embedded SmolLM2-135M (slow): its own metric moves the right
way on held-out rows after a few steps (DPO: reward accuracy above chance; the other preference
objectives: a wider chosen-over-rejected margin; GRPO: a higher mean reward), the adapter saves,
reloads exactly and generates."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

pytestmark = pytest.mark.slow


def _run(tmp_path, trainer: str, data: str, max_length: int, **options) -> dict:
    from qpeft import orchestrator

    cfg = {
        "model": {"name_or_path": "smollm2", "device": "cpu", "dtype": "float32"},
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
        "trainer": {"name": trainer, "options": {"batch_size": 2, "max_steps": 3, "lr": 2e-3, "scheduler": "constant", **options}},
        "data": {"path": data, "max_length": max_length, "max_val_examples": 4},
        "output_dir": str(tmp_path / trainer),
        "gradient_checkpointing": False,
        "generate": {"max_new_tokens": 8},
    }
    resolved, registry = orchestrator.prepare(cfg)
    s = orchestrator.run(resolved, registry)
    assert s["reload_max_abs_logit_diff"] <= 1e-4
    assert s["generation"]["new_tokens"] >= 1
    return s["objective_metrics"]


def test_dpo_on_the_embedded_model(tmp_path, embedded_model_path):
    m = _run(tmp_path, "dpo", "embedded:preference", 80)
    after = m["eval_after"]
    assert after["rewards/accuracies"] > 0.5 and after["rewards/margins"] > 0, m


@pytest.mark.parametrize(
    "trainer,data,options",
    # ORPO's odds-ratio term weighs beta (its lambda) against the NLL: at TRL's 0.1 three steps move
    # the NLL but not yet the held-out margin
    [("orpo", "embedded:preference", {"beta": 1.0}), ("simpo", "embedded:preference", {}), ("kto", "embedded:feedback", {})],
)
def test_preference_objectives_on_the_embedded_model(tmp_path, embedded_model_path, trainer, data, options):
    m = _run(tmp_path, trainer, data, 80, **options)
    assert m["eval_after"]["rewards/margins"] > m["eval_before"]["rewards/margins"], m


def test_grpo_on_the_embedded_model(tmp_path, embedded_model_path):
    # The format reward: completions start as ~20-token explanations and get shorter (measured
    # mean reward 0.60 -> 0.80 on the held-out prompts). The exact-answer reward needs more steps
    # than a test should take (configs/grpo.yaml: 0.88 -> 1.00 in 8 steps).
    m = _run(
        tmp_path,
        "grpo",
        "embedded:prompts",
        128,
        batch_size=4,
        num_generations=4,
        max_completion_length=24,
        rewards=["short_answer"],
        max_steps=4,
        lr=2e-3,
    )
    assert m["eval_after"]["reward"] > m["eval_before"]["reward"], m

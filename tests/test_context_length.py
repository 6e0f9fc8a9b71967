"""Rows longer than the base model's trained context: a run says so before any weight loads
(qpeft.preflight.check_context_length), unless the config scales RoPE."""

import json
from pathlib import Path

import pytest

from qpeft import orchestrator
from qpeft.preflight import check_context_length
from qpeft.registry import load_registry


def _model(tmp_path, **config) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 4096, **config}))
    return str(tmp_path)


def test_rows_longer_than_the_trained_context_get_a_note(tmp_path):
    note = check_context_length(_model(tmp_path), 16384)
    assert note and "data.max_length 16384" in note and "max_position_embeddings 4096" in note


@pytest.mark.parametrize("max_length", [1024, 4096])
def test_rows_within_the_trained_context_get_none(tmp_path, max_length):
    assert check_context_length(_model(tmp_path), max_length) is None


@pytest.mark.parametrize(
    "config",
    [
        {"rope_scaling": {"type": "linear", "factor": 4.0}},  # the transformers 4 key
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},  # transformers 5
    ],
    ids=["rope_scaling", "rope_parameters"],
)
def test_a_scaled_rope_gets_none(tmp_path, config):
    assert check_context_length(_model(tmp_path, **config), 16384) is None


def test_default_rope_parameters_still_get_the_note(tmp_path):
    path = _model(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert check_context_length(path, 16384)


def test_nested_text_config_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 2048}}))
    assert "max_position_embeddings 2048" in check_context_length(str(tmp_path), 4096)
    assert check_context_length(str(tmp_path / "nowhere"), 4096) is None


def test_a_run_with_longer_rows_records_the_note(tiny_config, tiny_llama_path):
    limit = json.loads((Path(tiny_llama_path) / "config.json").read_text())["max_position_embeddings"]
    cfg = tiny_config(
        quantizer="none",
        trainer={"name": "native", "options": {"batch_size": 2, "max_steps": 1}},
        data={"path": "embedded:instruct", "max_length": limit + 64, "max_train_examples": 4, "max_val_examples": 2},
        evaluate=False,
        generate={"max_new_tokens": 2},
    )
    resolved, reg = orchestrator.prepare(cfg, registry=load_registry())
    summary = orchestrator.run(resolved, reg)
    assert any(f"max_position_embeddings {limit}" in n for n in summary["notes"]), summary["notes"]

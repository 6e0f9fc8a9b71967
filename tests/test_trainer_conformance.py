"""The trainer part of the conformance kit (qpeft.testing.check_trainer) on both built-in
trainers: they read the lazy datasets in qpeft's order, train, and resume exactly."""

from __future__ import annotations

import pytest

from qpeft.testing import ConformanceError, TrainerChecker, check_trainer


@pytest.mark.parametrize("trainer", ["native", "hf"])
def test_builtin_trainers_pass_the_trainer_kit(trainer, tiny_llama_path, tmp_path, monkeypatch):
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    result = check_trainer(trainer, model_path=tiny_llama_path)
    assert set(result) == {"registration", "objective_data", "data_order", "trains", "resume"}
    assert result["resume"]["checkpoint"] and result["resume"]["max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("trainer", ["grpo"])  # dpo passes it too (55 s on a loaded 2-core box; its checks are in test_objectives.py)
def test_objective_trainers_pass_the_trainer_kit(trainer, tiny_llama_path, tmp_path, monkeypatch):
    """The kit on trainers of other objectives: their data kind's rows are checked before any
    weight loads (a bad row is refused naming it), they train and reload exactly, and they
    refuse save_steps rather than write checkpoints --resume could not use."""
    pytest.importorskip("trl")
    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    result = check_trainer(trainer, model_path=tiny_llama_path)
    assert result["registration"]["data_kind"] == {"dpo": "preference", "grpo": "prompts"}[trainer]
    assert "skipped" in result["data_order"] and "skipped" in result["resume"]


def test_the_kit_catches_a_trainer_that_ignores_the_data_order(tiny_llama_path, tmp_path, monkeypatch):
    """A trainer reading the examples in file order instead of qpeft's fails ``data_order``."""
    from qpeft import hookimpl
    from qpeft.api import TrainerPlugin, TrainingOptions
    from qpeft.context import TrainResult
    from qpeft.data import collate

    class InFileOrder(TrainerPlugin):
        name = "in-file-order"
        description = "reads train_data[0], [1], ... (wrong)"
        Options = TrainingOptions

        def train(self, model, tokenizer, train_data, eval_data, options, ctx):
            import torch

            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=options.lr)
            model.train()
            for step in range(1, options.max_steps + 1):
                batch = collate(train_data[(step - 1) * options.batch_size : step * options.batch_size], tokenizer.pad_token_id)
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                ctx.hooks.qpeft_on_step_end(step=step, max_steps=options.max_steps, logs={"loss": loss.item(), "tokens": 0}, ctx=ctx)
            return TrainResult(train_loss=loss.item(), steps=options.max_steps, tokens=0, seconds=1.0, log_history=[])

    class Plugin:
        @hookimpl
        def qpeft_register_trainers(self, register):
            register(InFileOrder())

    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    checker = TrainerChecker("in-file-order", model_path=tiny_llama_path, plugins=(Plugin(),))
    try:
        checker.check_registration()
        with pytest.raises(ConformanceError, match=r"does not read the examples in qpeft's order"):
            checker.check_data_order()
    finally:
        checker.close()

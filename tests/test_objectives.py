"""Training objectives beyond SFT on the tiny model: qpeft's objective data layer (rows checked
and rendered before any weight loads) and the dpo, orpo, simpo, kto and grpo trainers (TRL's),
each moving its own metric the right way, saving and reloading exactly."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

from qpeft import orchestrator
from qpeft.config import DataConfig, load_config, resolve
from qpeft.data.objectives import load_objective_data, render_row, row_problem
from qpeft.errors import ConfigError
from qpeft.registry import load_registry

CHATML = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The kit's tiny Llama with a chat template (so rows render as conversations)."""
    from qpeft.testing import save_tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    return save_tiny_llama(tok, tmp_path_factory.mktemp("tinychat"), tie_word_embeddings=False)


@pytest.fixture(scope="module")
def chat_tok(chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model)


def _config(model, out, trainer, peft="lora", quantizer="none", **opts) -> dict:
    options = {"batch_size": 2, "max_steps": 4, "lr": 1e-3, "logging_steps": 1, **opts}
    return {
        "model": {"name_or_path": model, "device": "cpu", "dtype": "float32"},
        "quantizer": quantizer,
        "peft": peft,
        "trainer": {"name": trainer, "options": options},
        "data": {"max_length": 64, "max_train_examples": 8, "max_val_examples": 4},
        "output_dir": str(out),
        "gradient_checkpointing": False,
        "generate": {"max_new_tokens": 3},
    }


def _run(cfg, plugins=()):
    resolved, registry = orchestrator.prepare(cfg, registry=load_registry(plugins))
    return orchestrator.run(resolved, registry)


# ---------------------------------------------------------------------------- data layer


@pytest.mark.parametrize(
    "kind,row,message",
    [
        ("preference", {"prompt": "p", "chosen": "a"}, "has no 'rejected'"),
        ("preference", {"chosen": "a", "rejected": "b"}, "has no 'prompt'"),
        ("preference", {"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "same form for both"),
        (
            "preference",
            {"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
            "ending with a 'user' turn",
        ),
        ("unpaired", {"prompt": "p", "completion": "a"}, "has no 'label'"),
        ("unpaired", {"prompt": "p", "completion": "a", "label": "maybe"}, "expected true or false"),
        ("prompts", {"answer": "x"}, "has no 'prompt'"),
    ],
)
def test_bad_rows_name_the_field(kind, row, message):
    assert message in row_problem(row, kind)


def test_bad_row_fails_before_any_weight_loads(tmp_path, chat_model):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    cfg = _config(str(tmp_path / "no-such-model"), tmp_path / "out", "dpo")  # a model that would fail to load
    cfg["model"]["name_or_path"] = chat_model
    cfg["data"]["path"] = str(bad)
    resolved, registry = orchestrator.prepare(cfg)
    with pytest.raises(ConfigError, match=r"data.path: .*pairs.jsonl: row 2 has no 'rejected'"):
        orchestrator.run(resolved, registry)
    assert not (tmp_path / "out" / "adapter").exists()


def test_rendering_chat_and_text(chat_tok):
    from qpeft.testing import tiny_tokenizer

    pair = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    chat = render_row(pair, "preference", chat_tok)
    assert chat["prompt"] == [{"role": "user", "content": "Q?"}] and chat["chosen"] == [{"role": "assistant", "content": "yes"}]
    implicit = {
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}],
    }
    assert render_row(implicit, "preference", chat_tok) == chat
    plain = render_row(pair, "preference", tiny_tokenizer())  # no chat template: strings, prompt ends with a newline
    assert plain == {"prompt": "Q?\n", "chosen": "yes", "rejected": "no"}
    with pytest.raises(ValueError, match="chat template"):
        render_row(implicit, "preference", tiny_tokenizer())
    assert render_row({"prompt": "p", "completion": "c", "label": "false"}, "unpaired", chat_tok)["label"] is False
    assert render_row({"prompt": "p", "answer": "x"}, "prompts", chat_tok)["answer"] == "x"


def test_trl_masks_the_loss_to_the_assistant_turn(chat_tok):
    """TRL tokenizes qpeft's rendered conversation: the completion tokens are exactly the
    assistant turn the chat template renders (ending with its end-of-turn token)."""
    import datasets
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    row = render_row({"prompt": "Q?", "chosen": "yes indeed", "rejected": "no"}, "preference", chat_tok)
    ds = DPOTrainer._prepare_dataset(
        type("T", (), {"_tokenizer": chat_tok})(),
        datasets.Dataset.from_list([row]),
        chat_tok,
        DPOConfig("/tmp/x", report_to=[], use_cpu=True, bf16=False, dataset_num_proc=None),
        "train",
    )
    ex = ds[0]
    full = chat_tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    prompt = chat_tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert chat_tok.decode(ex["prompt_ids"]) == prompt
    assert chat_tok.decode(ex["chosen_ids"]) == full[len(prompt) :] and ex["chosen_ids"][-2] == chat_tok.eos_token_id


def test_default_data_follows_the_objective(chat_model, tmp_path):
    registry = load_registry()
    for trainer, path in (
        ("dpo", "embedded:preference"),
        ("kto", "embedded:feedback"),
        ("grpo", "embedded:prompts"),
        ("hf", "embedded:instruct"),
    ):
        cfg = _config(chat_model, tmp_path, trainer, batch_size=4)
        assert resolve(load_config(cfg), registry).config.data.path == path
    cfg = _config(chat_model, tmp_path, "dpo")
    cfg["data"]["packing"] = True
    with pytest.raises(ConfigError, match="data.packing"):
        resolve(load_config(cfg), registry)
    cfg = _config(chat_model, tmp_path, "dpo", save_steps=2)
    with pytest.raises(ConfigError, match="trainer.options.save_steps"):
        resolve(load_config(cfg), registry)
    cfg = _config(chat_model, tmp_path, "grpo", rewards=["nope"])
    with pytest.raises(ConfigError, match=r"trainer.options.rewards.0: unknown reward 'nope'"):
        resolve(load_config(cfg), registry)
    cfg = _config(chat_model, tmp_path, "grpo", batch_size=3, num_generations=2)
    with pytest.raises(ConfigError, match="trainer.options.num_generations"):
        resolve(load_config(cfg), registry)


def test_embedded_objective_sets_load(chat_tok):
    for path, kind, n in (
        ("embedded:preference", "preference", 67),
        ("embedded:feedback", "unpaired", 134),
        ("embedded:prompts", "prompts", 67),
    ):
        data = load_objective_data(DataConfig(path=path, max_length=512, max_val_examples=None), kind, chat_tok)
        assert len(data.train) == n and data.val and data.format == "chat"


# ---------------------------------------------------------------------------- trainers


def test_dpo_reference_is_the_base_with_the_adapter_disabled(chat_model, tmp_path, monkeypatch):
    """TRL adds a copy of a passed adapter as its reference; qpeft removes it, leaving one adapter
    and no second copy of any weight; eval accuracy and margin rise."""
    from qpeft.plugins import trainer_trl

    seen = {}
    original = trainer_trl.drop_reference_copy

    def spy(model):
        seen["before"] = list(model.peft_config)
        dropped = original(model)
        seen["after"] = list(model.peft_config)
        seen["ref_params"] = [n for n, _ in model.named_parameters() if ".ref." in n]
        seen["params"] = sum(p.numel() for p in model.parameters())
        return dropped

    monkeypatch.setattr(trainer_trl, "drop_reference_copy", spy)
    s = _run(_config(chat_model, tmp_path / "dpo", "dpo"))
    assert seen["before"] == ["default", "ref"] and seen["after"] == ["default"] and not seen["ref_params"]
    assert seen["params"] == s["total_params"] or seen["params"] >= s["trainable_params"]
    assert not (tmp_path / "dpo" / "adapter" / "ref").exists()
    m = s["objective_metrics"]
    assert m["eval_before"]["rewards/margins"] == 0.0  # policy == reference before training
    assert m["eval_after"]["rewards/margins"] > 0 and m["eval_after"]["rewards/accuracies"] > 0.5
    assert s["reload_max_abs_logit_diff"] <= 1e-4 and s["generation"]["new_tokens"] >= 1


@pytest.mark.parametrize("trainer", ["orpo", "simpo", "kto"])
def test_preference_trainers_move_their_margin(chat_model, tmp_path, trainer):
    s = _run(_config(chat_model, tmp_path / trainer, trainer))
    m = s["objective_metrics"]
    assert m["eval_after"]["rewards/margins"] > m["eval_before"]["rewards/margins"], m
    assert s["reload_max_abs_logit_diff"] <= 1e-4


def test_dpo_on_nf4_with_prefix(chat_model, tmp_path):
    """A quantized base and a non-LoRA method: prefix tuning's fresh adapter is not the identity,
    so the reference must be the disabled adapter (TRL's copy would not be the base)."""
    s = _run(_config(chat_model, tmp_path / "nf4", "dpo", peft="prefix", quantizer="bnb-nf4"))
    assert s["objective_metrics"]["eval_after"]["rewards/margins"] > 0
    # Regression: TRL casts a quantized model's trainable tensors to bfloat16; qpeft puts them back
    assert any("cast" in n and "put them back in torch.float32" in n for n in s["notes"]), s["notes"]
    assert s["reload_max_abs_logit_diff"] <= 1e-4


def test_dpo_on_nf4_keeps_the_adapter_in_float32(chat_model, tmp_path):
    """TRL 1.16 casts trainable parameters to bfloat16 on 4/8-bit bases; qpeft restores them
    (plugins/trainer_trl.py: restore_dtypes), so the reloaded adapter gives the trained
    model's logits (on an H200 they differed by 1.9 before the guard)."""
    s = _run(_config(chat_model, tmp_path / "nf4-lora", "dpo", quantizer="bnb-nf4"))
    assert any("qpeft put them back" in n for n in s["notes"]), s["notes"]
    assert s["reload_max_abs_logit_diff"] <= 1e-4


def letter_e(completions, **kwargs) -> list[float]:
    """A reward the tiny random model can learn within a few steps: the share of 'e' in the text."""
    from qpeft.rewards import text_of

    return [text_of(c).count("e") / max(len(text_of(c)), 1) for c in completions]


def test_grpo_reward_goes_up(chat_model, tmp_path):
    """grpo with a reward named as a module:function entry point: the mean reward on the held-out
    prompts rises after a few steps."""
    cfg = _config(
        chat_model,
        tmp_path / "grpo",
        "grpo",
        batch_size=8,
        num_generations=4,
        max_completion_length=16,
        rewards=["test_objectives:letter_e"],
        lr=5e-2,
        max_steps=6,
    )
    s = _run(cfg)
    m = s["objective_metrics"]
    assert m["eval_after"]["reward"] > m["eval_before"]["reward"], m  # measured 0.066 -> 0.081
    assert s["reload_max_abs_logit_diff"] <= 1e-4


def test_bench_records_and_report_show_the_objective():
    from qpeft.bench import cell_metrics
    from qpeft.bench.report import objective_text

    summary = {
        "objective": "preference",
        "objective_metrics": {
            "eval_before": {"rewards/accuracies": 0.0, "rewards/margins": 0.0},
            "eval_after": {"rewards/accuracies": 0.94, "rewards/margins": 1.36},
        },
        "train_loss": 0.3,
    }
    m = cell_metrics(summary, None)
    assert m["objective"] == "preference" and m["objective_eval_after"]["rewards/accuracies"] == 0.94
    assert objective_text(m["objective_eval_before"], m["objective_eval_after"]) == "acc 0 → 0.94, margin 0 → 1.36"
    assert "objective" not in cell_metrics({"objective": "lm", "train_loss": 1.0}, None)


@pytest.mark.gpu
@pytest.mark.parametrize("trainer", ["dpo", "kto", "grpo"])
def test_objectives_on_cuda_nf4(chat_model, tmp_path, trainer):
    """On a GPU in bf16 with an NF4 base: trains, the margin (dpo, kto) or the run (grpo) holds up,
    the adapter reloads within bf16's rounding."""
    opts = {"batch_size": 4, "num_generations": 4, "max_completion_length": 8} if trainer == "grpo" else {}
    cfg = _config(chat_model, tmp_path / trainer, trainer, quantizer="bnb-nf4", **opts)
    cfg["model"].update(device="cuda", dtype="bfloat16")
    s = _run(cfg)
    if trainer != "grpo":
        assert s["objective_metrics"]["eval_after"]["rewards/margins"] > 0, s["objective_metrics"]
    assert s["reload_max_abs_logit_diff"] <= 5e-2 and s["peak_allocated_gib"] > 0

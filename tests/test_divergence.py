"""A run that diverged is a failure, never a result.

* Both trainers stop at the first non-finite loss, and at a non-finite gradient norm (no fp16
  loss scaler on CPU), with one line naming the step, the last finite loss and what to try;
  checkpoints written before stay, no adapter is saved, an earlier ``adapter/`` stays intact.
  Before: ``qpeft run`` exited 0 with NaN adapter tensors, and the HF Trainer's
  ``logging_nan_inf_filter`` printed ``train loss 0.0000`` for a base holding one NaN weight.
* The adapter save refuses non-finite tensors; ``qpeft generate``/``merge`` refuse an adapter
  folder holding them, and merge refuses to write non-finite merged weights.
* An adapter none of whose keys matches the base is refused (peft only warns; merge then wrote
  a copy of the base).
* JSON qpeft writes is valid JSON: NaN/inf become null.

NaN is planted, never hoped for: in a copy of the tiny model's weights, or by a lifecycle
plugin that poisons the base (or the adapter's gradients) after a given step.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qpeft import cli, hookimpl, orchestrator
from qpeft.api import TrainerPlugin, TrainingOptions
from qpeft.checkpoint import MARKER, checkpoint_dir
from qpeft.context import TrainResult
from qpeft.errors import NonFiniteError, QpeftError, TrainingDiverged
from qpeft.integrity import check_adapter_files
from qpeft.io import atomic_write_json
from qpeft.registry import load_registry

NAN = float("nan")


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def nan_base(tiny_llama_path, tmp_path_factory) -> str:
    """A copy of the tiny model whose final norm weight holds one NaN (every logit is NaN)."""
    dst = tmp_path_factory.mktemp("nan-base")
    for f in Path(tiny_llama_path).iterdir():
        shutil.copy(f, dst / f.name)
    weights = load_file(dst / "model.safetensors")
    weights["model.norm.weight"][0] = NAN
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


class Poison:
    """After optimizer step ``after``: ``"base"`` puts NaN into the base's final norm weight
    (the next loss is NaN); ``"grad"`` makes every LoRA gradient NaN (the loss stays finite);
    ``"adapter"`` puts NaN into a LoRA weight before that step's checkpoint is written."""

    def __init__(self, what: str, after: int):
        self.what, self.after, self.model = what, after, None

    @hookimpl
    def qpeft_on_model_loaded(self, model, ctx):
        self.model = model  # peft injects its layers into this very model

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        if step != self.after:
            return
        if self.what == "base":
            with torch.no_grad():
                self.model.model.norm.weight[0] = NAN
        elif self.what == "adapter":
            with torch.no_grad():
                next(p for n, p in self.model.named_parameters() if "lora_A" in n)[0, 0] = NAN
        else:
            for name, p in self.model.named_parameters():
                if "lora_" in name:
                    p.register_hook(lambda g: torch.full_like(g, NAN))


def _earlier_outputs(out: Path) -> dict[str, str]:
    """Plant an earlier run's adapter/ and summary.json (marked as qpeft's, which a run may
    replace); return their sha256s."""
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"earlier adapter")
    (out / "adapter" / "qpeft.json").write_text('{"earlier": true}\n')
    (out / "summary.json").write_text('{"qpeft_version": "0.1.0", "earlier": true}\n')
    return _digests(out)


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in [out / "summary.json", *(out / "adapter").iterdir()]
    }


def _run(tiny_config, trainer: str, plugin, out: Path, **opts):
    cfg = tiny_config(
        quantizer="none",
        trainer={"name": trainer, "options": {"batch_size": 2, "max_steps": 5, "lr": 1e-3, "scheduler": "constant", **opts}},
        evaluate=False,
        output_dir=str(out),
    )
    cfg["data"]["max_train_examples"] = 8
    resolved, reg = orchestrator.prepare(cfg, registry=load_registry([plugin]))
    return orchestrator.run(resolved, reg)


@pytest.mark.parametrize("trainer", ["hf", "native"])
def test_nan_loss_stops_training_at_that_step(tiny_config, tmp_path, trainer):
    out = tmp_path / "run"
    earlier = _earlier_outputs(out)
    with pytest.raises(TrainingDiverged) as err:
        _run(tiny_config, trainer, Poison("base", after=2), out, save_steps=1, save_total_limit=2)
    msg = str(err.value)
    assert "\n" not in msg and err.value.exit_code == 2
    kept = checkpoint_dir(out, 2)
    assert re.match(
        r"training diverged at step 3: the training loss is nan \(last finite loss (\d+\.\d{4}) at step 2\); "
        rf"no adapter was saved and the last good checkpoint {re.escape(str(kept))} is kept; "
        r"try a lower trainer\.options\.lr \(now 0\.001\)",
        msg,
    ), msg
    assert "check the data and the base model's weights for NaN/inf" in msg
    assert (kept / MARKER).is_file() and not checkpoint_dir(out, 3).exists()
    check_adapter_files(kept)  # the kept checkpoint is finite
    assert _digests(out) == earlier  # the earlier adapter/ and summary.json are untouched


@pytest.mark.parametrize("trainer", ["hf", "native"])
def test_non_finite_gradient_norm_stops_training_without_a_loss_scaler(tiny_config, tmp_path, trainer):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3: the gradient norm is nan \(with a finite loss \d") as err:
        _run(tiny_config, trainer, Poison("grad", after=2), out, max_grad_norm=0.0)
    assert "(last finite loss" in str(err.value) and "at step 2)" in str(err.value)
    assert "gradient clipping (trainer.options.max_grad_norm: 1.0)" in str(err.value)
    assert not (out / "adapter").exists()


@pytest.mark.parametrize("trainer", ["hf", "native"])
def test_no_checkpoint_is_marked_with_non_finite_adapter_tensors(tiny_config, tmp_path, trainer):
    out = tmp_path / "run"
    with pytest.raises(QpeftError, match=r"^training diverged at step 2: .*lora_A.* (is non-finite|holds 1 NaN/inf)"):
        _run(tiny_config, trainer, Poison("adapter", after=2), out, save_steps=1, save_total_limit=3)
    assert (checkpoint_dir(out, 1) / MARKER).is_file()
    assert not (checkpoint_dir(out, 2) / MARKER).exists()  # never resumed from (--resume deletes it)
    assert not (out / "adapter").exists()


@pytest.mark.parametrize("trainer", ["hf", "native"])
def test_nan_in_the_base_fails_qpeft_run_in_one_line(nan_base, tmp_path, trainer, monkeypatch):
    """The review's case: the HF Trainer printed ``train loss 0.0000`` and exited 0."""
    out = tmp_path / "run"
    cfg = {
        "model": {"name_or_path": nan_base, "device": "cpu"},
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4}},
        "trainer": {"name": trainer, "options": {"max_steps": 3, "batch_size": 2}},
        "data": {"max_train_examples": 4, "max_val_examples": 2, "max_length": 96},
        "output_dir": str(out),
        "evaluate": False,
        "generate": {"max_new_tokens": 2},
    }
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    monkeypatch.setattr(cli, "_registry", lambda extra=(): load_registry(extra))
    result = CliRunner().invoke(cli.app, ["run", str(tmp_path / "run.yaml")])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].startswith(
        "error: training diverged at step 1: the training loss is nan (no earlier step); no adapter was saved and no checkpoint "
        "was written; check the data and the base model's weights for NaN/inf, then try a lower trainer.options.lr"
    ), errors[0]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


class _NanTrainer(TrainerPlugin):
    """A third-party trainer that does not guard: it leaves one LoRA tensor NaN and reports success."""

    name = "nan-test"
    Options = TrainingOptions

    def train(self, model, tokenizer, train_data, eval_data, options, ctx):
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(NAN)
        return TrainResult(train_loss=1.0, steps=1, tokens=1, seconds=1.0)


class _ProvideNanTrainer:
    @hookimpl
    def qpeft_register_trainers(self, register):
        register(_NanTrainer())


def test_adapter_save_refuses_non_finite_tensors(tiny_config, tmp_path):
    out = tmp_path / "run"
    earlier = _earlier_outputs(out)
    cfg = tiny_config(quantizer="none", trainer={"name": "nan-test"}, evaluate=False, output_dir=str(out))
    resolved, reg = orchestrator.prepare(cfg, registry=load_registry([_ProvideNanTrainer()]))
    with pytest.raises(
        NonFiniteError,
        match=rf"^refusing to save a diverged adapter \({out / 'adapter'} is left as it was\): tensor "
        r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight' holds \d+ NaN/inf values",
    ):
        orchestrator.run(resolved, reg)
    assert _digests(out) == earlier
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp folder left behind"


@pytest.fixture()
def plain_adapter(tiny_llama_path, tmp_path) -> Path:
    """A plain peft LoRA adapter (random, non-zero) for the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(tmp_path / "plain")
    return tmp_path / "plain"


def _rewrite(adapter: Path, fn) -> None:
    file = adapter / "adapter_model.safetensors"
    save_file(fn(load_file(file)), file, metadata={"format": "pt"})


def test_generate_and_merge_refuse_a_non_finite_adapter(plain_adapter, registry, tmp_path):
    def plant(w):
        w[sorted(w)[0]][0, 0] = float("inf")
        return w

    _rewrite(plain_adapter, plant)
    one_line = rf"^adapter {plain_adapter} is not usable \(adapter_model\.safetensors; .*\): tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' holds 1 NaN/inf values"
    with pytest.raises(NonFiniteError, match=one_line):
        orchestrator.generate(str(plain_adapter), "Hi", registry, ["model.device=cpu"], max_new_tokens=2)
    with pytest.raises(NonFiniteError, match=one_line):
        orchestrator.merge(str(plain_adapter), str(tmp_path / "merged"), registry, overrides=["quantizer=none", "model.device=cpu"])
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_to_write_non_finite_merged_weights(plain_adapter, nan_base, registry, tmp_path):
    with pytest.raises(
        NonFiniteError,
        match=r"^refusing to write the merged model to .*merged \(non-finite merged weights\): tensor 'model\.norm\.weight' holds 1 NaN/inf",
    ):
        orchestrator.merge(
            str(plain_adapter), str(tmp_path / "merged"), registry, overrides=["quantizer=none", "model.device=cpu", f"model={nan_base}"]
        )
    assert not (tmp_path / "merged").exists()


def test_adapter_whose_keys_match_nothing_is_refused(plain_adapter, registry, tmp_path):
    _rewrite(plain_adapter, lambda w: {k.replace(".layers.", ".blocks."): v for k, v in w.items()})
    one_line = (
        rf"^adapter {plain_adapter} does not apply to this base: none of its 8 tensors matches a module of the model "
        r"\(e\.g\. 'base_model\.model\.model\.blocks\.0\.self_attn\.q_proj\.lora_A\.weight'; the base expects keys like "
        r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight'\); load it on the base model it was trained on$"
    )
    with pytest.raises(QpeftError, match=one_line):
        orchestrator.generate(str(plain_adapter), "Hi", registry, ["model.device=cpu"], max_new_tokens=2)
    with pytest.raises(QpeftError, match=one_line):
        orchestrator.merge(str(plain_adapter), str(tmp_path / "merged"), registry, overrides=["quantizer=none", "model.device=cpu"])
    assert not (tmp_path / "merged").exists()


def test_json_outputs_never_hold_nan_or_infinity(tmp_path):
    """A perplexity that overflowed (exp of a large finite loss) is written as null: valid JSON."""
    data = {"val_perplexity_after": float("inf"), "val_loss_after": 800.0, "h": [{"loss": NAN}], "m": -math.inf}
    atomic_write_json(tmp_path / "summary.json", data)

    def refuse(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    back = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert back == {"val_perplexity_after": None, "val_loss_after": 800.0, "h": [{"loss": None}], "m": None}

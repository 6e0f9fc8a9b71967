"""Packing without cross-document attention, the chunked cross-entropy, and checkpoints +
``--resume`` (also after kill -9 and after a checkpoint interrupted mid-write)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from qpeft import orchestrator
from qpeft.checkpoint import MARKER, checkpoint_dir, latest_complete
from qpeft.data import IGNORE, collate, pack, tokenize
from qpeft.errors import ConfigError
from qpeft.registry import load_registry

DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "To be, or not to be, that is the question."},
    {"text": "A short one."},
    {"text": "Packing must never let one document attend to another, whatever their lengths are."},
]


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def tiny(tiny_llama_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qpeft.tokenizer import load_tokenizer

    tok, _ = load_tokenizer(tiny_llama_path)  # a pad token distinct from EOS, as in a run
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    return model, tok


def _loss_sum(model, batch, **kw):
    import torch

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, **kw).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    ).item()


def test_packed_rows_give_the_same_loss_as_separate_documents(tiny):
    model, tok = tiny
    data = tokenize(DOCS, "text", tok, 64)
    rows = pack(data, 64)
    assert len(rows) < len(data)  # something was actually packed
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(d["input_ids"]) for d in data)
    separate = sum(_loss_sum(model, collate([d], tok.pad_token_id)) for d in data)
    packed = _loss_sum(model, collate(rows, tok.pad_token_id), use_cache=False)
    assert packed == pytest.approx(separate, rel=1e-5)
    # The check can fail: the same packed row with an all-ones attention mask (documents
    # attending to each other) gives another loss.
    leaky = collate(rows, tok.pad_token_id)
    leaky["attention_mask"] = leaky.pop("position_ids") * 0 + 1
    assert abs(_loss_sum(model, leaky, use_cache=False) - separate) > 1e-4 * separate


def test_packed_rows_leak_when_the_kv_cache_is_on_and_training_turns_it_off(tiny, tiny_config, tmp_path):
    """transformers trap: with use_cache on (the config default), the model creates an empty
    cache and then skips the per-document mask, so packed documents see each other. qpeft
    trains with the cache off (qpeft.modeling.kv_cache_off)."""
    model, tok = tiny
    data = tokenize(DOCS, "text", tok, 64)
    separate = sum(_loss_sum(model, collate([d], tok.pad_token_id)) for d in data)
    with_cache = _loss_sum(model, collate(pack(data, 64), tok.pad_token_id), use_cache=True)
    assert abs(with_cache - separate) > 1e-4 * separate  # the trap (if this fails, transformers fixed it)

    import qpeft

    class CacheWatch:
        seen = []

        @qpeft.hookimpl
        def qpeft_on_step_end(self, step, max_steps, logs, ctx):
            CacheWatch.seen.append(self.model.config.use_cache)

        @qpeft.hookimpl
        def qpeft_on_model_loaded(self, model, ctx):
            self.model = model

    cfg = _cfg(tiny_config, tmp_path, "native", "cache", max_steps=2)
    cfg["data"]["packing"] = True
    watch = CacheWatch()
    resolved, reg = orchestrator.prepare(cfg, registry=load_registry([watch]))
    orchestrator.run(resolved, reg)
    assert CacheWatch.seen == [False, False]
    assert watch.model.config.use_cache is True  # restored for generation


def test_pack_restarts_positions_and_never_targets_a_document_start(tiny):
    _, tok = tiny
    data = tokenize(DOCS, "text", tok, 64)
    rows = pack(data, 40)
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert starts[0] == 0 and all(r["labels"][i] == IGNORE for i in starts)
        assert len(r["input_ids"]) <= 40 or len(starts) == 1
    batch = collate(rows, tok.pad_token_id)
    assert "attention_mask" not in batch  # a mask would switch transformers' packed detection off


def _cfg(tiny_config, tmp_path, trainer, name, **opts):
    cfg = tiny_config(
        quantizer="none",
        trainer={
            "name": trainer,
            "options": {"batch_size": 2, "max_steps": 6, "lr": 3e-3, "scheduler": "cosine", "warmup_steps": 1, **opts},
        },
        evaluate=False,
        output_dir=str(tmp_path / name),
    )
    cfg["data"]["max_train_examples"] = 10
    return cfg


def _run(cfg, registry, **kw):
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    return orchestrator.run(resolved, reg, **kw)


def test_native_chunked_loss_matches_full(tiny_config, registry, tmp_path):
    full = _run(_cfg(tiny_config, tmp_path, "native", "full"), registry)
    chunked = _run(_cfg(tiny_config, tmp_path, "native", "chunked", loss="chunked", loss_chunk=32), registry)
    a = [h["loss"] for h in full["loss_history"]]
    b = [h["loss"] for h in chunked["loss_history"]]
    assert a[-1] < a[0]
    assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.parametrize("trainer", ["native", "hf"])
def test_packed_training_runs_and_trainers_agree(tiny_config, registry, tmp_path, trainer):
    cfg = _cfg(tiny_config, tmp_path, trainer, f"packed-{trainer}")
    cfg["data"]["packing"] = True
    cfg["data"]["max_length"] = 192
    s = _run(cfg, registry)
    losses = [h["loss"] for h in s["loss_history"]]
    assert losses[-1] < losses[0]
    assert s["reload_max_abs_logit_diff"] < 1e-3
    if trainer == "hf":
        other = _run({**cfg, "trainer": {**cfg["trainer"], "name": "native"}, "output_dir": str(tmp_path / "packed-native-2")}, registry)
        assert [h["loss"] for h in other["loss_history"]] == pytest.approx(losses, rel=2e-3)
        assert other["train_tokens"] == s["train_tokens"]


def test_prefix_refuses_packing(tiny_config, registry):
    cfg = tiny_config(peft="prefix")
    cfg["data"]["packing"] = True
    with pytest.raises(ConfigError, match="data.packing"):
        orchestrator.prepare(cfg, registry=registry)


KILLER = textwrap.dedent(
    """
    import os, signal, sys, json
    import qpeft
    from qpeft import orchestrator
    from qpeft.registry import load_registry

    class Killer:
        @qpeft.hookimpl
        def qpeft_on_step_end(self, step, max_steps, logs, ctx):
            if step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[3] == "mid-save":  # die inside the checkpoint write of step argv[2], after its first torch.save
        import torch

        real_save = torch.save

        def save_then_die(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if f"checkpoint-{sys.argv[2]}" in str(f):
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_then_die
        Killer.qpeft_on_step_end = lambda *a, **k: None
    resolved, reg = orchestrator.prepare(json.load(open(sys.argv[1])), registry=load_registry([Killer()]))
    orchestrator.run(resolved, reg)
    """
)


def _adapter_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("trainer,when", [("native", "after-step"), ("hf", "after-step"), ("native", "mid-save"), ("hf", "mid-save")])
def test_resume_after_kill_gives_the_uninterrupted_adapter(tiny_config, registry, tmp_path, trainer, when):
    opts = {"save_steps": 2, "save_total_limit": 3}
    if trainer == "native":
        opts["optim"] = "adamw_torch"
    ref = _run(_cfg(tiny_config, tmp_path, trainer, "straight", **opts), registry)
    assert ref["train_steps"] == 6

    cfg = _cfg(tiny_config, tmp_path, trainer, "killed", **opts)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    kill_step = "5" if when == "after-step" else "4"
    proc = subprocess.run([sys.executable, str(script), str(cfg_file), kill_step, when], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_dir = tmp_path / "killed"
    assert not (run_dir / "adapter").exists()
    if when == "after-step":
        assert latest_complete(run_dir) == checkpoint_dir(run_dir, 4)
        # A checkpoint torn by a kill mid-write, planted by hand: a step-6 folder with a
        # truncated file and no completion marker. Resume must not use it.
        half = checkpoint_dir(run_dir, 6)
        shutil.copytree(checkpoint_dir(run_dir, 4), half)
        (half / MARKER).unlink()
        for f in half.glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:100])
        expected = "checkpoint-4"
    else:
        # Killed for real inside the step-4 checkpoint write: the HF Trainer leaves a partial
        # checkpoint-4 folder (written in place), the native trainer a hidden temp folder.
        assert latest_complete(run_dir) == checkpoint_dir(run_dir, 2)
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if "4" in p.name]
        assert leftovers, "the kill did not happen inside the step-4 checkpoint write"
        expected = "checkpoint-2"

    resumed = _run(cfg, registry, resume=True)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"][-3:]
    assert all((p / MARKER).exists() for p in (run_dir / "checkpoints").iterdir())
    assert any("resuming from" in n and expected in n for n in resumed["notes"])
    a, b = _adapter_tensors(tmp_path / "straight"), _adapter_tensors(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
    # resuming a finished run with another training config is refused
    changed = {**cfg, "seed": 1}
    with pytest.raises(ConfigError, match="different training config"):
        _run(changed, registry, resume=True)


def test_resume_without_checkpoint_starts_over(tiny_config, registry, tmp_path):
    s = _run(_cfg(tiny_config, tmp_path, "native", "fresh", max_steps=2), registry, resume=True)
    assert s["train_steps"] == 2
    assert any("starting from step 0" in n for n in s["notes"])


def test_chunked_loss_reenters_autocast():
    """Regression (found on the H100): accelerate casts a model's outputs to float32, so the
    chunked loss gets float32 hidden states and must run the (bf16) head under autocast again."""
    import torch

    from qpeft.plugins.trainer_native import _chunked_ce_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    hidden = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 50, (40,))
    labels[:5] = IGNORE

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    got = _chunked_ce_sum(hidden, head, labels, 16, autocast)
    got.backward()
    with autocast():
        ref = torch.nn.functional.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE, reduction="sum")
    assert got.item() == pytest.approx(ref.item(), rel=1e-3)
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


class _Payload:
    """Unpickling this runs code: it creates the file named in ``__reduce__``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("planted", ["rng.pt", "scheduler.pt", "optimizer.pt"])
def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path, planted):
    """A checkpoint folder is data: a planted pickle is refused with one line and never runs."""
    import torch
    from safetensors.torch import save_file

    from qpeft.errors import ConfigError
    from qpeft.plugins import trainer_native

    p = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([p])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    save_file({"w": torch.ones(2)}, str(ckpt / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state(), "python": __import__("random").getstate()}, ckpt / "rng.pt")
    marker = tmp_path / "code-ran"
    torch.save({"state": _Payload(marker)}, ckpt / planted)
    with pytest.raises(ConfigError, match=rf"{planted} is not a checkpoint file qpeft wrote"):
        trainer_native._load_state(ckpt, {"w": p}, optimizer, scheduler, sharded=False)
    assert not marker.exists()

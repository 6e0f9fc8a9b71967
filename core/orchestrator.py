"""What qpeft does, one readable function per verb.

``run``: validate → resolve plugins → check compatibility → load base via the quantizer →
evaluate → prepare for k-bit training → attach the adapter → train → evaluate → save →
reload on a fresh quantized base → check logits → generate.
``generate``: rebuild the base from an adapter's metadata and generate.
``merge``: merge an adapter into full-precision weights and verify the result.
"""

from __future__ import annotations

import gc
import math
import platform
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from . import __version__, capability_table
from .adapter_source import (
    METADATA_FILE,
    absolute_base,
    base_fingerprint,
    check_base_fingerprint,
    read_adapter_metadata,
    record_base,
    trusted_run_sections,
)
from .checkpoint import find_resume_point, read_marker
from .config import ResolvedRun, RunConfig, dump_yaml, load_config, resolve
from .context import RunContext
from .data import check_same_data, load_datasets, tokenize
from .data.objectives import load_objective_data, probe_example
from .distributed import check_shared_output_dir, fsdp_version, gather_trainable_state, local_rank, world_size
from .distributed import rank as distributed_rank
from .errors import QpeftError, TrainingDiverged
from .evaluation import run_evaluators
from .integrity import check_adapter_applied, check_adapter_files, check_finite
from .io import atomic_dir, atomic_write_json, atomic_write_text, deferred_interrupts, folder_lock
from .model_card import model_card
from .model_source import check_weight_files, resolve_model_path
from .modeling import (
    StepTimer,
    align_pad_token,
    forget_load_conversions,
    generate_text,
    kv_cache_off,
    logits_for,
    peak_memory_gib,
    reset_peak_memory,
    weight_memory_gib,
)
from .outputs import MERGE_MARKER, check_merge_output, check_run_output
from .preflight import check_context_length
from .quantized_cache import load_base
from .registry import Registry, load_registry
from .timeline import Timeline
from .tokenizer import load_tokenizer
from .tracking import tracking

Say = Callable[[str], None]

#: A validation split smaller than this (examples, or loss-target tokens) gets a note that its
#: perplexity means little.
TINY_VAL_EXAMPLES = 4
TINY_VAL_TOKENS = 200


def _quiet(msg: str) -> None:
    pass


def _context(resolved: ResolvedRun, registry: Registry) -> RunContext:
    ctx = RunContext(
        config=resolved.config,
        device=resolved.device,
        dtype=resolved.dtype,
        output_dir=resolved.config.output_dir,
        hooks=registry.hooks,
        fsdp=fsdp_version(),
        quantizer=resolved.quantizer,
        quantizer_options=resolved.quantizer_options,
    )
    ctx.notes.extend(resolved.notes)
    return ctx


def prepare(config: RunConfig | str | dict, overrides=(), registry: Registry | None = None) -> tuple[ResolvedRun, Registry]:
    """Validate everything that can be validated without loading a weight."""
    registry = registry or load_registry()
    if not isinstance(config, RunConfig):
        config = load_config(config, list(overrides))
    return resolve(config, registry), registry


def run(resolved: ResolvedRun, registry: Registry, say: Say = _quiet, *, resume: bool = False) -> dict:
    """Fine-tune, save, reload and generate; return (and write) the run summary.

    Before anything is read or written: ``output_dir`` must not overlap the run's inputs nor
    hold files qpeft did not write (:mod:`qpeft.outputs`), and only one run writes to it at a
    time (:func:`qpeft.io.folder_lock`, held by rank 0 for the whole run).

    ``resume``: continue from the newest complete checkpoint in ``output_dir/checkpoints``
    (see :mod:`qpeft.checkpoint`); without one, train from step 0. Under ``accelerate launch``
    every rank trains (data parallel: DDP, or FSDP2 with ``--use_fsdp``) and only rank 0
    evaluates after training, saves, reloads and generates; under FSDP it first gathers the
    sharded adapter from all ranks and rebuilds the trained model on a base of its own.
    """
    check_run_output(resolved.config)
    if distributed_rank() != 0:
        return _run(resolved, registry, say, resume=resume)
    with folder_lock(resolved.config.output_dir, "qpeft run"), tracking(resolved, registry, say):
        return _run(resolved, registry, say, resume=resume)


def _run(resolved: ResolvedRun, registry: Registry, say: Say, *, resume: bool) -> dict:
    from . import timeline

    clock = Timeline(timeline.COMMAND_START)
    clock.mark("run")
    quant, peft, trainer = resolved.quantizer, resolved.peft, resolved.trainer
    # the first line before the libraries' imports (seconds): the command shows it started
    say(
        f"model {resolved.config.model.name_or_path} on {resolved.device} ({resolved.dtype}); "
        f"quantizer {quant.name}, peft {peft.name}, trainer {trainer.name}"
    )
    import torch
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    clock.mark("imported")  # transformers' set_seed imports its trainer utilities, and with them peft and bitsandbytes

    cfg = resolved.config
    ctx = _context(resolved, registry)
    if note := check_shared_output_dir(cfg.output_dir, resume=resume, cpu=ctx.device == "cpu"):
        say(f"[yellow]{note}[/]")
        ctx.notes.append(note)
    if resume:
        path, notes = find_resume_point(cfg, resolved.trainer.name)
        ctx.resume_from = str(path) if path else None
        for note in notes:
            say(note)
        ctx.notes.extend(notes)
    rank = distributed_rank()
    if ctx.device == "cuda":
        torch.cuda.set_device(local_rank())
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "resolved_config.yaml", dump_yaml(resolved.to_dict()))
    if cfg.model.trust_remote_code:
        say("[yellow]trust_remote_code is ON: the model folder's own code will run[/]")
    set_seed(cfg.seed)
    q_opts = resolved.quantizer_options

    model_path = resolve_model_path(cfg.model.name_or_path, progress=say)
    tok, pad = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    ctx.tokenizer = tok
    say(f"pad token: {pad.action} {pad.token!r} (id {pad.token_id}); eos {tok.eos_token!r} (id {tok.eos_token_id})")

    d = cfg.data
    kind = getattr(trainer, "data_kind", "lm")
    if kind != "lm":  # preference pairs, feedback or prompts: read, checked and rendered before any weight loads
        data = load_objective_data(d, kind, tok, say=say)
        train_data, val_data = data.train, data.val
        say(f"data {d.path} ({kind}, {data.format} rows): {len(train_data)} train / {len(val_data)} val rows")
    else:
        data = load_datasets(d, tok, say=say)
        train_data, val_data = data.train, data.val
        say(
            f"data {d.path} ({data.format}): {train_data.n_documents} train / {len(val_data)} val examples, {train_data.n_tokens:,} training tokens"
        )
        if d.packing:
            say(f"packed {train_data.n_documents} training documents into {len(train_data)} rows of up to {d.max_length} tokens")
        for split, rows, path in (("training", train_data, d.path), ("validation", val_data, d.val_path or d.path)):
            if not rows:  # checked before any weight loads (training would divide by zero)
                raise QpeftError(
                    f"data.max_length: no {split} example of {path} keeps a target token within {d.max_length} tokens; raise data.max_length"
                )
        if any(e.plugin.name == "perplexity" for e in resolved.evaluators) and (
            len(val_data) < TINY_VAL_EXAMPLES or val_data.label_tokens() < TINY_VAL_TOKENS
        ):
            note = (
                f"the validation split is {len(val_data)} example(s) with {val_data.label_tokens()} target tokens: a perplexity "
                "on so few tokens means little; name a validation file (data.val_path) or hold out more (data.val_fraction, "
                "data.max_val_examples)"
            )
            say(f"[yellow]{note}[/]")
            ctx.notes.append(note)
        if ctx.resume_from:
            check_same_data((read_marker(ctx.resume_from) or {}).get("data_position"), train_data)
    if note := check_context_length(model_path, d.max_length):
        say(f"[yellow]{note}[/]")
        ctx.notes.append(note)

    clock.mark("load")
    t0 = time.perf_counter()
    model = load_base(quant, model_path, q_opts, ctx, training=True, say=say)
    load_s = time.perf_counter() - t0
    clock.mark("loaded")
    if pad.needs_resize:
        model.resize_token_embeddings(len(tok))
    align_pad_token(model, tok)
    registry.hooks.qpeft_on_model_loaded(model=model, ctx=ctx)
    weight_gib = weight_memory_gib(model, quant, q_opts)
    say(f"loaded base in {load_s:.1f}s, weights {weight_gib:.3f} GiB")

    # Other objectives than language modelling measure their own metrics (TrainResult.metrics);
    # the held-out perplexity needs LM rows, so it runs on "lm" trainers only.
    evaluators = [e for e in resolved.evaluators if kind == "lm" or e.plugin.name != "perplexity"]
    eval_data = val_data if kind == "lm" else None
    evals: dict = {}
    if evaluators:
        run_evaluators(evaluators, model, tok, eval_data, ctx, "before", evals, say)
        quant.ensure_training_kernels(model, q_opts)

    model = quant.prepare_for_training(model, q_opts, ctx, grad_checkpointing=resolved.grad_checkpointing)
    ctx.train_data = train_data
    model = peft.attach(model, resolved.peft_options, ctx)
    trainable, total = quant.count_parameters(model, q_opts)
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    reset_peak_memory(ctx.device)
    clock.mark("train")
    with kv_cache_off(model), StepTimer(registry.pm) as steps, clock.first_optimizer_step():
        result = trainer.train(model, tok, train_data, val_data, resolved.trainer_options, ctx)
    if not math.isfinite(result.train_loss):  # the built-in trainers stop at the first non-finite loss
        raise TrainingDiverged(
            f"training diverged: trainer {trainer.name} reported a non-finite loss ({result.train_loss}); no adapter was saved",
            step=result.steps,
        )
    memory = {k: round(v, 3) for k, v in peak_memory_gib(ctx.device).items()}
    phases = clock.summary()
    if phases["to_first_step_s"] is not None:
        say(
            f"first optimizer step done {phases['to_first_step_s']:.1f}s after the {phases['from']} started "
            + ", ".join(
                f"{k.removesuffix('_s')} {phases[k]:.1f}s"
                for k in ("startup_s", "imports_s", "data_s", "load_s", "setup_s", "first_step_s")
                if phases[k] is not None
            )
        )
    peak = ", ".join(f"{k.removesuffix('_gib').replace('_', ' ')} {v:.2f} GiB" for k, v in memory.items())
    who = f"rank {rank}: " if world_size() > 1 else ""
    say(f"{who}trained {result.steps} steps, loss {result.train_loss:.4f}, {result.tokens_per_s:.1f} tokens/s, {peak}")
    if ctx.fsdp:
        # FSDP left each rank a shard of the model; a forward pass now would need every rank.
        # All ranks gather the adapter, then rank 0 carries on with it on a fresh base of its own.
        trained, sharded = gather_trainable_state(model)
        ctx.notes.append(f"FSDP{ctx.fsdp}: {sharded} of {len(trained)} trainable tensors were sharded over {world_size()} ranks")
        del model
        gc.collect()
        if rank == 0:
            model = _rebuild_trained(resolved, registry, ctx, model_path, pad.needs_resize, len(tok), trained)
    if rank != 0:  # data-parallel worker: rank 0 evaluates, saves, reloads and generates
        return {"rank": rank, "train_steps": result.steps, "train_loss": result.train_loss}

    if evaluators:
        run_evaluators(evaluators, model, tok, eval_data, ctx, "after", evals, say)
    before, after = _perplexity(evals, "before"), _perplexity(evals, "after")
    probe = val_data[0] if kind == "lm" else probe_example(val_data[0], tok, d.max_length)
    trained_logits = logits_for(model, probe, tok.pad_token_id)

    summary = {
        "qpeft_version": __version__,
        "model": cfg.model.name_or_path,
        "quantizer": quant.name,
        "peft": peft.name,
        "trainer": trainer.name,
        "device": ctx.device,
        "device_name": _device_name(ctx.device),
        "dtype": ctx.dtype,
        "gradient_checkpointing": resolved.grad_checkpointing,
        "pad_token": {"action": pad.action, "token": pad.token, "id": pad.token_id},
        "load_seconds": round(load_s, 2),
        "weight_memory_gib": round(weight_gib, 4),
        "bits": quant.bits(q_opts),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "train_steps": result.steps,
        "train_loss": round(result.train_loss, 4),
        "train_tokens": result.tokens,
        "train_seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_s, 1),
        **steps.summary(),
        "timeline": phases,
        **memory,
        "val_tokens": val_data.label_tokens() if kind == "lm" else None,
        "train_data": {
            "documents": train_data.n_documents,
            "examples": len(train_data),
            "tokens": train_data.n_tokens,
            "store": str(train_data.store.folder),
        }
        if kind == "lm"
        else {"rows": len(train_data), "val_rows": len(val_data), "format": data.format},
        "objective": kind,
        "objective_metrics": result.metrics,
        "val_perplexity_before": round(before["perplexity"], 4) if before else None,
        "val_perplexity_after": round(after["perplexity"], 4) if after else None,
        "val_loss_before": round(before["loss"], 4) if before else None,
        "val_loss_after": round(after["loss"], 4) if after else None,
        "loss_history": [{"step": h.get("step"), "loss": h.get("loss")} for h in result.log_history],
        "eval": evals,
        "notes": ctx.notes,
    }

    adapter_dir = out / "adapter"
    # The adapter and its summary are one result: an interrupt (Ctrl-C, SIGTERM) waits until
    # both are written, and a save that fails leaves the earlier pair untouched. Both carry the
    # run's id (only a kill -9 between the two renames could part them; the ids then differ).
    # The summary is written again once the reload check and generation ran.
    summary["run_id"] = uuid.uuid4().hex
    with deferred_interrupts():
        save_adapter(model, peft, adapter_dir, resolved, summary)
        summary["adapter_bytes"] = sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file())
        summary["stage"] = "saved"  # the reload check and generation have not run yet
        atomic_write_json(out / "summary.json", summary)
    say(f"saved adapter to {adapter_dir}")
    del model
    gc.collect()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()

    # Reload as trained (same dtype layout as after prepare_for_training) so that the check
    # measures the adapter's save/load round trip, not bf16-vs-fp32 norm layers.
    model = load_for_inference(adapter_dir, resolved, registry, ctx, as_trained=True)
    reload_diff = float((logits_for(model, probe, tok.pad_token_id) - trained_logits).abs().max())
    summary["reload_max_abs_logit_diff"] = reload_diff
    say(f"reloaded adapter on a fresh {quant.name} base: max |Δlogit| vs trained model = {reload_diff:.2e}")
    say(f"generating up to {cfg.generate.max_new_tokens} tokens")
    sample = generate_text(model, tok, cfg.generate.prompt, cfg.generate.max_new_tokens, cfg.generate.chat_template)
    summary["generation"] = sample
    summary["notes"] = list(dict.fromkeys(ctx.notes))  # loading the base again repeats the plugins' notes
    summary["stage"] = "complete"
    atomic_write_json(out / "summary.json", summary)
    registry.hooks.qpeft_on_run_end(summary=summary, ctx=ctx)
    return summary


def _perplexity(evals: dict, stage: str) -> dict | None:
    """The first perplexity evaluator's result at ``stage`` (the summary's ``val_perplexity_*``)."""
    entry = next((e for e in evals.values() if e["evaluator"] == "perplexity" and e.get(stage)), None)
    return entry[stage] if entry else None


def _rebuild_trained(resolved: ResolvedRun, registry: Registry, ctx: RunContext, model_path: str, resize: bool, vocab: int, trained: dict):
    """The trained model on this rank alone: a fresh base prepared and adapted as for training,
    with the trained adapter tensors (gathered from FSDP's shards) copied in; in eval mode."""
    import torch

    model = load_base(resolved.quantizer, model_path, resolved.quantizer_options, ctx, training=True)
    if resize:
        model.resize_token_embeddings(vocab)
    model = resolved.quantizer.prepare_for_training(model, resolved.quantizer_options, ctx, grad_checkpointing=False)
    model = resolved.peft.attach(model, resolved.peft_options, ctx)
    params = dict(model.named_parameters())
    names = {n for n, p in params.items() if p.requires_grad}
    if names != set(trained):
        diff = sorted(names ^ set(trained))
        raise QpeftError(
            f"the adapter gathered after FSDP training does not match a fresh one: {len(diff)} tensors differ, such as {diff[0]!r}"
        )
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    model.eval()
    return model


def save_adapter(model, peft, adapter_dir: Path, resolved: ResolvedRun, summary: dict) -> None:
    """Write the adapter (PEFT format, safetensors) plus qpeft's metadata and a model card,
    atomically. The base is recorded by a name another machine can resolve (the embedded name,
    the hub id, or the local folder the user named, never qpeft's cache) in both ``qpeft.json``
    and ``adapter_config.json``, with a fingerprint of its files in ``qpeft.json``."""
    base = absolute_base(resolved.config.model.name_or_path)
    meta = {
        "qpeft_version": __version__,
        "base_model": base,
        "base_model_fingerprint": base_fingerprint(resolve_model_path(resolved.config.model.name_or_path)),
        "model": {**resolved.config.model.model_dump(mode="json"), "name_or_path": absolute_base(resolved.config.model.name_or_path)},
        "quantizer": {"name": resolved.quantizer.name, "options": resolved.quantizer_options.model_dump(mode="json")},
        "peft": {"name": resolved.peft.name, "options": resolved.peft_options.model_dump(mode="json")},
        "dtype": resolved.dtype,
        "training": {k: summary[k] for k in ("train_steps", "train_loss", "val_perplexity_before", "val_perplexity_after")},
        "run_id": summary.get("run_id"),
    }
    with atomic_dir(adapter_dir) as tmp:
        peft.save(model, str(tmp))
        if list(tmp.glob("*.bin")) or list(tmp.glob("*.pt")):
            raise QpeftError(f"{peft.name} wrote a pickle file; qpeft saves safetensors only")
        check_adapter_files(tmp, f"refusing to save a diverged adapter ({adapter_dir} is left as it was)")
        record_base(tmp, base)
        atomic_write_json(tmp / METADATA_FILE, meta)
        atomic_write_text(tmp / "resolved_config.yaml", dump_yaml(resolved.to_dict()))
        atomic_write_text(tmp / "README.md", model_card(resolved, summary, meta))


def load_for_inference(
    adapter_dir: Path,
    resolved: ResolvedRun,
    registry: Registry,
    ctx: RunContext,
    *,
    as_trained: bool = False,
    training_kernels: bool = False,
):
    """A freshly loaded quantized base with the saved adapter on it, in eval mode.

    ``as_trained`` also applies the quantizer's training preparation (e.g. fp32 norms and
    embeddings after ``prepare_model_for_kbit_training``) so numerics match the trained model.
    ``training_kernels`` keeps the quantizer's exact training kernels in eval mode instead of
    its inference kernels (bitsandbytes' AVX512-BF16 CPU path rounds the 4-bit scales through
    bfloat16, ~3e-3 in logits): the reference a merge is verified against. The base comes from
    the quantized-base cache where it holds one (:mod:`qpeft.quantized_cache`).
    """
    check_weight_files(adapter_dir, allow_pickle=resolved.config.model.allow_pickle)  # before any weight loads
    check_adapter_files(adapter_dir)  # NaN/inf tensors: a diverged run's adapter, or a damaged file
    model_path = resolve_model_path(resolved.config.model.name_or_path)
    training = as_trained or training_kernels
    base = load_base(resolved.quantizer, model_path, resolved.quantizer_options, ctx, training=training)
    if as_trained:
        base = resolved.quantizer.prepare_for_training(base, resolved.quantizer_options, ctx, grad_checkpointing=False)
    try:
        model = resolved.peft.load_adapter(base, str(adapter_dir), ctx, trainable=False)
    except Exception as exc:  # torch size mismatch, safetensors header errors, missing keys...
        lines = [l.strip() for l in str(exc).splitlines() if l.strip()] or [type(exc).__name__]
        first = next((l for l in lines if "size mismatch" in l), lines[0])
        raise QpeftError(
            f"adapter {adapter_dir} does not load on base {resolved.config.model.name_or_path!r} "
            f"({type(base).__name__}): {first[:300]}; load it on the base model it was trained on"
        ) from None
    check_adapter_applied(model, adapter_dir)  # peft only warns when no key matches
    model.eval()
    return model


def resolve_from_adapter(adapter_dir: str | Path, registry: Registry, overrides=(), say: Say = _quiet) -> ResolvedRun:
    """Rebuild a run config from an adapter's metadata (``--set`` may override, e.g. the quantizer).

    The metadata is untrusted data: only the base's identity and the backends' names and
    quantizer options come from it (:mod:`qpeft.adapter_source`); remote code, pickles and
    device maps only from ``overrides``. What it asked for and did not get is in the notes."""
    user_keys = {o.split("=", 1)[0].strip() for o in overrides}
    if "model" in user_keys:
        user_keys.add("model.name_or_path")
    sections, ignored = trusted_run_sections(read_adapter_metadata(adapter_dir), adapter_dir, user_keys)
    data = {
        **sections,
        # Generation and merge train nothing: any trainer resolves, but the first by name may need a
        # package that is not installed (dpo: trl), so the built-in `hf` is preferred.
        "trainer": {"name": "hf" if "hf" in registry.backends["trainer"] else next(iter(sorted(registry.backends["trainer"])))},
        "output_dir": str(adapter_dir),
    }
    data["model"].update(device="auto", dtype="auto")
    config = load_config(data, list(overrides))
    resolved = resolve(config, registry)
    resolved.notes.extend(ignored)
    for note in ignored:
        say(f"[yellow]{note}[/yellow]")
    return resolved


def _warn_other_base(adapter_dir, model_path: str, resolved: ResolvedRun, say: Say) -> None:
    """Say so when the base resolved here is not the one the adapter was trained on."""
    try:
        note = check_base_fingerprint(read_adapter_metadata(adapter_dir), model_path)
    except (QpeftError, OSError):
        return
    if note:
        resolved.notes.append(note)
        say(f"[yellow]{note}[/yellow]")


def generate(adapter_dir: str, prompt: str, registry: Registry, overrides=(), max_new_tokens: int = 64, say: Say = _quiet) -> dict:
    """Load the base an adapter was trained on (or the one overrides ask for) and generate."""
    resolved = resolve_from_adapter(adapter_dir, registry, overrides, say=say)
    ctx = _context(resolved, registry)
    model_path = resolve_model_path(resolved.config.model.name_or_path, progress=say)
    _warn_other_base(adapter_dir, model_path, resolved, say)
    tok, _ = load_tokenizer(model_path, trust_remote_code=resolved.config.model.trust_remote_code)
    say(f"loading {resolved.config.model.name_or_path} with {resolved.quantizer.name} + adapter {adapter_dir}")
    model = load_for_inference(Path(adapter_dir), resolved, registry, ctx)
    return generate_text(model, tok, prompt, max_new_tokens)


def merge(
    adapter_dir: str,
    out_dir: str,
    registry: Registry,
    *,
    force: bool = False,
    overrides=(),
    dtype: str = "float32",
    requantize: str | None = None,
    requantize_options: list[str] | None = None,
    say: Say = _quiet,
) -> dict:
    """Merge an adapter into full-precision weights and save a plain transformers model.

    The merge itself runs in float32 (a LoRA delta added to bfloat16 weights is mostly rounded
    away); the result is saved in ``dtype``. The reference is the adapter on its quantized
    base; the merged model must reproduce its logits on a fixed prompt, and the max |Δ| is
    reported. The saved config's pad token is the saved tokenizer's.

    ``requantize`` names a quantizer (or a YAML run config whose ``quantizer`` section to use)
    that loads the merged model quantized; it is saved beside ``out_dir`` as
    ``<out_dir>-<quantizer>`` (:func:`requantize_merged`). Its options: the config's, else the
    adapter's own when it is the quantizer the adapter was trained with, updated by
    ``requantize_options`` (``key=value`` items). A quantizer that cannot save its models
    (``capabilities.saves_quantized="none"``) is refused before any weight loads.
    """
    import torch

    resolved = resolve_from_adapter(adapter_dir, registry, overrides, say=say)
    quant, peft = resolved.quantizer, resolved.peft
    support = capability_table.cell(quant, peft)  # the same rule the docs and bench use
    if not support.merge:
        raise QpeftError(support.merge_reason)
    out = Path(out_dir)
    ctx = _context(resolved, registry)
    rq = rq_options = rq_dir = None
    if requantize:
        rq, rq_options = requantize_target(requantize, requantize_options or [], resolved, registry, ctx)
        rq_dir = out.with_name(f"{out.name}-{rq.name}")
    model_path = resolve_model_path(resolved.config.model.name_or_path, progress=say)
    _warn_other_base(adapter_dir, model_path, resolved, say)
    inputs = {"adapter": adapter_dir, "base model": model_path}
    for target in (out, rq_dir) if rq_dir else (out,):  # before any weight loads
        check_merge_output(target, force=force, inputs=inputs)
    tok, _ = load_tokenizer(model_path)
    probe = tokenize([{"text": "The quick brown fox jumps over the lazy dog."}], "text", tok, 64)[0]

    # The reference is what the adapter was trained against: the quantized base on the
    # quantizer's exact (training) kernels, not an approximate inference kernel.
    model = load_for_inference(Path(adapter_dir), resolved, registry, ctx, training_kernels=True)
    reference = logits_for(model, probe, tok.pad_token_id)
    with model.disable_adapter():
        quantized_base = logits_for(model, probe, tok.pad_token_id)
    base = peft.unload(model)
    say(f"getting full-precision weights ({quant.capabilities.merge_source}) from {quant.name}")
    full = quant.full_precision_model(base, model_path, resolved.quantizer_options, ctx).to(torch.float32)
    # The floor: how far the quantized inference path is from float32 weights before any merge
    # (LLM.int8 also quantizes activations; GPTQ merges into the unquantized original).
    floor = float((logits_for(full, probe, tok.pad_token_id) - quantized_base).abs().max())
    adapted = peft.load_adapter(full, str(adapter_dir), ctx)
    check_adapter_applied(adapted, adapter_dir)
    merged = peft.merge(adapted).to(getattr(torch, dtype))
    align_pad_token(merged, tok)  # the saved config pads with the saved tokenizer's pad id
    forget_load_conversions(merged)  # a base read from a saved quantized folder recorded its loading
    check_finite(merged.state_dict().items(), f"refusing to write the merged model to {out} (non-finite merged weights)")
    merged_logits = logits_for(merged, probe, tok.pad_token_id)
    delta = float((merged_logits - reference).abs().max())
    result = {
        "out_dir": str(out),
        "merge_source": quant.capabilities.merge_source,
        "dtype": dtype,
        "max_abs_logit_diff": delta,
        "base_path_diff": floor,
    }
    # Both folders appear together or not at all: a failed re-quantization leaves neither.
    with atomic_dir(out, replace=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / MERGE_MARKER, {"adapter": str(adapter_dir), **{k: v for k, v in result.items() if k != "out_dir"}})
        if rq is not None:
            del merged, full, base, model, adapted
            gc.collect()
            result["requantized"] = requantize_merged(
                rq, rq_options, tmp, rq_dir, tok, probe, merged_logits, ctx, marker={"adapter": str(adapter_dir), "merged": str(out)}
            )
    say(
        f"merged model written to {out}; max |Δlogit| vs adapter on quantized base = {delta:.3e} "
        f"(quantized vs float32 base without adapter: {floor:.3e})"
    )
    if rq is not None:
        r = result["requantized"]
        say(
            f"re-quantized with {rq.name} into {rq_dir}; reloaded from disk: max |Δlogit| {r['reload_max_abs_logit_diff']:.2e} "
            f"vs before saving, relative L2 {r['logit_rel_err_vs_merged']:.3f} vs the merged model"
        )
    return result


#: Re-quantized model saved and loaded again vs the same model before saving: the same kernels on
#: the same stored values, so only float reassociation may differ (relative L2 of the logits).
REQUANTIZE_RELOAD_TOLERANCE = 1e-3
#: Re-quantized vs merged model (relative L2 of the logits): the quantizer's own error, bounded
#: as the conformance kit bounds it (``logit_tolerance``); a model whose layers were initialised
#: at random is ~1.0 or more away.
REQUANTIZE_LOGIT_TOLERANCE = 0.5


def requantize_target(spec: str, items: list[str], resolved: ResolvedRun, registry: Registry, ctx: RunContext):
    """The quantizer and validated options ``qpeft merge --requantize`` will use; refuses
    (before any weight loads) a quantizer that cannot save its models or run here."""
    from .config import normalize_shorthands, parse_override, read_yaml, validate_options

    name, options = spec, {}
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        section = normalize_shorthands(read_yaml(spec) or {}).get("quantizer") or {}
        if not isinstance(section, dict) or not isinstance(section.get("name"), str):
            raise QpeftError(f"--requantize: {spec} has no quantizer section with a name")
        name, options = section["name"], dict(section.get("options") or {})
    rq = registry.get("quantizer", name, key="--requantize")
    if not options and rq.name == resolved.quantizer.name:
        options = resolved.quantizer_options.model_dump(mode="json")
    for item in items:
        parts, value = parse_override(item)
        options[".".join(parts)] = value
    how = rq.capabilities.saves_quantized
    if how == "none":
        raise QpeftError(
            f"--requantize: quantizer {rq.name!r} cannot save quantized models (capabilities.saves_quantized is 'none'); "
            "its models exist only in memory: load the merged model with it instead"
        )
    if ctx.device not in rq.capabilities.devices:
        raise QpeftError(f"--requantize: quantizer {rq.name!r} runs on {', '.join(rq.capabilities.devices)}, not {ctx.device}")
    rq_options = validate_options(rq, options, "--requantize-set")
    rq.check(rq_options, ctx)
    return rq, rq_options


def requantize_merged(rq, rq_options, merged_dir: Path, rq_dir: Path, tok, probe, merged_logits, ctx: RunContext, marker: dict) -> dict:
    """Load the merged model in ``merged_dir`` with quantizer ``rq``, save it into ``rq_dir``
    (atomically), load the saved folder again the way a user would (``load_quantized``: plain
    ``from_pretrained`` for ``saves_quantized="transformers"``) and verify it by logits: the
    reloaded model must reproduce the model before saving and stay within the quantizer's error
    of the merged model. On any failure nothing is written and the error says why."""
    quantized = rq.load(str(merged_dir), rq_options, ctx, training=False)
    with atomic_dir(rq_dir, replace=True) as tmp:
        # Saved before any forward pass: some kernels repack their weights on the first one.
        rq.save_quantized(quantized, str(tmp), rq_options, ctx)
        align_pad_token_file(tmp, tok)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / MERGE_MARKER, {**marker, "requantized": rq.name, "options": rq_options.model_dump(mode="json")})
        before = logits_for(quantized, probe, tok.pad_token_id)
        del quantized
        gc.collect()
        try:
            again = rq.load_quantized(str(tmp), rq_options, ctx, training=False)
        except QpeftError as exc:
            raise QpeftError(f"--requantize {rq.name}: the saved model does not load back ({exc}); nothing was written") from None
        after = logits_for(again, probe, tok.pad_token_id)
        del again
        reload_err = float((after - before).norm() / before.norm())
        vs_merged = float((after - merged_logits).norm() / merged_logits.norm())
        if not bool(after.isfinite().all()) or reload_err > REQUANTIZE_RELOAD_TOLERANCE or vs_merged > REQUANTIZE_LOGIT_TOLERANCE:
            raise QpeftError(
                f"--requantize {rq.name}: the saved model, loaded again, gives other logits than the model it was saved from "
                f"(relative L2 {reload_err:.2e}, tolerance {REQUANTIZE_RELOAD_TOLERANCE:g}; {vs_merged:.3f} from the merged model): "
                f"its weights do not round-trip through capabilities.saves_quantized={rq.capabilities.saves_quantized!r}; nothing was written"
            )
    return {
        "quantizer": rq.name,
        "options": rq_options.model_dump(mode="json"),
        "out_dir": str(rq_dir),
        "reload_max_abs_logit_diff": float((after - before).abs().max()),
        "logit_rel_err_vs_merged": vs_merged,
        "max_abs_logit_diff_vs_merged": float((after - merged_logits).abs().max()),
    }


def align_pad_token_file(folder: Path, tok) -> None:
    """Set ``pad_token_id`` in a saved model's config.json (and generation_config.json) to the
    tokenizer's, as :func:`qpeft.modeling.align_pad_token` does in memory."""
    import json

    for name in ("config.json", "generation_config.json"):
        path = Path(folder) / name
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("pad_token_id") != tok.pad_token_id:
                data["pad_token_id"] = tok.pad_token_id
                atomic_write_json(path, data)


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def quantize(config, out_dir: str, registry: Registry, *, overrides=(), force: bool = False, say: Say = _quiet) -> dict:
    """``qpeft quantize``: load the config's base model with its quantizer, save it quantized into
    ``out_dir`` (``save_quantized``, with the tokenizer) and verify it as ``merge --requantize``
    does (:func:`requantize_merged`): loaded back from disk it must give the logits it was saved
    with, and stay within the quantizer's error of the full-precision model. A quantizer that
    cannot save its models (``saves_quantized="none"``) is refused before any weight loads."""
    resolved, registry = prepare(config, overrides, registry=registry)
    quant, options = resolved.quantizer, resolved.quantizer_options
    if quant.capabilities.saves_quantized == "none":
        raise QpeftError(
            f"quantizer {quant.name!r} cannot save quantized models (capabilities.saves_quantized is 'none'); "
            "its models exist only in memory: name it in the run config instead"
        )
    from .modeling import load_causal_lm

    ctx = _context(resolved, registry)
    model_path = resolve_model_path(resolved.config.model.name_or_path, progress=say)
    out = Path(out_dir)
    check_merge_output(out, force=force, inputs={"base model": model_path})
    tok, _ = load_tokenizer(model_path)
    probe = tokenize([{"text": "The quick brown fox jumps over the lazy dog."}], "text", tok, 64)[0]
    full = load_causal_lm(model_path, ctx)
    full_logits = logits_for(full, probe, tok.pad_token_id)
    del full
    gc.collect()
    say(f"quantizing {model_path} with {quant.name} into {out}")
    t0 = time.perf_counter()
    result = requantize_merged(
        quant, options, Path(model_path), out, tok, probe, full_logits, ctx, marker={"quantized_from": str(model_path)}
    )
    result["seconds"] = time.perf_counter() - t0
    say(
        f"quantized model written to {out}; reloaded from disk: max |Δlogit| {result['reload_max_abs_logit_diff']:.2e} vs before "
        f"saving, relative L2 {result['logit_rel_err_vs_merged']:.3f} vs the full-precision model"
    )
    return result

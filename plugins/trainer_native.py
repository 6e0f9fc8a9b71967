"""Trainer ``native``: a lean loop on accelerate — mixed precision, gradient accumulation,
clipping, linear/cosine schedules, optional 8-bit/paged optimizers, packed rows, a chunked
cross-entropy that never holds the full-vocabulary logits, atomic checkpoints and resume,
and data-parallel (DDP) or sharded (FSDP2) training under ``accelerate launch``."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, TrainerPlugin, TrainingOptions
from qpeft.context import TrainResult
from qpeft.data import IGNORE, DataSchedule, collate, count_example_tokens
from qpeft.distributed import gather_trainable_state, world_size
from qpeft.errors import ConfigError
from qpeft.integrity import DivergenceGuard, check_finite
from qpeft.modeling import param_groups, release_model


class NativeOptions(TrainingOptions):
    #: "auto": torch's fused AdamW on CUDA (one kernel for all adapter tensors; same update),
    #: adamw_torch elsewhere. "adamw_8bit" and "paged_adamw_8bit" need bitsandbytes.
    optim: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "auto"
    #: "full": cross-entropy on the float32 logits of the whole batch (as the HF Trainer).
    #: "chunked": the output head and cross-entropy run on ``loss_chunk`` tokens at a time and
    #: are recomputed in the backward pass, so full-vocabulary logits never exist at once.
    #: "auto": chunked on CUDA (memory), full on CPU.
    loss: Literal["auto", "full", "chunked"] = "auto"
    #: LoRA+ (Hayou et al. 2024): the LoRA B matrices learn at lr × this ratio (e.g. 16), the
    #: rest at lr. Null = off. Needs parameters named like peft's LoRA (``lora_B``).
    loraplus_lr_ratio: float | None = Field(None, gt=0, le=1e4)
    #: Tokens per chunk of the chunked cross-entropy (its peak memory is chunk × vocabulary).
    loss_chunk: int = Field(1024, ge=16)
    #: liger-kernel's fused RMSNorm, SwiGLU and rotary kernels (Triton, CUDA only) on Llama-family
    #: models. "auto": used when liger-kernel is installed, the run is on CUDA and the model's
    #: norm/MLP modules are the stock ones; "on": required (config error otherwise); "off".
    liger: Literal["auto", "on", "off"] = "auto"
    #: torch.compile each decoder layer (regional compilation: one compiled graph shared by the
    #: identical layers); the first steps pay the compile time. "auto": on CUDA for runs of at
    #: least 50 optimizer steps, falling back to eager execution where a backend cannot be compiled.
    compile: Literal["auto"] | bool = "auto"
    #: Move the activations kept for backward — with gradient checkpointing, each decoder layer's
    #: input — to pinned CPU memory during the forward pass (on a side stream, overlapped with
    #: compute) and back just before backward needs them (qpeft.memory.offload): the GPU then holds about
    #: one layer's activations instead of one input per layer, for longer rows. The same numbers.
    activation_offload: bool = False
    #: Memory-budget mode (qpeft.memory.activations): decoder layers whose activations are kept instead of
    #: recomputed in backward (their gradient checkpointing is off). n: the last n layers; "auto"
    #: (CUDA): as many as fit in ``memory_budget`` of the card, measured on this model and the first
    #: optimizer step, from the second step on (the notes say how many); 0: every layer recomputed.
    keep_activations: int | Literal["auto"] = 0
    #: Tiled MLP for long rows (qpeft.memory.tiled_mlp): each decoder layer's gated MLP runs on this many
    #: tokens at a time, each tile recomputed in backward, so its intermediates (4 × tokens ×
    #: intermediate size, and LoRA's) exist for one tile at a time. Costs one more MLP forward per
    #: step; the same numbers up to float summation order. Null: off.
    mlp_chunk: int | None = Field(None, ge=16)
    #: The fraction of the card's memory that keep_activations: auto plans for.
    memory_budget: float = Field(0.9, gt=0, le=1)


def _resolved_optim(o: NativeOptions, device: str) -> str:
    if o.optim != "auto":
        return o.optim
    return "adamw_torch_fused" if device == "cuda" else "adamw_torch"


def _optimizer(params, o: NativeOptions, device: str):
    import torch

    optim = _resolved_optim(o, device)

    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if optim.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, lr=o.lr, weight_decay=o.weight_decay)
    if optim == "sgd":
        return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=optim == "adamw_torch_fused")


#: compile: auto compiles runs at least this long (on an H100, compiling a 7B model's layers
#: costs tens of seconds once; a shorter run would spend more on compiling than it saves).
COMPILE_MIN_STEPS = 50


def _resolved_compile(o: NativeOptions, ctx, max_steps: int) -> bool:
    if o.compile != "auto":
        return bool(o.compile)
    return ctx.device == "cuda" and not ctx.fsdp and max_steps >= COMPILE_MIN_STEPS


#: What the native loop leaves out under FSDP (untested there, or needing parameters outside
#: the wrapped forward): option -> value FSDP cannot take.
FSDP_REFUSED = {"loss": "chunked", "compile": True, "liger": "on", "activation_offload": True}


def _liger_unavailable(device: str) -> str | None:
    """Why liger-kernel cannot be used in this run, as far as the config tells; None if it can."""
    import importlib.util

    if device != "cuda":
        return "liger-kernel's kernels are Triton kernels for CUDA; this run is on " + device
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def _apply_liger(model, options: NativeOptions, ctx, compiled: bool):
    """Swap in liger-kernel's RMSNorm, SwiGLU and rotary kernels for training (through its own
    ``apply_liger_kernel_to_llama(model=...)``); return a function that puts back the
    transformers module globals it replaces, so models built later in the process are stock."""
    if options.liger == "off" or (options.liger == "auto" and (compiled or ctx.fsdp)):
        # torch.compile fuses these ops itself, and liger's Triton kernels break its graph
        # (H100, 7B NF4: compiled 9,092 tokens/s, compiled + liger 8,183).
        return lambda: None
    reason = _liger_unavailable(ctx.device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if reason is None:
        from transformers.models.llama import modeling_llama as ml

        cfg = base.config
        layers = getattr(getattr(base, "model", None), "layers", None)
        if cfg.model_type != "llama" or layers is None:
            reason = f"qpeft uses liger-kernel on Llama-family models only (this one is {cfg.model_type!r})"
        elif getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
            reason = f"liger's SwiGLU needs a silu activation (this model: {cfg.hidden_act!r})"
        elif not all(
            type(l.mlp) is ml.LlamaMLP
            and type(l.input_layernorm) is ml.LlamaRMSNorm
            and type(l.post_attention_layernorm) is ml.LlamaRMSNorm
            for l in layers
        ):
            # An adapter that wraps these modules would be bypassed by liger's forward.
            reason = "the model's MLP or norm modules are not transformers' own (an adapter wraps them)"
    if reason is not None:
        if options.liger == "on":
            raise ConfigError("trainer.options.liger", reason)
        if ctx.device == "cuda":
            ctx.notes.append(f"native: liger-kernel not used: {reason}")
        return lambda: None
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except Exception as e:  # e.g. a Triton that does not match; "auto" then trains without it
        if options.liger == "on":
            raise ConfigError("trainer.options.liger", f"liger-kernel does not import here: {e}") from e
        ctx.notes.append(f"native: liger-kernel not used: it does not import ({type(e).__name__}: {e})")
        return lambda: None
    saved = {name: getattr(ml, name) for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=base)
    ctx.notes.append("native: liger-kernel RMSNorm, SwiGLU and rotary kernels")

    def restore():
        for name, value in saved.items():
            setattr(ml, name, value)

    return restore


def _compile_layers(model, ctx, fallback: bool):
    """torch.compile every decoder layer in place; return a function that undoes it (so evaluation
    and generation after training run eagerly instead of compiling for new shapes). ``fallback``:
    a layer that cannot be compiled runs eagerly (dynamo's suppress_errors) instead of failing."""
    import torch._dynamo
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    suppress = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = fallback
    ctx.notes.append(f"native: torch.compile on {len(layers)} decoder layers")

    def undo():
        torch._dynamo.config.suppress_errors = suppress
        for layer in layers:
            layer._compiled_call_impl = None

    return undo


def _activation_offload(model, options: NativeOptions, ctx):
    """The offload context for each forward pass (qpeft.memory.offload), or None when it is off."""
    if not options.activation_offload:
        return None
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qpeft.memory.offload import ActivationOffload

    checkpointed = sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)
    if checkpointed:
        ctx.notes.append(f"native: activation offloading to pinned CPU memory (the inputs of {checkpointed} checkpointed layers)")
    else:
        ctx.notes.append("native: activation offloading of every saved activation (no layer is checkpointed)")
    return ActivationOffload()


def _keep_activations(model, options: NativeOptions, ctx, acc):
    """keep_activations: (a function that undoes it, the auto planner or None). An explicit count
    applies now; "auto" measures one layer now (qpeft.memory.activations.AutoKeep.probe) and decides
    after the first optimizer step."""
    from qpeft.memory.activations import AutoKeep, checkpointed_layers, keep_last

    keep = options.keep_activations
    if keep == 0:
        return (lambda: None), None
    layers = checkpointed_layers(model)
    if keep != "auto":
        n = min(keep, len(layers))
        ctx.notes.append(f"native: keep_activations: {n} of {len(layers)} decoder layers keep their activations (not recomputed)")
        return keep_last(layers, n), None
    if ctx.device != "cuda" or len(layers) < 2:
        why = "it measures CUDA memory" if ctx.device != "cuda" else "fewer than 2 checkpointed layers"
        ctx.notes.append(f"native: keep_activations auto: every layer checkpointed ({why})")
        return (lambda: None), None
    planner = AutoKeep(model, layers, options.batch_size * ctx.config.data.max_length, options.memory_budget)
    with acc.autocast():
        planner.probe(acc.device)

    def undo() -> None:
        for layer in layers:
            layer.gradient_checkpointing = True

    return undo, planner


def _tile_mlps(model, tokens: int, ctx):
    """mlp_chunk: tile each decoder layer's gated MLP (qpeft.memory.tiled_mlp); return the undo."""
    from qpeft.memory.tiled_mlp import tile_mlps

    n, undo = tile_mlps(model, tokens)
    if n:
        ctx.notes.append(f"native: tiled MLP in {n} decoder layers ({tokens} tokens per tile, recomputed in backward)")
    else:
        ctx.notes.append("native: mlp_chunk: no gated MLP (gate/up/down projections) in this model's decoder layers; nothing tiled")
    return undo


def _passthrough_head(model):
    """Swap the output head for one that can hand back its input (the final hidden states)
    instead of logits; return (wrapper, original head). The wrapper owns the original, so
    parameter names change only under ``lm_head`` and trainable adapters are unaffected."""
    import torch

    head = model.get_output_embeddings()

    class PassthroughHead(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.passthrough = True

        def forward(self, x):
            return x if self.passthrough else self.inner(x)

    wrapper = PassthroughHead(head)
    model.set_output_embeddings(wrapper)
    return wrapper, head


def _chunked_ce_sum(hidden, head, labels, chunk: int, autocast):
    """Sum of token cross-entropies of ``head(hidden)`` against ``labels`` (already shifted),
    ``chunk`` rows at a time; each chunk's logits are recomputed in backward (checkpointing).
    ``autocast`` is the trainer's mixed-precision context: the head runs outside the model's
    forward (whose outputs accelerate has already cast to float32), so it must be re-entered."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h, y):
        return torch.nn.functional.cross_entropy(head(h).float(), y, ignore_index=IGNORE, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    with autocast():
        for i in range(0, hidden.size(0), chunk):
            y = labels[i : i + chunk]
            if bool((y != IGNORE).any()):
                total = total + checkpoint(chunk_loss, hidden[i : i + chunk], y, use_reentrant=False)
    return total


#: The optimizer state's file: keyed by parameter index (one process or DDP), or, under FSDP, the
#: full state keyed by parameter name (torch.distributed.checkpoint's full optimizer state dict).
OPTIMIZER_FILE = {False: "optimizer.pt", True: "optimizer_full.pt"}


def _full_state(model, trainable: dict, optimizer, sharded: bool) -> tuple[dict, dict]:
    """What a checkpoint holds of the model and optimizer: the trainable tensors and the optimizer
    state. Under FSDP both are gathered from the ranks' shards (a collective: every rank calls
    it); rank 0 receives the optimizer state."""
    if not sharded:
        return trainable, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    tensors, _ = gather_trainable_state(model)
    return tensors, get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_sharded_optimizer(path: Path, model, optimizer) -> None:
    """Under FSDP, after ``prepare``: every rank loads the full optimizer state of a checkpoint and
    keeps its own shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = _load_tensors(path / OPTIMIZER_FILE[True])
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def _save_state(path: Path, trainable: dict, optim_state: dict, scheduler, step: int, ctx, data_position: dict) -> None:
    """A checkpoint: trainable tensors (safetensors), optimizer/scheduler/RNG state, step and
    data position."""
    import random

    import torch
    from safetensors.torch import save_file

    from qpeft.checkpoint import fingerprint, mark_complete
    from qpeft.io import atomic_dir

    with atomic_dir(path) as tmp:
        save_file({k: p.detach().contiguous().cpu() for k, p in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optim_state, tmp / OPTIMIZER_FILE[bool(ctx.fsdp)])
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        mark_complete(tmp, step=step, trainer="native", config_fingerprint=fingerprint(ctx.config), data_position=data_position)


def _load_tensors(file: Path):
    """``torch.load`` restricted to tensors and plain containers; anything else is refused."""
    import pickle

    import torch

    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = next((l for l in str(exc).splitlines() if l.strip()), type(exc).__name__)
        raise ConfigError("--resume", f"{file} is not a checkpoint file qpeft wrote (refused to load it: {first[:200]})") from None


def _load_state(path: Path, trainable: dict, optimizer, scheduler, sharded: bool) -> int:
    """Restore a checkpoint written by :func:`_save_state`; return its step. ``sharded`` (FSDP):
    the optimizer state is left for :func:`_load_sharded_optimizer`, once the model is sharded."""
    import random

    import torch
    from safetensors.torch import load_file

    from qpeft.checkpoint import read_marker

    saved = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(trainable) - set(saved))
    if missing:
        raise ConfigError("--resume", f"{path} lacks trainable tensors such as {missing[0]!r}; it belongs to another adapter")
    for k, p in trainable.items():  # checked before any is copied: a bad checkpoint changes nothing
        if tuple(saved[k].shape) != tuple(p.shape):
            raise ConfigError("--resume", f"{path}: tensor {k!r} has shape {tuple(saved[k].shape)}, the adapter's is {tuple(p.shape)}")
        if saved[k].is_floating_point() and not bool(torch.isfinite(saved[k]).all()):
            raise ConfigError(
                "--resume",
                f"{path}: tensor {k!r} holds non-finite values; this checkpoint cannot be resumed (delete it to resume from an earlier one)",
            )
    with torch.no_grad():
        for k, p in trainable.items():
            p.copy_(saved[k].to(p.device, p.dtype))
    if not (path / OPTIMIZER_FILE[sharded]).is_file():
        made, now = ("without", "under") if sharded else ("under", "without")
        raise ConfigError("--resume", f"{path} was written {made} FSDP; resume it {made} FSDP, not {now}")
    # A checkpoint folder is data: every pickle is read with weights_only=True (tensors and plain
    # containers only), so a planted file cannot run code.
    if not sharded:
        optimizer.load_state_dict(_load_tensors(path / OPTIMIZER_FILE[False]))
    scheduler.load_state_dict(_load_tensors(path / "scheduler.pt"))
    rng = _load_tensors(path / "rng.pt")
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(read_marker(path)["step"])


class NativeTrainer(TrainerPlugin):
    name = "native"
    description = "lean accelerate training loop"
    Options = NativeOptions
    capabilities = Capabilities(fsdp=True)

    def check(self, options, ctx):
        if options.optim == "adamw_torch_fused" and ctx.device == "cpu":
            ctx.notes.append("native: fused AdamW on CPU runs the CPU fused kernel")
        if options.liger == "on" and (reason := _liger_unavailable(ctx.device)):
            raise ConfigError("trainer.options.liger", reason)
        for key, value in FSDP_REFUSED.items():
            if ctx.fsdp and getattr(options, key) == value:
                raise ConfigError(
                    f"trainer.options.{key}", f"{value!r} is not supported under FSDP; use auto (the native loop turns it off there)"
                )
        if options.activation_offload and ctx.config.gradient_checkpointing is False:
            raise ConfigError(
                "trainer.options.activation_offload",
                "offloads the layer inputs that gradient checkpointing keeps; set gradient_checkpointing: true (or auto)",
            )
        keep = options.keep_activations
        if isinstance(keep, int) and keep < 0:
            raise ConfigError("trainer.options.keep_activations", f"must be auto or a number of layers >= 0 (got {keep})")
        if keep != 0:
            if ctx.config.gradient_checkpointing is False:
                raise ConfigError(
                    "trainer.options.keep_activations",
                    "chooses layers to leave out of gradient checkpointing; it needs gradient_checkpointing",
                )
            if options.activation_offload:
                raise ConfigError(
                    "trainer.options.keep_activations",
                    "cannot be combined with activation_offload (the kept layers' activations would all be offloaded); choose one",
                )
            if ctx.fsdp:
                raise ConfigError("trainer.options.keep_activations", "is not supported under FSDP; use 0")
        if options.mlp_chunk is not None and ctx.fsdp:
            raise ConfigError("trainer.options.mlp_chunk", "is not supported under FSDP; use null")
        if options.mixed_precision in ("bf16", "fp16") and ctx.device == "cpu":
            raise ConfigError("trainer.options.mixed_precision", f"{options.mixed_precision} autocast is for GPUs; use auto or no on CPU")

    def train(self, model, tokenizer, train_data, eval_data, options, ctx):
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from transformers import get_scheduler

        from qpeft.checkpoint import checkpoint_dir, prune, read_marker

        precision = options.resolved_mixed_precision(ctx)
        # accelerate keeps its settings process-wide and refuses an Accelerator with other ones
        # (a second run in the same process on another device or precision): start from fresh
        # settings, as the transformers Trainer does; under `accelerate launch` the process
        # group (partial state) stays.
        AcceleratorState._reset_state(reset_partial_state=world_size() == 1)
        acc = Accelerator(mixed_precision=precision, gradient_accumulation_steps=options.grad_accum, cpu=ctx.device == "cpu")
        world, rank = acc.num_processes, acc.process_index

        # One optimizer step consumes batch_size × grad_accum examples on each of `world` ranks.
        per_rank = options.batch_size * options.grad_accum
        schedule = DataSchedule(
            train_data, seed=ctx.config.seed, per_rank=per_rank, world=world, epochs=options.epochs, max_steps=options.max_steps
        )
        max_steps = schedule.max_steps
        pad_id = tokenizer.pad_token_id

        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        params = list(trainable.values())
        optimizer = _optimizer(param_groups(trainable.items(), options.lr, options.loraplus_lr_ratio), options, ctx.device)
        if options.optim == "auto" and _resolved_optim(options, ctx.device) == "adamw_torch_fused":
            ctx.notes.append("native: fused AdamW (optim: auto on CUDA)")
        scheduler = get_scheduler(options.scheduler, optimizer, num_warmup_steps=options.warmup_steps, num_training_steps=max_steps)
        start = 0
        if ctx.resume_from:
            start = _load_state(Path(ctx.resume_from), trainable, optimizer, scheduler, sharded=bool(ctx.fsdp))
            schedule.resume(start, read_marker(ctx.resume_from).get("data_position"))
        head = wrapper = None
        # Under FSDP the head's weight is only whole inside the wrapped forward: full loss there.
        if options.loss == "chunked" or (options.loss == "auto" and ctx.device == "cuda" and not ctx.fsdp):
            wrapper, head = _passthrough_head(model)
            ctx.notes.append(f"native: chunked cross-entropy ({options.loss_chunk} tokens per chunk)")
        compiled = _resolved_compile(options, ctx, max_steps)
        offload = _activation_offload(model, options, ctx)
        model.train()
        undo_keep, planner = _keep_activations(model, options, ctx, acc)
        undo = [_apply_liger(model, options, ctx, compiled)]
        if options.mlp_chunk is not None:  # after liger: it tiles liger's SwiGLU forward
            undo.append(_tile_mlps(model, options.mlp_chunk, ctx))
        if compiled:
            undo.append(_compile_layers(model, ctx, fallback=options.compile == "auto"))
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        if ctx.fsdp:
            # fully_shard replaced the parameters by sharded ones (the optimizer was switched over
            # by accelerate); clipping must see the new ones, which hold the gradients.
            params = [p for p in model.parameters() if p.requires_grad]
            if ctx.resume_from:
                _load_sharded_optimizer(Path(ctx.resume_from), model, optimizer)
            ctx.notes.append(f"native: FSDP{ctx.fsdp} over {world} ranks (full cross-entropy, eager, no liger-kernel)")
        model.train()
        guard = DivergenceGuard(ctx, options, precision)
        # fp16's dynamic loss scaler skips a step whose scaled gradients overflowed (normal there);
        # without one, a non-finite gradient norm would write NaN into the adapter.
        scaled = acc.scaler is not None

        tokens, history, losses, largest_micro = 0, [], [], 0
        t0 = time.perf_counter()
        try:
            for step in range(start + 1, max_steps + 1):
                micro = schedule.step_examples(step)
                # Token-weighted loss over the whole step (all ranks), as the HF Trainer does;
                # DDP averages gradients over ranks, hence the factor `world`.
                n_label = sum(sum(1 for l in ex["labels"][1:] if l != IGNORE) for ex in micro)
                tokens += count_example_tokens(micro, pad_id)  # every rank counts the whole step's tokens
                mine = schedule.rank_examples(micro, rank)
                step_loss = 0.0
                for i in range(options.grad_accum):
                    lo, hi = i * options.batch_size, (i + 1) * options.batch_size
                    batch = collate(mine[lo:hi], pad_id)
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    largest_micro = max(largest_micro, batch["input_ids"].numel())
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    labels = batch["labels"][:, 1:].reshape(-1)
                    with acc.accumulate(model):
                        with offload or contextlib.nullcontext():
                            out = model(**inputs)
                            if head is not None:
                                hidden = out.logits[:, :-1].reshape(-1, out.logits.size(-1))
                                loss_sum = _chunked_ce_sum(hidden, head, labels, options.loss_chunk, acc.autocast)
                            else:
                                logits = out.logits.float()
                                loss_sum = torch.nn.functional.cross_entropy(
                                    logits[:, :-1].reshape(-1, logits.size(-1)), labels, ignore_index=IGNORE, reduction="sum"
                                )
                        loss = loss_sum / max(n_label, 1)
                        value = loss.item()
                        # Stop before a non-finite loss reaches the gradients (every rank decides alike).
                        if world > 1:
                            others = float(acc.reduce(torch.tensor(float(not math.isfinite(value)), device=acc.device), reduction="sum"))
                            if others and math.isfinite(value):
                                raise guard.diverged(step, "the training loss is non-finite on another rank")
                        guard.check_loss(step, value)
                        acc.backward(loss * options.grad_accum * world)  # accumulate() divides by grad_accum
                        if acc.sync_gradients and (options.max_grad_norm > 0 or not scaled):
                            # max_grad_norm 0: the norm alone (clipping at inf scales by exactly 1).
                            norm = acc.clip_grad_norm_(params, options.max_grad_norm if options.max_grad_norm > 0 else float("inf"))
                            if not scaled:
                                guard.check_grad_norm(step, float(norm), step_loss + value)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    step_loss += value
                if world > 1:
                    step_loss = float(acc.reduce(torch.tensor(step_loss, device=acc.device), reduction="sum"))
                guard.step_done(step, step_loss)
                if planner is not None and step == start + 1:
                    _, note = planner.decide(acc.device, largest_micro)
                    ctx.notes.append(note)
                losses.append(step_loss)
                if step % options.logging_steps == 0 or step == max_steps:
                    history.append({"step": step, "loss": step_loss, "learning_rate": scheduler.get_last_lr()[0]})
                    ctx.hooks.qpeft_on_step_end(step=step, max_steps=max_steps, logs={"loss": step_loss, "tokens": tokens}, ctx=ctx)
                if options.save_steps and (step % options.save_steps == 0 or step == max_steps):
                    acc.wait_for_everyone()
                    tensors, optim_state = _full_state(model, trainable, optimizer, sharded=bool(ctx.fsdp))
                    # Never a checkpoint to resume into a diverged state (the guard stops such runs
                    # earlier); every rank holds the full tensors, so every rank decides alike.
                    check_finite(tensors.items(), f"training diverged at step {step}: refusing to write its checkpoint")
                    if acc.is_main_process:
                        _save_state(
                            checkpoint_dir(ctx.output_dir, step), tensors, optim_state, scheduler, step, ctx, schedule.position(step)
                        )
                        prune(ctx.output_dir, options.save_total_limit)
        finally:
            undo_keep()
            for fn in undo:
                fn()
            release_model(model)
            if wrapper is not None:
                acc.unwrap_model(model).set_output_embeddings(head)
        seconds = time.perf_counter() - t0
        return TrainResult(
            train_loss=sum(losses) / max(len(losses), 1),
            steps=max_steps,
            tokens=tokens,
            seconds=seconds,
            log_history=history,
        )


@hookimpl
def qpeft_register_trainers(register):
    register(NativeTrainer())

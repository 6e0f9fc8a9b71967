"""Trainer ``hf``: the transformers Trainer, configured from qpeft's config."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, TrainerPlugin, TrainingOptions
from qpeft.context import TrainResult
from qpeft.data import DataSchedule, collate
from qpeft.distributed import world_size
from qpeft.errors import ConfigError
from qpeft.integrity import DivergenceGuard, first_non_finite
from qpeft.modeling import param_groups, release_model


class HfTrainerOptions(TrainingOptions):
    #: The Trainer's optimizer (its ``optim`` argument); the 8-bit ones need bitsandbytes.
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_bnb_8bit", "sgd"] = "adamw_torch"
    #: LoRA+ (Hayou et al. 2024): the LoRA B matrices learn at lr × this ratio (e.g. 16), the
    #: rest at lr. Null = off. Needs parameters named like peft's LoRA (``lora_B``).
    loraplus_lr_ratio: float | None = Field(None, gt=0, le=1e4)


def _loraplus_optimizer(model, args, options):
    """With ``loraplus_lr_ratio``: the optimizer ``args.optim`` names, on LoRA+ groups (the
    Trainer still builds the schedule, which scales every group's lr alike). Else None."""
    if not options.loraplus_lr_ratio:
        return None
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = param_groups(((n, p) for n, p in model.named_parameters() if p.requires_grad), args.learning_rate, options.loraplus_lr_ratio)
    for g in groups:
        g["weight_decay"] = args.weight_decay
    return cls(groups, **kwargs)


def _qpeft_callback(ctx, guard: DivergenceGuard, schedule: DataSchedule):
    """A TrainerCallback that feeds the Trainer's logged steps to qpeft's lifecycle hooks and
    marks each checkpoint complete, with its data position, once the Trainer has finished
    writing it (never one with non-finite adapter tensors)."""
    from transformers import TrainerCallback

    from qpeft.checkpoint import checkpoint_dir, fingerprint, mark_complete

    class QpeftCallback(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            # The Trainer writes checkpoints in place; without this marker (written last,
            # atomically) a checkpoint interrupted mid-write would look resumable.
            path = checkpoint_dir(ctx.output_dir, state.global_step)
            # Every rank holds the same adapter (DDP; no hf checkpoints under FSDP): all decide alike.
            trainable = ((n, p) for n, p in model.named_parameters() if p.requires_grad) if model is not None else ()
            if (bad := first_non_finite(trainable)) is not None:  # left unmarked: never resumed from
                raise guard.diverged(state.global_step, f"the adapter tensor {bad[0]!r} is non-finite in {path.name}")
            if state.is_world_process_zero:
                if path.is_dir():
                    mark_complete(
                        path,
                        step=state.global_step,
                        trainer="hf",
                        config_fingerprint=fingerprint(ctx.config),
                        data_position=schedule.position(state.global_step),
                    )

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                extra = {k: v for k, v in logs.items() if k != "loss"}
                ctx.hooks.qpeft_on_step_end(
                    step=state.global_step,
                    max_steps=state.max_steps,
                    logs={"loss": float(logs["loss"]), "tokens": int(state.num_input_tokens_seen), **extra},
                    ctx=ctx,
                )

    return QpeftCallback()


def _in_order_trainer_class(guard: DivergenceGuard):
    """A transformers Trainer that reads the training set in the order qpeft laid it out, and
    stops at the first non-finite loss (or gradient norm, where no fp16 loss scaler handles it)
    with ``guard``'s one-line error, before the optimizer applies it."""
    import torch
    from transformers import Trainer

    class InOrderTrainer(Trainer):
        _step_loss = 0.0

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            # The unscaled loss of one micro-batch (already divided for accumulation), after its
            # backward, before the optimizer step. Every rank decides alike.
            loss = super().training_step(model, inputs, num_items_in_batch)
            value, step = float(loss), self.state.global_step + 1
            if self.accelerator.num_processes > 1:
                others = float(self.accelerator.reduce(torch.tensor(float(not math.isfinite(value)), device=loss.device), reduction="sum"))
                if others and math.isfinite(value):
                    raise guard.diverged(step, "the training loss is non-finite on another rank")
            guard.check_loss(step, value)
            self._step_loss += value
            return loss

        def _get_grad_norm(self, model, grad_norm=None):
            # Called once per optimizer step, between the backward passes and optimizer.step().
            norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            step = self.state.global_step + 1
            if self.accelerator.scaler is None and norm is not None:  # fp16's scaler skips overflow steps itself
                guard.check_grad_norm(step, float(norm), self._step_loss)
            guard.step_done(step, self._step_loss)
            self._step_loss = 0.0
            return norm

    return InOrderTrainer


def _check_resume_position(path, schedule: DataSchedule) -> None:
    """The Trainer resumes by skipping ``step`` batches of its own loader: refuse a checkpoint
    whose stored data position that would not reach (another number of ranks)."""
    from qpeft.checkpoint import read_marker

    marker = read_marker(path) or {}
    position = marker.get("data_position")
    if position is None:
        return
    expected = schedule.position(int(marker["step"]))["examples_seen"]
    if int(position["examples_seen"]) != expected:
        raise ConfigError(
            "--resume",
            f"{path} stopped after {position['examples_seen']} examples, {position['per_step']} per step; with "
            f"{schedule.per_step} per step now (another number of ranks) the hf trainer would resume at {expected}: "
            "resume with the original number of processes, or use trainer native, which continues at the stored position",
        )


class HfTrainer(TrainerPlugin):
    name = "hf"
    description = "transformers Trainer"
    Options = HfTrainerOptions
    capabilities = Capabilities(fsdp=True)

    def check(self, options, ctx):
        if ctx.fsdp and options.save_steps:
            raise ConfigError(
                "trainer.options.save_steps",
                "the hf trainer's checkpoints (and --resume) are not supported under FSDP; remove save_steps, "
                "or use trainer native, whose checkpoints work under FSDP",
            )

    def train(self, model, tokenizer, train_data, eval_data, options, ctx):
        from transformers import PrinterCallback, TrainingArguments

        from qpeft.checkpoint import checkpoint_root

        if ctx.fsdp and ctx.resume_from:
            raise ConfigError("--resume", f"{ctx.resume_from}: the hf trainer does not resume under FSDP; resume without FSDP")

        precision = options.resolved_mixed_precision(ctx)
        pad_id = tokenizer.pad_token_id

        # qpeft lays out the epochs itself (same order for every trainer); the Trainer reads it in order.
        # Under `accelerate launch` each optimizer step takes batch × accumulation examples per rank.
        schedule = DataSchedule(
            train_data,
            seed=ctx.config.seed,
            per_rank=options.batch_size * options.grad_accum,
            world=world_size(),
            epochs=options.epochs,
            max_steps=options.max_steps,
        )
        max_steps = schedule.max_steps
        if ctx.resume_from:
            _check_resume_position(ctx.resume_from, schedule)

        args = TrainingArguments(
            output_dir=str(checkpoint_root(ctx.output_dir)),
            per_device_train_batch_size=options.batch_size,
            gradient_accumulation_steps=options.grad_accum,
            learning_rate=options.lr,
            lr_scheduler_type=options.scheduler,
            warmup_steps=options.warmup_steps,
            max_steps=max_steps,
            weight_decay=options.weight_decay,
            max_grad_norm=options.max_grad_norm,
            optim=options.optim,
            logging_steps=options.logging_steps,
            save_strategy="steps" if options.save_steps else "no",
            save_steps=options.save_steps or 500,
            save_total_limit=options.save_total_limit,
            report_to=[],
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=ctx.device == "cpu",
            seed=ctx.config.seed,
            data_seed=ctx.config.seed,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
            # A non-finite loss is an error (the guard below), never averaged away in the logs.
            logging_nan_inf_filter=False,
        )
        guard = DivergenceGuard(ctx, options, precision)
        trainer = _in_order_trainer_class(guard)(
            model=model,
            args=args,
            train_dataset=schedule.ordered,  # read in index order (lazily) by the SequentialSampler
            data_collator=lambda batch: collate(batch, pad_id),
            processing_class=tokenizer,  # lets the Trainer count non-pad tokens of packed rows
            callbacks=[_qpeft_callback(ctx, guard, schedule)],
            optimizers=(_loraplus_optimizer(model, args, options), None),
        )
        trainer.remove_callback(PrinterCallback)  # qpeft's progress display replaces its prints
        t0 = time.perf_counter()
        try:
            out = trainer.train(resume_from_checkpoint=ctx.resume_from)
        finally:
            release_model(model)
            with contextlib.suppress(OSError):  # the Trainer makes its output folder even when it saves nothing
                checkpoint_root(ctx.output_dir).rmdir()  # only if empty
        seconds = time.perf_counter() - t0
        history = [h for h in trainer.state.log_history if "loss" in h]
        return TrainResult(
            train_loss=float(out.training_loss),
            steps=int(out.global_step),
            tokens=int(trainer.state.num_input_tokens_seen),
            seconds=seconds,
            log_history=history,
        )


@hookimpl
def qpeft_register_trainers(register):
    register(HfTrainer())

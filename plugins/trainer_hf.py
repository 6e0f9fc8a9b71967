"""Trainer ``hf``: the transformers Trainer, configured from qpeft's config."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, TrainerPlugin
from qpeft.context import TrainResult
from qpeft.data import collate


class HfTrainerOptions(Options):
    batch_size: int = Field(4, ge=1, le=65536)
    grad_accum: int = Field(1, ge=1, le=65536)
    lr: float = Field(2e-4, gt=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    #: Passes over the data; ignored when max_steps is set.
    epochs: float = Field(1.0, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_bnb_8bit", "sgd"] = "adamw_torch"
    logging_steps: int = Field(1, ge=1)
    #: Mixed precision: "auto" = bf16/fp16 autocast when the run dtype is bf16/fp16 on a GPU.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"


def _qpeft_callback(ctx, counter):
    """A TrainerCallback that feeds the Trainer's logged steps to qpeft's lifecycle hooks."""
    from transformers import TrainerCallback

    class QpeftCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                extra = {k: v for k, v in logs.items() if k != "loss"}
                ctx.hooks.qpeft_on_step_end(
                    step=state.global_step,
                    max_steps=state.max_steps,
                    logs={"loss": float(logs["loss"]), "tokens": counter["tokens"], **extra},
                    ctx=ctx,
                )

    return QpeftCallback()


class HfTrainer(TrainerPlugin):
    name = "hf"
    description = "transformers Trainer"
    Options = HfTrainerOptions
    capabilities = Capabilities()

    def train(self, model, tokenizer, train_data, eval_data, options, ctx):
        from transformers import PrinterCallback, Trainer, TrainingArguments

        precision = options.mixed_precision
        if precision == "auto":
            precision = {"bfloat16": "bf16", "float16": "fp16"}.get(ctx.dtype, "no") if ctx.device == "cuda" else "no"
        counter = {"tokens": 0}
        pad_id = tokenizer.pad_token_id

        def collator(batch):
            out = collate(batch, pad_id)
            counter["tokens"] += int(out["attention_mask"].sum())
            return out

        args = TrainingArguments(
            output_dir=f"{ctx.output_dir}/hf-trainer",
            per_device_train_batch_size=options.batch_size,
            gradient_accumulation_steps=options.grad_accum,
            learning_rate=options.lr,
            lr_scheduler_type=options.scheduler,
            warmup_steps=options.warmup_steps,
            num_train_epochs=options.epochs,
            max_steps=options.max_steps or -1,
            weight_decay=options.weight_decay,
            max_grad_norm=options.max_grad_norm,
            optim=options.optim,
            logging_steps=options.logging_steps,
            save_strategy="no",
            report_to=[],
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=ctx.device == "cpu",
            seed=ctx.config.seed,
            data_seed=ctx.config.seed,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_data,
            data_collator=collator,
            callbacks=[_qpeft_callback(ctx, counter)],
        )
        trainer.remove_callback(PrinterCallback)  # qpeft's progress display replaces its prints
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
        history = [h for h in trainer.state.log_history if "loss" in h]
        return TrainResult(
            train_loss=float(out.training_loss),
            steps=int(out.global_step),
            tokens=counter["tokens"],
            seconds=seconds,
            log_history=history,
        )


@hookimpl
def qpeft_register_trainers(register):
    register(HfTrainer())

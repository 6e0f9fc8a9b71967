"""Trainer ``native``: a lean loop on accelerate — mixed precision, gradient accumulation,
clipping, linear/cosine schedules, optional 8-bit/paged optimizers."""

from __future__ import annotations

import time
from typing import Literal

from qpeft import hookimpl
from qpeft.api import Capabilities, TrainerPlugin, TrainingOptions
from qpeft.context import TrainResult
from qpeft.modeling import release_model
from qpeft.data import IGNORE, collate, ordered_examples, plan_steps
from qpeft.errors import ConfigError


class NativeOptions(TrainingOptions):
    #: "adamw_8bit" and "paged_adamw_8bit" need bitsandbytes.
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw_torch"


def _optimizer(params, o: NativeOptions):
    import torch

    if o.optim in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if o.optim.startswith("paged") else bnb.optim.AdamW8bit
        return cls(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optim == "sgd":
        return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=o.optim == "adamw_torch_fused")


class NativeTrainer(TrainerPlugin):
    name = "native"
    description = "lean accelerate training loop"
    Options = NativeOptions
    capabilities = Capabilities()

    def check(self, options, ctx):
        if options.optim == "adamw_torch_fused" and ctx.device == "cpu":
            ctx.notes.append("native: fused AdamW on CPU runs the CPU fused kernel")
        if options.mixed_precision in ("bf16", "fp16") and ctx.device == "cpu":
            raise ConfigError("trainer.options.mixed_precision", f"{options.mixed_precision} autocast is for GPUs; use auto or no on CPU")

    def train(self, model, tokenizer, train_data, eval_data, options, ctx):
        import torch
        from accelerate import Accelerator
        from transformers import get_scheduler

        precision = options.resolved_mixed_precision(ctx)
        acc = Accelerator(mixed_precision=precision, gradient_accumulation_steps=options.grad_accum, cpu=ctx.device == "cpu")

        per_step = options.batch_size * options.grad_accum
        max_steps, epochs = plan_steps(len(train_data), per_step, options.epochs, options.max_steps)
        examples = ordered_examples(train_data, ctx.config.seed, epochs)
        pad_id = tokenizer.pad_token_id

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(params, options)
        scheduler = get_scheduler(options.scheduler, optimizer, num_warmup_steps=options.warmup_steps, num_training_steps=max_steps)
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        model.train()

        tokens, history, losses = 0, [], []
        t0 = time.perf_counter()
        pos = 0
        for step in range(1, max_steps + 1):
            micro = [examples[(pos + i) % len(examples)] for i in range(per_step)]
            pos += per_step
            # Token-weighted loss over the whole accumulated batch, as the HF Trainer does.
            n_label = sum(sum(1 for l in ex["labels"][1:] if l != IGNORE) for ex in micro)
            step_loss = 0.0
            for i in range(options.grad_accum):
                batch = collate(micro[i * options.batch_size : (i + 1) * options.batch_size], pad_id)
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                tokens += int(batch["attention_mask"].sum())
                with acc.accumulate(model):
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    logits = out.logits.float()
                    loss_sum = torch.nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                        ignore_index=IGNORE, reduction="sum",
                    )
                    loss = loss_sum / max(n_label, 1)
                    acc.backward(loss * options.grad_accum)  # accumulate() divides by grad_accum
                    if acc.sync_gradients and options.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, options.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.item()
            losses.append(step_loss)
            if step % options.logging_steps == 0 or step == max_steps:
                history.append({"step": step, "loss": step_loss, "learning_rate": scheduler.get_last_lr()[0]})
                ctx.hooks.qpeft_on_step_end(step=step, max_steps=max_steps, logs={"loss": step_loss, "tokens": tokens}, ctx=ctx)
        seconds = time.perf_counter() - t0
        release_model(model)
        return TrainResult(
            train_loss=sum(losses) / len(losses), steps=max_steps, tokens=tokens, seconds=seconds, log_history=history
        )


@hookimpl
def qpeft_register_trainers(register):
    register(NativeTrainer())

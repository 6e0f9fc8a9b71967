"""Trainers ``dpo``, ``orpo``, ``simpo``, ``kto`` and ``grpo``: TRL's trainers (trl 1.16) on
qpeft's quantized base and adapter.

qpeft reads, checks and renders the rows (:mod:`qpeft.data.objectives`) before any weight
loads; these plugins hand them to TRL as ``datasets.Dataset`` objects, with TRL's own
tokenization, losses and metrics. The reference model of ``dpo`` and ``kto`` is the base with
the adapter disabled: TRL 1.16 adds a frozen copy of a passed PEFT model's adapter (named
"ref") as its reference, which qpeft removes right after the trainer is built (a fresh
adapter's copy computes what the disabled adapter does, at the cost of a second adapter in
memory and in the saved folder; and for methods whose fresh adapter is not the identity,
such as prefix tuning, it would not be the base). ``orpo``, ``simpo`` and ``grpo`` (with
``beta: 0``, its default) need no reference model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time
from typing import Any, ClassVar, Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, TrainerPlugin, TrainingOptions
from qpeft.context import TrainResult
from qpeft.errors import ConfigError, TrainingDiverged
from qpeft.modeling import release_model

#: TRL's logged metrics shown beside the loss in the progress display, under shorter names.
SHOWN = {
    "rewards/accuracies": "acc",
    "rewards/margins": "margin",
    "reward": "reward",
    "kl": "kl",
}
#: TRL's metrics kept in the run summary (train: the last logged step's; eval: before/after).
KEPT = (
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "log_odds_ratio",
    "nll_loss",
    "kl",
    "reward",
    "reward_std",
    "completions/mean_length",
)


class TrlOptions(TrainingOptions):
    #: Peak learning rate (preference tuning of an adapter wants less than SFT's 2e-4).
    lr: float = Field(5e-5, gt=0, lt=1)
    #: The Trainer's optimizer (its ``optim`` argument); the 8-bit ones need bitsandbytes.
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_bnb_8bit", "sgd"] = "adamw_torch"


class DpoOptions(TrlOptions):
    #: β: how far the policy may move from the reference (higher = less).
    beta: float = Field(0.1, gt=0, le=100)
    #: TRL's DPO loss (``DPOConfig.loss_type``).
    loss_type: Literal[
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
    ] = "sigmoid"
    #: Label smoothing of robust DPO / EXO (0 = none).
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class OrpoOptions(TrlOptions):
    #: λ: weight of the odds-ratio term against the chosen answer's NLL.
    beta: float = Field(0.1, gt=0, le=100)


class SimpoOptions(TrlOptions):
    #: β: the reward scale of SimPO (the paper uses 2.0-2.5).
    beta: float = Field(2.0, gt=0, le=100)
    #: γ/β: the target reward margin (TRL's ``simpo_gamma``).
    gamma: float = Field(0.5, ge=0, le=100)


class KtoOptions(TrlOptions):
    #: β: how far the policy may move from the reference.
    beta: float = Field(0.1, gt=0, le=100)
    #: Loss weights of desirable and undesirable rows (balance them when the counts differ).
    desirable_weight: float = Field(1.0, gt=0, le=100)
    undesirable_weight: float = Field(1.0, gt=0, le=100)


class GrpoOptions(TrlOptions):
    #: Reward functions: shipped ones (exact_answer, short_answer) or ``module:function`` entry points.
    rewards: list[str] = Field(default_factory=lambda: ["exact_answer", "short_answer"], min_length=1)
    #: Weights of the rewards (default: 1 each).
    reward_weights: list[float] | None = None
    #: Completions sampled per prompt (the group whose rewards are compared); the batch
    #: (batch_size × grad_accum) must be a multiple of it.
    num_generations: int = Field(4, ge=2, le=1024)
    #: Most tokens generated per completion.
    max_completion_length: int = Field(32, ge=1, le=65536)
    #: Sampling temperature.
    temperature: float = Field(1.0, gt=0, le=10)
    #: KL coefficient against the reference (the base with the adapter disabled); 0 = no reference pass.
    beta: float = Field(0.0, ge=0, le=100)
    #: TRL's GRPO loss (``GRPOConfig.loss_type``).
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"


def _callback(ctx, name: str):
    """Feeds TRL's logged steps to qpeft's lifecycle hooks (``metrics``: the objective's own) and
    stops at the first non-finite loss."""
    from transformers import TrainerCallback

    class QpeftCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged: trainer {name} logged a non-finite loss ({loss}) at step {state.global_step}",
                    step=state.global_step,
                )
            shown = {short: float(logs[k]) for k, short in SHOWN.items() if k in logs}
            tokens = int(state.num_input_tokens_seen or logs.get("num_tokens") or 0)
            ctx.hooks.qpeft_on_step_end(
                step=state.global_step, max_steps=state.max_steps, logs={"loss": loss, "tokens": tokens, "metrics": shown}, ctx=ctx
            )

    return QpeftCallback()


def drop_reference_copy(model) -> bool:
    """Remove the "ref" adapter TRL 1.16 adds to a passed PEFT model (a frozen copy of the
    trained adapter), so that its reference passes run with the adapter disabled: the base.
    Returns whether there was one."""
    config = getattr(model, "peft_config", None)
    if not config or "ref" not in config:
        return False
    model.delete_adapter("ref")
    model.set_adapter("default")
    return True


def _picked(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key in KEPT:
        if f"{prefix}{key}" in metrics:
            out[key] = round(float(metrics[f"{prefix}{key}"]), 4)
    return out


class _TrlTrainer(TrainerPlugin):
    """What the TRL-based trainers share: the arguments, the run, the metrics."""

    capabilities = Capabilities()
    #: Module and class of the TRL trainer and its config.
    trl_trainer: ClassVar[tuple[str, str, str]]

    def check(self, options, ctx):
        for module in ("trl", "datasets"):
            if importlib.util.find_spec(module) is None:
                raise ConfigError("trainer.name", f"trainer {self.name!r} needs {module}: pip install 'qpeft[trl]'")
        if options.save_steps:
            raise ConfigError(
                "trainer.options.save_steps",
                f"trainer {self.name!r} writes no checkpoints (so --resume has nothing to continue from); remove save_steps",
            )
        if ctx.fsdp:
            raise ConfigError("trainer.name", f"trainer {self.name!r} is not tested under FSDP")

    def trl_args(self, options) -> dict:
        """The TRL config fields of this objective's own options."""
        return {}

    def trainer_kwargs(self, options, ctx) -> dict:
        return {}

    def _config(self, options, ctx, tokenizer):
        import importlib

        from qpeft.checkpoint import checkpoint_root

        module, _, config_name = self.trl_trainer
        config_cls = getattr(importlib.import_module(module), config_name)
        precision = options.resolved_mixed_precision(ctx)
        args: dict[str, Any] = dict(
            output_dir=str(checkpoint_root(ctx.output_dir)),
            per_device_train_batch_size=options.batch_size,
            per_device_eval_batch_size=options.batch_size,
            gradient_accumulation_steps=options.grad_accum,
            learning_rate=options.lr,
            lr_scheduler_type=options.scheduler,
            warmup_steps=options.warmup_steps,
            max_steps=options.max_steps or -1,
            num_train_epochs=options.epochs,
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
            dataloader_num_workers=0,
            disable_tqdm=True,
            # qpeft's quantizer already turned gradient checkpointing on or off (prepare_for_training)
            gradient_checkpointing=False,
            logging_nan_inf_filter=False,
            include_num_input_tokens_seen="non_padding",
        )
        if self.name != "grpo":
            args["max_length"] = ctx.config.data.max_length
        args.update(self.trl_args(options))
        return config_cls(**args)

    def train(self, model, tokenizer, train_data, eval_data, options, ctx):
        import importlib

        import datasets
        from transformers import PrinterCallback

        from qpeft.checkpoint import checkpoint_root

        module, trainer_name, _ = self.trl_trainer
        trainer_cls = getattr(importlib.import_module(module), trainer_name)
        args = self._config(options, ctx, tokenizer)
        train_ds = datasets.Dataset.from_list(list(train_data))
        eval_ds = datasets.Dataset.from_list(list(eval_data)) if eval_data else None
        with _quiet_datasets():
            trainer = trainer_cls(
                model=model,
                args=args,
                train_dataset=train_ds,
                eval_dataset=eval_ds,
                processing_class=tokenizer,
                callbacks=[_callback(ctx, self.name)],
                **self.trainer_kwargs(options, ctx),
            )
        trainer.remove_callback(PrinterCallback)
        if drop_reference_copy(model):
            ctx.notes.append(f"{self.name}: reference = the base with the adapter disabled (TRL's copy of the adapter removed)")
        metrics: dict[str, Any] = {}
        evaluate = ctx.config.evaluate and eval_ds is not None
        if evaluate:
            metrics["eval_before"] = _picked(trainer.evaluate(), "eval_")
        t0 = time.perf_counter()
        try:
            out = trainer.train()
        finally:
            release_model(model)
            with contextlib.suppress(OSError):
                checkpoint_root(ctx.output_dir).rmdir()  # only if empty
        seconds = time.perf_counter() - t0
        history = [h for h in trainer.state.log_history if "loss" in h]
        if history:
            metrics["train_last_step"] = _picked(history[-1])
        if evaluate:
            metrics["eval_after"] = _picked(trainer.evaluate(), "eval_")
        tokens = int(trainer.state.num_input_tokens_seen or 0) or int(max((h.get("num_tokens", 0) for h in history), default=0))
        return TrainResult(
            train_loss=float(out.training_loss),
            steps=int(out.global_step),
            tokens=tokens,
            seconds=seconds,
            log_history=history,
            metrics=metrics,
        )


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets``' map progress bars off while TRL tokenizes (qpeft's display owns the terminal)."""
    import datasets

    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets.utils.logging.enable_progress_bar()


class DpoTrainer(_TrlTrainer):
    name = "dpo"
    description = "TRL DPOTrainer: direct preference optimisation on prompt/chosen/rejected pairs"
    data_kind = "preference"
    Options = DpoOptions
    trl_trainer = ("trl", "DPOTrainer", "DPOConfig")

    def trl_args(self, options):
        return {"beta": options.beta, "loss_type": [options.loss_type], "label_smoothing": options.label_smoothing}


class OrpoTrainer(_TrlTrainer):
    name = "orpo"
    description = "TRL ORPOTrainer: odds-ratio preference optimisation (no reference model)"
    data_kind = "preference"
    Options = OrpoOptions
    trl_trainer = ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig")

    def trl_args(self, options):
        return {"beta": options.beta}


class SimpoTrainer(_TrlTrainer):
    name = "simpo"
    description = "TRL CPOTrainer with the SimPO loss: length-normalised rewards, no reference model"
    data_kind = "preference"
    Options = SimpoOptions
    trl_trainer = ("trl.experimental.cpo", "CPOTrainer", "CPOConfig")

    def trl_args(self, options):
        return {"beta": options.beta, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": options.gamma}


class KtoTrainer(_TrlTrainer):
    name = "kto"
    description = "TRL KTOTrainer: Kahneman-Tversky optimisation on unpaired prompt/completion/label rows"
    data_kind = "unpaired"
    Options = KtoOptions
    trl_trainer = ("trl", "KTOTrainer", "KTOConfig")

    def trl_args(self, options):
        return {"beta": options.beta, "desirable_weight": options.desirable_weight, "undesirable_weight": options.undesirable_weight}


class GrpoTrainer(_TrlTrainer):
    name = "grpo"
    description = "TRL GRPOTrainer: group-relative policy optimisation with reward functions, HF generation"
    data_kind = "prompts"
    Options = GrpoOptions
    trl_trainer = ("trl", "GRPOTrainer", "GRPOConfig")

    def check(self, options, ctx):
        from qpeft.rewards import check_reward_name

        super().check(options, ctx)
        for i, name in enumerate(options.rewards):
            check_reward_name(name, f"trainer.options.rewards.{i}")
        if options.reward_weights is not None and len(options.reward_weights) != len(options.rewards):
            raise ConfigError(
                "trainer.options.reward_weights", f"has {len(options.reward_weights)} weights for {len(options.rewards)} rewards"
            )
        per_step = options.batch_size * options.grad_accum
        if per_step % options.num_generations:
            raise ConfigError(
                "trainer.options.num_generations",
                f"{options.num_generations} does not divide the {per_step} completions of a step (batch_size × grad_accum)",
            )

    def trl_args(self, options):
        return {
            "num_generations": options.num_generations,
            "max_completion_length": options.max_completion_length,
            "temperature": options.temperature,
            "beta": options.beta,
            "loss_type": options.loss_type,
            "reward_weights": options.reward_weights,
            "use_vllm": False,
        }

    def trainer_kwargs(self, options, ctx):
        from qpeft.rewards import load_reward

        funcs = []
        for i, name in enumerate(options.rewards):
            func = load_reward(name, f"trainer.options.rewards.{i}")
            funcs.append(func)
        return {"reward_funcs": funcs}


@hookimpl
def qpeft_register_trainers(register):
    for plugin in (DpoTrainer(), OrpoTrainer(), SimpoTrainer(), KtoTrainer(), GrpoTrainer()):
        register(plugin)

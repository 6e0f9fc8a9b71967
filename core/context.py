"""Objects the orchestrator hands to plugins during a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunContext:
    """Everything a plugin may need to know about the run it takes part in."""

    #: The validated run configuration (:class:`qpeft.config.RunConfig`).
    config: Any
    #: Resolved device type: "cpu" or "cuda".
    device: str
    #: Resolved torch dtype name for compute/weights: "float32", "bfloat16" or "float16".
    dtype: str
    #: Output directory of the run (may not exist yet during checks).
    output_dir: str
    #: The plugin manager's hook caller: ``ctx.hooks.qpeft_on_step_end(...)``.
    hooks: Any = None
    #: Tokenizer, once loaded (plugins that need the pad/eos ids read them here).
    tokenizer: Any = None
    #: Free-form notes plugins add for the run summary (e.g. "gradient checkpointing off").
    notes: list[str] = field(default_factory=list)
    #: A complete checkpoint folder to resume training from (``qpeft run --resume``), or None.
    resume_from: str | None = None
    #: The FSDP version the run was launched with (``accelerate launch --use_fsdp``), or None.
    fsdp: int | None = None
    #: The run's quantizer plugin and its validated options (a PEFT method that needs the
    #: quantizer's optional hooks, e.g. LoRA's LoftQ init, reads them here); None when unknown.
    quantizer: Any = None
    quantizer_options: Any = None
    #: The run's training rows (a :class:`qpeft.data.TokenDataset` for "lm" trainers), set before
    #: the adapter is attached, for data-driven adapter inits (LoRA's EVA); None when not loaded.
    train_data: Any = None

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@dataclass
class TrainResult:
    """What a trainer reports back."""

    train_loss: float
    steps: int
    tokens: int
    seconds: float
    #: One dict per logged step: {"step", "loss", ...}.
    log_history: list[dict] = field(default_factory=list)
    #: The objective's own measurements (reward accuracy, margins, mean reward, ...), written
    #: to the run summary as ``objective_metrics``.
    metrics: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

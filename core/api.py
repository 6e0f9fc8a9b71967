"""What a backend plugin is: a named object with an options model and declared capabilities.

Third-party packages subclass :class:`QuantizerPlugin`, :class:`PeftPlugin`,
:class:`TrainerPlugin` or :class:`EvaluatorPlugin` and register instances through the hooks in
:mod:`qpeft.hookspecs`.
Class attributes are read before any weight is loaded, so plugin modules must import only
light things at module level (pydantic, qpeft) and their backend libraries inside methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from . import API_VERSION
from .config import StrictModel

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext, TrainResult


class Options(StrictModel):
    """Base for plugin options models: unknown keys are errors, values are validated (numbers
    finite and within 64 bits, text without NUL: :class:`qpeft.config.StrictModel`)."""

    model_config = ConfigDict(validate_assignment=True)


class NoOptions(Options):
    """For plugins that take no options."""


class TrainingOptions(Options):
    """Options every trainer understands; a trainer plugin subclasses it and adds its own."""

    #: Examples (or packed rows) per forward pass.
    batch_size: int = Field(4, ge=1, le=65536)
    #: Forward passes whose gradients are summed per optimizer step (the effective batch is
    #: batch_size × grad_accum × the number of processes).
    grad_accum: int = Field(1, ge=1, le=65536)
    #: Peak learning rate (learning_rate in transformers).
    lr: float = Field(2e-4, gt=0, lt=1)
    #: Learning-rate schedule after the warmup.
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    #: Optimizer steps of linear warmup from 0 to lr.
    warmup_steps: int = Field(0, ge=0)
    #: Passes over the data (each in a seed-fixed order); ignored when max_steps is set.
    epochs: float = Field(1.0, gt=0, le=1000)
    #: Stop after this many optimizer steps (null = epochs decide).
    max_steps: int | None = Field(None, ge=1)
    #: AdamW weight decay of the trainable parameters.
    weight_decay: float = Field(0.0, ge=0, le=10)
    #: Clip the gradient norm to this (0 = no clipping).
    max_grad_norm: float = Field(1.0, ge=0)
    #: Record the loss every this many optimizer steps.
    logging_steps: int = Field(1, ge=1)
    #: "auto" = bf16/fp16 autocast when the run dtype is bf16/fp16 on a GPU, else none.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    #: Write a checkpoint (adapter, optimizer, scheduler, RNG, data position) every this many
    #: optimizer steps under OUTPUT_DIR/checkpoints/; null = no checkpoints. ``--resume`` uses them.
    save_steps: int | None = Field(None, ge=1)
    #: Checkpoints kept (the newest ones).
    save_total_limit: int = Field(2, ge=1)

    def resolved_mixed_precision(self, ctx: RunContext) -> str:
        """ "no", "bf16" or "fp16" for this run."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return {"bfloat16": "bf16", "float16": "fp16"}.get(ctx.dtype, "no") if ctx.device == "cuda" else "no"


@dataclass(frozen=True)
class Capabilities:
    """What a plugin can do, checked by the orchestrator before any weight is loaded.

    Fields that do not apply to a plugin kind keep their defaults.
    """

    #: Device types this backend runs on ("cpu", "cuda").
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: Quantizer: adapters can be trained on top of it. PEFT method: it has trainable params.
    trainable: bool = True
    #: PEFT method: the adapter can be merged into base weights.
    mergeable: bool = False
    #: Quantizer: where full-precision weights for a merge come from:
    #: "self" (already full precision), "dequantize" (from the quantized weights),
    #: "original" (the checkpoint that was quantized), or "none" (cannot merge).
    merge_source: Literal["self", "dequantize", "original", "none"] = "self"
    #: Plugins of other kinds this one is known not to work with: name -> reason.
    incompatible: dict[str, str] = field(default_factory=dict)
    #: PEFT method / quantizer: gradient checkpointing can be used with it.
    grad_checkpointing: bool = True
    #: Quantizer: bits per weight (for memory reporting); None for full precision. When the
    #: options choose the width, override :meth:`QuantizerPlugin.bits` (this is its default).
    bits: float | None = None
    #: Quantizer: how a loaded model is saved quantized (``qpeft merge --requantize``, the kit's
    #: save check): "transformers" = ``save_pretrained`` writes a folder that plain
    #: ``AutoModelForCausalLM.from_pretrained`` loads quantized (its ``quantization_config`` is in
    #: config.json); "plugin" = the plugin's own ``save_quantized``/``load_quantized`` write and
    #: read it; "none" = it cannot be saved quantized (``--requantize`` refuses before loading).
    saves_quantized: Literal["transformers", "plugin", "none"] = "none"
    #: PEFT method: works with packed rows (``data.packing``), i.e. with position ids that
    #: restart per document and no padding mask.
    packing: bool = True
    #: Trains under FSDP (``accelerate launch --use_fsdp --fsdp_version 2``): declared only by the
    #: backends whose FSDP run has been tested; the others are refused under FSDP before loading.
    fsdp: bool = False
    #: Quantizer: the kind of linear layer the loaded model holds, which PEFT methods check
    #: against their ``layer_kinds``: "float" (``torch.nn.Linear`` with float weights),
    #: "bnb-4bit", "bnb-8bit", "gptq", "torchao" (``nn.Linear`` holding a torchao tensor), or a
    #: new name for a new layer type. None = not declared (methods that wrap layers refuse it).
    linear_layers: str | None = None
    #: PEFT method: the quantizers' ``linear_layers`` kinds peft can wrap with this method, each
    #: tested in tests/test_matrix.py; None = the method wraps no linear layer itself (prompt
    #: learning) or accepts any kind peft dispatches (LoRA). Other kinds are refused before
    #: loading, with ``layer_note`` as the reason.
    layer_kinds: tuple[str, ...] | None = None
    #: PEFT method: why kinds outside ``layer_kinds`` are refused (shown in the refusal).
    layer_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Plugin:
    #: Name users write in the config (e.g. "bnb-nf4", "lora", "hf").
    name: ClassVar[str]
    #: One line shown by ``qpeft plugins``.
    description: ClassVar[str] = ""
    #: pydantic model of the ``options`` mapping of this plugin's config section.
    Options: ClassVar[type[Options]] = NoOptions
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: qpeft plugin API version this plugin targets.
    api_version: ClassVar[int] = API_VERSION

    def check(self, options: Options, ctx: RunContext) -> None:
        """Refuse a configuration the options model alone cannot judge (raise ConfigError).

        Runs before any weight is loaded; ``ctx.device`` is already resolved.
        """


class QuantizerPlugin(_Plugin):
    """Loads a base model quantized, and prepares it for adapter training."""

    #: Distributions whose versions key the quantized-base cache (:mod:`qpeft.quantized_cache`):
    #: the backend library that computes the quantized weights, e.g. ``("hqq",)``.
    backend_packages: ClassVar[tuple[str, ...]] = ()

    def load(self, model_path: str, options: Options, ctx: RunContext, *, training: bool):
        """Return a ``PreTrainedModel`` loaded from ``model_path`` (a local folder or hub id).

        ``training`` says whether adapters will be trained on it, so the plugin can pick
        kernels that support backward (and not inference-only ones).
        """
        raise NotImplementedError

    def prepare_for_training(self, model, options: Options, ctx: RunContext, *, grad_checkpointing: bool):
        """Make the loaded model ready for adapter training (freeze base, cast norms, ...)."""
        return model

    def ensure_training_kernels(self, model, options: Options) -> None:
        """Undo any switch to inference-only kernels that an eval forward may have made.

        Called by the orchestrator after every evaluation pass on a model that will train
        or be merged again (docs/architecture.md, library facts: some kernels switch silently and corrupt
        gradients and dequantization afterwards).
        """

    def full_precision_model(self, model, model_path: str, options: Options, ctx: RunContext):
        """Return a full-precision model to merge adapters into (see ``merge_source``)."""
        raise NotImplementedError(f"quantizer {self.name!r} cannot provide full-precision weights")

    def dequantized_weight(self, module, options: Options):
        """The float weight (``out_features × in_features``) that the quantized linear layer
        ``module`` of a model this plugin loaded multiplies with — dequantize(quantize(W)) of the
        checkpoint's ``W`` — or None when ``module`` is not one of its quantized layers (a layer
        it left in full precision).

        Optional. A quantizer that implements it supports LoRA's ``init: loftq`` (peft's
        ``replace_lora_weights_loftq``, for any quantizer): qpeft reads each layer's
        full-precision ``W`` from the safetensors checkpoint (one layer at a time) and starts
        the adapter at the rank-r SVD of ``W - dequantized_weight``, so that base + adapter
        approximates ``W``. Quantizers that do not implement it have LoftQ refused before any
        weight loads. Return a new tensor (float32 or the compute dtype, on the module's
        device); never change ``module``. Such an adapter corrects *this* base: merge it into
        these dequantized weights (``merge_source="dequantize"``), not into the original ``W``.
        """
        raise NotImplementedError(f"quantizer {self.name!r} does not expose its dequantized weights")

    def bits(self, options: Options) -> float | None:
        """Bits per weight of the quantized layers with these options (None: full precision).

        Default: ``capabilities.bits``. Override it when an option chooses the width (gptq's
        ``bits``); the conformance kit checks the storage of every option set against it.
        """
        return self.capabilities.bits

    def storage_bytes(self, model, options: Options) -> int:
        """Bytes of weights the loaded ``model`` holds (what qpeft reports as weight memory).

        Default: every storage reachable from the model's modules counted once — parameters,
        buffers, tensors kept as module attributes or hanging off parameters (bitsandbytes'
        ``quant_state``), tensor subclasses by their inner tensors (:mod:`qpeft.accounting`).
        Override it only if your layers hold memory that is not reachable that way.
        """
        from .accounting import held_bytes

        return held_bytes(model)

    def count_parameters(self, model, options: Options) -> tuple[int, int]:
        """``(trainable, total)`` parameters of ``model`` at their logical (unquantized) size.

        Default (:func:`qpeft.accounting.parameter_counts`): a linear layer holding its weight
        in another form (packed codes, scales, zero points in parameters or buffers) counts
        ``in_features × out_features`` (+ bias) once; other parameters count their elements.
        """
        from .accounting import parameter_counts

        return parameter_counts(model)

    def cache_key(self, options: Options) -> dict | None:
        """Parts of the quantized-base cache key beyond what qpeft puts there itself (the base's
        content fingerprint, this quantizer's name and options, dtype, device, versions; see
        :mod:`qpeft.quantized_cache`): e.g. a digest of the calibration data a path option names.
        None: never cache this quantizer's models (it caches them itself, or reading a saved copy
        back is no faster than quantizing). Default: ``{}`` (cached whenever ``saves_quantized``
        is not "none" and the options quantize)."""
        return {}

    def save_quantized(self, model, out_dir: str, options: Options, ctx: RunContext) -> None:
        """Write the loaded quantized ``model`` into ``out_dir`` (safetensors only).

        Default for ``saves_quantized="transformers"``: ``model.save_pretrained``. A plugin
        declaring ``"plugin"`` implements it together with :meth:`load_quantized`.
        """
        if self.capabilities.saves_quantized != "transformers":
            raise NotImplementedError(f"quantizer {self.name!r} cannot save quantized models (capabilities.saves_quantized)")
        model.save_pretrained(out_dir, safe_serialization=True)

    def load_quantized(self, path: str, options: Options, ctx: RunContext, *, training: bool = False):
        """Load a model that :meth:`save_quantized` wrote into ``path``.

        Default for ``saves_quantized="transformers"``: plain ``from_pretrained`` (the folder's
        config.json names the quantization), refusing a checkpoint that lacks weights the
        model needs (transformers would initialise them at random).
        """
        if self.capabilities.saves_quantized != "transformers":
            raise NotImplementedError(f"quantizer {self.name!r} cannot load saved quantized models (capabilities.saves_quantized)")
        from .modeling import load_causal_lm

        return load_causal_lm(path, ctx)


class PeftPlugin(_Plugin):
    """Attaches a parameter-efficient adapter to a model, saves and reloads it."""

    def attach(self, model, options: Options, ctx: RunContext):
        """Return the model wrapped with a fresh, trainable adapter (a ``peft.PeftModel``)."""
        raise NotImplementedError

    def load_adapter(self, model, adapter_dir: str, ctx: RunContext, *, trainable: bool = False):
        """Return ``model`` with the adapter saved in ``adapter_dir`` loaded onto it.

        The default reads PEFT's format with ``PeftModel.from_pretrained`` (safetensors).
        """
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)

    def save(self, model, out_dir: str) -> None:
        """Write the adapter in PEFT format (safetensors only) into ``out_dir``."""
        model.save_pretrained(out_dir, safe_serialization=True)

    def unload(self, model):
        """Return the base model of ``model`` with the adapter layers removed, not merged
        (``qpeft merge`` takes the quantized base back this way before dequantizing it)."""
        return model.unload() if hasattr(model, "unload") else model

    def merge(self, model):
        """Return the base model with the adapter merged in (only if ``mergeable``)."""
        raise NotImplementedError(f"peft method {self.name!r} cannot be merged")


class TrainerPlugin(_Plugin):
    """Runs the optimisation loop over a tokenized dataset."""

    #: The data this trainer consumes (:data:`qpeft.data.objectives.DATA_KINDS`): "lm"
    #: (language-modelling rows, tokenized into :class:`qpeft.data.TokenDataset`), "preference"
    #: (prompt/chosen/rejected pairs), "unpaired" (prompt/completion/label) or "prompts" (prompts
    #: for reward functions). For the kinds other than "lm", qpeft reads, checks and renders
    #: the rows before any weight loads and ``train`` receives them as lists of dicts
    #: (:mod:`qpeft.data.objectives`).
    data_kind: ClassVar[str] = "lm"

    def train(self, model, tokenizer, train_data, eval_data, options: Options, ctx: RunContext) -> TrainResult:
        """Train the trainable parameters of ``model``; return a :class:`TrainResult`.

        ``train_data``/``eval_data`` are map-style datasets (:class:`qpeft.data.TokenDataset`):
        ``len(data)`` examples, ``data[i]`` a dict of lists with ``input_ids``, ``labels``
        (``-100`` where no loss is taken) and, for packed data, ``position_ids``; read lazily
        from a memory-mapped token store, so never copy them into a list. Follow qpeft's
        example order and data position with :class:`qpeft.data.DataSchedule` (own loop: its
        ``step_examples``/``rank_examples``) or hand its ``ordered`` view to a loader that reads
        in index order; store ``schedule.position(step)`` in each checkpoint
        (``qpeft.checkpoint.mark_complete(..., data_position=...)``) and call
        ``schedule.resume(step, position)`` on ``--resume``. Batch with
        :func:`qpeft.data.collate`. Call ``ctx.hooks.qpeft_on_step_end`` after each optimizer
        step so lifecycle plugins and the progress display see it (``logs["metrics"]``, a dict of
        floats, is shown beside the loss).

        A trainer whose ``data_kind`` is not "lm" receives rendered rows instead
        (:class:`qpeft.data.objectives.ObjectiveData`'s ``train``/``val`` lists) and reports its
        objective's own measurements in ``TrainResult.metrics`` (the run summary's
        ``objective_metrics``).
        """
        raise NotImplementedError


class TrackerPlugin(_Plugin):
    """Records a run in an experiment tracker (TensorBoard, MLflow, W&B), chosen by name in the
    config's ``trackers`` list. A tracker is a lifecycle plugin that takes part only in the
    runs that name it: :meth:`start` returns an object implementing ``qpeft_on_*`` hooks, which
    qpeft registers for the run and unregisters after :meth:`finish`."""

    #: The Python package the tracker writes with (checked before any weight loads).
    requires: ClassVar[str] = ""
    #: The pip extra that installs it (named in the error when it is missing).
    extra: ClassVar[str] = ""

    def check(self, options: Options, ctx: RunContext) -> None:
        """Refuse the tracker when its package is not installed (before any weight loads)."""
        import importlib.util

        from .errors import ConfigError

        if self.requires and importlib.util.find_spec(self.requires) is None:
            raise ConfigError(
                "trackers",
                f"tracker {self.name!r} needs the {self.requires} package: pip install 'qpeft[{self.extra or self.requires}]'",
            )

    def start(self, options: Options, config: dict, ctx: RunContext):
        """Open the tracker's run and record ``config`` (the resolved run config) as its
        parameters; return the object whose ``qpeft_on_*`` hooks record the rest."""
        raise NotImplementedError

    def finish(self, session, status: str) -> None:
        """Close the run ``start`` opened; ``status`` is "FINISHED" or "FAILED".

        Default: ``session.finish(status)`` when the session has that method."""
        close = getattr(session, "finish", None)
        if close is not None:
            close(status)


class EvaluatorPlugin(_Plugin):
    """Measures the quality of a model: run before training (on the quantized base) and after
    (on the trained model in memory: the quantized base with its adapter, not merged)."""

    def evaluate(self, model, tokenizer, options: Options, ctx: RunContext, *, stage: str, data, out_dir) -> EvalResult:
        """Evaluate ``model`` (in eval mode, the network closed) and return an :class:`EvalResult`.

        ``stage`` is ``"before"`` or ``"after"`` (training); ``data`` is the run's validation
        set (a :class:`qpeft.data.TokenDataset`), for evaluators that score it. Files the
        evaluator writes go into ``out_dir`` (``OUTPUT_DIR/eval/<label>``, a ``Path`` that may not
        exist yet), written atomically (:func:`qpeft.io.atomic_write_text`). Raise
        :class:`qpeft.errors.QpeftError` with one line for what the user must fix (a task whose
        data is not on this machine, ...). Validate what can be validated before any weight loads
        in :meth:`check`, raising ``ConfigError(option_name, message)``: qpeft names the key as
        ``eval.N.options.<option_name>``.
        """
        raise NotImplementedError


@dataclass
class EvalResult:
    """What an evaluator measured: metric name -> number, and how to read them."""

    #: Metric name -> value (float or int; None when the evaluator could not compute it).
    metrics: dict[str, float | int | None]
    #: Metric name -> True when higher is better, False when lower is (absent: neither, e.g. counts).
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    #: The metric that stands for quality on a plot (``qpeft bench``'s quality axis), or None.
    primary: str | None = None
    #: Files written (paths), for the summary.
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PLUGIN_KINDS = {
    "quantizer": QuantizerPlugin,
    "peft": PeftPlugin,
    "trainer": TrainerPlugin,
    "tracker": TrackerPlugin,
    "evaluator": EvaluatorPlugin,
}


def implements(plugin: _Plugin, method: str) -> bool:
    """Whether ``plugin`` overrides the optional ``method`` of its base class (e.g. a quantizer's
    :meth:`QuantizerPlugin.dequantized_weight`), judged before any weight loads."""
    for base in PLUGIN_KINDS.values():
        if isinstance(plugin, base):
            return getattr(type(plugin), method) is not getattr(base, method)
    return False

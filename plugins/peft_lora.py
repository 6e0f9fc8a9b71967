"""PEFT method ``lora``: low-rank adapters (with rsLoRA and DoRA switches) through peft."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, PeftPlugin
from qpeft.errors import ConfigError
from qpeft.modeling import check_target_modules, find_linear_targets


class LoraOptions(Options):
    #: Rank of the low-rank update (A is r × in, B is out × r).
    r: int = Field(16, ge=1, le=4096)
    #: Scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).
    alpha: float = Field(32, gt=0, le=1e6)
    #: Dropout on the adapter's input (0 trains fastest).
    dropout: float = Field(0.0, ge=0, lt=1)
    #: "all-linear" = every linear layer except the output head, found for any architecture.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    #: Which biases train: none, all of the model's, or only those of adapted layers.
    bias: Literal["none", "all", "lora_only"] = "none"
    #: rsLoRA: scale by alpha / sqrt(r), which keeps updates stable at high ranks.
    use_rslora: bool = False
    #: DoRA: learn a magnitude per output and the direction by LoRA (slower per step).
    use_dora: bool = False
    #: Modules trained in full and saved with the adapter (e.g. ["lm_head"]).
    modules_to_save: list[str] | None = None
    #: How A and B start. "default": A Kaiming-uniform, B zero; "gaussian": A normal(1/r), B
    #: zero; "pissa"/"olora": A and B from the principal singular vectors / a QR of each weight,
    #: which peft subtracts from the base weight (float bases only; the saved adapter is converted
    #: to a plain LoRA of rank 2r against the original weights, so it loads and merges anywhere).
    #: "loftq", "eva", "corda" are refused (see docs/methods.md, "LoRA initialisations").
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "eva", "corda"] = "default"


#: Initialisations that rewrite the base weights (W - BA), so they need a float base.
REWRITES_BASE = ("pissa", "olora")
REFUSED_INIT = {
    "loftq": "qpeft does not implement LoftQ yet: it needs the full-precision weights and the quantizer's own "
    "quantization function (not in the quantizer contract yet); use default, gaussian, or pissa/olora on quantizer none",
    "eva": "EVA needs a pass over the training data before the adapter is created (peft's initialize_lora_eva_weights), "
    "which qpeft's run does not do yet; use default or gaussian",
    "corda": "CorDA needs covariance statistics from a calibration pass (peft's preprocess_corda), "
    "which qpeft's run does not do yet; use default or gaussian",
}


def _quantizer_layers(ctx) -> str | None:
    """The ``linear_layers`` kind of the run's quantizer (None when unknown)."""
    from qpeft.registry import load_registry

    name = ctx.config.quantizer.name
    quant = load_registry().backends["quantizer"].get(name)
    return quant.capabilities.linear_layers if quant is not None else None


class Lora(PeftPlugin):
    name = "lora"
    description = "LoRA low-rank adapters (rsLoRA, DoRA) via peft"
    Options = LoraOptions
    capabilities = Capabilities(mergeable=True, fsdp=True)

    def check(self, options, ctx):
        if options.init in REFUSED_INIT:
            raise ConfigError("peft.options.init", f"{options.init!r}: {REFUSED_INIT[options.init]}")
        if options.init in REWRITES_BASE:
            kind = _quantizer_layers(ctx)
            if kind != "float":
                raise ConfigError(
                    "peft.options.init",
                    f"{options.init!r} rewrites the base weights (W - BA), which quantizer {ctx.config.quantizer.name!r} holds "
                    f"quantized ({kind or 'undeclared'} layers) and frozen; use it with quantizer none, or init default/gaussian",
                )
            if options.use_dora:
                raise ConfigError("peft.options.init", f"{options.init!r} with use_dora is not supported by peft's weight conversion")
            if (ctx.config.trainer.options or {}).get("save_steps"):
                raise ConfigError(
                    "trainer.options.save_steps",
                    f"checkpoints hold the unconverted {options.init} adapter, which --resume cannot rebuild; drop save_steps or use init default",
                )

    def attach(self, model, options, ctx):
        from peft import LoraConfig, get_peft_model

        if options.target_modules == "all-linear":
            targets = find_linear_targets(model)
        else:
            targets = list(options.target_modules)
            check_target_modules(model, targets, "peft.options.target_modules")
        if options.modules_to_save:
            check_target_modules(model, options.modules_to_save, "peft.options.modules_to_save")
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=options.r,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            target_modules=targets,
            bias=options.bias,
            use_rslora=options.use_rslora,
            use_dora=options.use_dora,
            modules_to_save=options.modules_to_save,
            init_lora_weights={"default": True}.get(options.init, options.init),
        )
        ctx.notes.append(f"lora targets: {', '.join(targets)}")
        peft_model = get_peft_model(model, config)
        if options.init in REWRITES_BASE:
            # peft's recipe: save the initial adapter (marked as a plain init so loading it does
            # not re-run the SVD/QR), then convert the trained one against it at save time.
            import tempfile

            init_dir = tempfile.mkdtemp(prefix=f"qpeft-{options.init}-init-")
            peft_model.peft_config["default"].init_lora_weights = True
            peft_model.save_pretrained(init_dir, safe_serialization=True)
            peft_model.peft_config["default"].init_lora_weights = options.init
            peft_model._qpeft_init_dir = init_dir
            ctx.notes.append(
                f"lora init {options.init}: base weights rewritten to W - BA; the saved adapter is converted to rank {2 * options.r}"
            )
        elif options.init != "default":
            ctx.notes.append(f"lora init {options.init}")
        return peft_model

    def save(self, model, out_dir):
        init_dir = getattr(model, "_qpeft_init_dir", None)
        if init_dir is None:
            return super().save(model, out_dir)
        model.save_pretrained(out_dir, safe_serialization=True, path_initial_model_for_weight_conversion=init_dir)

    def merge(self, model):
        return model.merge_and_unload()


@hookimpl
def qpeft_register_peft_methods(register):
    register(Lora())

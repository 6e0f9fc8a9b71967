"""PEFT method ``lora``: low-rank adapters (with rsLoRA and DoRA switches) through peft."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, PeftPlugin
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


class Lora(PeftPlugin):
    name = "lora"
    description = "LoRA low-rank adapters (rsLoRA, DoRA) via peft"
    Options = LoraOptions
    capabilities = Capabilities(mergeable=True, fsdp=True)

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
        )
        ctx.notes.append(f"lora targets: {', '.join(targets)}")
        return get_peft_model(model, config)

    def merge(self, model):
        return model.merge_and_unload()


@hookimpl
def qpeft_register_peft_methods(register):
    register(Lora())

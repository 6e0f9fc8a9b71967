"""Quantizer ``none``: the full-precision base (float32 / bfloat16 / float16 per ``model.dtype``),
the reference every quantized cell is compared with."""

from __future__ import annotations

from qpeft import hookimpl
from qpeft.api import Capabilities, NoOptions, QuantizerPlugin
from qpeft.modeling import enable_gradient_checkpointing, freeze, load_causal_lm


class NoQuantizer(QuantizerPlugin):
    name = "none"
    description = "Full-precision base model (dtype from model.dtype): the reference"
    Options = NoOptions
    capabilities = Capabilities(merge_source="self", bits=None, fsdp=True, saves_quantized="transformers", linear_layers="float")

    def load(self, model_path, options, ctx, *, training):
        return load_causal_lm(model_path, ctx)

    def prepare_for_training(self, model, options, ctx, *, grad_checkpointing):
        freeze(model)
        if grad_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def full_precision_model(self, model, model_path, options, ctx):
        return model


@hookimpl
def qpeft_register_quantizers(register):
    register(NoQuantizer())

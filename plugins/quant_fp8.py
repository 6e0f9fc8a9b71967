"""Quantizer ``fp8``: float8 (e4m3) weights with per-block scales through transformers'
``FineGrainedFP8Config`` — CUDA with compute capability >= 8.9 (Ada, Hopper) only.

Refused before any weight loads, with the reason, where it cannot run:

* on CPU: transformers' FineGrainedFP8 quantizer refuses a CPU ``device_map`` and its matmul
  needs GPU float8 kernels;
* without the ``kernels`` package: transformers 5.23 runs FP8 matmuls through
  ``kernels-community/finegrained-fp8`` (or DeepGEMM), which ``kernels`` downloads from the
  Hugging Face Hub at run time — qpeft runs offline and does not install ``kernels``.

transformers' ``FP8Linear`` has a backward for its input (``FP8LinearFunction``: the gradient
goes through the dequantized weight), so LoRA trains on it; merges go into the dequantized
weights.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, QuantizerPlugin
from qpeft.errors import ConfigError
from qpeft.modeling import enable_gradient_checkpointing, freeze, load_causal_lm


class Fp8Options(Options):
    #: Weights sharing one scale: (rows, columns) blocks; DeepGEMM's fast path wants 128 x 128.
    block_size: Literal[64, 128] = 128
    #: Module names kept in full precision (the output head always is).
    skip_modules: list[str] | None = None


def refusal(device: str, capability: tuple[int, int] | None, kernels_installed: bool) -> str | None:
    """Why ``fp8`` cannot run here (None when it can)."""
    if device != "cuda":
        return (
            f"fp8 runs on CUDA GPUs with compute capability >= 8.9 (Ada, Hopper); this run is on {device}: "
            "transformers' FineGrainedFP8 refuses the CPU and has no CPU float8 matmul (use torchao-float8 for float8 weights on a CPU)"
        )
    if capability is not None and capability < (8, 9):
        return f"fp8 needs compute capability >= 8.9 (Ada, Hopper); this GPU has {capability[0]}.{capability[1]}"
    if not kernels_installed:
        return (
            "fp8: transformers runs FineGrainedFP8 matmuls through the `kernels` package, which downloads "
            "kernels-community/finegrained-fp8 from the Hugging Face Hub at run time; it is not installed (qpeft runs offline)"
        )
    return None


class Fp8(QuantizerPlugin):
    name = "fp8"
    description = "float8 e4m3 weights, per-block scales (transformers FineGrainedFP8Config; CUDA >= 8.9)"
    Options = Fp8Options
    capabilities = Capabilities(devices=("cuda",), merge_source="dequantize", bits=8)

    def check(self, options, ctx):
        capability = None
        if ctx.device == "cuda":
            import torch

            capability = tuple(torch.cuda.get_device_capability())
        reason = refusal(ctx.device, capability, importlib.util.find_spec("kernels") is not None)
        if reason:
            raise ConfigError("quantizer.name", reason)

    def load(self, model_path, options, ctx, *, training):
        from transformers import FineGrainedFP8Config

        config = FineGrainedFP8Config(
            weight_block_size=(options.block_size, options.block_size), modules_to_not_convert=options.skip_modules
        )
        return load_causal_lm(model_path, ctx, quantization_config=config)

    def prepare_for_training(self, model, options, ctx, *, grad_checkpointing):
        freeze(model)
        if grad_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def full_precision_model(self, model, model_path, options, ctx):
        import torch
        from transformers.integrations.finegrained_fp8 import FP8Linear, _dequantize_fp8_weight

        with torch.no_grad():
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, FP8Linear):
                        weight = _dequantize_fp8_weight(child.weight, child.weight_scale_inv, child.block_size, torch.float32)
                        plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device=weight.device)
                        plain.weight = torch.nn.Parameter(weight, requires_grad=False)
                        if child.bias is not None:
                            plain.bias = torch.nn.Parameter(child.bias.detach().float(), requires_grad=False)
                        setattr(parent, name, plain)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        return model


@hookimpl
def qpeft_register_quantizers(register):
    register(Fp8())

"""torchao quantizers through transformers' ``TorchAoConfig``: ``torchao-int8`` (int8
weight-only, per-row scales), ``torchao-int4`` (int4 weight-only, per-group scales; CUDA only)
and ``torchao-float8`` (float8 e4m3 weights, per-row scales; with ``activations: dynamic`` also
float8 activations on GPUs that have float8 matmuls).

Each linear layer but the output head keeps its ``torch.nn.Linear`` module and holds a torchao
tensor subclass as its weight (``Int8Tensor``, ``Int4TilePackedTo4dTensor``, ``Float8Tensor``),
so peft's LoRA dispatch wraps it with its ``TorchaoLoraLinear`` (it covers every
``TorchAOBaseTensor``). Backward through the base goes through torchao's ``F.linear`` override,
which is differentiable with respect to the input; the conformance kit's gradient check proves it
against a float32 model holding the dequantized weights (tests/test_conformance.py).

torchao 0.18's int4 weight-only has no CPU layout usable here: ``plain`` needs the CUDA-only
``mslk`` package, ``plain_int32`` supports XPU/NPU, ``tile_packed_to_4d`` needs CUDA and bfloat16
(measured on torch 2.13 CPU), so ``torchao-int4`` is refused on CPU before loading, with that reason.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, QuantizerPlugin
from qpeft.errors import ConfigError
from qpeft.modeling import enable_gradient_checkpointing, freeze, load_causal_lm

INSTALL_HINT = "torchao is not installed: pip install 'qpeft[torchao]' (torchao>=0.16,<0.19; tested with 0.18.0)"
INT4_GROUP_SIZES = (32, 64, 128, 256)


class _TorchaoOptions(Options):
    #: Module names kept in full precision (the output head always is).
    skip_modules: list[str] | None = None


class Int4Options(_TorchaoOptions):
    #: Input columns sharing one scale and zero point.
    group_size: Literal[32, 64, 128, 256] = 128


class Float8Options(_TorchaoOptions):
    #: "none": float8 weights dequantized for a matmul in the activations' dtype (any device);
    #: "dynamic": activations are quantized to float8 per row on the fly and multiplied in
    #: float8 (CUDA with compute capability >= 8.9, i.e. Ada/Hopper; bfloat16 runs).
    activations: Literal["none", "dynamic"] = "none"


def _torchao():
    """``torchao.quantization``, imported with its CUDA-extension load warnings silenced."""
    import logging

    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    finally:
        logger.setLevel(level)
    return quantization


def _is_torchao_weight(tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(tensor, TorchAOBaseTensor)


class _Torchao(QuantizerPlugin):
    backend_packages = ("torchao",)
    # saves_quantized: transformers writes torchao's tensor subclasses into safetensors and
    # from_pretrained loads them back quantized (the kit's test_quantized_save checks it).
    capabilities = Capabilities(merge_source="dequantize", bits=8, saves_quantized="transformers", linear_layers="torchao")

    def ao_config(self, options, ctx):
        raise NotImplementedError

    def check(self, options, ctx):
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("quantizer.name", INSTALL_HINT)

    def load(self, model_path, options, ctx, *, training):
        from transformers import TorchAoConfig

        config = TorchAoConfig(quant_type=self.ao_config(options, ctx), modules_to_not_convert=options.skip_modules)
        return load_causal_lm(model_path, ctx, quantization_config=config)

    def prepare_for_training(self, model, options, ctx, *, grad_checkpointing):
        freeze(model)
        if grad_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def dequantized_weight(self, module, options):
        weight = getattr(module, "weight", None)
        if weight is None or not _is_torchao_weight(weight):
            return None
        return weight.dequantize().float()

    def full_precision_model(self, model, model_path, options, ctx):
        """The same model with every torchao weight dequantized into a plain float parameter —
        exactly the weights the adapter was trained against — and no quantization config."""
        import torch

        with torch.no_grad():
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if weight is not None and _is_torchao_weight(weight):
                    module.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        return model


class TorchaoInt8(_Torchao):
    name = "torchao-int8"
    description = "torchao int8 weight-only, per-row scales (transformers TorchAoConfig)"
    Options = _TorchaoOptions

    def ao_config(self, options, ctx):
        q = _torchao()
        # set_inductor_config=False: the default changes global torch._inductor settings.
        return q.Int8WeightOnlyConfig(granularity=q.PerRow(), set_inductor_config=False)


class TorchaoInt4(_Torchao):
    name = "torchao-int4"
    description = "torchao int4 weight-only, per-group scales (CUDA, bfloat16)"
    Options = Int4Options
    # transformers' Trainer refuses to train a torchao base whose type is not 8-bit
    # (TorchAoHfQuantizer.is_trainable, transformers 5.17-5.23): seen on an H200 with trainer hf.
    _TRAINER_REFUSAL = (
        "transformers' Trainer trains torchao bases of 8-bit types only (TorchAoHfQuantizer.is_trainable); use trainer native"
    )
    # torch 2.11 has no derivative for the int4 matmul (aten::_weight_int4pack_mm), so no gradient
    # reaches the layers below the first int4 layer: seen on an H200 with trainer native
    # (configs/bench/quality_gpu.yaml). It quantizes, saves and generates; it trains nothing.
    _NO_BACKWARD = (
        "torch has no derivative for torchao's int4 matmul (aten::_weight_int4pack_mm), so adapters cannot be "
        "trained on it; it can quantize (qpeft quantize) and serve"
    )
    capabilities = Capabilities(
        devices=("cuda",),
        trainable=False,
        merge_source="dequantize",
        bits=4,
        saves_quantized="transformers",
        incompatible={**dict.fromkeys(("hf", "dpo", "orpo", "simpo", "kto", "grpo"), _TRAINER_REFUSAL), "native": _NO_BACKWARD},
        linear_layers="torchao-int4",
    )

    def check(self, options, ctx):
        super().check(options, ctx)
        if ctx.dtype != "bfloat16":
            raise ConfigError(
                "model.dtype", f"torchao-int4 (torchao's tile-packed int4 layout) runs in bfloat16 only; this run is {ctx.dtype}"
            )

    def ao_config(self, options, ctx):
        q = _torchao()
        return q.Int4WeightOnlyConfig(group_size=options.group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


class TorchaoFloat8(_Torchao):
    name = "torchao-float8"
    description = "torchao float8 (e4m3) weights, per-row scales; optional float8 dynamic activations on CUDA"
    Options = Float8Options
    # Its own layer kind: PEFT methods are tested on torchao's int8 layers, not on float8 ones.
    capabilities = Capabilities(merge_source="dequantize", bits=8, saves_quantized="transformers", linear_layers="torchao-float8")

    def check(self, options, ctx):
        super().check(options, ctx)
        if options.activations == "dynamic":
            if ctx.device != "cuda":
                raise ConfigError(
                    "quantizer.options.activations",
                    "dynamic float8 activations need float8 matmuls (CUDA, compute capability >= 8.9); use none on this device",
                )
            import torch

            if torch.cuda.get_device_capability() < (8, 9):
                raise ConfigError(
                    "quantizer.options.activations",
                    f"dynamic float8 activations need compute capability >= 8.9; this GPU has {torch.cuda.get_device_capability()}",
                )

    def ao_config(self, options, ctx):
        q = _torchao()
        if options.activations == "dynamic":
            return q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow(), set_inductor_config=False)
        return q.Float8WeightOnlyConfig(set_inductor_config=False)


@hookimpl
def qpeft_register_quantizers(register):
    for plugin in (TorchaoInt8(), TorchaoInt4(), TorchaoFloat8()):
        register(plugin)

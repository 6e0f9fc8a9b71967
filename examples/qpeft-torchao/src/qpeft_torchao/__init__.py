"""qpeft-torchao: the quantizer ``example-torchao-int8`` for qpeft, shipped as a separate package.

int8 weight-only quantization through torchao (``Int8WeightOnlyConfig``, loaded by transformers'
``TorchAoConfig``): every linear layer but the output head stores int8 weights with float
scales (per output row by default, or per group of input columns, or one per tensor) and
dequantizes them in its matmul. It runs on CPU and CUDA, trains LoRA through peft's
``TorchaoLoraLinear``, and merges by dequantizing the int8 weights into a float model.

This package touches no qpeft file: it is found through the ``qpeft`` entry-point group
declared in its ``pyproject.toml``. Like every qpeft plugin module it imports only pydantic and
qpeft at import time; torch, transformers and torchao are imported when a model is loaded.

Guard (a transformers 5.23 bug, regression test in tests/test_plugin.py): ``get_memory_footprint``
counts a torchao weight at its logical float size (``numel * element_size`` of the outer
tensor), so qpeft would report no memory saved; :meth:`TorchaoInt8.load` makes the loaded
model count the int8 data and scales that the weights really hold.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, QuantizerPlugin
from qpeft.errors import ConfigError, QpeftError
from qpeft.modeling import enable_gradient_checkpointing, freeze, load_causal_lm

__version__ = "0.2.0"

INSTALL_HINT = "torchao is not installed: pip install 'torchao>=0.16,<0.19' (or reinstall qpeft-torchao)"


class TorchaoInt8Options(Options):
    """``quantizer.options`` of ``example-torchao-int8``."""

    #: Scales per output row ("per_row"), per ``group_size`` input columns ("per_group"), or
    #: one for the whole weight ("per_tensor").
    granularity: Literal["per_row", "per_group", "per_tensor"] = "per_row"
    #: Input columns per scale with granularity "per_group"; must divide every layer's width.
    group_size: int = Field(128, ge=8, le=65536)
    #: Module names kept in full precision (the output head always is).
    skip_modules: list[str] | None = None


def _import_torchao():
    """Import torchao with its C-extension load warnings silenced (it logs one per CUDA-only
    extension it cannot load on a CPU build; they do not concern int8 weight-only)."""
    import logging

    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        import torchao.quantization as quantization
    finally:
        logger.setLevel(level)
    return quantization


def ao_config(options: TorchaoInt8Options):
    """The torchao ``Int8WeightOnlyConfig`` for ``options``."""
    q = _import_torchao()
    granularity = {
        "per_row": lambda: q.PerRow(),
        "per_group": lambda: q.PerGroup(options.group_size),
        "per_tensor": lambda: q.PerTensor(),
    }[options.granularity]()
    # set_inductor_config=False: the default changes global torch._inductor settings.
    return q.Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)


def is_torchao_weight(tensor) -> bool:
    """Whether ``tensor`` is one of torchao's quantized tensor subclasses."""
    from torchao.utils import TorchAOBaseTensor

    return isinstance(tensor, TorchAOBaseTensor)


def storage_bytes(tensor) -> int:
    """Bytes a tensor really holds, counting a tensor subclass by its inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(storage_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n, None) is not None)
    return tensor.nelement() * tensor.element_size()


def _true_memory_footprint(self, return_buffers: bool = True) -> int:
    """``PreTrainedModel.get_memory_footprint`` that counts quantized storage (see module doc)."""
    tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
    return sum(storage_bytes(t) for t in tensors)


def _check_group_size(model_path, options, ctx) -> None:
    """Refuse a ``group_size`` that does not divide the model's hidden or MLP width, from its
    config alone (torchao would fail on every layer while loading, in a long report)."""
    if options.granularity != "per_group":
        return
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=ctx.config.model.trust_remote_code)
    cfg = getattr(cfg, "text_config", cfg)
    widths = {getattr(cfg, k, None) for k in ("hidden_size", "intermediate_size")}
    bad = sorted(w for w in widths if isinstance(w, int) and w % options.group_size)
    if bad:
        raise ConfigError(
            "quantizer.options.group_size",
            f"{options.group_size} does not divide the layer width {', '.join(map(str, bad))} of {model_path}; "
            "use a divisor of it (e.g. 32, 64 or 128) or granularity per_row",
        )


class TorchaoInt8(QuantizerPlugin):
    """int8 weight-only quantization through torchao."""

    name = "example-torchao-int8"
    description = "torchao int8 weight-only, per-row/group/tensor scales (external package qpeft-torchao)"
    #: The qpeft plugin API this package is written against.
    api_version = 1
    Options = TorchaoInt8Options
    # saves_quantized: transformers saves torchao's Int8Tensor weights in safetensors and
    # from_pretrained loads them back quantized (the kit's test_quantized_save checks it).
    capabilities = Capabilities(
        devices=("cpu", "cuda"), merge_source="dequantize", bits=8, saves_quantized="transformers", linear_layers="torchao"
    )

    def check(self, options, ctx):
        """Refuse the config before loading anything if torchao is missing."""
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("quantizer.name", INSTALL_HINT)

    def load(self, model_path, options, ctx, *, training):
        """Load ``model_path`` with its linear layers (but the head) quantized to int8."""
        import types

        from transformers import TorchAoConfig

        _check_group_size(model_path, options, ctx)
        config = TorchAoConfig(quant_type=ao_config(options), modules_to_not_convert=options.skip_modules)
        try:
            model = load_causal_lm(model_path, ctx, quantization_config=config)
        except (AssertionError, ValueError, RuntimeError) as exc:
            if options.granularity == "per_group":
                raise QpeftError(
                    f"example-torchao-int8 could not quantize {model_path} with group_size {options.group_size} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    "group_size must divide the input width of every linear layer"
                ) from None
            raise
        model.get_memory_footprint = types.MethodType(_true_memory_footprint, model)
        return model

    def prepare_for_training(self, model, options, ctx, *, grad_checkpointing):
        """Freeze the base; non-reentrant gradient checkpointing if asked."""
        freeze(model)
        if grad_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def full_precision_model(self, model, model_path, options, ctx):
        """The same model with every int8 weight dequantized into a plain float ``Parameter``
        (exactly the weights the adapter was trained against) and no quantization config."""
        import torch

        with torch.no_grad():
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if weight is not None and is_torchao_weight(weight):
                    module.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.__dict__.pop("get_memory_footprint", None)
        return model


@hookimpl
def qpeft_register_quantizers(register):
    """Register ``example-torchao-int8``."""
    register(TorchaoInt8())

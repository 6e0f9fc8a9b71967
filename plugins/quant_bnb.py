"""bitsandbytes quantizers: ``bnb-8bit`` (LLM.int8), ``bnb-4bit`` and its presets ``bnb-nf4``
and ``bnb-fp4`` (QLoRA). bitsandbytes is imported only when a model is loaded."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, QuantizerPlugin
from qpeft.errors import ConfigError
from qpeft.modeling import enable_gradient_checkpointing, freeze, load_causal_lm

DTYPES = Literal["auto", "float32", "bfloat16", "float16"]
INSTALL_HINT = "bitsandbytes is not installed: pip install 'qpeft[bnb]' (bitsandbytes>=0.49 has CPU and CUDA kernels)"


class _PrepareOptions(Options):
    #: Cast the non-quantized weights (embeddings, norms, output head) to float32 before
    #: training, as peft's prepare_model_for_kbit_training does. "auto": only for float16
    #: runs (whose range needs it); bfloat16 runs keep them in bfloat16 — they are frozen, and
    #: float32 copies make the output head's matmul and the residual stream float32 (slower,
    #: more memory) for no gain in the gradients of the adapter.
    upcast_non_quantized: Literal["auto", True, False] = "auto"


class Bnb4bitPresetOptions(_PrepareOptions):
    #: Quantize the quantization constants too (QLoRA's double quantization, ~0.4 bit/weight saved).
    double_quant: bool = True
    #: dtype of the matmuls; "auto" = the run's dtype (bfloat16 on modern GPUs, float32 on CPU).
    compute_dtype: DTYPES = "auto"
    #: Storage dtype of the packed 4-bit weights. FSDP shards parameters of a floating dtype only
    #: and casts them to the compute dtype, so under FSDP it must be the run's dtype. "auto": the
    #: run's dtype under FSDP, uint8 otherwise (the same packed bytes either way).
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    #: Module names kept in full precision (default: the output head).
    skip_modules: list[str] | None = None


class Bnb4bitOptions(Bnb4bitPresetOptions):
    #: 4-bit data type: NormalFloat4 (QLoRA's, for normally distributed weights) or float4.
    quant_type: Literal["nf4", "fp4"] = "nf4"


class Bnb8bitOptions(_PrepareOptions):
    #: Outlier threshold of LLM.int8 (activations above it run in 16-bit).
    threshold: float = Field(6.0, ge=0)
    #: How the 8-bit weights are multiplied. "int8": LLM.int8's int8 matmul with outlier
    #: decomposition (activations quantized too). "dequantize": each weight is dequantized
    #: row-wise to the compute dtype right before a 16-bit matmul and again in backward (never
    #: stored): exact with respect to the int8 weights, several times faster to train on GPUs,
    #: same weight memory. "auto": dequantize on CUDA, int8 on CPU.
    matmul: Literal["auto", "int8", "dequantize"] = "auto"
    #: Module names kept in full precision (default: the output head).
    skip_modules: list[str] | None = None
    #: Keep modules that do not fit on the GPU in float32 on the CPU (CUDA only).
    cpu_offload: bool = False


def _require_bnb() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("quantizer.name", INSTALL_HINT)


def _dtype(name: str, ctx):
    import torch

    return ctx.torch_dtype if name == "auto" else getattr(torch, name)


class _BnbBase(QuantizerPlugin):
    backend_packages = ("bitsandbytes",)

    def cache_key(self, options):
        """Not cached on disk: bitsandbytes quantizes while transformers reads the float weights
        (no slower than reading a saved copy back), and a ``qpeft bench`` worker keeps the loaded
        base in memory (:class:`qpeft.modeling.BaseModelCache`)."""
        return None

    def check(self, options, ctx):
        _require_bnb()

    def prepare_for_training(self, model, options, ctx, *, grad_checkpointing):
        upcast = options.upcast_non_quantized
        if upcast == "auto":
            upcast = ctx.dtype == "float16"
        if upcast:
            from peft import prepare_model_for_kbit_training

            return prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=grad_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        # prepare_model_for_kbit_training without its float32 cast: freeze the base, and
        # checkpoint with inputs that require grad so a frozen base back-propagates.
        if ctx.dtype != "float32":
            ctx.notes.append(f"{self.name}: frozen non-quantized weights kept in {ctx.dtype} (no float32 upcast)")
        freeze(model)
        if grad_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def full_precision_model(self, model, model_path, options, ctx):
        # Merging into the dequantized weights reproduces exactly what the adapter was
        # trained against; merging into the 4/8-bit weights would add rounding error.
        if _repacked_for_cpu_inference(model):
            # An eval forward on an AVX512-BF16 CPU repacked the 4-bit weights and undoing
            # that is lossy (absmax went through bfloat16): quantize the original weights
            # again (deterministic) rather than dequantize the repacked ones.
            model = self.load(model_path, options, ctx, training=True)
        self.ensure_training_kernels(model, options)
        return model.dequantize()


def _repacked_for_cpu_inference(model) -> bool:
    """Whether bitsandbytes repacked any 4-bit weight for its CPU inference kernel."""
    return any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False) for m in model.modules())


class Bnb4bit(_BnbBase):
    name = "bnb-4bit"
    description = "bitsandbytes 4-bit (NF4 or FP4, double quantization): QLoRA"
    Options = Bnb4bitOptions
    capabilities = Capabilities(merge_source="dequantize", bits=4, fsdp=True, saves_quantized="transformers", linear_layers="bnb-4bit")
    quant_type: str | None = None  # presets fix it

    def check(self, options, ctx):
        super().check(options, ctx)
        if ctx.fsdp and options.quant_storage not in ("auto", ctx.dtype):
            raise ConfigError(
                "quantizer.options.quant_storage",
                f"{options.quant_storage!r} under FSDP: FSDP would leave uint8 weights unsharded and cast other dtypes "
                f"to the run's {ctx.dtype}, scrambling the packed bytes; use auto or {ctx.dtype}",
            )
        if ctx.device == "cpu" and _dtype(options.compute_dtype, ctx) != _dtype("float32", ctx):
            ctx.notes.append(
                f"{self.name}: compute_dtype {options.compute_dtype} on CPU; float32 is ~16x faster on CPUs without AVX512-BF16"
            )

    def load(self, model_path, options, ctx, *, training):
        from transformers import BitsAndBytesConfig

        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type or options.quant_type,
            bnb_4bit_use_double_quant=options.double_quant,
            bnb_4bit_compute_dtype=_dtype(options.compute_dtype, ctx),
            bnb_4bit_quant_storage=_quant_storage(options.quant_storage, ctx),
            llm_int8_skip_modules=options.skip_modules,
        )
        model = load_causal_lm(model_path, ctx, quantization_config=cfg)
        if training:
            self.ensure_training_kernels(model, options)
        return model

    def dequantized_weight(self, module, options):
        import bitsandbytes as bnb

        if not isinstance(module, bnb.nn.Linear4bit):
            return None
        self.ensure_training_kernels(module, options)  # a repacked weight would dequantize wrongly
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()

    def ensure_training_kernels(self, model, options):
        """bnb's Linear4bit repacks its weight for an inference-only CPU kernel on the first
        eval-mode forward on AVX512-BF16 CPUs; LoRA gradients and dequantization are wrong
        afterwards (docs/architecture.md, library facts). Turn the switch off and undo any repacking."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
                state = getattr(module.weight, "quant_state", None)
                if state is not None and getattr(state, "packing_format_for_cpu", False):
                    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)


def _quant_storage(name: str, ctx):
    if name == "auto":
        name = ctx.dtype if ctx.fsdp else "uint8"
    return _dtype(name, ctx)


class BnbNF4(Bnb4bit):
    name = "bnb-nf4"
    description = "bitsandbytes 4-bit NormalFloat (preset of bnb-4bit)"
    Options = Bnb4bitPresetOptions
    quant_type = "nf4"


class BnbFP4(Bnb4bit):
    name = "bnb-fp4"
    description = "bitsandbytes 4-bit float (preset of bnb-4bit)"
    Options = Bnb4bitPresetOptions
    quant_type = "fp4"


class Bnb8bit(_BnbBase):
    name = "bnb-8bit"
    description = "bitsandbytes LLM.int8 with outlier decomposition"
    Options = Bnb8bitOptions
    capabilities = Capabilities(merge_source="dequantize", bits=8, saves_quantized="transformers", linear_layers="bnb-8bit")

    def check(self, options, ctx):
        super().check(options, ctx)
        if options.cpu_offload and ctx.device != "cuda":
            raise ConfigError("quantizer.options.cpu_offload", "offloads from a GPU to the CPU; it needs model.device cuda")

    def load(self, model_path, options, ctx, *, training):
        from transformers import BitsAndBytesConfig

        cfg = BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=options.threshold,
            llm_int8_skip_modules=options.skip_modules,
            llm_int8_enable_fp32_cpu_offload=options.cpu_offload,
        )
        return self._with_matmul(load_causal_lm(model_path, ctx, quantization_config=cfg), options, ctx, training)

    def dequantized_weight(self, module, options):
        import bitsandbytes as bnb
        import torch

        if not isinstance(module, bnb.nn.Linear8bitLt):
            return None
        cb, scb = _int8_parts(module)
        return _int8_dequantize(cb, scb, torch.float32)

    def load_quantized(self, path, options, ctx, *, training=False):
        """A saved 8-bit model multiplies the same way as a freshly quantized one (``options.matmul``):
        without this, on CUDA the reloaded model took LLM.int8's matmul where the saved one had
        run dequantize-then-matmul, and its logits differed by 9.3e-3 (H200, the conformance kit)."""
        return self._with_matmul(super().load_quantized(path, options, ctx, training=training), options, ctx, training)

    def _with_matmul(self, model, options, ctx, training):
        matmul = options.matmul if options.matmul != "auto" else ("dequantize" if ctx.device == "cuda" else "int8")
        if matmul == "dequantize":
            n = use_dequantize_matmul(model)
            if training:
                ctx.notes.append(f"bnb-8bit: {n} int8 layers multiply by dequantize-then-matmul (no activation quantization)")
        return model


def use_dequantize_matmul(model) -> int:
    """Make every bnb ``Linear8bitLt`` of ``model`` multiply with its int8 weight dequantized
    to the compute dtype (see ``Bnb8bitOptions.matmul``); return the number of layers."""
    import types

    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.forward = types.MethodType(_dequantize_forward, module)
            n += 1
    return n


def _int8_parts(module):
    """(int8 weight, row scales) of a Linear8bitLt, wherever bnb keeps them at this point."""
    weight = module.weight
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    cb = weight.CB if getattr(weight, "CB", None) is not None else weight.data
    return cb, scb


def _dequantize_forward(self, x):
    import torch

    cb, scb = _int8_parts(self)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    out = _Int8DequantizeMatmul.apply(x.to(dtype), cb, scb)
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out


def _int8_dequantize(cb, scb, dtype):
    # Row-wise: w = cb * scb / 127, computed in float32 and rounded once to the compute dtype.
    return (cb.float() * (scb.float() / 127.0).unsqueeze(1)).to(dtype)


def _autograd_function():
    import torch

    class Int8DequantizeMatmul(torch.autograd.Function):
        """x @ dequantize(W).T, saving only the int8 weight for backward (the 16-bit copy is
        made again there), so no dequantized weight outlives its matmul."""

        @staticmethod
        def forward(ctx, x, cb, scb):
            ctx.save_for_backward(cb, scb)
            with torch.autocast(x.device.type, enabled=False):
                return torch.nn.functional.linear(x, _int8_dequantize(cb, scb, x.dtype))

        @staticmethod
        def backward(ctx, grad):
            cb, scb = ctx.saved_tensors
            with torch.autocast(grad.device.type, enabled=False):
                return grad @ _int8_dequantize(cb, scb, grad.dtype), None, None

    return Int8DequantizeMatmul


class _LazyFunction:
    fn = None

    def apply(self, *args):
        if self.fn is None:
            self.fn = _autograd_function()
        return self.fn.apply(*args)


_Int8DequantizeMatmul = _LazyFunction()


@hookimpl
def qpeft_register_quantizers(register):
    for plugin in (Bnb4bit(), BnbNF4(), BnbFP4(), Bnb8bit()):
        register(plugin)

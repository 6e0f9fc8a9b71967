"""Quantizer ``awq``: Activation-aware Weight Quantization through gptqmodel (autoawq is
archived), loaded by transformers' ``AwqConfig``.

* A float base is quantized with calibration text (qpeft's embedded data by default) by
  gptqmodel's ``GPTQModel.load(..., AWQConfig)`` + ``quantize`` (GEMM format, packed with
  ``AwqTorchLinear``, which every device runs), written to a folder and loaded back by
  transformers; qpeft's quantized-base cache (:mod:`qpeft.quantized_cache`) keeps the result,
  keyed by the calibration data too, so a base is quantized once.
* An existing AWQ checkpoint (config.json with ``quant_method: awq``) named by
  ``model.name_or_path`` is loaded as it is.

Kernels: training (``load(training=True)``) always gets gptqmodel's ``awq_torch`` backend
(``AwqTorchLinear``: dequantize the packed int4 weights, then ``torch.matmul``), which is
differentiable with respect to its input in every mode and runs on CPU and CUDA; it computes in
float16 or bfloat16 only (a float32 input is cast to float16 and the output back), so the base
matmul of a float32 CPU run is a float16 one. peft's ``AwqLoraLinear`` (its dispatcher matches any
gptqmodel layer whose ``SUPPORTS_METHODS`` has AWQ) wraps the layers. Inference with ``kernel:
auto`` takes gptqmodel's own choice (``TorchAtenAwqLinear``, ATen int4pack, on CPU; GEMM/Marlin on
CUDA); nothing trains or merges on such a model (qpeft reloads with training kernels for that).

Merging: into the dequantized weights (``merge_source: dequantize``), not into the original
checkpoint as for GPTQ. gptqmodel's AWQ folds its per-channel activation scales into the layers
before each quantized one (the RMSNorm weights changed by up to 0.26 on the tiny test model, the
linear layers' inputs are scaled to match), so an adapter trained on the AWQ model sees scaled
inputs: added to the original weights it would be applied to unscaled ones. The dequantized
model keeps the folded norms, so base + adapter merge exactly (checked by logits); this also
merges adapters trained on AWQ checkpoints that have no original.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, QuantizerPlugin
from qpeft.errors import ConfigError, QpeftError
from qpeft.modeling import load_causal_lm
from qpeft.quiet import allow_gptqmodel

INSTALL_HINT = "awq needs gptqmodel: pip install 'qpeft[awq]' (gptqmodel==7.6.0)"
TRAINING_BACKEND = "torch_awq"


class AwqOptions(Options):
    #: Bits per weight (AWQ's GEMM format as transformers loads it: 4).
    bits: Literal[4] = 4
    #: Input columns sharing one scale and zero point (must divide every linear layer's input width).
    group_size: Literal[32, 64, 128] = 128
    #: Calibration text: "embedded" (qpeft's embedded text + instruct data) or a data file
    #: (.jsonl/.json/.csv/.parquet/.txt) whose rows have a ``text`` field.
    calibration: str = Field("embedded", min_length=1)
    #: Calibration rows AWQ measures the activations on.
    num_calibration_samples: int = Field(64, ge=1, le=100_000)
    #: Calibration rows are cut to this many tokens.
    calibration_max_length: int = Field(512, ge=8, le=65_536)
    #: Inference kernel: "auto" = gptqmodel's fastest for the device, "torch" = ``AwqTorchLinear``.
    #: Training always uses ``AwqTorchLinear``.
    kernel: Literal["auto", "torch"] = "auto"


def _require() -> None:
    allow_gptqmodel()  # the command line defers gptqmodel's import until a quantizer needs it
    if importlib.util.find_spec("gptqmodel") is None:
        raise ConfigError("quantizer.name", INSTALL_HINT)


def _quant_config(model_path: str) -> dict | None:
    """The ``quantization_config`` of ``model_path``'s config.json, or None."""
    from qpeft.io import MetadataError, read_json_file

    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    try:
        config = read_json_file(path)
    except (OSError, MetadataError) as exc:
        raise QpeftError(f"awq: cannot read {path}: {exc}") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc if isinstance(qc, dict) else None


def is_awq_checkpoint(model_path: str) -> bool:
    """Whether ``model_path`` is an AWQ-quantized checkpoint (loaded as it is)."""
    qc = _quant_config(model_path) or {}
    return str(qc.get("quant_method", "")).lower() == "awq"


def _calibration_files(options: AwqOptions) -> list[Path]:
    from qpeft.data import EMBEDDED_DATA

    if options.calibration == "embedded":
        return [EMBEDDED_DATA / "text_train.jsonl", EMBEDDED_DATA / "instruct_train.jsonl"]
    return [Path(options.calibration).expanduser()]


def calibration_texts(options: AwqOptions) -> list[str]:
    """Up to ``num_calibration_samples`` texts, shuffled with a fixed seed."""
    from qpeft.data.records import iter_records

    texts = []
    for path in _calibration_files(options):
        for row in iter_records(path, "quantizer.options.calibration"):
            text = row.get("text")
            if text is None:  # instruct rows: prompt and response, or chat messages
                parts = [row.get("prompt"), row.get("response")] + [m.get("content") for m in row.get("messages") or []]
                text = "\n".join(p for p in parts if isinstance(p, str))
            if isinstance(text, str) and text.strip():
                texts.append(text)
    if not texts:
        raise ConfigError("quantizer.options.calibration", f"{options.calibration}: no text to calibrate on")
    random.Random(0).shuffle(texts)
    return texts[: options.num_calibration_samples]


def _check_widths(model_path: str, group_size: int) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    cfg = getattr(cfg, "text_config", None) or cfg
    widths = {getattr(cfg, k, None) for k in ("hidden_size", "intermediate_size")} - {None}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise ConfigError(
            "quantizer.options.group_size",
            f"{group_size} does not divide the input widths {bad} of {model_path}'s linear layers; choose 32, 64 or 128 dividing them",
        )


class Awq(QuantizerPlugin):
    name = "awq"
    description = "AWQ 4-bit (gptqmodel quantizes with calibration; transformers AwqConfig loads), CPU and CUDA"
    Options = AwqOptions
    backend_packages = ("gptqmodel",)
    capabilities = Capabilities(
        merge_source="dequantize",
        bits=4,
        saves_quantized="transformers",
        linear_layers="awq",
        incompatible={
            method: f"peft 0.21 has no {label} layer for gptqmodel's AWQ layers (it supports only torch.nn.Linear and Conv targets)"
            for method, label in (("loha", "LoHa"), ("lokr", "LoKr"), ("ia3", "IA3"))
        },
    )

    def check(self, options, ctx):
        _require()
        if options.calibration != "embedded" and not Path(options.calibration).expanduser().exists():
            raise ConfigError("quantizer.options.calibration", f"{options.calibration} does not exist; use 'embedded' or a data file")
        peft = getattr(getattr(ctx.config, "peft", None), "options", None) or {}
        if peft.get("use_dora"):
            raise ConfigError("peft.options.use_dora", "peft's LoRA layer for AWQ (AwqLoraLinear) does not support DoRA")

    def cache_key(self, options):
        digest = hashlib.sha256()
        for path in _calibration_files(options):
            digest.update(path.read_bytes() if path.is_file() else str(path).encode())
        return {"calibration": digest.hexdigest()}

    # ------------------------------------------------------------------ loading

    def load(self, model_path, options, ctx, *, training):
        _require()
        if is_awq_checkpoint(model_path):
            return self.load_quantized(model_path, options, ctx, training=training)
        _check_widths(model_path, options.group_size)
        with tempfile.TemporaryDirectory(prefix="qpeft-awq-") as tmp:
            seconds = self._quantize(model_path, options, ctx, tmp)
            ctx.notes.append(f"awq: quantized {model_path} (4-bit, group {options.group_size}) in {seconds:.1f}s")
            model = self.load_quantized(tmp, options, ctx, training=training)
            # from_pretrained may keep tensors memory-mapped from the folder: copy them out before it goes
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.data = tensor.data.clone()
        model.config._name_or_path = str(model_path)
        return model

    def _quantize(self, model_path, options, ctx, out_dir: str) -> float:
        """Quantize ``model_path`` with gptqmodel into ``out_dir``; return the seconds it took."""
        if "GPTQMODEL_CPU_WORKERS" not in os.environ and (os.cpu_count() or 1) <= 2:
            os.environ["GPTQMODEL_CPU_WORKERS"] = "2"  # docs/architecture.md: on 2-core machines
        from gptqmodel import GPTQModel
        from gptqmodel.quantization.config import FORMAT, AWQConfig
        from gptqmodel.utils.backend import BACKEND
        from transformers import AutoTokenizer

        tok = ctx.tokenizer or AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        rows = []
        for text in calibration_texts(options):
            ids = tok(text, add_special_tokens=True, truncation=True, max_length=options.calibration_max_length)["input_ids"]
            if len(ids) >= 10:  # gptqmodel drops shorter rows (calibration_data_min_length)
                rows.append({"input_ids": list(ids), "attention_mask": [1] * len(ids)})
        if not rows:
            raise ConfigError("quantizer.options.calibration", "no calibration text of at least 10 tokens")
        t0 = time.perf_counter()
        config = AWQConfig(bits=options.bits, group_size=options.group_size, format=FORMAT.GEMM)
        model = GPTQModel.load(model_path, quantize_config=config, device="cuda" if ctx.device == "cuda" else "cpu")
        # BACKEND.AUTO packs for AwqGEMMLinear, which gptqmodel refuses without CUDA; the torch
        # kernel packs the same GEMM layout on every device.
        model.quantize(rows, batch_size=1, backend=BACKEND.AWQ_TORCH)
        model.save(out_dir)
        seconds = time.perf_counter() - t0
        del model
        return seconds

    def load_quantized(self, path, options, ctx, *, training=False):
        """An AWQ folder (written by :meth:`save_quantized`, gptqmodel, or AutoAWQ in GEMM format)."""
        _require()
        from transformers import AwqConfig

        qc = _quant_config(path) or {}
        if str(qc.get("quant_method", "")).lower() != "awq":
            raise QpeftError(f"awq: {path} is not an AWQ checkpoint (config.json has no quantization_config with quant_method awq)")
        backend = TRAINING_BACKEND if training or options.kernel == "torch" else "auto"
        config = AwqConfig(bits=int(qc.get("bits", 4)), group_size=int(qc.get("group_size", 128)), backend=backend)
        with warnings.catch_warnings():
            # "You passed `quantization_config` ... loading attributes will be overwritten": intended (the backend).
            warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
            model = load_causal_lm(str(path), ctx, quantization_config=config)
        if len(getattr(model, "hf_device_map", None) or {}) == 1:
            del model.hf_device_map  # as gptq: peft's prefix tuning looks for a non-CPU device in it
        model._qpeft_awq_source = str(path)
        return model

    def save_quantized(self, model, out_dir, options, ctx):
        model.save_pretrained(out_dir, safe_serialization=True)

    # ------------------------------------------------------------------ training, merging

    def prepare_for_training(self, model, options, ctx, *, grad_checkpointing):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=grad_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    def full_precision_model(self, model, model_path, options, ctx):
        """``model`` with each AWQ layer replaced by a ``torch.nn.Linear`` holding its dequantized
        weights (gptqmodel's ``dequantize_gemm``), the folded norms kept; no quantization config."""
        import torch
        from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        with torch.no_grad():
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if not hasattr(child, "qweight"):
                        continue
                    if not isinstance(child, AwqTorchLinear):
                        raise QpeftError(f"awq: {type(child).__name__} holds repacked weights; load with training=True to merge")
                    weight = dequantize_gemm(
                        qweight=child.qweight, qzeros=child.qzeros, scales=child.scales, bits=child.bits, group_size=child.group_size
                    )
                    plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    plain.to(device=weight.device, dtype=torch.float32)
                    plain.weight = torch.nn.Parameter(weight.t().float().contiguous(), requires_grad=False)
                    if child.bias is not None:
                        plain.bias = torch.nn.Parameter(child.bias.detach().float().clone(), requires_grad=False)
                    setattr(parent, name, plain)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.config.__dict__.pop("quantization_config", None)
        return model


@hookimpl
def qpeft_register_quantizers(register):
    register(Awq())

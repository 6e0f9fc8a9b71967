"""Quantizer ``gptq``: GPTQ through transformers' ``GPTQConfig`` + optimum + gptqmodel.

The base model is quantized once with calibration text (qpeft's embedded data by default)
and cached as a safetensors checkpoint under ``<qpeft cache>/gptq/<key>``; later runs load
the cache. ``quantized_path`` loads an existing GPTQ checkpoint instead.

Kernels (gptqmodel 7.6.0 ``backend=`` names, chosen by ``kernel``):

* training (``load(training=True)``, ``kernel: auto``): ``gptq_torch`` (``TorchLinear``):
  dequantizes the packed weights and runs a plain ``matmul`` in every mode, so gradients
  flow back through the frozen base to earlier adapters;
* inference (``training=False``, ``kernel: auto``): gptqmodel's own choice, e.g.
  ``TorchAtenLinear`` (``gptq_torch_aten``, int4pack ATen kernel) for 4-bit on CPU,
  Marlin/Machete on CUDA.

SILENT CORRUPTION guarded here (docs/architecture.md, library facts). ``TorchAtenLinear`` and
``TorchFusedLinear`` (both declare ``SUPPORTS_TRAINING = True``, so gptqmodel's
``auto_trainable`` still picks ``TorchAtenLinear`` for 4-bit on CPU) latch on the first
forward that runs with ``module.training == False`` and an input that does not require
grad: ``forward`` calls ``transform_cpu()``, which overwrites ``qweight`` with the ATen int4pack
layout, ``qzeros`` with float zero offsets and ``scales`` with bfloat16, and sets
``linear_mode = "inference"`` for good. Every later forward, in train mode too, goes
through ``_fused_op_forward``, decorated ``@torch.no_grad``: the base layer's output has
no autograd edge to its input, so no gradient reaches adapters of earlier layers (measured:
LoRA gradients ~100% wrong, no warning), and ``dequantize_weight()`` fails or returns
garbage because the buffers no longer hold GPTQ packing. The guard pins ``linear_mode``
to ``"train"`` before any eval forward (``load(training=True)``,
``ensure_training_kernels``), and undoes a latch that already happened by reloading the
module's original tensors from the checkpoint it was loaded from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, QuantizerPlugin
from qpeft.errors import ConfigError, QpeftError
from qpeft.io import MetadataError, read_json_file
from qpeft.modeling import load_causal_lm
from qpeft.quiet import allow_gptqmodel

INSTALL_HINT = "GPTQ needs gptqmodel and optimum: pip install 'qpeft[gptq]' (gptqmodel==7.6.0, optimum>=2.3)"
CACHE_LAYOUT = 1
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)

# kernel option -> (gptqmodel backend, bits, group sizes, devices, sym values, trainable).
# From gptqmodel 7.6.0's QuantLinear SUPPORTS_* attributes (read here without importing
# gptqmodel, which takes ~5-14 s). "trainable": "yes" = backward-safe in every mode,
# "pinned" = latches to an inference-only path unless qpeft pins it (see module docstring),
# "no" = inference only (model.train() raises in gptqmodel).
KERNELS = {
    "torch": ("gptq_torch", (2, 3, 4, 8), GROUP_SIZES, ("cpu", "cuda"), (True, False), "yes"),
    "torch_aten": ("gptq_torch_aten", (4,), (16, 32, 64, 128), ("cpu",), (True, False), "pinned"),
    "torch_fused": ("gptq_torch_fused", (4,), (-1, 16, 32, 64, 128), ("cpu",), (True, False), "pinned"),
    "triton": ("gptq_triton", (2, 4, 8), GROUP_SIZES, ("cuda",), (True, False), "yes"),
    "marlin": ("gptq_marlin", (4, 8), (-1, 32, 64, 128), ("cuda",), (True,), "no"),
    "exllama_v2": ("gptq_exllama_v2", (4,), (-1, 32, 64, 128), ("cuda",), (True, False), "no"),
}
TRAINING_BACKEND = "gptq_torch"


class GptqOptions(Options):
    #: Bits per weight.
    bits: Literal[2, 3, 4, 8] = 4
    #: Columns sharing one scale/zero; -1 = one group per output row (per-channel).
    group_size: int = 128
    #: Quantize columns in order of decreasing activation (GPTQ "act order", desc_act).
    act_order: bool = False
    #: Symmetric quantization (zero point fixed at the middle of the range).
    sym: bool = True
    #: Calibration text: "embedded" (qpeft's embedded text + instruct data) or a .jsonl
    #: (keys text, or prompt/response, or messages) / .txt (blank-line separated) file.
    calibration: str = Field("embedded", min_length=1)
    #: Calibration samples (rows of the calibration data) GPTQ measures the layers on.
    num_calibration_samples: int = Field(64, ge=1, le=100_000)
    #: Calibration samples are cut to this many tokens.
    calibration_max_length: int = Field(512, ge=8, le=65_536)
    #: Load this GPTQ checkpoint (a folder with a GPTQ quantization_config) instead of
    #: quantizing; bits/group_size/act_order/sym are then read from it.
    quantized_path: str | None = None
    #: Cache the quantized model under <qpeft cache>/gptq/<key> and reuse it next time.
    save_quantized: bool = True
    #: "auto": gptq_torch (backward-safe) for training, gptqmodel's fastest for inference.
    #: torch_aten/torch_fused train through qpeft's pin (dequantize + matmul); torch_fused
    #: then still casts float32 activations to bfloat16. marlin/exllama_v2: inference only.
    kernel: Literal["auto", "torch", "torch_aten", "torch_fused", "triton", "marlin", "exllama_v2"] = "auto"
    #: Let gptqmodel torch.compile its dequantization (TorchLinear). Off: on CPU the first
    #: forward of a 2-layer model took 31 s compiling, then 10 s per forward.
    torch_compile: bool = False

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, GROUP_SIZES))}")
        return v


def _require_gptq() -> None:
    allow_gptqmodel()  # the command line defers gptqmodel's import until a GPTQ run needs it
    for name in ("gptqmodel", "optimum"):
        if importlib.util.find_spec(name) is None:
            raise ConfigError("quantizer.name", f"{name} is not installed. {INSTALL_HINT}")
    if importlib.util.find_spec("optimum.gptq") is None:
        raise ConfigError("quantizer.name", f"optimum has no GPTQ support (optimum.gptq). {INSTALL_HINT}")


def _set_env() -> None:
    # docs/architecture.md (library facts): GPTQMODEL_CPU_WORKERS=2 on 2-core machines. Read at import.
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and (os.cpu_count() or 1) <= 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


# ---------------------------------------------------------------------------- checkpoints


def indivisible_in_features(config_dir: str | Path, group_size: int) -> list[int]:
    """Input widths of the model's linear layers (from its config.json) that ``group_size`` does
    not divide. optimum picks one kernel class for every layer, and on CUDA gptqmodel's "auto"
    picks Marlin, which refuses such layers outright (SmolLM2's 576-wide layers with group 128:
    "in_features: 576 must be divisible by group_size: 128")."""
    if group_size <= 0:
        return []
    try:
        cfg = read_json_file(Path(config_dir) / "config.json")
    except (OSError, MetadataError):
        return []
    if not isinstance(cfg, dict):
        return []
    cfg = cfg.get("text_config", cfg)
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    widths = {hidden, cfg.get("intermediate_size")}
    if hidden and heads:
        widths.add(int(cfg.get("head_dim") or hidden // heads) * heads)  # o_proj's input
    return sorted(w for w in widths if isinstance(w, int) and w % group_size)


def _checkpoint_quant_config(path: Path) -> dict:
    """The ``quantization_config`` of a GPTQ checkpoint folder (ConfigError if it is not one)."""
    key = "quantizer.options.quantized_path"
    if not path.is_dir():
        raise ConfigError(key, f"GPTQ checkpoint folder not found: {path}")
    try:
        cfg = read_json_file(path / "config.json")
    except FileNotFoundError:
        raise ConfigError(key, f"{path} is not a Hugging Face model folder (no config.json)") from None
    except MetadataError as exc:
        raise ConfigError(key, f"{path / 'config.json'}: {exc.reason}") from None
    qc = (cfg.get("quantization_config") if isinstance(cfg, dict) else None) or {}
    if not isinstance(qc, dict):
        raise ConfigError(key, f"{path / 'config.json'}: quantization_config is not an object")
    if str(qc.get("quant_method", "")).lower() != "gptq":
        raise ConfigError(key, f"{path} is not a GPTQ checkpoint (quantization_config.quant_method is {qc.get('quant_method')!r})")
    if not list(path.glob("*.safetensors")):
        raise ConfigError(key, f"{path} has no .safetensors weights (qpeft loads safetensors only)")
    return qc


def _spec(options: GptqOptions) -> dict:
    """bits/group_size/sym/desc_act the model will have: from the checkpoint, else the options."""
    if options.quantized_path:
        qc = _checkpoint_quant_config(Path(options.quantized_path).expanduser())
        return {
            "bits": int(qc.get("bits", 4)),
            "group_size": int(qc.get("group_size", 128)),
            "sym": bool(qc.get("sym", True)),
            "desc_act": bool(qc.get("desc_act", False)),
            "source": "quantized_path",
        }
    return {"bits": options.bits, "group_size": options.group_size, "sym": options.sym, "desc_act": options.act_order, "source": "options"}


# ---------------------------------------------------------------------------- calibration


def _calibration_path(options: GptqOptions) -> Path | None:
    return None if options.calibration == "embedded" else Path(options.calibration).expanduser()


def _check_calibration(options: GptqOptions) -> None:
    path = _calibration_path(options)
    if path is None:
        return
    key = "quantizer.options.calibration"
    how = "give 'embedded' (qpeft's own text) or a .jsonl file (keys text, or prompt/response, or messages) or a .txt file"
    if path.suffix.lower() not in (".jsonl", ".txt"):
        raise ConfigError(key, f"{path}: unsupported file type {path.suffix!r}; {how}")
    if not path.is_file():
        raise ConfigError(key, f"calibration file not found: {path}; {how}")


def _row_text(row) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return ""
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("prompt"), str):
        return row["prompt"] + "\n" + str(row.get("response") or "")
    if isinstance(row.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict))
    return ""


def _read_texts(path: Path) -> list[str]:
    key = "quantizer.options.calibration"
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path}: not UTF-8 text") from None
    if path.suffix.lower() == ".txt":
        return [b.strip() for b in raw.split("\n\n") if b.strip()]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(_row_text(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ConfigError(key, f"{path}: row {n} is not valid JSON: {exc.msg}") from None
    return texts


def calibration_texts(options: GptqOptions) -> list[str]:
    """The calibration texts, shuffled with a fixed seed, at most ``num_calibration_samples``."""
    path = _calibration_path(options)
    if path is None:
        from qpeft.data import EMBEDDED_DATA

        texts = _read_texts(EMBEDDED_DATA / "text_train.jsonl") + _read_texts(EMBEDDED_DATA / "instruct_train.jsonl")
    else:
        _check_calibration(options)
        texts = _read_texts(path)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError("quantizer.options.calibration", f"{path or 'embedded data'}: no text to calibrate on")
    random.Random(0).shuffle(texts)
    return texts[: options.num_calibration_samples]


def _calibration_digest(options: GptqOptions) -> str:
    from qpeft.data import EMBEDDED_DATA

    path = _calibration_path(options)
    files = [EMBEDDED_DATA / "text_train.jsonl", EMBEDDED_DATA / "instruct_train.jsonl"] if path is None else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def _model_fingerprint(model_path: str) -> dict:
    path = Path(model_path)
    if not path.is_dir():
        return {"id": model_path}
    files = sorted(list(path.glob("*.safetensors")) + [path / "config.json"])
    return {
        "path": str(path.resolve()),
        "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()],
    }


def cache_dir(model_path: str, options: GptqOptions, ctx) -> Path:
    """Where the quantized ``model_path`` is cached for these options."""
    from qpeft.model_source import cache_root

    key = {
        "layout": CACHE_LAYOUT,
        "model": _model_fingerprint(model_path),
        "dtype": ctx.dtype,
        "bits": options.bits,
        "group_size": options.group_size,
        "act_order": options.act_order,
        "sym": options.sym,
        "calibration": _calibration_digest(options),
        "num_calibration_samples": options.num_calibration_samples,
        "calibration_max_length": options.calibration_max_length,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(model_path.rstrip("/")).name or "model"
    return cache_root() / "gptq" / f"{name}-{options.bits}bit-g{options.group_size}-{digest}"


# ---------------------------------------------------------------------------- the plugin


class Gptq(QuantizerPlugin):
    name = "gptq"
    description = "GPTQ 2/3/4/8-bit (transformers GPTQConfig + optimum + gptqmodel), quantized once and cached"
    Options = GptqOptions
    backend_packages = ("gptqmodel", "optimum")
    capabilities = Capabilities(
        merge_source="original",
        bits=4,  # the default options'; bits() reads the options
        saves_quantized="transformers",
        linear_layers="gptq",
    )

    def bits(self, options):
        """The ``bits`` option, or the width of the ``quantized_path`` checkpoint."""
        try:
            return _spec(options)["bits"]
        except ConfigError:
            return options.bits

    def cache_key(self, options):
        """None: gptq caches its quantized checkpoints itself (:func:`cache_dir`, keyed by its
        calibration data too, option ``save_quantized``)."""
        return None

    def load_quantized(self, path, options, ctx, *, training=False):
        """A GPTQ folder written by ``save_quantized``: loaded as ``quantized_path``."""
        return self.load(path, options.model_copy(update={"quantized_path": str(path)}), ctx, training=training)

    # ------------------------------------------------------------------ checks

    def check(self, options, ctx):
        _require_gptq()
        spec = _spec(options)
        if spec["source"] == "options":
            _check_calibration(options)
        elif spec["bits"] != options.bits or spec["group_size"] != options.group_size:
            ctx.notes.append(
                f"gptq: quantized_path is {spec['bits']}-bit, group {spec['group_size']}; bits/group_size/act_order/sym options are ignored"
            )
        peft = getattr(getattr(ctx.config, "peft", None), "options", None) or {}
        if peft.get("use_dora"):
            raise ConfigError("peft.options.use_dora", "peft's LoRA layer for GPTQ (GPTQLoraLinear) does not support DoRA")
        if options.kernel == "auto":
            if spec["bits"] == 3:
                ctx.notes.append("gptq: 3-bit runs on the gptq_torch kernel only (slowest)")
            return
        backend, bits, groups, devices, syms, _ = KERNELS[options.kernel]
        key = "quantizer.options.kernel"
        able = [k for k, v in KERNELS.items() if spec["bits"] in v[1] and ctx.device in v[3]]
        alt = f"; kernels for {spec['bits']}-bit on {ctx.device}: auto, {', '.join(able)}" if able else ""
        if ctx.device not in devices:
            raise ConfigError(key, f"{options.kernel!r} ({backend}) runs on {'/'.join(devices)}, not {ctx.device}{alt}")
        if spec["bits"] not in bits:
            raise ConfigError(key, f"{options.kernel!r} ({backend}) supports {'/'.join(map(str, bits))}-bit, not {spec['bits']}-bit{alt}")
        if spec["group_size"] not in groups:
            raise ConfigError(
                key, f"{options.kernel!r} supports group_size {', '.join(map(str, groups))}, not {spec['group_size']}; use kernel torch"
            )
        if spec["sym"] not in syms:
            raise ConfigError(key, f"{options.kernel!r} supports symmetric quantization only (sym: true)")
        if ctx.device == "cuda" and ctx.dtype == "float32" and options.kernel in ("triton", "marlin", "exllama_v2"):
            raise ConfigError("model.dtype", f"gptq kernel {options.kernel!r} computes in float16/bfloat16; set model.dtype to one of them")

    def _backend(self, options, training: bool, ctx=None) -> str:
        if options.kernel == "auto":
            # gptqmodel's own choice on CUDA is Marlin, which computes in float16/bfloat16
            # only: a float32 run (e.g. `qpeft merge`'s verification) would fail at its first
            # forward, so float32 gets the torch kernel.
            if ctx is not None and ctx.device == "cuda" and ctx.dtype == "float32":
                return TRAINING_BACKEND
            return TRAINING_BACKEND if training else "auto"
        backend, *_, trainable = KERNELS[options.kernel]
        if training and trainable == "no":
            raise ConfigError(
                "quantizer.options.kernel",
                f"{options.kernel!r} ({backend}) is inference-only and cannot train adapters; use kernel auto or torch",
            )
        return backend

    # ------------------------------------------------------------------ loading

    def load(self, model_path, options, ctx, *, training):
        _require_gptq()
        backend = self._backend(options, training, ctx)
        _set_env()
        checkpoint = Path(options.quantized_path).expanduser() if options.quantized_path else None
        # Reading the checkpoint's quantization config also checks that it is one (ConfigError).
        group = int(_checkpoint_quant_config(checkpoint).get("group_size", options.group_size)) if checkpoint else options.group_size
        if backend == "auto" and ctx.device == "cuda":
            odd = indivisible_in_features(checkpoint or Path(model_path).expanduser(), group)
            if odd:
                backend = TRAINING_BACKEND
                ctx.notes.append(f"gptq: layers {odd} wide are not divisible by group {group}: the {TRAINING_BACKEND} kernel, not Marlin")
        if checkpoint:
            source = checkpoint
            model = self._load_quantized(source, backend, ctx)
        else:
            target = cache_dir(model_path, options, ctx)
            if options.save_quantized and (target / "config.json").is_file():
                ctx.notes.append(f"gptq: loaded cached quantized model {target}")
                source, model = target, self._load_quantized(target, backend, ctx)
            else:
                model, seconds = self._quantize(model_path, options, ctx)
                note = f"gptq: quantized {model_path} ({options.bits}-bit, group {options.group_size}) in {seconds:.1f}s"
                if options.save_quantized:
                    self._save(model, target, model_path, options, seconds)
                    note += f", cached at {target}"
                ctx.notes.append(note)
                source = target if options.save_quantized else None
                if options.save_quantized and backend != TRAINING_BACKEND:
                    del model
                    model = self._load_quantized(target, backend, ctx)
                elif backend != TRAINING_BACKEND:
                    ctx.notes.append(f"gptq: save_quantized is off, so the model keeps the {TRAINING_BACKEND} kernel")
        self._finalize(model, source, options, training)
        return model

    def _load_quantized(self, path: Path, backend: str, ctx):
        from transformers import GPTQConfig

        qc = _checkpoint_quant_config(path)
        with warnings.catch_warnings():
            # "You passed `quantization_config` ... loading attributes will be overwritten": intended.
            warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
            return load_causal_lm(str(path), ctx, quantization_config=GPTQConfig(bits=int(qc.get("bits", 4)), backend=backend))

    def _quantize(self, model_path, options, ctx):
        from transformers import AutoTokenizer, GPTQConfig

        tok = ctx.tokenizer or AutoTokenizer.from_pretrained(model_path, trust_remote_code=ctx.config.model.trust_remote_code)
        dataset = []
        for text in calibration_texts(options):
            ids = tok(text, add_special_tokens=True, truncation=True, max_length=options.calibration_max_length)["input_ids"]
            if ids:
                dataset.append({"input_ids": [list(ids)], "attention_mask": [[1] * len(ids)]})
        cfg = GPTQConfig(
            bits=options.bits,
            dataset=dataset,
            group_size=options.group_size,
            desc_act=options.act_order,
            # Group-aware act order (GAR) needs groups and no desc_act; gptqmodel raises otherwise.
            act_group_aware=options.group_size > 0 and not options.act_order,
            sym=options.sym,
            backend=TRAINING_BACKEND,  # packs with TorchLinear, which every device can load
            model_seqlen=options.calibration_max_length,
        )
        t0 = time.perf_counter()
        try:
            model = load_causal_lm(model_path, ctx, quantization_config=cfg)
        except ValueError as exc:
            if "divisible by" in str(exc):
                raise QpeftError(
                    f"gptq: {model_path} has a linear layer gptqmodel cannot pack ({exc}); "
                    "GPTQ needs in/out features that are multiples of 32"
                ) from None
            raise
        seconds = time.perf_counter() - t0
        # GPTQConfig keeps the tokenized calibration set; do not write it into config.json.
        for qc in (
            getattr(model.config, "quantization_config", None),
            getattr(getattr(model, "hf_quantizer", None), "quantization_config", None),
        ):
            if qc is not None:
                qc.dataset = None
                qc.tokenizer = None
        model.eval()
        return model, seconds

    def _save(self, model, target: Path, model_path, options, seconds: float) -> None:
        from importlib.metadata import version

        from qpeft.io import atomic_dir, atomic_write_json

        with atomic_dir(target) as tmp:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*offloaded modules.*", category=UserWarning)
                model.save_pretrained(tmp, safe_serialization=True)
            atomic_write_json(
                tmp / "qpeft_gptq.json",
                {
                    "source_model": str(model_path),
                    "options": options.model_dump(mode="json"),
                    "quantize_seconds": round(seconds, 2),
                    "gptqmodel": version("gptqmodel"),
                    "optimum": version("optimum"),
                    "transformers": version("transformers"),
                },
            )

    def _finalize(self, model, source: Path | None, options, training: bool) -> None:
        """Drop gptqmodel's torch.compile wrappers (unless asked), record where each layer's
        tensors came from (for undoing a latch), and pin latching kernels when training."""
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear

        if len(getattr(model, "hf_device_map", None) or {}) == 1:
            # transformers' GPTQ path keeps hf_device_map={"": "cpu"} (bnb and plain loads do
            # not); peft's prefix tuning then fails with StopIteration looking for a non-CPU
            # device. A one-entry map says nothing a model on one device does not.
            del model.hf_device_map
        qc = getattr(model.config, "quantization_config", None)
        fmt = (qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})).get("checkpoint_format", "gptq")
        for name, module in model.named_modules():
            if not isinstance(module, BaseQuantLinear):
                continue
            if not options.torch_compile and "dequantize_weight" in vars(module):
                del module.dequantize_weight  # TorchLinear.optimize() set a torch.compile wrapper
            module._qpeft_checkpoint = (str(source), name, fmt) if source is not None else None
            if hasattr(module, "linear_mode") and (training or module.in_features % max(module.group_size, 1)):
                # Pinned layers use the dequantize+matmul path in every mode. ATen's int4pack
                # kernel also needs in_features divisible by group_size, so such layers are
                # pinned for inference too (else: "expect K to be divisible by qGroupSize").
                _pin(module)
        if training:
            self.ensure_training_kernels(model, options)
        kernels = sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})
        model._qpeft_gptq_kernels = kernels

    # ------------------------------------------------------------------ training

    def prepare_for_training(self, model, options, ctx, *, grad_checkpointing):
        from peft import prepare_model_for_kbit_training

        self.ensure_training_kernels(model, options)
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )

    def ensure_training_kernels(self, model, options):
        """Pin latching kernels (TorchAtenLinear, TorchFusedLinear) to their backward-safe
        dequantize+matmul path, and restore layers that already latched to the int4pack
        inference kernel from their checkpoint (see the module docstring)."""
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear

        latched = []
        for module in model.modules():
            if not isinstance(module, BaseQuantLinear):
                continue
            if getattr(type(module), "SUPPORTS_TRAINING", True) is False:
                raise QpeftError(
                    f"gptq: {type(module).__name__} is an inference-only kernel; "
                    "load with training=True (kernel auto or torch) to train or merge"
                )
            if _is_latched(module):
                latched.append(module)
            elif hasattr(module, "linear_mode"):
                _pin(module)
            _reset_caches(module)
        if latched:
            _restore_from_checkpoint(latched)

    def full_precision_model(self, model, model_path, options, ctx):
        # GPTQ weights are not dequantized for a merge: the original checkpoint is loaded.
        return load_causal_lm(model_path, ctx)


# ---------------------------------------------------------------------------- the guard


def _pin(module) -> None:
    from gptqmodel.looper.linear_mode import LinearMode

    module.linear_mode = LinearMode.TRAIN


def _is_latched(module) -> bool:
    mode = getattr(module, "linear_mode", None)
    return mode is not None and str(getattr(mode, "value", mode)) == "inference"


def _reset_caches(module) -> None:
    """TorchLinear caches decoded zeros/g_idx for its eval path and may move g_idx to the CPU."""
    if hasattr(module, "_stream_reset_cache"):
        module._stream_reset_cache()
    qweight, g_idx = getattr(module, "qweight", None), getattr(module, "g_idx", None)
    if qweight is not None and g_idx is not None and g_idx.device != qweight.device:
        module.g_idx = g_idx.to(qweight.device)


def _restore_from_checkpoint(modules) -> None:
    """Reload qweight/qzeros/scales/g_idx of latched layers from their checkpoint (exact:
    transform_cpu rounded the scales to bfloat16, so the tensors cannot be rebuilt from memory)."""
    import torch
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    from safetensors import safe_open

    by_file: dict[str, list] = {}
    for module in modules:
        origin = getattr(module, "_qpeft_checkpoint", None)
        if origin is None:
            raise QpeftError(
                f"gptq: a {type(module).__name__} layer ran an eval forward and switched to its "
                "inference-only int4pack kernel, and there is no checkpoint to restore it from "
                "(save_quantized was off): reload the model with training=True"
            )
        folder, key, _ = origin
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            by_file.setdefault(_shard_of(Path(folder), f"{key}.{name}"), []).append((module, name))
    fresh: dict[tuple[int, str], object] = {}
    for file, wanted in by_file.items():
        with safe_open(file, framework="pt") as f:
            for module, name in wanted:
                fresh[(id(module), name)] = f.get_tensor(f"{module._qpeft_checkpoint[1]}.{name}")
    for module in modules:
        device = module.g_idx.device
        probe = _probe(module)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(module, name, fresh[(id(module), name)].to(device))
        if module._qpeft_checkpoint[2] == "gptq" and getattr(module, "REQUIRES_FORMAT_V2", False):
            convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
        for attr in ("scales_and_zeros", "torch_fused_op"):
            if hasattr(module, attr):
                delattr(module, attr)
        _pin(module)
        if probe is not None:
            x, expected = probe
            with torch.no_grad():
                got = module.dequantize_weight()[: x.shape[0]].float()
            if (got - expected).abs().max() > 0.02 * expected.abs().max() + 1e-6:
                raise QpeftError(f"gptq: restoring {module._qpeft_checkpoint[1]} from {module._qpeft_checkpoint[0]} gave different weights")


def _probe(module):
    """First rows of the dequantized weight as the latched kernel computes them (bf16), to
    check the restored tensors against; None if the kernel cannot be probed."""
    import torch

    try:
        n = min(8, module.in_features)
        x = torch.eye(n, module.in_features, dtype=torch.bfloat16, device=module.g_idx.device)
        with torch.no_grad():
            out = module._fused_op_forward(x).float()
        return x, out
    except Exception:  # noqa: BLE001 - the probe is only a safety check
        return None


def _shard_of(folder: Path, tensor: str) -> str:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        if tensor in weight_map:
            return str(folder / weight_map[tensor])
    single = folder / "model.safetensors"
    if single.is_file():
        return str(single)
    raise QpeftError(f"gptq: cannot find tensor {tensor} in {folder} to restore a latched layer")


@hookimpl
def qpeft_register_quantizers(register):
    register(Gptq())

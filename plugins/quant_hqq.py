"""Quantizer ``hqq``: Half-Quadratic Quantization (the ``hqq`` package), 8/4/3/2 bits, no
calibration data.

transformers' ``HqqConfig`` refuses any ``device_map`` that holds the CPU (5.23:
``HqqHfQuantizer.validate_environment``), so qpeft loads the float model and replaces each
linear layer (the output head excepted) by hqq's ``HQQLinear`` itself — the same layers
transformers would build — on CPU and CUDA alike. Each ``HQQLinear`` runs hqq's pure-PyTorch
backend (``HQQBackend.PYTORCH``: unpack, ``(W_q - zero) * scale``, ``matmul``), which is
differentiable with respect to its input in every mode, so LoRA trains through it; peft wraps
the layers with its ``HqqLoraLinear``.

Saving: ``save_quantized`` writes the model's config and every tensor (hqq's own
safetensors-compatible ``HQQLinear.state_dict``, metadata encoded as tensors) into one
``model.safetensors`` plus ``qpeft-hqq.json``; ``load_quantized`` (and ``load`` given such a
folder as ``model.name_or_path``) builds the model from its config and loads the layers back
without quantizing again.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, QuantizerPlugin
from qpeft.errors import ConfigError, QpeftError
from qpeft.modeling import enable_gradient_checkpointing, freeze, load_causal_lm

INSTALL_HINT = "hqq is not installed: pip install 'qpeft[hqq]' (hqq==0.2.8.post1; DISABLE_CUDA=1 skips its CUDA extension build)"
#: The marker file of a folder written by :meth:`Hqq.save_quantized`.
SAVED_MARKER = "qpeft-hqq.json"
SAVED_LAYOUT = 1
GROUP_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024)


class HqqOptions(Options):
    #: Bits per weight code (hqq packs 3-bit codes ten to an int32, 3.2 bits each).
    nbits: Literal[8, 4, 3, 2] = 4
    #: Weights sharing one scale and zero point (each stored in the run's dtype: on a float32 CPU
    #: run they add 64 / group_size bits per weight).
    group_size: int = 64
    #: Axis the groups run along: 1 = along each row's inputs (hqq's advice for low bits), 0 = along columns.
    axis: Literal[0, 1] = 1
    #: Refine scales and zero points with HQQ's half-quadratic solver (False: plain min-max rounding).
    optimize: bool = True
    #: Module names kept in full precision (the output head always is).
    skip_modules: list[str] | None = None

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, GROUP_SIZES))}")
        return v


def _require_hqq() -> None:
    if importlib.util.find_spec("hqq") is None:
        raise ConfigError("quantizer.name", INSTALL_HINT)


def _quant_config(options: HqqOptions) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=options.nbits, group_size=options.group_size, axis=options.axis, quant_zero=False, quant_scale=False)


def _targets(model, options: HqqOptions) -> list[tuple]:
    """(parent, attribute name, full name, linear) of every ``torch.nn.Linear`` to quantize."""
    import torch

    head = model.get_output_embeddings()
    skip = set(options.skip_modules or ())
    out = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is torch.nn.Linear and child is not head and name not in skip and full not in skip:
                out.append((parent, name, full, child))
    return out


def _check_group_size(targets, options: HqqOptions) -> None:
    bad = sorted({c.in_features if options.axis == 1 else c.out_features for *_, c in targets} - {0})
    bad = [w for w in bad if w % options.group_size]
    if bad:
        side = "input" if options.axis == 1 else "output"
        raise ConfigError(
            "quantizer.options.group_size",
            f"{options.group_size} does not divide the {side} widths {bad} of this model's linear layers (axis {options.axis}); "
            f"choose a group size dividing them",
        )


class Hqq(QuantizerPlugin):
    name = "hqq"
    description = "HQQ (half-quadratic, no calibration) 8/4/3/2-bit, pure-PyTorch backend: CPU and CUDA"
    Options = HqqOptions
    backend_packages = ("hqq",)
    # peft 0.21's LoHa/LoKr/IA3 layers accept only torch.nn.Linear/Conv targets and refuse
    # HQQLinear at attach time (TypeError/ValueError, checked): refused here before loading, for
    # when those methods are installed as qpeft plugins.
    capabilities = Capabilities(
        merge_source="dequantize",
        bits=4,
        saves_quantized="plugin",
        linear_layers="hqq",
        incompatible={
            method: f"peft 0.21 has no {label} layer for HQQ's HQQLinear (it supports only torch.nn.Linear and Conv targets)"
            for method, label in (("loha", "LoHa"), ("lokr", "LoKr"), ("ia3", "IA3"))
        },
    )

    def bits(self, options):
        return options.nbits

    def check(self, options, ctx):
        _require_hqq()

    def load(self, model_path, options, ctx, *, training):
        if (Path(model_path) / SAVED_MARKER).is_file():
            return self.load_quantized(model_path, options, ctx, training=training)
        from hqq.core.quantize import HQQBackend, HQQLinear

        # The backend is a class attribute of HQQLinear; PYTORCH is the one that back-propagates
        # on every device (the ATen/torch.compile ones need hqq's extension or a compiler).
        HQQLinear.set_backend(HQQBackend.PYTORCH)
        model = load_causal_lm(model_path, ctx)
        targets = _targets(model, options)
        _check_group_size(targets, options)
        config = _quant_config(options)
        config["weight_quant_params"]["optimize"] = options.optimize
        for parent, name, _, linear in targets:
            layer = HQQLinear(linear, config, compute_dtype=linear.weight.dtype, device=str(linear.weight.device))
            setattr(parent, name, layer)
        model.hqq_quantized = True  # what peft's helpers look for on an HQQ model
        return model

    def prepare_for_training(self, model, options, ctx, *, grad_checkpointing):
        freeze(model)
        if grad_checkpointing:
            enable_gradient_checkpointing(model)
        return model

    def dequantized_weight(self, module, options):
        from hqq.core.quantize import HQQLinear

        if not isinstance(module, HQQLinear):
            return None
        return module.dequantize().float().reshape(module.out_features, module.in_features)

    def full_precision_model(self, model, model_path, options, ctx):
        import torch
        from hqq.core.quantize import HQQLinear

        with torch.no_grad():
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, HQQLinear):
                        weight = child.dequantize()
                        plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                        plain.to(device=weight.device, dtype=weight.dtype)
                        plain.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
                        if child.bias is not None:
                            plain.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                        setattr(parent, name, plain)
        model.__dict__.pop("hqq_quantized", None)
        return model

    # ------------------------------------------------------------------------ saving

    def save_quantized(self, model, out_dir, options, ctx):
        from safetensors.torch import save_file

        from qpeft.io import atomic_write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        state, seen = {}, {}
        for key, value in model.state_dict().items():
            # tied tensors (embeddings and head) are stored once; the model ties them again on load
            if value.data_ptr() in seen and value.numel() and value.device.type != "meta":
                continue
            seen[value.data_ptr()] = key
            state[key] = value.detach().contiguous().cpu()
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        quantized = [n for n, m in model.named_modules() if type(m).__name__ == "HQQLinear"]
        atomic_write_json(out / SAVED_MARKER, {"layout": SAVED_LAYOUT, "options": options.model_dump(mode="json"), "layers": quantized})

    def load_quantized(self, path, options, ctx, *, training=False):
        from hqq.core.quantize import HQQBackend, HQQLinear
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        from qpeft.io import MetadataError, read_json_file

        folder = Path(path)
        try:
            marker = read_json_file(folder / SAVED_MARKER)
        except (OSError, MetadataError) as exc:
            raise QpeftError(f"{folder} is not a model saved by qpeft's hqq quantizer ({SAVED_MARKER}: {exc})") from None
        if not isinstance(marker, dict) or marker.get("layout") != SAVED_LAYOUT or not isinstance(marker.get("layers"), list):
            raise QpeftError(f"{folder / SAVED_MARKER}: layout {marker.get('layout') if isinstance(marker, dict) else marker!r} unknown")
        saved = HqqOptions.model_validate(marker.get("options") or {})
        if saved.model_dump() != options.model_dump():
            ctx.notes.append(f"hqq: {folder} was quantized with {saved.model_dump(mode='json')}; those options apply")
        HQQLinear.set_backend(HQQBackend.PYTORCH)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        config.__dict__.pop("quantization_config", None)
        device = "cuda" if ctx.device == "cuda" else "cpu"
        # Built in float from the config (its weights are overwritten below): the same modules and
        # non-persistent buffers (rotary frequencies) a from_pretrained load computes.
        model = AutoModelForCausalLM.from_config(config, dtype=ctx.torch_dtype).to(device)
        state = load_file(str(folder / "model.safetensors"), device=device)
        qconfig = _quant_config(saved)
        for name in marker["layers"]:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            prefix = name + "."
            layer_state = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
            if "W_q" not in layer_state:
                raise QpeftError(f"{folder}: no saved tensors for the quantized layer {name}")
            layer = HQQLinear(None, qconfig, compute_dtype=ctx.torch_dtype, device=device, initialize=False)
            layer.load_state_dict(layer_state)
            setattr(parent, attr, layer)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = config.tie_word_embeddings and "lm_head.weight" not in state
        # HQQLinear reports its own keys as missing (they were loaded into it above)
        layers = tuple(name + "." for name in marker["layers"])
        missing = [k for k in missing if not (tied and k == "lm_head.weight") and not k.startswith(layers)]
        if missing or unexpected:
            raise QpeftError(f"{folder}: saved tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        if tied:
            model.tie_weights()
        model.eval()
        model.hqq_quantized = True
        return model


@hookimpl
def qpeft_register_quantizers(register):
    register(Hqq())

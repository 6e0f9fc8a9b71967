"""``qpeft.testing``: the conformance kit plugin authors run in their own test suite.

A quantizer plugin passes when it is registered and usable the way qpeft will use it::

    # tests/test_conformance.py of your package
    from qpeft.testing import QuantizerConformance

    class TestMyQuantizer(QuantizerConformance):
        quantizer = "my-int8"          # the name your plugin registers
        options = {"group_size": 64}   # quantizer.options for the kit's runs (default: none)

pytest collects the inherited ``test_*`` methods; each runs one check on a tiny random Llama
(2 layers, hidden 128, MLP 256, vocabulary 512, built offline and cached under
``<qpeft cache>/testing``) in float32:

=============================  ===================================================================
``test_registration``          found by name through the ``qpeft`` entry points, a
                               ``QuantizerPlugin`` targeting this qpeft's plugin API, declared
                               capabilities well-formed, plugin module imports no torch
``test_options_schema``        options model: defaults/given options validate, unknown keys are
                               refused naming the key, JSON schema, JSON round trip, a run config
                               naming the quantizer resolves without loading a weight
``test_load_tiny_model``       ``load()`` gives a causal LM whose logits are finite and close to
                               the float32 model; LoRA's ``all-linear`` finds the same layers
``test_weight_memory_saved``   bytes held by the quantized linear layers ≈ ``bits(options)`` / 32
                               of float32; ``storage_bytes`` = the bytes really held (outside
                               parameters and buffers too); ``count_parameters`` = float model's
``test_lora_gradients``        after an eval-mode forward and ``ensure_training_kernels``, LoRA
                               gradients on every layer equal those of the same LoRA on a float32
                               model holding the quantized weights (the full-precision reference)
``test_train_save_reload``     ``qpeft run``: loss goes down, base weights untouched, the saved
                               adapter reloads on a fresh quantized base with the same logits
``test_merge``                 ``qpeft merge`` reproduces the adapter's logits with a plain
                               float model, or, for ``merge_source="none"``, refuses clearly
``test_missing_library``       without the backend library, a one-line ConfigError, no traceback
``test_bfloat16``              a bfloat16 load honours ``model.dtype``; LoRA trains on it
``test_quantized_save``        ``saves_quantized``: the saved model loads back with equal logits
``test_option_sets``           every ``option_grid`` combination loads with ``bits(options)``
``test_hf_trainer``            ``qpeft run`` with the ``hf`` trainer trains and reloads
``test_inference_path``        ``load(training=False)`` ≈ the training path; generation works
=============================  ===================================================================

Without pytest, :func:`check_quantizer` runs the same checks and returns what they measured;
``python -m qpeft.testing NAME [--options JSON]`` prints it.

A trainer plugin is checked by :func:`check_trainer` (:class:`TrainerChecker`): it reads the
lazy datasets in qpeft's order, reports every step, trains, and resumes at its checkpoint's
data position with the uninterrupted run's adapter. An evaluator plugin is checked by
:func:`check_evaluator` (:class:`EvaluatorChecker`): it resolves from a run config, evaluates
offline, deterministically, without changing the model.

This module imports neither pytest nor torch at import time; both are imported when used.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from .hookspecs import hookimpl

#: Bumped when the tiny model changes, so cached copies (and GPTQ caches keyed on them) renew.
TINY_LAYOUT = 1
#: Modules a quantizer plugin's module must not import at import time (listing plugins and
#: rejecting configs must not pay for loading a backend library).
HEAVY_MODULES = ("torch", "transformers", "peft")
#: Default tolerances per ``merge_source`` for the merged model's max |Δlogit| to the adapter on
#: its quantized base: exact float error when merging into the very weights the adapter trained
#: against; the base's own quantization error when merging into the original checkpoint.
MERGE_TOLERANCE = {"self": 1e-3, "dequantize": 1e-3, "original": 0.5}


class ConformanceError(AssertionError):
    """A plugin does not do what qpeft relies on; the message says what and by how much."""


# ---------------------------------------------------------------------------- tiny models


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on qpeft's embedded text (offline, about a second).

    Special tokens: ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2, EOS) and ``<pad>`` (3).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import EMBEDDED_DATA

    rows = (EMBEDDED_DATA / "text_train.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in rows if line.strip()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_llama(tok, path, *, tie_word_embeddings: bool = True) -> str:
    """Save a seeded 2-layer random Llama (hidden 128, MLP 256) with ``tok`` into ``path``.

    Layer widths are multiples of 128, as bitsandbytes' 4-bit CPU kernels and GPTQ packing need.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def tiny_model_path(root: str | Path | None = None) -> str:
    """The kit's tiny Llama (untied head, BPE vocabulary 512), built once and cached.

    ``root`` defaults to ``<qpeft cache>/testing``; a stable path lets quantizers that cache
    their quantized models by source path (``gptq``) reuse them across test runs.
    """
    from .io import atomic_dir
    from .model_source import cache_root

    target = Path(root or cache_root() / "testing") / f"tiny-llama-v{TINY_LAYOUT}"
    if not (target / "config.json").is_file():
        with atomic_dir(target, replace=True) as tmp:
            save_tiny_llama(tiny_tokenizer(), tmp, tie_word_embeddings=False)
    return str(target)


# ---------------------------------------------------------------------------- measurements


def tensor_nbytes(t) -> int:
    """Bytes a tensor really holds: tensor subclasses (torchao's quantized tensors and the
    like) are counted by their inner tensors, not by their logical float shape."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.nelement() * t.element_size()


def module_nbytes(module) -> int:
    """Bytes held by a module's parameters and buffers (recursively), by :func:`tensor_nbytes`."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_nbytes(t)
    return total


def linear_modules(model) -> dict:
    """Every linear layer (``torch.nn.Linear`` or a quantized layer with ``in_features`` and
    ``out_features``, e.g. GPTQ's QuantLinear) by its full name, output head included."""
    import torch

    found = {}
    for name, module in model.named_modules():
        linear = isinstance(module, torch.nn.Linear) or (
            type(module).__name__.endswith("Linear") and hasattr(module, "in_features") and hasattr(module, "out_features")
        )
        if linear and name and not any(name.startswith(p + ".") for p in found):
            found[name] = module
    return found


def effective_weights(model) -> dict:
    """The float32 weight each linear layer of ``model`` actually applies, read by probing it
    with the identity matrix (no_grad, train mode): ``W.T = layer(I) - layer(0)``.

    Quantizer-agnostic: whatever a layer stores (packed ints, scales, tensor subclasses), this
    is the matrix its kernel multiplies by, so a float32 model holding these weights is the
    exact full-precision reference for gradients through the quantized model.
    """
    import torch

    out = {}
    was_training = model.training
    model.train()
    with torch.no_grad():
        for name, layer in linear_modules(model).items():
            ref = next((p for p in layer.parameters()), None)
            ref = ref if ref is not None else next(layer.buffers())
            dtype = ref.dtype if ref.is_floating_point() else torch.float32
            eye = torch.eye(layer.in_features, dtype=dtype, device=ref.device)
            zero = torch.zeros(1, layer.in_features, dtype=dtype, device=ref.device)
            out[name] = (layer(eye).float() - layer(zero).float()).T.contiguous().cpu()
    model.train(was_training)
    return out


def reference_model(model_path: str, weights: dict, others: dict | None = None):
    """The float32 model at ``model_path`` with ``weights`` (from :func:`effective_weights`)
    copied into its linear layers and ``others`` (from :func:`other_float_tensors`) into the
    rest."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        for name, w in weights.items():
            ref.get_submodule(name).weight.copy_(w)
        state = ref.state_dict()
        for name, t in (others or {}).items():
            if name in state and state[name].shape == t.shape:
                state[name].copy_(t)
    return ref


def other_float_tensors(model) -> dict:
    """The floating-point tensors of ``model`` outside its linear layers (norms, embeddings),
    as float32 CPU copies by state-dict name: a quantizer may change them too (gptqmodel's AWQ
    folds its activation scales into the RMSNorm weights before the quantized layers)."""
    linear = tuple(n + "." for n in linear_modules(model))
    return {
        k: v.detach().float().cpu().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(linear) and v.is_floating_point() and v.device.type != "meta" and type(v).__name__ == "Tensor"
    }


def _batch(vocab_size: int, device, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (2, 24), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _device_of(model):
    return next(p.device for p in model.parameters())


def _logits(model, batch):
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits.float().cpu()
    model.train(was_training)
    return out


def _set_lora_weights(peft_model, seed: int = 1) -> None:
    """Deterministic nonzero LoRA A and B (B = 0 would leave A without gradient)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))


def _lora_grads(peft_model, batch) -> dict:
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: (p.grad.detach().float().cpu() if p.grad is not None else None) for n, p in peft_model.named_parameters() if p.requires_grad}


def flat_tensors(t) -> list:
    """Detached CPU copies of the tensors ``t`` stores: itself, or for a tensor subclass
    (e.g. torchao's ``Int8Tensor``, which implements neither ``torch.equal`` nor ``clone``
    for every layout) its inner tensors, recursively."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [x for n in names if getattr(t, n, None) is not None for x in flat_tensors(getattr(t, n))]
    return [t.detach().cpu().clone()]


def same_tensors(after: list, before: list) -> bool:
    """Whether two :func:`flat_tensors` lists hold the same values (``after`` cast to the
    dtypes of ``before``: bf16 norms upcast to fp32 for training must cast back bit-exactly)."""
    import torch

    return len(after) == len(before) and all(torch.equal(a.to(b.dtype), b) for a, b in zip(after, before))


def _flat_state(model, skip=("lora_",)) -> dict:
    """Every base tensor of ``model`` as :func:`flat_tensors`, by name without ``.base_layer``."""
    return {
        k.replace(".base_layer", ""): flat_tensors(v)
        for k, v in model.state_dict(keep_vars=True).items()
        if not any(s in k for s in skip + ("quant_linear_module",))
    }


def _required_modules(plugin_module: str) -> tuple[str, ...]:
    """Top-level modules of the libraries the distribution holding ``plugin_module`` requires
    (its backend libraries), less qpeft and the libraries qpeft itself requires."""
    import importlib.metadata as md
    import re

    top = plugin_module.split(".")[0]
    by_module = md.packages_distributions()
    dists = by_module.get(top, [])
    if not dists or top == "qpeft":
        return ()
    own = {"qpeft"} | {re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower() for r in (md.requires("qpeft") or []) if "extra ==" not in r}
    wanted = set()
    for req in md.requires(dists[0]) or []:
        if "extra ==" in req:
            continue
        name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name not in own:
            wanted.add(name)
    return tuple(sorted(m for m, ds in by_module.items() if any(d.lower().replace("_", "-") in wanted for d in ds) and m.isidentifier()))


class _HidingFinder:
    """A ``sys.meta_path`` finder wrapper that finds nothing for hidden module names."""

    def __init__(self, finder, names):
        self.finder, self.names = finder, tuple(names)

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == n or fullname.startswith(n + ".") for n in self.names):
            return None
        return self.finder.find_spec(fullname, path, target)

    def __getattr__(self, name):
        return getattr(self.finder, name)


@contextlib.contextmanager
def _hidden_modules(names):
    """Inside the block, ``import name`` (and its submodules) fails with ModuleNotFoundError and
    ``importlib.util.find_spec(name)`` returns None, as if the libraries were not installed:
    they leave ``sys.modules`` and every import finder skips them. Restored afterwards."""
    import importlib

    saved = {k: v for k, v in sys.modules.items() if any(k == n or k.startswith(n + ".") for n in names)}
    finders = list(sys.meta_path)
    for k in saved:
        del sys.modules[k]
    sys.meta_path[:] = [_HidingFinder(f, names) if hasattr(f, "find_spec") else f for f in finders]
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.meta_path[:] = finders
        for k in [k for k in sys.modules if any(k == n or k.startswith(n + ".") for n in names)]:
            del sys.modules[k]
        sys.modules.update(saved)


def _skip(reason: str):
    try:
        import pytest
    except ImportError:  # pragma: no cover - without pytest (unittest or check_quantizer)
        import unittest

        raise unittest.SkipTest(reason) from None
    pytest.skip(reason)


# ---------------------------------------------------------------------------- the checker


class _Checker:
    """What both checkers share: ``name``, failing with it, and running ``CHECKS`` in order."""

    name: str
    CHECKS: ClassVar[tuple[str, ...]] = ()

    def fail(self, message: str):
        """Raise a :class:`ConformanceError` prefixed with the plugin's name."""
        raise ConformanceError(f"[{self.name}] {message}")

    def expect(self, condition: bool, message: str) -> None:
        """:meth:`fail` with ``message`` unless ``condition``."""
        if not condition:
            self.fail(message)

    def run_all(self) -> dict:
        """Every check in order; returns ``{check: measurements}`` with each check's seconds
        (the first failure raises)."""
        import time

        out = {}
        for name in self.CHECKS:
            t0 = time.perf_counter()
            out[name] = getattr(self, f"check_{name}")()
            out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        return out


class QuantizerChecker(_Checker):
    """Runs the conformance checks of one quantizer; each ``check_*`` returns what it measured
    and raises :class:`ConformanceError` when the plugin falls short.

    ``plugins`` are extra in-process plugin modules/objects (for plugins not installed yet; set
    ``require_entry_point=False`` with them). Loaded models and the trained adapter are kept
    between checks; call :meth:`close` to free them and the temporary folder.
    """

    def __init__(
        self,
        quantizer: str,
        options: dict | None = None,
        *,
        device: str = "cpu",
        model_path: str | None = None,
        plugins: tuple = (),
        require_entry_point: bool = True,
        grad_tolerance: float = 1e-3,
        logit_tolerance: float = 0.5,
        reload_tolerance: float = 1e-3,
        merge_tolerance: float | None = None,
        memory_slack: float = 1.3,
        option_grid: dict | None = None,
        backend_modules: tuple[str, ...] | None = None,
        inference_tolerance: float = 2e-2,
    ):
        self.name = quantizer
        self.options = dict(options or {})
        self.device = device
        self.model_path = model_path
        self.plugins = tuple(plugins)
        self.require_entry_point = require_entry_point
        self.grad_tolerance = grad_tolerance
        self.logit_tolerance = logit_tolerance
        self.reload_tolerance = reload_tolerance
        self.merge_tolerance = merge_tolerance
        self.memory_slack = memory_slack
        self.option_grid = dict(option_grid or {})
        self.backend_modules = backend_modules
        self.inference_tolerance = inference_tolerance
        self._tmp: Path | None = None
        self._state: dict[str, Any] = {}

    # ------------------------------------------------------------------ plumbing

    @property
    def tmp(self) -> Path:
        """A private temporary folder, removed by :meth:`close`."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix=f"qpeft-conformance-{self.name}-"))
        return self._tmp

    def close(self) -> None:
        """Drop loaded models and remove the temporary folder."""
        self._state.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _cached(self, key: str, make):
        if key not in self._state:
            self._state[key] = make()
        return self._state[key]

    @property
    def registry(self):
        """The registry as qpeft builds it: entry points plus ``plugins``."""
        from .registry import load_registry

        return self._cached("registry", lambda: load_registry(self.plugins))

    @property
    def plugin(self):
        """The registered quantizer backend (ConformanceError, with broken-plugin reasons, if absent)."""
        found = self.registry.backends["quantizer"].get(self.name)
        if found is None:
            broken = [f"{b.name} ({b.source}): {b.reason}" for b in self.registry.broken]
            self.fail(
                f"no quantizer of this name is registered; installed: {', '.join(sorted(self.registry.backends['quantizer']))}"
                + (f"; broken plugins: {'; '.join(broken)}" if broken else "")
            )
        return found

    @property
    def tiny_path(self) -> str:
        """The model the kit loads (``model_path``, default :func:`tiny_model_path`)."""
        return self._cached("tiny_path", lambda: self.model_path or tiny_model_path())

    def config_dict(self, **overrides) -> dict:
        """A run config for the tiny model with this quantizer, LoRA and a few training steps."""
        cfg = {
            # a private quantized-base cache: the run's reload reads what its training load wrote
            "model": {
                "name_or_path": self.tiny_path,
                "device": self.device,
                "dtype": "float32",
                "quantized_cache": str(self.tmp / "quantized-cache"),
            },
            "quantizer": {"name": self.name, "options": self.options},
            "peft": {"name": "lora", "options": {"r": 8, "alpha": 16}},
            "trainer": {
                "name": "native",
                "options": {"batch_size": 4, "max_steps": 4, "lr": 1e-2, "scheduler": "constant"},
            },
            "data": {"path": "embedded:text", "max_length": 48, "max_train_examples": 8, "max_val_examples": 2},
            "output_dir": str(self.tmp / "run"),
            "seed": 0,
            # check_lora_gradients covers gradient checkpointing; the run saves the recomputation.
            "gradient_checkpointing": False,
            "generate": {"max_new_tokens": 4, "chat_template": False},
        }
        cfg.update(overrides)
        return cfg

    @property
    def resolved(self):
        """The run config resolved against the registry (device checked, ``check()`` run)."""
        from .config import load_config, resolve

        def make():
            """Resolve once; skip when the plugin does not run on the kit's device."""
            self.plugin  # noqa: B018  (a clear error if the name is not registered)
            if self.device not in self.plugin.capabilities.devices:
                _skip(f"{self.name} does not run on {self.device} (capabilities.devices)")
            return resolve(load_config(self.config_dict()), self.registry)

        return self._cached("resolved", make)

    def context(self):
        """A fresh :class:`qpeft.context.RunContext` for the resolved run."""
        from .context import RunContext

        r = self.resolved
        return RunContext(config=r.config, device=r.device, dtype=r.dtype, output_dir=str(self.tmp / "run"), hooks=self.registry.hooks)

    def float_model(self):
        """The tiny model in float32, unquantized."""
        import torch
        from transformers import AutoModelForCausalLM

        return self._cached(
            "float_model", lambda: AutoModelForCausalLM.from_pretrained(self.tiny_path, dtype=torch.float32).to(self.device).eval()
        )

    def quantized_model(self):
        """The plugin's ``load(training=True)`` of the tiny model (loaded once per checker)."""
        return self._cached(
            "quantized",
            lambda: self.plugin.load(self.tiny_path, self.resolved.quantizer_options, self.context(), training=True),
        )

    # ------------------------------------------------------------------ checks

    def check_registration(self) -> dict:
        """Found through the entry points, well-formed, light to import."""
        from . import API_VERSION
        from .api import Capabilities, QuantizerPlugin
        from .registry import declared_api_version

        plugin = self.plugin
        source = self.registry.origins[("quantizer", self.name)]
        if self.require_entry_point:
            self.expect(
                "(in-process)" not in source,
                "registered in-process only; a package registers through [project.entry-points.qpeft] in pyproject.toml",
            )
        self.expect(isinstance(plugin, QuantizerPlugin), f"{type(plugin).__name__} is not a qpeft.api.QuantizerPlugin")
        self.expect(plugin.api_version == API_VERSION, f"targets plugin API {plugin.api_version}, this qpeft has {API_VERSION}")
        is_builtin = type(plugin).__module__.startswith("qpeft.")
        self.expect(
            is_builtin or declared_api_version(plugin) is not None,
            f"does not state the plugin API it targets: set api_version = {API_VERSION} on {type(plugin).__name__}",
        )
        self.expect(
            isinstance(plugin.description, str) and plugin.description.strip() != "", "has no description (shown by `qpeft plugins`)"
        )
        caps = plugin.capabilities
        self.expect(isinstance(caps, Capabilities), "capabilities is not a qpeft.api.Capabilities")
        self.expect(
            bool(caps.devices) and set(caps.devices) <= {"cpu", "cuda"}, f"capabilities.devices {caps.devices!r}: use 'cpu' and/or 'cuda'"
        )
        self.expect(caps.trainable, "capabilities.trainable is False: the kit tests adapter training, which such a quantizer refuses")
        self.expect(
            caps.bits is None or 0 < caps.bits <= 16, f"capabilities.bits {caps.bits!r}: bits per weight, or None for full precision"
        )
        self.expect(type(plugin).load is not QuantizerPlugin.load, "does not implement load()")
        self.expect(
            caps.saves_quantized in ("transformers", "plugin", "none"),
            f"capabilities.saves_quantized {caps.saves_quantized!r}: 'transformers', 'plugin' or 'none'",
        )
        if caps.saves_quantized == "plugin":
            for method in ("save_quantized", "load_quantized"):
                self.expect(
                    getattr(type(plugin), method) is not getattr(QuantizerPlugin, method),
                    f"saves_quantized is 'plugin' but {method}() is not implemented",
                )
        if caps.merge_source != "none":
            self.expect(
                type(plugin).full_precision_model is not QuantizerPlugin.full_precision_model,
                f"merge_source is {caps.merge_source!r} but full_precision_model() is not implemented (declare merge_source='none' to refuse merges)",
            )
        module = type(plugin).__module__
        heavy = []
        if "(in-process)" not in source:
            code = (
                f"import importlib, json, sys; importlib.import_module({module!r}); "
                f"print(json.dumps([m for m in {list(HEAVY_MODULES)!r} if m in sys.modules]))"
            )
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            self.expect(proc.returncode == 0, f"importing {module} in a fresh interpreter failed: {proc.stderr.strip()[-400:]}")
            heavy = json.loads(proc.stdout.strip().splitlines()[-1])
            self.expect(
                not heavy,
                f"importing {module} imports {', '.join(heavy)}; import backend libraries inside load() so `qpeft plugins` and config checks stay fast",
            )
        return {"source": source, "api_version": plugin.api_version, "module": module}

    def check_options_schema(self) -> dict:
        """Options: validated, unknown keys refused by name, JSON schema, JSON round trip."""
        from pydantic import BaseModel

        from .api import Options
        from .config import validate_options
        from .errors import ConfigError

        plugin = self.plugin
        self.expect(isinstance(plugin.Options, type) and issubclass(plugin.Options, BaseModel), "Options is not a pydantic model")
        self.expect(issubclass(plugin.Options, Options), "Options should subclass qpeft.api.Options (unknown keys are errors)")
        try:
            opts = validate_options(plugin, self.options, "quantizer.options")
        except ConfigError as exc:
            self.fail(f"the kit's options {self.options!r} do not validate: {exc}")
        bogus = "qpeft_conformance_no_such_option"
        try:
            validate_options(plugin, {**self.options, bogus: 1}, "quantizer.options")
        except ConfigError as exc:
            self.expect(exc.key == f"quantizer.options.{bogus}", f"an unknown option was reported as {exc.key!r}")
        else:
            self.fail(f"the unknown option {bogus!r} was accepted; options models must forbid extra keys")
        schema = plugin.Options.model_json_schema()
        self.expect(schema.get("type") == "object", "Options' JSON schema is not an object")
        dumped = opts.model_dump(mode="json")
        json.dumps(dumped)  # qpeft writes it into qpeft.json beside every adapter
        again = validate_options(plugin, dumped, "quantizer.options")
        self.expect(again == opts, f"options do not survive a JSON round trip (saved in qpeft.json): {dumped!r}")
        resolved = self.resolved  # resolve(): combination checks and plugin.check(), no weights
        return {"fields": sorted(schema.get("properties", {})), "options": dumped, "device": resolved.device}

    def check_load(self) -> dict:
        """A causal LM with finite logits close to the float32 model; same linear targets."""
        from transformers import PreTrainedModel

        from .modeling import find_linear_targets

        model = self.quantized_model()
        self.expect(isinstance(model, PreTrainedModel), f"load() returned {type(model).__name__}, not a transformers PreTrainedModel")
        full = self.float_model()
        batch = _batch(full.config.vocab_size, _device_of(model))
        got, want = _logits(model, batch), _logits(full, batch)
        self._state["train_path_logits"] = got
        self.expect(got.shape == want.shape, f"logits shape {tuple(got.shape)} != {tuple(want.shape)}")
        self.expect(bool(got.isfinite().all()), "logits are not finite")
        rel = float((got - want).norm() / want.norm())
        self.expect(
            rel <= self.logit_tolerance, f"logits are {rel:.3f} (relative L2) from the float32 model's (tolerance {self.logit_tolerance})"
        )
        self.expect(
            find_linear_targets(model) == find_linear_targets(full),
            f"LoRA's all-linear targets differ after quantizing: {find_linear_targets(model)} vs {find_linear_targets(full)}",
        )
        return {"logit_rel_err_vs_fp32": rel, "targets": find_linear_targets(model)}

    def check_memory(self) -> dict:
        """Storage and parameter accounting of the loaded model (:meth:`_accounting`)."""
        return self._accounting(self.quantized_model(), self.resolved.quantizer_options)

    def _accounting(self, model, opts) -> dict:
        """Bytes of the quantized linear layers vs float32 against ``plugin.bits(opts)``; the
        plugin's ``storage_bytes`` vs the bytes the model really holds (every storage reachable
        from it, parameters and buffers or not); its ``count_parameters`` vs the float model's."""
        from .accounting import held_bytes, parameter_counts
        from .modeling import find_linear_targets

        plugin, full = self.plugin, self.float_model()
        targets = set(find_linear_targets(full))
        q_layers = {n: m for n, m in linear_modules(model).items() if n.rsplit(".", 1)[-1] in targets}
        f_layers = {n: m for n, m in linear_modules(full).items() if n.rsplit(".", 1)[-1] in targets}
        self.expect(q_layers.keys() == f_layers.keys(), "the quantized model's linear layers are not the float model's")
        q_bytes = sum(held_bytes(m) for m in q_layers.values())
        f_bytes = sum(held_bytes(m) for m in f_layers.values())
        ratio = q_bytes / f_bytes
        bits = plugin.bits(opts)
        self.expect(bits is None or 0 < bits <= 16, f"bits({opts!r}) is {bits!r}: bits per weight in (0, 16], or None")
        if bits is None:
            self.expect(ratio > 0.99, f"bits() is None (full precision) for options {opts!r} but linear layers hold {ratio:.3f} of float32")
        else:
            lo, hi = bits / 32 * 0.9, bits / 32 * self.memory_slack + 0.01
            self.expect(
                lo <= ratio <= hi,
                f"linear layers hold {q_bytes} B = {ratio:.3f} of float32 ({f_bytes} B); bits={bits:g} for options {opts!r} "
                f"expects {lo:.3f}..{hi:.3f} (capabilities.bits is the default of QuantizerPlugin.bits(options))",
            )
        held = held_bytes(model)
        reported = int(plugin.storage_bytes(model, opts))
        self.expect(
            abs(reported - held) <= 0.05 * held,
            f"storage_bytes() reports {reported / 2**20:.3f} MiB of weights but the model holds {held / 2**20:.3f} MiB "
            "(every tensor reachable from its modules, counted once: qpeft.accounting.held_bytes); qpeft's memory report "
            "would be wrong",
        )
        trainable, total = plugin.count_parameters(model, opts)
        _, want = parameter_counts(full)
        self.expect(
            total == want,
            f"count_parameters() reports {total:,} parameters, the float model has {want:,}: count a quantized linear layer "
            "once, as in_features x out_features (docs/plugins.md, storage and parameter counts)",
        )
        return {
            "bits": bits,
            "linear_bytes": q_bytes,
            "linear_bytes_fp32": f_bytes,
            "ratio": ratio,
            "model_bytes": held,
            "storage_bytes": reported,
            "model_bytes_fp32": held_bytes(full),
            "parameters": total,
            "trainable_after_load": trainable,
        }

    def check_lora_gradients(self) -> dict:
        """LoRA gradients through the quantized base equal those through a float32 model that
        holds the quantized weights, after an eval forward + ``ensure_training_kernels``."""
        import torch

        from .modeling import freeze

        plugin, opts = self.plugin, self.resolved.quantizer_options
        lora = self.registry.get("peft", "lora")
        lora_opts = lora.Options(r=4, alpha=8)
        ctx = self.context()
        # The model check_load/check_memory used, if any (this check modifies it), else a fresh one.
        model = self._state.pop("quantized", None) or plugin.load(self.tiny_path, opts, ctx, training=True)
        plugin.ensure_training_kernels(model, opts)
        weights = effective_weights(model)
        ref = reference_model(self.tiny_path, weights, other_float_tensors(model)).to(self.device)
        batch = _batch(ref.config.vocab_size, _device_of(model), seed=1)

        _logits(model, batch)  # what evaluation does before training: an eval-mode no-grad forward
        plugin.ensure_training_kernels(model, opts)
        model = plugin.prepare_for_training(model, opts, ctx, grad_checkpointing=True)
        leaked = [n for n, p in model.named_parameters() if p.requires_grad]
        self.expect(not leaked, f"prepare_for_training left base parameters trainable: {leaked[:3]}")
        freeze(ref)
        pm, pr = lora.attach(model, lora_opts, ctx), lora.attach(ref, lora_opts, ctx)
        _set_lora_weights(pm)
        _set_lora_weights(pr)
        from .accounting import parameter_counts

        counted, want_counts = plugin.count_parameters(pm, opts), parameter_counts(pr)
        self.expect(
            tuple(counted) == want_counts,
            f"with LoRA attached, count_parameters() reports (trainable, total) = {tuple(counted)}, the float model with the same "
            f"LoRA has {want_counts}",
        )
        got, want = _lora_grads(pm, batch), _lora_grads(pr, batch)
        self.expect(got.keys() == want.keys() and len(want) > 0, "LoRA was attached to other layers than on the float model")
        missing = [n for n, g in got.items() if g is None or not bool(g.abs().sum() > 0)]
        self.expect(not missing, f"no gradient reached {len(missing)} LoRA parameters, e.g. {missing[0] if missing else ''}")
        errors = {n: float((got[n] - want[n]).norm() / want[n].norm()) for n in want}
        worst = max(errors, key=errors.get)
        self.expect(
            errors[worst] <= self.grad_tolerance,
            f"LoRA gradients differ from the float32 reference holding the quantized weights: relative error "
            f"{errors[worst]:.2e} at {worst} (tolerance {self.grad_tolerance:g})",
        )
        # For information: how far quantization moves gradients from the unquantized model's.
        orig = self.float_model()
        po = lora.attach(
            reference_model(self.tiny_path, {n: m.weight.detach().float().cpu() for n, m in linear_modules(orig).items()}).to(self.device),
            lora_opts,
            ctx,
        )
        _set_lora_weights(po)
        vs_orig = _lora_grads(po, batch)
        quant_effect = max(float((got[n] - vs_orig[n]).norm() / vs_orig[n].norm()) for n in vs_orig)
        del pm, pr, po, model, ref
        torch.manual_seed(0)
        return {"grad_rel_err": errors[worst], "params": len(want), "grad_rel_err_vs_unquantized": quant_effect}

    def _options(self, **changes):
        """The resolved options with ``changes`` validated on top."""
        from .config import validate_options

        return validate_options(self.plugin, {**self.resolved.quantizer_options.model_dump(mode="json"), **changes}, "quantizer.options")

    def check_missing_library(self) -> dict:
        """With the backend library hidden (``backend_modules``, by default the libraries the
        plugin's distribution requires), the config is refused with a clear ``ConfigError`` /
        ``QpeftError`` before any weight loads (or ``load()`` raises one), not an ImportError."""
        from .config import load_config, resolve
        from .errors import QpeftError

        modules = self.backend_modules if self.backend_modules is not None else _required_modules(type(self.plugin).__module__)
        if not modules:
            return {"backend_modules": [], "checked": False}
        self.plugin  # noqa: B018
        error = None
        with _hidden_modules(modules):
            try:
                resolved = resolve(load_config(self.config_dict()), self.registry)
                self.plugin.load(self.tiny_path, resolved.quantizer_options, self.context(), training=True)
            except QpeftError as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - what a user would see as a traceback
                self.fail(
                    f"without {', '.join(modules)} the run fails with {type(exc).__name__}: {str(exc)[:200]}; check for the library "
                    "in check() (importlib.util.find_spec) and raise qpeft.errors.ConfigError('quantizer.name', 'X is not installed: pip install ...')"
                )
        self.expect(error is not None, f"with {', '.join(modules)} hidden, the run was not refused (does load() really use it?)")
        self.expect("\n" not in error.strip(), f"the missing-library error is not one line: {error!r}")
        return {"backend_modules": list(modules), "error": error}

    def check_bfloat16(self) -> dict:
        """A bfloat16 run: ``load`` honours ``model.dtype`` (the weights it keeps in float are
        bfloat16) and LoRA trains on it (finite loss, finite nonzero gradients), with logits
        within ``logit_tolerance`` of the float32 model's. Skipped when ``check()`` refuses
        bfloat16 (or the device lacks it)."""
        import torch

        from .config import load_config, resolve
        from .context import RunContext
        from .errors import ConfigError

        self.resolved  # noqa: B018  (skips when the device is not supported)
        cfg = self.config_dict()
        cfg["model"] = {**cfg["model"], "dtype": "bfloat16"}
        try:
            r = resolve(load_config(cfg), self.registry)
        except ConfigError as exc:
            _skip(f"{self.name} refuses bfloat16: {exc}")
        ctx = RunContext(config=r.config, device=r.device, dtype=r.dtype, output_dir=str(self.tmp / "bf16"), hooks=self.registry.hooks)
        lora = self.registry.get("peft", "lora")
        try:
            model = self.plugin.load(self.tiny_path, r.quantizer_options, ctx, training=True)
            embed = model.get_input_embeddings().weight
            self.expect(
                embed.dtype == torch.bfloat16,
                f"model.dtype is bfloat16 but load() left the embeddings in {embed.dtype}: pass ctx.torch_dtype to from_pretrained "
                "(qpeft.modeling.load_causal_lm does)",
            )
            batch = _batch(model.config.vocab_size, _device_of(model), seed=2)
            got = _logits(model, batch)
            model = self.plugin.prepare_for_training(model, r.quantizer_options, ctx, grad_checkpointing=False)
            pm = lora.attach(model, lora.Options(r=4, alpha=8), ctx)
            _set_lora_weights(pm)
            pm.train()
            loss = pm(**batch, labels=batch["input_ids"]).loss
            loss.backward()
        except ConformanceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the check reports what a bf16 run would raise
            self.fail(f"a bfloat16 run fails: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        grads = [p.grad for p in pm.parameters() if p.requires_grad]
        loss = loss.detach()
        self.expect(bool(torch.isfinite(loss)), f"bfloat16 loss is {float(loss)}")
        self.expect(all(g is not None and bool(g.isfinite().all()) for g in grads), "bfloat16 LoRA gradients are missing or not finite")
        self.expect(any(bool(g.abs().sum() > 0) for g in grads), "no bfloat16 LoRA gradient is nonzero")
        want = _logits(self.float_model(), batch)
        rel = float((got - want).norm() / want.norm())
        self.expect(
            rel <= self.logit_tolerance, f"bfloat16 logits are {rel:.3f} from the float32 model's (tolerance {self.logit_tolerance})"
        )
        del pm, model
        return {"loss": float(loss), "logit_rel_err_vs_fp32": rel}

    def check_quantized_save(self) -> dict:
        """Where ``capabilities.saves_quantized`` says so: ``save_quantized`` writes safetensors,
        ``load_quantized`` (plain ``from_pretrained`` for "transformers") loads it back with the
        same storage and the same logits as the model that was saved."""
        from .accounting import held_bytes
        from .errors import QpeftError

        how = self.plugin.capabilities.saves_quantized
        if how == "none":
            return {"saves_quantized": "none"}
        opts, ctx = self.resolved.quantizer_options, self.context()
        folder = self.tmp / "saved-quantized"
        model = self.plugin.load(self.tiny_path, opts, ctx, training=False)
        self.plugin.save_quantized(model, str(folder), opts, ctx)  # before any forward: kernels may repack on one
        files = sorted(p.name for p in folder.iterdir())
        self.expect(not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], f"pickle files in the saved model: {files}")
        batch = _batch(model.config.vocab_size, _device_of(model), seed=3)
        before, size = _logits(model, batch), held_bytes(model)
        del model
        try:
            again = self.plugin.load_quantized(str(folder), opts, ctx, training=False)
        except QpeftError as exc:
            self.fail(f"the model saved with saves_quantized={how!r} does not load back: {exc}")
        after, size_again = _logits(again, batch), held_bytes(again)
        rel = float((after - before).norm() / before.norm())
        self.expect(
            abs(size_again - size) <= 0.05 * size,
            f"the saved model loads back holding {size_again} B, the model saved held {size} B: it was not loaded quantized",
        )
        self.expect(
            rel <= 1e-3,
            f"the saved model loads back with logits {rel:.2e} (relative L2) from the saved model's: its weights do not round-trip "
            f"through saves_quantized={how!r}",
        )
        shutil.rmtree(folder, ignore_errors=True)
        return {"saves_quantized": how, "files": files, "logit_rel_err": rel}

    def check_option_sets(self) -> dict:
        """Every combination of ``option_grid`` (on top of ``options``): validates, resolves,
        loads with finite logits within ``logit_tolerance``, and passes the storage and
        parameter accounting with ``bits(options)`` (:meth:`_accounting`)."""
        import itertools

        from .config import load_config, resolve
        from .errors import QpeftError

        self.resolved  # noqa: B018
        keys = sorted(self.option_grid)
        out = []
        for values in itertools.product(*(self.option_grid[k] for k in keys)):
            changes = dict(zip(keys, values))
            cfg = self.config_dict()
            cfg["quantizer"] = {"name": self.name, "options": {**self.options, **changes}}
            try:
                r = resolve(load_config(cfg), self.registry)
            except QpeftError as exc:
                self.fail(f"declared option set {changes} is refused: {exc}")
            model = self.plugin.load(self.tiny_path, r.quantizer_options, self.context(), training=True)
            full = self.float_model()
            batch = _batch(full.config.vocab_size, _device_of(model))
            got, want = _logits(model, batch), _logits(full, batch)
            rel = float((got - want).norm() / want.norm())
            self.expect(bool(got.isfinite().all()) and rel <= self.logit_tolerance, f"options {changes}: logits {rel:.3f} from float32")
            try:
                measured = self._accounting(model, r.quantizer_options)
            except ConformanceError as exc:
                self.fail(f"options {changes}: {str(exc).split('] ', 1)[-1]}")
            out.append({"options": changes, "bits": measured["bits"], "ratio": measured["ratio"], "logit_rel_err_vs_fp32": rel})
            del model
        return {"option_sets": out}

    def check_hf_trainer(self) -> dict:
        """``qpeft run`` with the ``hf`` trainer (the transformers Trainer validates the model
        its own way): trains, and the saved adapter reloads with the trained logits."""
        from . import orchestrator
        from .registry import load_registry

        self.resolved  # noqa: B018
        cfg = self.config_dict(output_dir=str(self.tmp / "run-hf"), evaluate=False)
        cfg["trainer"] = {"name": "hf", "options": {"batch_size": 4, "max_steps": 2, "lr": 1e-2, "scheduler": "constant"}}
        cfg["generate"] = {"max_new_tokens": 1, "chat_template": False}
        try:
            resolved, registry = orchestrator.prepare(cfg, registry=load_registry(self.plugins))
            s = orchestrator.run(resolved, registry)
        except ConformanceError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.fail(f"qpeft run with the hf trainer fails: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        losses = [h["loss"] for h in s["loss_history"] if h.get("loss") is not None]
        self.expect(bool(losses) and all(math.isfinite(l) for l in losses), f"hf trainer losses: {losses}")
        self.expect(
            s["reload_max_abs_logit_diff"] <= self.reload_tolerance,
            f"hf trainer: the reloaded adapter's logits are {s['reload_max_abs_logit_diff']:.2e} from the trained model's",
        )
        return {"losses": losses, "reload_max_abs_logit_diff": s["reload_max_abs_logit_diff"]}

    def check_inference(self) -> dict:
        """The inference path (``load(training=False)``, as ``qpeft generate`` loads): finite
        logits within ``inference_tolerance`` (relative L2) of the training path's, and
        ``qpeft generate`` on the trained adapter produces tokens."""
        from . import orchestrator

        self.resolved  # noqa: B018
        model = self.plugin.load(self.tiny_path, self.resolved.quantizer_options, self.context(), training=False)
        full = self.float_model()
        batch = _batch(full.config.vocab_size, _device_of(model))
        got = _logits(model, batch)
        train_path = self._state.get("train_path_logits")
        if train_path is None:
            train_path = _logits(self.plugin.load(self.tiny_path, self.resolved.quantizer_options, self.context(), training=True), batch)
        del model
        self.expect(bool(got.isfinite().all()), "load(training=False) gives non-finite logits")
        rel = float((got - train_path).norm() / train_path.norm())
        self.expect(
            rel <= self.inference_tolerance,
            f"load(training=False) gives logits {rel:.2e} (relative L2) from load(training=True)'s (tolerance "
            f"{self.inference_tolerance:g}): the inference kernels compute something else",
        )
        self._run()
        adapter = self.tmp / "run" / "adapter"
        sample = orchestrator.generate(
            str(adapter), "Hello", self.registry, overrides=[f"model.device={self.device}", "model.dtype=float32"], max_new_tokens=4
        )
        self.expect(sample["new_tokens"] > 0, "qpeft generate (inference path) produced no token")
        return {"logit_rel_err_vs_training_path": rel, "generated_tokens": sample["new_tokens"]}

    def _run(self) -> dict:
        def make():
            """One ``qpeft run`` with a lifecycle plugin watching the base model."""
            from . import orchestrator
            from .registry import load_registry

            watch = _BaseWatch()
            registry = load_registry(self.plugins + (watch,))
            resolved, registry = orchestrator.prepare(self.config_dict(), registry=registry)
            summary = orchestrator.run(resolved, registry)
            return {"summary": summary, "watch": watch}

        return self._cached("run", make)

    def check_train_save_reload(self) -> dict:
        """``qpeft run`` on the tiny model: trains, leaves the base alone, reloads exactly."""
        from .orchestrator import METADATA_FILE, resolve_from_adapter

        self.resolved  # noqa: B018  (skips when the device is not supported)
        state = self._run()
        s, watch = state["summary"], state["watch"]
        losses = [h["loss"] for h in s["loss_history"] if h.get("loss") is not None]
        self.expect(len(losses) >= 2 and losses[-1] < losses[0], f"training loss did not go down: {losses}")
        self.expect(watch.before is not None, "qpeft_on_model_loaded was not called")
        after = _flat_state(watch.model)
        self.expect(after.keys() == watch.before.keys(), f"base tensors changed names: {sorted(after.keys() ^ watch.before.keys())[:4]}")
        changed = [k for k in after if not same_tensors(after[k], watch.before[k])]
        self.expect(not changed, f"training changed base tensors: {changed[:4]}")
        self.expect(
            s["reload_max_abs_logit_diff"] <= self.reload_tolerance,
            f"the saved adapter on a freshly loaded base gives logits {s['reload_max_abs_logit_diff']:.2e} from the trained "
            f"model's (tolerance {self.reload_tolerance:g})",
        )
        adapter = Path(s.get("adapter_dir") or self.tmp / "run" / "adapter")
        files = sorted(p.name for p in adapter.iterdir())
        self.expect(not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], f"pickle files in the adapter: {files}")
        meta = json.loads((adapter / METADATA_FILE).read_text())
        self.expect(meta["quantizer"]["name"] == self.name, f"qpeft.json names quantizer {meta['quantizer']['name']!r}")
        rebuilt = resolve_from_adapter(adapter, self.registry)
        self.expect(
            rebuilt.quantizer_options == self.resolved.quantizer_options,
            "the quantizer options saved in qpeft.json rebuild other options",
        )
        self.expect(s["generation"]["new_tokens"] > 0, "generation after reload produced no token")
        from .accounting import parameter_counts

        expected = parameter_counts(self.float_model())[1] + s["trainable_params"]
        self.expect(
            s["total_params"] == expected,
            f"the run reported {s['total_params']:,} parameters, the float model's plus LoRA's are {expected:,} "
            "(QuantizerPlugin.count_parameters)",
        )
        return {
            "losses": losses,
            "reload_max_abs_logit_diff": s["reload_max_abs_logit_diff"],
            "weight_memory_gib": s["weight_memory_gib"],
            "train_seconds": s["train_seconds"],
        }

    def check_merge(self) -> dict:
        """``qpeft merge``: a plain float model reproducing the adapter's logits, or a clear refusal."""
        import torch
        from transformers import AutoModelForCausalLM

        from . import capability_table, orchestrator
        from .errors import QpeftError

        self.resolved  # noqa: B018
        self._run()
        adapter, out = self.tmp / "run" / "adapter", self.tmp / "merged"
        cell = capability_table.cell(self.plugin, self.registry.get("peft", "lora"))
        source = self.plugin.capabilities.merge_source
        # qpeft merge rebuilds the run from qpeft.json with dtype "auto" (bfloat16 on GPUs): keep
        # the kit's float32 so the comparison measures the merge, not bfloat16 rounding.
        overrides = [f"model.device={self.device}", "model.dtype=float32"]
        if not cell.merge:
            try:
                orchestrator.merge(str(adapter), str(out), self.registry, overrides=overrides)
            except QpeftError as exc:
                self.expect(self.name in str(exc), f"the merge refusal does not name the quantizer: {exc}")
                self.expect(not out.exists(), "a refused merge left an output folder")
                return {"merge": "refused", "reason": str(exc)}
            self.fail(f"merge_source is {source!r}, yet qpeft merge did not refuse")
        result = orchestrator.merge(str(adapter), str(out), self.registry, force=True, overrides=overrides)
        bound = self.merge_tolerance if self.merge_tolerance is not None else MERGE_TOLERANCE[source]
        self.expect(
            result["max_abs_logit_diff"] <= bound,
            f"the merged model's logits are {result['max_abs_logit_diff']:.2e} from the adapter on its quantized base "
            f"(merge_source {source!r}, tolerance {bound:g})",
        )
        cfg = json.loads((out / "config.json").read_text())
        self.expect("quantization_config" not in cfg, "the merged model still carries a quantization_config")
        self.expect(not list(out.glob("*.bin")), "the merged model was saved with pickle files")
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        odd = [n for n, p in merged.named_parameters() if type(p.data) is not torch.Tensor or not p.is_floating_point()]
        self.expect(not odd, f"the merged model has non-float or subclassed weights: {odd[:3]}")
        return {
            "merge": "ok",
            "merge_source": source,
            "max_abs_logit_diff": result["max_abs_logit_diff"],
            "base_path_diff": result["base_path_diff"],
        }

    def check_dequantized_weight(self) -> dict:
        """Where the plugin implements ``dequantized_weight`` (LoRA's ``init: loftq``): for every
        linear layer it returns None or a finite float (out × in) tensor equal, within 1e-3
        (relative L2; 1e-2 for int8 matmuls, whose activations go through float16), to the
        weight the layer applies (read by probing it with the identity matrix); at least one
        layer is quantized; the layer computes the same afterwards. Skipped without the hook."""
        import torch

        from .api import implements

        plugin, opts = self.plugin, self.resolved.quantizer_options
        if not implements(plugin, "dequantized_weight"):
            _skip(f"{self.name} does not implement dequantized_weight (LoRA's init loftq is refused for it)")
        model = plugin.load(self.tiny_path, opts, self.context(), training=True)
        plugin.ensure_training_kernels(model, opts)
        applied = effective_weights(model)
        worst, n = 0.0, 0
        for name, layer in linear_modules(model).items():
            with torch.no_grad():
                deq = plugin.dequantized_weight(layer, opts)
            if deq is None:
                continue
            n += 1
            self.expect(
                isinstance(deq, torch.Tensor) and deq.is_floating_point() and tuple(deq.shape) == (layer.out_features, layer.in_features),
                f"dequantized_weight({name}) is not a float tensor of shape ({layer.out_features}, {layer.in_features})",
            )
            self.expect(bool(torch.isfinite(deq).all()), f"dequantized_weight({name}) holds non-finite values")
            err = float((deq.float().cpu() - applied[name]).norm() / applied[name].norm())
            worst = max(worst, err)
            bound = 1e-2 if "8bit" in type(layer).__name__.lower() else 1e-3
            self.expect(err <= bound, f"dequantized_weight({name}) differs from the weight the layer applies by {err:.2e} (relative L2)")
        self.expect(n > 0, "dequantized_weight returned None for every linear layer of a model this plugin loaded")
        after = effective_weights(model)
        changed = [k for k in applied if not torch.equal(applied[k], after[k])]
        self.expect(not changed, f"dequantized_weight changed what {changed[0] if changed else ''} computes")
        return {"quantized_layers": n, "max_rel_err": worst}

    CHECKS: ClassVar[tuple[str, ...]] = (
        "registration",
        "options_schema",
        "missing_library",
        "load",
        "memory",
        "lora_gradients",
        "bfloat16",
        "quantized_save",
        "option_sets",
        "train_save_reload",
        "hf_trainer",
        "inference",
        "merge",
        "dequantized_weight",
    )


class _BaseWatch:
    """A lifecycle plugin that snapshots the base model's tensors when the quantizer loaded it."""

    model = None
    before = None

    @hookimpl
    def qpeft_on_model_loaded(self, model, ctx):
        """Remember the model and a copy of its tensors."""
        self.model = model
        self.before = _flat_state(model)


def check_quantizer(quantizer: str, options: dict | None = None, **kwargs) -> dict:
    """Run every conformance check on ``quantizer``; return ``{check: measurements}``.

    Keyword arguments are those of :class:`QuantizerChecker` (device, tolerances, plugins...).
    Raises :class:`ConformanceError` at the first check that fails.
    """
    checker = QuantizerChecker(quantizer, options, **kwargs)
    try:
        return checker.run_all()
    finally:
        checker.close()


# ---------------------------------------------------------------------------- pytest base class


class QuantizerConformance:
    """Base class for a pytest (or unittest-style) conformance suite of one quantizer.

    Subclass it in a class named ``Test...`` and set :attr:`quantizer`; override the other
    class attributes to pass options or adjust tolerances (say why in a comment).
    """

    #: The quantizer name under test (what users write as ``quantizer.name``).
    quantizer: ClassVar[str]
    #: ``quantizer.options`` for every run of the kit.
    options: ClassVar[dict] = {}
    #: "cpu" or "cuda"; the kit always computes in float32 so comparisons are exact.
    device: ClassVar[str] = "cpu"
    #: A model folder to use instead of the kit's tiny Llama.
    model_path: ClassVar[str | None] = None
    #: Extra in-process plugins (with ``require_entry_point = False``) for unpackaged code.
    plugins: ClassVar[tuple] = ()
    require_entry_point: ClassVar[bool] = True
    #: Max relative L2 error of LoRA gradients vs the float32 reference with the same weights.
    grad_tolerance: ClassVar[float] = 1e-3
    #: Max relative L2 distance of the quantized model's logits from the float32 model's.
    logit_tolerance: ClassVar[float] = 0.5
    #: Max |Δlogit| between the trained model and its saved adapter reloaded on a fresh base.
    reload_tolerance: ClassVar[float] = 1e-3
    #: Max |Δlogit| of a merged model vs the adapter on its quantized base (None: by merge_source).
    merge_tolerance: ClassVar[float | None] = None
    #: Linear-layer bytes may exceed ``bits / 32`` of float32 by this factor (scales, zero points).
    memory_slack: ClassVar[float] = 1.3
    #: ``{option: [values]}``: every combination (on top of ``options``) is loaded and checked
    #: (``test_option_sets``), e.g. ``{"bits": [2, 4, 8]}`` for a quantizer whose options choose the width.
    option_grid: ClassVar[dict] = {}
    #: Modules of the backend library hidden by ``test_missing_library`` (None: the libraries the
    #: plugin's distribution requires; ``()`` skips the check).
    backend_modules: ClassVar[tuple[str, ...] | None] = None
    #: Max relative L2 distance of ``load(training=False)``'s logits from ``load(training=True)``'s.
    #: Inference kernels may round differently: bitsandbytes' 4-bit path on AVX512-BF16 CPUs
    #: (Intel Xeon with AMX, AMD Zen 4) takes the scales through bfloat16, ~3e-3 in logits;
    #: elsewhere the paths agree to float error (relative 1e-7 to 1e-4 on this kit's model).
    inference_tolerance: ClassVar[float] = 2e-2

    _checkers: ClassVar[dict] = {}

    @classmethod
    def checker(cls) -> QuantizerChecker:
        """The :class:`QuantizerChecker` shared by this class's tests (built on first use)."""
        if cls not in QuantizerConformance._checkers:
            QuantizerConformance._checkers[cls] = QuantizerChecker(
                cls.quantizer,
                cls.options,
                device=cls.device,
                model_path=cls.model_path,
                plugins=cls.plugins,
                require_entry_point=cls.require_entry_point,
                grad_tolerance=cls.grad_tolerance,
                logit_tolerance=cls.logit_tolerance,
                reload_tolerance=cls.reload_tolerance,
                merge_tolerance=cls.merge_tolerance,
                memory_slack=cls.memory_slack,
                option_grid=cls.option_grid,
                backend_modules=cls.backend_modules,
                inference_tolerance=cls.inference_tolerance,
            )
        return QuantizerConformance._checkers[cls]

    @classmethod
    def teardown_class(cls):
        """Free the models and temporary files of this class's checks."""
        checker = QuantizerConformance._checkers.pop(cls, None)
        if checker is not None:
            checker.close()

    def _report(self, name: str, result: dict) -> None:
        print(f"[{self.quantizer}] {name}: {json.dumps(result, default=str)}")

    def test_registration(self):
        """Registered through the entry points, well-formed, light to import."""
        self._report("registration", self.checker().check_registration())

    def test_options_schema(self):
        """Options validate, refuse unknown keys by name, and survive JSON."""
        self._report("options", self.checker().check_options_schema())

    def test_load_tiny_model(self):
        """load() gives a causal LM close to the float32 model."""
        self._report("load", self.checker().check_load())

    def test_weight_memory_saved(self):
        """The quantized layers hold about bits/32 of float32's bytes, and qpeft reports it."""
        self._report("memory", self.checker().check_memory())

    def test_lora_gradients(self):
        """LoRA gradients equal the full-precision reference's, after an eval forward."""
        self._report("gradients", self.checker().check_lora_gradients())

    def test_train_save_reload(self):
        """qpeft run trains, leaves the base untouched, and reloads exactly."""
        self._report("train/save/reload", self.checker().check_train_save_reload())

    def test_merge(self):
        """qpeft merge reproduces the adapter's logits, or refuses clearly."""
        self._report("merge", self.checker().check_merge())

    def test_missing_library(self):
        """Without the backend library the config is refused in one line, not a traceback."""
        self._report("missing library", self.checker().check_missing_library())

    def test_bfloat16(self):
        """A bfloat16 load honours model.dtype and LoRA trains on it (skipped if refused)."""
        self._report("bfloat16", self.checker().check_bfloat16())

    def test_quantized_save(self):
        """Where saves_quantized says so, a saved quantized model loads back identical."""
        self._report("quantized save", self.checker().check_quantized_save())

    def test_option_sets(self):
        """Every option combination of option_grid loads with the width bits(options) says."""
        self._report("option sets", self.checker().check_option_sets())

    def test_hf_trainer(self):
        """qpeft run with the hf trainer trains and reloads."""
        self._report("hf trainer", self.checker().check_hf_trainer())

    def test_inference_path(self):
        """load(training=False) computes what the training path does; qpeft generate works."""
        self._report("inference", self.checker().check_inference())

    def test_dequantized_weight(self):
        """Where implemented (LoRA's LoftQ init), dequantized_weight is what each layer applies."""
        self._report("dequantized weight", self.checker().check_dequantized_weight())


# ---------------------------------------------------------------------------- trainer plugins


class _StepLosses:
    """A lifecycle plugin recording the loss of every step a trainer reports; with ``stop_at``,
    it interrupts the run (KeyboardInterrupt) when that step is reported."""

    def __init__(self, stop_at: int | None = None):
        self.losses: list[tuple[int, float]] = []
        self.stop_at = stop_at

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        """Record the step's loss; interrupt at ``stop_at``."""
        self.losses.append((int(step), float(logs["loss"])))
        if self.stop_at is not None and step >= self.stop_at:
            raise KeyboardInterrupt(f"conformance kit: interrupted at step {step}")


class TrainerChecker(_Checker):
    """The conformance checks of a trainer plugin, on the tiny model with ``quantizer: none`` and
    LoRA, through ``qpeft run`` (so the trainer gets the datasets, context and hooks of a real run):

    * ``registration``: a ``TrainerPlugin`` whose ``Options`` subclass ``TrainingOptions``;
    * ``data_order``: with a learning rate too small to change the model, the loss of each of
      the first steps equals the ``native`` trainer's (1e-3 relative): the trainer reads the
      lazy dataset in qpeft's seed-fixed order (:class:`qpeft.data.DataSchedule`) and reports
      every step through ``qpeft_on_step_end``;
    * ``trains``: the loss goes down on a few repeated examples and the run saves and reloads;
    * ``resume``: interrupted after its step-2 checkpoint (``save_steps: 2``), ``--resume``
      ends with the uninterrupted run's adapter (1e-5); a trainer that writes no checkpoint
      starts over, which the check reports.
    """

    def __init__(self, trainer: str, options: dict | None = None, *, model_path: str | None = None, plugins: tuple = ()):
        self.name, self.options = trainer, dict(options or {})
        self.model_path, self.plugins = model_path, tuple(plugins)
        self._tmp = Path(tempfile.mkdtemp(prefix=f"qpeft-trainer-kit-{trainer}-"))

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def config_dict(self, out: str, trainer: str | None = None, **options) -> dict:
        opts = {"batch_size": 1, "max_steps": 3, "lr": 1e-7, "scheduler": "constant", "logging_steps": 1}
        if trainer in (None, self.name) and self._kind() == "prompts":  # whole groups of generations per step, kept short
            fields = self._plugin_options()
            opts.update({k: v for k, v in {"batch_size": 4, "num_generations": 4, "max_completion_length": 8}.items() if k in fields})
        opts.update({**self.options, **options})
        return {
            "model": {"name_or_path": self.model_path or tiny_model_path(), "device": "cpu", "dtype": "float32"},
            "quantizer": "none",
            "peft": {"name": "lora", "options": {"r": 8, "alpha": 16}},
            "trainer": {"name": trainer or self.name, "options": opts},
            "data": {"path": self._data_path(trainer), "max_length": 48, "max_train_examples": 8, "max_val_examples": 2},
            "output_dir": str(self._tmp / out),
            "seed": 0,
            "evaluate": False,
            "gradient_checkpointing": False,
            "generate": {"max_new_tokens": 2, "chat_template": False},
        }

    def _plugin_options(self) -> set:
        from .registry import load_registry

        plugin = load_registry(self.plugins).backends["trainer"].get(self.name)
        return set(plugin.Options.model_fields) if plugin else set()

    def _kind(self) -> str:
        from .registry import load_registry

        plugin = load_registry(self.plugins).backends["trainer"].get(self.name)
        return getattr(plugin, "data_kind", "lm")

    def _data_path(self, trainer: str | None) -> str:
        from .data.objectives import EMBEDDED_FOR_KIND

        kind = self._kind() if trainer in (None, self.name) else "lm"
        return "embedded:text" if kind == "lm" else EMBEDDED_FOR_KIND[kind]

    def _run(self, cfg: dict, watch: _StepLosses, resume: bool = False) -> dict:
        from . import orchestrator
        from .registry import load_registry

        registry = load_registry((*self.plugins, watch))
        resolved, registry = orchestrator.prepare(cfg, registry=registry)
        return orchestrator.run(resolved, registry, resume=resume)

    def check_registration(self) -> dict:
        from .api import TrainerPlugin, TrainingOptions
        from .registry import load_registry

        registry = load_registry(self.plugins)
        plugin = registry.backends["trainer"].get(self.name)
        self.expect(
            plugin is not None, f"no trainer of this name is registered; installed: {', '.join(sorted(registry.backends['trainer']))}"
        )
        self.expect(isinstance(plugin, TrainerPlugin), f"{type(plugin).__name__} is not a qpeft.api.TrainerPlugin")
        self.expect(issubclass(plugin.Options, TrainingOptions), "Options should subclass qpeft.api.TrainingOptions")
        from .data.objectives import DATA_KINDS

        kind = getattr(plugin, "data_kind", "lm")
        self.expect(kind in DATA_KINDS, f"data_kind {kind!r} is not one of {', '.join(DATA_KINDS)}")
        return {"source": registry.origins[("trainer", self.name)], "data_kind": kind}

    def check_objective_data(self) -> dict:
        """A trainer of another objective: its kind's embedded rows load, and a row missing a field
        is refused (ConfigError naming the row) before any weight loads."""
        from .data.objectives import REQUIRED

        kind = self._kind()
        if kind == "lm":
            return {"skipped": "language-modelling data (checked by data_order)"}
        bad = self._tmp / "bad.jsonl"
        bad.write_text(json.dumps({"unrelated": "p"}) + "\n" + json.dumps({"unrelated": "q"}) + "\n")
        cfg = self.config_dict("bad-data")
        cfg["data"]["path"] = str(bad)
        from . import orchestrator
        from .errors import QpeftError
        from .registry import load_registry

        watch = _BaseWatch()
        resolved, registry = orchestrator.prepare(cfg, registry=load_registry((*self.plugins, watch)))
        try:
            orchestrator.run(resolved, registry)
            self.fail("a row without its fields was accepted")
        except QpeftError as exc:
            missing = [*REQUIRED[kind], "prompt"]
            self.expect("row 1" in str(exc), f"the error does not name the row: {exc}")
            self.expect(any(repr(c) in str(exc) for c in missing), f"the error does not name the missing field: {exc}")
        self.expect(watch.model is None, "the base model was loaded before the bad row was refused")
        return {"kind": kind}

    def check_data_order(self) -> dict:
        if self._kind() != "lm":
            return {"skipped": f"data kind {self._kind()!r}: TRL-style trainers sample their own order"}
        mine, ref = _StepLosses(), _StepLosses()
        self._run(self.config_dict("order"), mine)
        self._run(self.config_dict("order-native", trainer="native"), ref)
        self.expect(
            [s for s, _ in mine.losses] == [1, 2, 3],
            f"steps reported through qpeft_on_step_end: {[s for s, _ in mine.losses]}, expected 1, 2, 3",
        )
        for (step, a), (_, b) in zip(mine.losses, ref.losses):
            self.expect(
                abs(a - b) <= 1e-3 * abs(b),
                f"step {step} loss {a:.6f}, the native trainer's {b:.6f}: the trainer does not read the examples in qpeft's order "
                "(qpeft.data.DataSchedule) or does not average the loss over the step's target tokens",
            )
        return {"losses": [l for _, l in mine.losses], "native_losses": [l for _, l in ref.losses]}

    def check_trains(self) -> dict:
        watch = _StepLosses()
        cfg = self.config_dict("trains", batch_size=4, max_steps=6, lr=1e-2)  # (4: a multiple of grpo's groups)
        cfg["data"]["max_train_examples"] = 4  # every step sees the same four examples
        kind = self._kind()
        summary = self._run(cfg, watch)
        losses = [l for _, l in watch.losses]
        if kind == "prompts":  # a policy-gradient loss need not fall; the steps must be reported, finite
            self.expect(len(losses) == 6 and all(math.isfinite(l) for l in losses), f"losses reported: {losses}")
        else:
            self.expect(len(losses) >= 2 and losses[-1] < losses[0], f"training loss did not go down: {losses}")
        self.expect(summary["reload_max_abs_logit_diff"] <= 1e-4, f"reload changed logits by {summary['reload_max_abs_logit_diff']:.2e}")
        return {"losses": losses}

    def check_resume(self) -> dict:
        from safetensors.torch import load_file

        from .checkpoint import latest_complete

        opts = {"batch_size": 2, "max_steps": 4, "lr": 1e-2, "save_steps": 2}
        if self._kind() != "lm":
            from .errors import QpeftError

            try:
                self._run(self.config_dict("whole", **opts), _StepLosses())
            except QpeftError as exc:  # a trainer that writes no checkpoints refuses save_steps up front
                self.expect("save_steps" in str(exc), f"save_steps refused without naming it: {exc}")
                return {"skipped": f"writes no checkpoints: {exc}"}
            self.fail("a trainer of another objective accepted save_steps; its resume is not checked by the kit yet")
        self._run(self.config_dict("whole", **opts), _StepLosses())
        cut = self.config_dict("cut", **opts)
        try:
            self._run(cut, _StepLosses(stop_at=3))
            self.fail("the run was not interrupted at step 3: does the trainer call qpeft_on_step_end after each step?")
        except KeyboardInterrupt:
            pass
        checkpoint = latest_complete(cut["output_dir"])
        self._run(cut, _StepLosses(), resume=True)
        a = load_file(str(self._tmp / "whole" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(self._tmp / "cut" / "adapter" / "adapter_model.safetensors"))
        self.expect(a.keys() == b.keys(), "the resumed run saved other adapter tensors")
        diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a else 0.0
        self.expect(
            diff <= 1e-5,
            f"resumed from {checkpoint}, the adapter differs from the uninterrupted run's by {diff:.2e}: the trainer must restore "
            "its optimizer and scheduler state and continue at the checkpoint's data position (DataSchedule.resume)",
        )
        return {"checkpoint": str(checkpoint) if checkpoint else None, "max_abs_diff": diff}

    CHECKS: ClassVar[tuple[str, ...]] = ("registration", "objective_data", "data_order", "trains", "resume")


def check_trainer(trainer: str, options: dict | None = None, **kwargs) -> dict:
    """Run every trainer conformance check (:class:`TrainerChecker`); return what they measured.
    Raises :class:`ConformanceError` at the first check that fails."""
    checker = TrainerChecker(trainer, options, **kwargs)
    try:
        return checker.run_all()
    finally:
        checker.close()


# ---------------------------------------------------------------------------- evaluator plugins


class EvaluatorChecker(_Checker):
    """The conformance checks of an evaluator plugin, on the tiny model (float32, CPU):

    * ``registration``: an ``EvaluatorPlugin`` with a description, whose module imports no torch;
    * ``options_schema``: its default options validate and a run config naming it resolves
      (``check`` included) without loading a weight; an unknown option key is refused as
      ``eval.0.options.<key>``;
    * ``evaluate``: with the network closed, ``evaluate`` returns an ``EvalResult`` of numbers whose
      ``primary`` metric is among them; twice on the same model it gives the same numbers; it
      leaves the model's weights and train/eval mode as they were; its files are under ``out_dir``.
    """

    def __init__(self, evaluator: str, options: dict | None = None, *, model_path: str | None = None, plugins: tuple = ()):
        self.name, self.options = evaluator, dict(options or {})
        self.model_path, self.plugins = model_path, tuple(plugins)
        self._tmp = Path(tempfile.mkdtemp(prefix=f"qpeft-evaluator-kit-{evaluator}-"))

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def config_dict(self, **options) -> dict:
        return {
            "model": {"name_or_path": self.model_path or tiny_model_path(), "device": "cpu", "dtype": "float32"},
            "quantizer": "none",
            "peft": "lora",
            "trainer": "native",
            "data": {"path": "embedded:text", "max_length": 48, "max_train_examples": 4, "max_val_examples": 2},
            "output_dir": str(self._tmp / "run"),
            "eval": [{"name": self.name, "options": {**self.options, **options}}],
        }

    def _registry(self):
        from .registry import load_registry

        return load_registry(self.plugins)

    def check_registration(self) -> dict:
        from .api import EvaluatorPlugin

        registry = self._registry()
        plugin = registry.backends["evaluator"].get(self.name)
        self.expect(
            plugin is not None, f"no evaluator of this name is registered; installed: {', '.join(sorted(registry.backends['evaluator']))}"
        )
        self.expect(isinstance(plugin, EvaluatorPlugin), f"{type(plugin).__name__} is not a qpeft.api.EvaluatorPlugin")
        self.expect(type(plugin).evaluate is not EvaluatorPlugin.evaluate, "does not implement evaluate()")
        self.expect(bool(str(plugin.description).strip()), "has no description (shown by `qpeft plugins`)")
        source = registry.origins[("evaluator", self.name)]
        module = type(plugin).__module__
        if "(in-process)" not in source:
            code = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps('torch' in sys.modules))"
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            self.expect(proc.returncode == 0, f"importing {module} failed: {proc.stderr.strip()[-400:]}")
            self.expect(
                not json.loads(proc.stdout.strip().splitlines()[-1]), f"importing {module} imports torch; import it inside evaluate()"
            )
        return {"source": source, "module": module}

    def check_options_schema(self) -> dict:
        from . import orchestrator
        from .errors import ConfigError

        resolved, _ = orchestrator.prepare(self.config_dict(), registry=self._registry())
        self.expect([e.plugin.name for e in resolved.evaluators] == [self.name], "the run config's eval list did not resolve to it")
        try:
            orchestrator.prepare(self.config_dict(no_such_option_xyz=1), registry=self._registry())
            self.fail("an unknown option key was accepted (subclass qpeft.api.Options)")
        except ConfigError as exc:
            self.expect(exc.key == "eval.0.options.no_such_option_xyz", f"an unknown option was reported as {exc.key!r}")
        return {"schema": sorted(resolved.evaluators[0].plugin.Options.model_json_schema().get("properties", {}))}

    def check_evaluate(self) -> dict:
        import torch

        from . import orchestrator
        from .api import EvalResult
        from .context import RunContext
        from .data import load_datasets
        from .evaluation import no_network
        from .tokenizer import load_tokenizer

        resolved, _ = orchestrator.prepare(self.config_dict(), registry=self._registry())
        ev = resolved.evaluators[0]
        path = resolved.config.model.name_or_path
        tok, _ = load_tokenizer(path)
        ctx = RunContext(config=resolved.config, device="cpu", dtype="float32", output_dir=str(self._tmp / "run"), tokenizer=tok)
        data = load_datasets(resolved.config.data, tok).val
        model = resolved.quantizer.load(path, resolved.quantizer_options, ctx, training=False).eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out_dir = self._tmp / "run" / "eval" / ev.label
        results = []
        for _ in range(2):
            with no_network():
                r = ev.plugin.evaluate(model, tok, ev.options, ctx, stage="after", data=data, out_dir=out_dir)
            self.expect(isinstance(r, EvalResult), f"evaluate() returned {type(r).__name__}, not a qpeft.api.EvalResult")
            results.append(r.metrics)
        r0, r1 = results
        self.expect(
            r0 and all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in r0.values()),
            f"metrics {r0!r}: numbers",
        )
        self.expect(r.primary is None or r.primary in r0, f"primary metric {r.primary!r} is not among {sorted(r0)}")
        self.expect(r0 == r1, f"two evaluations of the same model differ: {r0} vs {r1}")
        self.expect(not model.training, "evaluate() left the model in training mode")
        after = model.state_dict()
        self.expect(all(torch.equal(before[k], after[k]) for k in before), "evaluate() changed the model's weights")
        for f in r.files:
            self.expect(Path(f).resolve().is_relative_to(out_dir.resolve()), f"wrote {f} outside out_dir {out_dir}")
        return {"metrics": r0, "primary": r.primary}

    CHECKS: ClassVar[tuple[str, ...]] = ("registration", "options_schema", "evaluate")


def check_evaluator(evaluator: str, options: dict | None = None, **kwargs) -> dict:
    """Run every evaluator conformance check (:class:`EvaluatorChecker`); return what they
    measured. Raises :class:`ConformanceError` at the first check that fails."""
    checker = EvaluatorChecker(evaluator, options, **kwargs)
    try:
        return checker.run_all()
    finally:
        checker.close()


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout inside the block to stderr — Python's ``sys.stdout`` and
    file descriptor 1, so banners printed by backend libraries (or their C code) too — so that
    stdout carries only what the caller prints afterwards (``python -m qpeft.testing``'s JSON)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    """``python -m qpeft.testing NAME [--options JSON] [--device D] [--plugin MODULE]``: run the
    kit and print what it measured as JSON on stdout (anything the checks print goes to stderr)."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog="python -m qpeft.testing", description="qpeft quantizer conformance kit")
    parser.add_argument("quantizer")
    parser.add_argument("--options", default="{}", help="quantizer.options as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE", help="an importable plugin module not installed as a package yet"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with stdout_to_stderr():
            plugins = tuple(importlib.import_module(m) for m in args.plugin)
            extra = {"plugins": plugins, "require_entry_point": False} if plugins else {}
            result = check_quantizer(args.quantizer, json.loads(args.options), device=args.device, **extra)
    except ConformanceError as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


# ---------------------------------------------------------------------------- peft method plugins


def check_peft_method(name: str, options: dict | None = None, *, plugins=()) -> dict:
    """Conformance of a PEFT method plugin, on the kit's tiny Llama in float32 on the CPU.

    Checks: registered as a :class:`qpeft.api.PeftPlugin` targeting this plugin API, with a
    description; its module imports no backend library (torch, transformers, peft); options
    validate and survive a JSON round trip; ``capabilities.layer_kinds`` is None or a tuple of
    names; ``attach`` gives a model whose trainable parameters all get finite, non-zero
    gradients in total, and whose base weights do not train; the saved adapter (safetensors)
    loads in plain ``peft.PeftModel.from_pretrained`` and through the plugin's ``load_adapter``
    with the same logits; ``merge`` reproduces them when ``mergeable``, else raises.
    Returns measurements; raises :class:`ConformanceError` naming what failed.
    """
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .api import API_VERSION, Options, PeftPlugin
    from .config import RunConfig
    from .context import RunContext
    from .registry import load_registry

    def expect(ok, msg):
        if not ok:
            raise ConformanceError(f"peft method {name!r}: {msg}")

    registry = load_registry(list(plugins))
    plugin = registry.get("peft", name)
    expect(isinstance(plugin, PeftPlugin), f"{type(plugin).__name__} is not a qpeft.api.PeftPlugin")
    expect(plugin.api_version == API_VERSION, f"targets plugin API {plugin.api_version}, this qpeft has {API_VERSION}")
    expect(isinstance(plugin.description, str) and plugin.description.strip(), "has no description (shown by `qpeft plugins`)")
    expect(issubclass(plugin.Options, Options), "Options should subclass qpeft.api.Options (unknown keys are errors)")
    kinds = plugin.capabilities.layer_kinds
    expect(
        kinds is None or (isinstance(kinds, tuple) and all(isinstance(k, str) for k in kinds)),
        "layer_kinds is not None or a tuple of names",
    )
    module = type(plugin).__module__
    if "(in-process)" not in registry.origins.get(("peft", name), ""):  # an in-process plugin has no entry point to import
        code = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps([m for m in {list(HEAVY_MODULES)!r} if m in sys.modules]))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        expect(
            proc.returncode == 0 and not json.loads(proc.stdout.strip().splitlines()[-1]),
            f"importing {module} imports a backend library or fails",
        )
    opts = plugin.Options(**(options or {}))
    expect(
        plugin.Options.model_validate(json.loads(json.dumps(opts.model_dump(mode="json")))) == opts,
        "options do not survive a JSON round trip",
    )

    path = tiny_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = RunConfig.model_validate(
        {
            "model": {"name_or_path": path, "device": "cpu"},
            "quantizer": {"name": "none"},
            "peft": {"name": name},
            "trainer": {"name": "hf"},
            "data": {"path": "embedded:instruct"},
            "output_dir": tempfile.gettempdir(),
        }
    )
    ctx = RunContext(config=cfg, device="cpu", dtype="float32", output_dir=tempfile.gettempdir(), tokenizer=tok)
    torch.manual_seed(0)
    ids = torch.randint(3, len(tok), (2, 24))

    def fresh():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.requires_grad_(False)
        return model

    model = plugin.attach(fresh(), opts, ctx)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    expect(trainable, "attach() left no trainable parameter")
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for _, p in trainable if p.grad is not None]
    expect(grads and all(torch.isfinite(g).all() for g in grads), "gradients are missing or not finite")
    expect(sum(float(g.abs().sum()) for g in grads) > 0, "every gradient is zero")
    with torch.no_grad():  # move the adapter away from its identity start, as training would
        for _, p in trainable:
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory(prefix=f"qpeft-peft-kit-{name}-") as tmp:
        plugin.save(model, tmp)
        files = set(os.listdir(tmp))
        expect(
            "adapter_config.json" in files and any(f.endswith(".safetensors") for f in files), f"saved {sorted(files)}, not PEFT's format"
        )
        expect(not any(f.endswith((".bin", ".pt", ".pkl")) for f in files), "saved pickle files; safetensors only")
        diffs = {}
        for how in ("peft", "plugin"):
            base = fresh()
            loaded = PeftModel.from_pretrained(base, tmp) if how == "peft" else plugin.load_adapter(base, tmp, ctx)
            loaded.eval()
            with torch.no_grad():
                diffs[how] = float((loaded(input_ids=ids).logits - ref).abs().max())
            expect(diffs[how] < 1e-4, f"the adapter reloaded by {how} gives logits {diffs[how]:.3g} away from the trained model's")
        if plugin.capabilities.mergeable:
            merged = plugin.merge(plugin.load_adapter(fresh(), tmp, ctx))
            with torch.no_grad():
                diffs["merge"] = float((merged(input_ids=ids).logits - ref).abs().max())
            expect(diffs["merge"] < 1e-3, f"the merged model's logits are {diffs['merge']:.3g} away from the adapter's")
        else:
            try:
                plugin.merge(plugin.load_adapter(fresh(), tmp, ctx))
            except NotImplementedError:
                pass
            else:
                expect(False, "declares mergeable=False, yet merge() did not raise NotImplementedError")
    return {"trainable_tensors": len(trainable), "max_abs_logit_diff": diffs}

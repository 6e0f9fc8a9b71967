"""PEFT method ``adapters``: bottleneck adapters (Houlsby 2019, Pfeiffer 2020) as a PEFT custom method.

AdapterHub's ``adapters`` package pins transformers 4.x, so the adapters are implemented here on
peft's tuner API and registered with ``peft.utils.register_peft_method``; they save and load in
PEFT's own format (``adapter_config.json`` with ``"peft_type": "QPEFT_BOTTLENECK"`` +
``adapter_model.safetensors``) through ``save_pretrained`` / ``PeftModel.from_pretrained``.

An adapter is ``h + scaling * up(act(down(h)))`` applied to the *output* ``h`` of a target
sub-module, with ``up`` zero-initialised so the model starts unchanged:

* ``pfeiffer``: after each layer's feed-forward block (``mlp`` / ``feed_forward`` / ``ffn``);
* ``houlsby``: after the attention block and after the feed-forward block.

Its weights are float32 on the wrapped module's device whatever the base (fp32, bf16, 8-bit,
4-bit); it is non-linear, so it cannot be merged into base weights.

Using the method outside qpeft (plain peft)::

    from qpeft.plugins.peft_adapters import register_bottleneck
    register_bottleneck()            # idempotent; before PeftModel.from_pretrained
    model = PeftModel.from_pretrained(base, "path/to/adapter")

peft 0.21 quirk (guarded in :func:`register_bottleneck`): ``register_peft_method`` only accepts names
that are members of the ``PeftType`` enum, which third parties cannot declare; the member
``QPEFT_BOTTLENECK`` is added to the enum at registration time.

Like every plugin module, this one imports only pydantic and qpeft at import time; torch and
peft are imported (and the method registered) on first use.
"""

from __future__ import annotations

import threading
from typing import Literal, Optional, Union  # noqa: F401  (Optional/Union: the lazily built config's annotations)

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, PeftPlugin
from qpeft.errors import ConfigError

#: peft method name (lower case, as register_peft_method wants) and its PeftType member.
PEFT_METHOD = "qpeft_bottleneck"
PEFT_TYPE = PEFT_METHOD.upper()
#: Attribute prefix of the adapter weights (unique among peft methods).
PREFIX = "bottleneck_"
#: Leaf names of feed-forward and attention blocks across common architectures.
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
ATTENTION_NAMES = ("self_attn", "self_attention", "attention", "attn")
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
PLACEMENTS = ("pfeiffer", "houlsby")
NO_MERGE = (
    "bottleneck adapters are non-linear (down-projection, activation, up-projection) and cannot be merged "
    "into base weights; serve them on their base model instead: qpeft generate --adapter ADAPTER_DIR"
)

_lock = threading.Lock()
_impl: dict | None = None
_EXPORTS = ("BottleneckConfig", "BottleneckModel", "BottleneckLayer")


class AdaptersOptions(Options):
    #: "pfeiffer": one adapter after each feed-forward block; "houlsby": after attention and feed-forward.
    placement: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    #: Bottleneck width = hidden size // reduction_factor.
    reduction_factor: int = Field(16, ge=1, le=65536)
    #: Activation between the bottleneck's down- and up-projection.
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    #: Std of the normal init of the down-projection (the up-projection starts at zero, so
    #: the adapted model starts equal to the base).
    init_scale: float = Field(0.02, ge=0, le=10)
    #: Multiplier of the adapter's output before the residual add.
    scaling: float = Field(1.0, gt=0, le=1000)
    #: "auto" = the feed-forward (and, for houlsby, attention) block of every layer, found by
    #: name for any architecture; or module names (leaf names or full paths).
    target_modules: Literal["auto"] | list[str] = "auto"


# --------------------------------------------------------------------------- targets


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def find_block_targets(model, placement: str = "pfeiffer") -> list[str]:
    """Names of the blocks whose outputs get adapters, for any architecture.

    Finds the outermost modules named like a feed-forward block (``MLP_NAMES``) and, for
    ``houlsby``, an attention block (``ATTENTION_NAMES``). Returns their leaf names (e.g.
    ``["mlp", "self_attn"]``) when those are unambiguous, else their full paths. Raises
    ``ValueError`` naming the candidates when a block kind is missing.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    kinds = {"feed-forward": MLP_NAMES}
    if placement == "houlsby":
        kinds["attention"] = ATTENTION_NAMES
    wanted = {n for names in kinds.values() for n in names}
    named = [(n, m) for n, m in model.named_modules() if n]
    matches: list[str] = []
    for name, _ in named:
        if _leaf(name) in wanted and not any(name.startswith(m + ".") for m in matches):
            matches.append(name)
    for kind, names in kinds.items():
        if not any(_leaf(m) in names for m in matches):
            msg = (
                f"no {kind} block found in {type(model).__name__} (looked for modules named {', '.join(names)}); "
                "pass target_modules explicitly"
            )
            # Show what a layer is made of (the first module named "0" with several children).
            layer = next((n for n, m in named if _leaf(n) == "0" and len(list(m.children())) > 1), None)
            if layer:
                depth = layer.count(".") + 1
                children = sorted({_leaf(n) for n, _ in named if n.startswith(layer + ".") and n.count(".") == depth})
                msg += f"; the sub-modules of {layer} are: {', '.join(children)}"
            raise ValueError(msg)
    leaves = sorted({_leaf(m) for m in matches})
    # Leaf names are portable; use them only if they match exactly the chosen modules (no
    # nested module of the same name, which peft's suffix matching would also wrap).
    if {n for n, _ in named if _leaf(n) in leaves} == set(matches):
        return leaves
    return matches


def _check_targets(model, targets: list[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        blocks = sorted({_leaf(n) for n in names if _leaf(n) in MLP_NAMES + ATTENTION_NAMES})
        raise ConfigError(
            "peft.options.target_modules",
            f"no module named {missing[0]!r} in {type(model).__name__}" + (f"; block candidates: {', '.join(blocks)}" if blocks else ""),
        )


def _hidden_size(model_config: dict) -> int | None:
    cfg = model_config.get("text_config") if isinstance(model_config.get("text_config"), dict) else model_config
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


# --------------------------------------------------------------------------- peft method


def _ensure_peft_type(PeftType, name: str):
    """Add ``name`` to peft's ``PeftType`` enum if missing (idempotent; Python 3.10-3.13).

    ``register_peft_method`` refuses names that are not enum members, and the enum is closed
    to third parties; this adds a member the way ``enum`` itself does when it builds a class.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    setattr(PeftType, name, member)  # allowed: not yet in _member_map_
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    if name not in list(PeftType) or PeftType(name) is not member:  # pragma: no cover - future enum changes
        raise RuntimeError(f"could not add {name} to peft's PeftType enum")
    return member


def register_bottleneck() -> dict:
    """Register the bottleneck method with peft (idempotent, thread-safe) and return its classes.

    Call before ``PeftModel.from_pretrained`` on an adapter saved by this plugin when not going
    through qpeft (qpeft's ``attach``/``load_adapter`` call it themselves).
    """
    global _impl
    if _impl is not None:
        return _impl
    with _lock:
        if _impl is None:
            _impl = _build()
            globals().update(_impl)
    return _impl


def __getattr__(name):  # PEP 562: `from qpeft.plugins.peft_adapters import BottleneckConfig` registers
    if name in _EXPORTS:
        return register_bottleneck()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build() -> dict:
    from dataclasses import dataclass, field

    import torch
    import torch.nn.functional as F
    from peft.config import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import PeftType, register_peft_method
    from torch import nn

    peft_type = _ensure_peft_type(PeftType, PEFT_TYPE)
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        # Registered already, e.g. by another copy of this module (importlib.reload): reuse it.
        model_cls = PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
        return {
            "BottleneckConfig": PEFT_TYPE_TO_CONFIG_MAPPING[peft_type],
            "BottleneckModel": model_cls,
            "BottleneckLayer": model_cls.tuner_layer_cls,
        }

    activations = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}

    @dataclass
    class BottleneckConfig(PeftConfig):
        """Configuration of bottleneck adapters (see the module docstring of qpeft.plugins.peft_adapters)."""

        target_modules: list[str] | str | None = field(
            default=None,
            metadata={"help": "Modules whose output gets an adapter (names, suffixes or a regex); None = by placement."},
        )
        exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to skip."})
        placement: str = field(default="pfeiffer", metadata={"help": "pfeiffer (after FFN) or houlsby (after attention and FFN)."})
        reduction_factor: int = field(default=16, metadata={"help": "Bottleneck width = hidden_size // reduction_factor."})
        non_linearity: str = field(default="relu", metadata={"help": f"One of {NON_LINEARITIES}."})
        init_scale: float = field(default=0.02, metadata={"help": "Std of the down-projection init (up starts at 0)."})
        scaling: float = field(default=1.0, metadata={"help": "Multiplier of the adapter output."})
        hidden_size: int | None = field(default=None, metadata={"help": "Width of the adapted outputs; None = model's."})
        modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved."})

        def __post_init__(self):
            super().__post_init__()
            self.peft_type = peft_type
            if self.placement not in PLACEMENTS:
                raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
            if self.non_linearity not in NON_LINEARITIES:
                raise ValueError(f"non_linearity must be one of {NON_LINEARITIES}, got {self.non_linearity!r}")
            if int(self.reduction_factor) < 1:
                raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")

    class BottleneckLayer(nn.Module, BaseTunerLayer):
        """Wraps a block and adds ``scaling * up(act(down(h)))`` to its output ``h`` (first element of a tuple)."""

        adapter_layer_names = ("bottleneck_down", "bottleneck_up")
        other_param_names = ("bottleneck_act", "bottleneck_scaling")

        def __init__(self, base_layer: nn.Module, adapter_name: str, hidden_size: int, config) -> None:
            super().__init__()
            self.base_layer = base_layer
            self.bottleneck_down = nn.ModuleDict({})
            self.bottleneck_up = nn.ModuleDict({})
            self.bottleneck_act: dict[str, str] = {}
            self.bottleneck_scaling: dict[str, float] = {}
            self._disable_adapters = False
            self.merged_adapters = []
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, hidden_size, config)

        def _base_device(self):
            base = self.get_base_layer()
            for t in list(base.parameters()) + list(base.buffers()):
                if t.device.type != "meta":
                    return t.device
            return torch.device("cpu")

        def update_layer(self, adapter_name: str, hidden_size: int, config) -> None:
            width = max(1, int(hidden_size) // int(config.reduction_factor))
            device = self._base_device()
            # float32 whatever the base dtype or quantization: small, and stable to train.
            down = nn.Linear(hidden_size, width, device=device, dtype=torch.float32)
            up = nn.Linear(width, hidden_size, device=device, dtype=torch.float32)
            with torch.no_grad():
                nn.init.normal_(down.weight, std=float(config.init_scale))
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
            self.bottleneck_down[adapter_name] = down
            self.bottleneck_up[adapter_name] = up
            self.bottleneck_act[adapter_name] = config.non_linearity
            self.bottleneck_scaling[adapter_name] = float(config.scaling)
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

        def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
            # peft's default would also cast to the base dtype (bf16, or nothing for a block);
            # adapters stay float32.
            target = device if device is not None else self._base_device()
            for attr in self.adapter_layer_names:
                container = getattr(self, attr)
                if adapter_name in container and not any(p.device.type == "meta" for p in container[adapter_name].parameters()):
                    container[adapter_name] = container[adapter_name].to(target, dtype=torch.float32)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise NotImplementedError(NO_MERGE)

        def unmerge(self) -> None:
            raise NotImplementedError(NO_MERGE)

        def _delta(self, name: str, h: torch.Tensor) -> torch.Tensor:
            down, up = self.bottleneck_down[name], self.bottleneck_up[name]
            if h.shape[-1] != down.in_features:
                raise ValueError(
                    f"bottleneck adapter built for width {down.in_features} got an output of width {h.shape[-1]}; "
                    "set hidden_size or target_modules to blocks whose output is the model's hidden state"
                )
            x = h.to(down.weight.dtype)
            y = up(activations[self.bottleneck_act[name]](down(x)))
            return (y * self.bottleneck_scaling[name]).to(h.dtype)

        def forward(self, *args, **kwargs):
            out = self.base_layer(*args, **kwargs)
            if self.disable_adapters or self.merged:
                return out
            active = [a for a in self.active_adapters if a in self.bottleneck_down]
            if not active:
                return out
            is_tuple = isinstance(out, tuple)
            h = out[0] if is_tuple else out
            for name in active:
                h = h + self._delta(name, h)
            return (h, *out[1:]) if is_tuple else h

        def __getattr__(self, name: str):
            # Code that reads attributes of the wrapped block (e.g. an attention module's
            # layer_idx or config) keeps working.
            try:
                return super().__getattr__(name)
            except AttributeError:
                if name == "base_layer":
                    raise
                return getattr(self.base_layer, name)

        def __repr__(self) -> str:
            return "bottleneck." + super().__repr__()

    class BottleneckModel(BaseTuner):
        """Injects :class:`BottleneckLayer` around the target blocks of a model."""

        prefix: str = PREFIX
        tuner_layer_cls = BottleneckLayer
        target_module_mapping: dict = {}

        def _prepare_adapter_config(self, peft_config, model_config):
            if peft_config.target_modules is None:
                peft_config.target_modules = find_block_targets(self.model, peft_config.placement)
            if peft_config.hidden_size is None:
                peft_config.hidden_size = _hidden_size(model_config)
                if peft_config.hidden_size is None:
                    raise ValueError("could not read the hidden size from the model config; set hidden_size")
            return peft_config

        def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
            if isinstance(target, BottleneckLayer):
                target.update_layer(adapter_name, peft_config.hidden_size, peft_config)
                return
            new_module = BottleneckLayer(target, adapter_name, peft_config.hidden_size, peft_config)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

        def _replace_module(self, parent, child_name, new_module, child) -> None:
            # peft's default copies `.weight` between wrapper and block (blocks have none) and
            # finds the device with next(child.parameters()), which fails for blocks whose
            # quantized weights are buffers (GPTQ). The layer already sits on its block's device.
            setattr(parent, child_name, new_module)

        def merge_and_unload(self, *args, **kwargs):
            raise NotImplementedError(NO_MERGE)

        def merge_adapter(self, *args, **kwargs):
            raise NotImplementedError(NO_MERGE)

    classes = {"BottleneckConfig": BottleneckConfig, "BottleneckModel": BottleneckModel, "BottleneckLayer": BottleneckLayer}
    for name, cls in classes.items():  # importable by name (pickle, copy, reprs)
        cls.__module__ = __name__
        cls.__qualname__ = name
    register_peft_method(name=PEFT_METHOD, config_cls=BottleneckConfig, model_cls=BottleneckModel, prefix=PREFIX)
    return classes


# --------------------------------------------------------------------------- qpeft plugin


class Adapters(PeftPlugin):
    name = "adapters"
    description = "Bottleneck adapters (Houlsby, Pfeiffer) as a PEFT custom method"
    Options = AdaptersOptions
    capabilities = Capabilities(mergeable=False, grad_checkpointing=True)

    def check(self, options, ctx):
        if options.target_modules != "auto" and not options.target_modules:
            raise ConfigError("peft.options.target_modules", 'is empty; name modules or use "auto"')

    def attach(self, model, options, ctx):
        from peft import get_peft_model

        impl = register_bottleneck()
        if options.target_modules == "auto":
            try:
                targets = find_block_targets(model, options.placement)
            except ValueError as exc:
                raise ConfigError("peft.options.target_modules", str(exc)) from None
        else:
            targets = list(options.target_modules)
            _check_targets(model, targets)
        config = impl["BottleneckConfig"](
            task_type="CAUSAL_LM",
            target_modules=targets,
            placement=options.placement,
            reduction_factor=options.reduction_factor,
            non_linearity=options.non_linearity,
            init_scale=options.init_scale,
            scaling=options.scaling,
        )
        peft_model = get_peft_model(model, config)
        layers = [m for m in peft_model.modules() if isinstance(m, impl["BottleneckLayer"])]
        cfg = peft_model.peft_config["default"]
        ctx.notes.append(
            f"adapters ({options.placement}): {len(layers)} bottlenecks {cfg.hidden_size}->"
            f"{max(1, cfg.hidden_size // cfg.reduction_factor)}->{cfg.hidden_size} on {', '.join(targets)}"
        )
        return peft_model

    def load_adapter(self, model, adapter_dir, ctx, *, trainable=False):
        register_bottleneck()  # before peft reads adapter_config.json's peft_type
        return super().load_adapter(model, adapter_dir, ctx, trainable=trainable)

    def merge(self, model):
        raise NotImplementedError(NO_MERGE)


@hookimpl
def qpeft_register_peft_methods(register):
    register(Adapters())

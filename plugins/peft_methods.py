"""PEFT methods ``ia3``, ``vera``, ``loha``, ``lokr``, ``oft``, ``prompt`` and ``ptuning`` through peft.

Each saves and loads in peft's own format, so a plain ``PeftModel.from_pretrained`` loads the
adapter. Which quantized layers each can wrap (``Capabilities.layer_kinds``) was measured with
peft 0.21.2 on a tiny Llama (tests/test_matrix.py runs every declared cell):

* IA3: peft has layers for ``nn.Linear`` (torchao's int8 layers are ``nn.Linear``) and bnb
  8/4-bit; not for GPTQ ("Target module TorchLinear() is not supported").
* VeRA and OFT wrap any layer by calling it (OFT rotates the input, VeRA adds a projection of
  it), so they train on bnb, GPTQ and torchao bases.
* LoHa/LoKr (LyCORIS) reshape their update to the base weight's shape: on bnb 4-bit layers that
  is the packed ``[n, 1]`` storage and the forward fails ("shape '[8192, 1]' is invalid");
  GPTQ layers are refused by peft ("only adapters for Conv2d, Conv1d, Linear are supported").
* Prompt tuning and p-tuning wrap no layer (learned input embeddings), so any base works; peft
  drops ``position_ids`` for prompt learning ("Position ids are not supported"), so packed rows
  would attend across documents: ``packing=False``. ``PeftModel.from_pretrained(...,
  is_trainable=True)`` refuses prompt learning adapters; :func:`_load_prompt_learning` builds a
  fresh adapter and loads the saved weights for training (``--resume``).

The merge of the layer methods is peft's ``merge_and_unload``; qpeft merges into full-precision
weights only (the quantizer's ``merge_source``), never into the quantized layers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, PeftPlugin
from qpeft.errors import ConfigError
from qpeft.modeling import check_target_modules, find_linear_targets

#: Leaf-name parts of feed-forward blocks (IA3 scales their inputs instead of their outputs).
MLP_PARTS = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
FLOAT_KINDS = ("float", "torchao")
NO_MERGE_PROMPT = "learned virtual-token embeddings cannot be merged into base weights; serve it with `qpeft generate --adapter`"


def _targets(model, requested) -> list[str]:
    if requested == "all-linear":
        return find_linear_targets(model)
    targets = list(requested)
    check_target_modules(model, targets, "peft.options.target_modules")
    return targets


class _LayerOptions(Options):
    #: "all-linear" = every linear layer except the output head, found for any architecture.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class _LayerMethod(PeftPlugin):
    """A peft method that wraps linear layers: build its config, attach, merge."""

    def peft_config(self, model, options, targets):  # pragma: no cover - each method overrides
        raise NotImplementedError

    def attach(self, model, options, ctx):
        from peft import get_peft_model

        targets = _targets(model, options.target_modules)
        try:
            peft_model = get_peft_model(model, self.peft_config(model, options, targets))
        except (ValueError, TypeError) as exc:
            raise ConfigError("peft.options", f"peft refused the {self.name} config: {str(exc).splitlines()[0]}") from None
        ctx.notes.append(f"{self.name} targets: {', '.join(targets)}")
        return peft_model

    def unload(self, model):
        """The base model with every adapter wrapper replaced by the layer it wraps.

        Done here rather than by peft's ``unload()``, which (0.21) refuses IA3 on a model flagged
        is_loaded_in_8bit/4bit, and for VeRA/OFT on GPTQ assigns ``weight`` to gptqmodel's
        layer, a read-only property ("property 'weight' of 'TorchLinear' object has no setter").
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        base = model.get_base_model()
        wrapped = [(n, m) for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)]
        for name, module in wrapped:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.get_base_layer())
        return base

    def merge(self, model):
        return model.merge_and_unload()


# ---------------------------------------------------------------------------- IA3


class IA3Options(_LayerOptions):
    #: Modules whose input (not output) is scaled: "auto" = the targets inside feed-forward blocks.
    feedforward_modules: Literal["auto"] | list[str] = "auto"


class IA3(_LayerMethod):
    name = "ia3"
    description = "IA3: learned per-channel scaling of activations via peft"
    Options = IA3Options
    capabilities = Capabilities(
        mergeable=True,
        layer_kinds=("float", "torchao", "bnb-8bit", "bnb-4bit"),
        layer_note="peft 0.21 has IA3 layers for nn.Linear and bitsandbytes 8/4-bit only",
    )

    def peft_config(self, model, options, targets):
        from peft import IA3Config

        if options.feedforward_modules == "auto":
            ff = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, _ in model.named_modules()
                    if n.rsplit(".", 1)[-1] in targets and any(f".{p}." in f".{n}" for p in MLP_PARTS)
                }
            )
        else:
            ff = list(options.feedforward_modules)
            missing = [m for m in ff if m not in targets]
            if missing:
                raise ConfigError("peft.options.feedforward_modules", f"{missing[0]!r} is not a target; targets: {', '.join(targets)}")
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=ff)

    def merge(self, model):
        # peft 0.21 refuses an IA3 merge whenever the model says is_loaded_in_8bit/4bit, and a
        # bitsandbytes model dequantized for qpeft merge keeps saying so. Merge only when every
        # adapted layer really holds float weights, with the stale flags cleared.
        base = model.get_base_model()
        held = {type(m.get_base_layer().weight).__name__ for m in model.modules() if hasattr(m, "ia3_l")}
        dtypes = {m.get_base_layer().weight.dtype.is_floating_point for m in model.modules() if hasattr(m, "ia3_l")}
        if dtypes != {True} or held - {"Parameter", "Tensor"}:
            raise NotImplementedError(f"ia3 merges into float weights only; these layers hold {sorted(held)}")
        for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit"):
            if getattr(base, flag, False):
                setattr(base, flag, False)
        return model.merge_and_unload()


# ---------------------------------------------------------------------------- VeRA


class VeraOptions(_LayerOptions):
    #: Rank of the shared frozen random projections (VeRA trains only two scaling vectors per layer).
    r: int = Field(256, ge=1, le=65536)
    #: Initial value of the trained vector d (b starts at zero, so the model starts unchanged).
    d_initial: float = Field(0.1, gt=0, le=100)
    #: Dropout on the adapter's input.
    dropout: float = Field(0.0, ge=0, lt=1)
    #: Seed of the frozen random projections.
    projection_prng_key: int = Field(0, ge=0, le=2**31 - 1)
    #: Save the projections with the adapter (else they are regenerated from the seed on load).
    save_projection: bool = True


class Vera(_LayerMethod):
    name = "vera"
    description = "VeRA: shared frozen random low-rank projections, trained scaling vectors, via peft"
    Options = VeraOptions
    capabilities = Capabilities(
        mergeable=True,
        layer_kinds=("float", "torchao", "bnb-8bit", "bnb-4bit", "gptq"),
        layer_note="the kinds tested with peft 0.21; others are untested",
    )

    def peft_config(self, model, options, targets):
        from peft import VeraConfig

        return VeraConfig(
            task_type="CAUSAL_LM",
            r=options.r,
            target_modules=targets,
            d_initial=options.d_initial,
            vera_dropout=options.dropout,
            projection_prng_key=options.projection_prng_key,
            save_projection=options.save_projection,
        )


# ---------------------------------------------------------------------------- LoHa / LoKr

LYCORIS_NOTE = (
    "LoHa/LoKr reshape their update to the base weight's shape, which bitsandbytes 4-bit layers store packed "
    "(the forward fails), and peft has no LyCORIS layer for GPTQ"
)


class LohaOptions(_LayerOptions):
    #: Rank of each Hadamard factor.
    r: int = Field(8, ge=1, le=4096)
    #: Scaling numerator (scale = alpha / r).
    alpha: float = Field(8, gt=0, le=1e6)
    #: Dropout of whole ranks during training.
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    #: Probability of skipping a whole adapted module in a training step.
    module_dropout: float = Field(0.0, ge=0, lt=1)


class Loha(_LayerMethod):
    name = "loha"
    description = "LoHa: low-rank Hadamard-product updates (LyCORIS) via peft"
    Options = LohaOptions
    capabilities = Capabilities(mergeable=True, layer_kinds=("float", "torchao", "bnb-8bit"), layer_note=LYCORIS_NOTE)

    def peft_config(self, model, options, targets):
        from peft import LoHaConfig

        return LoHaConfig(
            task_type="CAUSAL_LM",
            r=options.r,
            alpha=options.alpha,
            rank_dropout=options.rank_dropout,
            module_dropout=options.module_dropout,
            target_modules=targets,
        )


class LokrOptions(LohaOptions):
    #: Also factor the larger Kronecker factor into low rank.
    decompose_both: bool = False
    #: Size of the first Kronecker factor (-1 = the most balanced split).
    decompose_factor: int = Field(-1, ge=-1, le=65536)


class Lokr(_LayerMethod):
    name = "lokr"
    description = "LoKr: low-rank Kronecker-product updates (LyCORIS) via peft"
    Options = LokrOptions
    capabilities = Capabilities(mergeable=True, layer_kinds=("float", "torchao", "bnb-8bit"), layer_note=LYCORIS_NOTE)

    def check(self, options, ctx):
        if options.decompose_factor == 0:
            raise ConfigError("peft.options.decompose_factor", "must be -1 (balanced) or a positive factor")

    def peft_config(self, model, options, targets):
        from peft import LoKrConfig

        return LoKrConfig(
            task_type="CAUSAL_LM",
            r=options.r,
            alpha=options.alpha,
            rank_dropout=options.rank_dropout,
            module_dropout=options.module_dropout,
            decompose_both=options.decompose_both,
            decompose_factor=options.decompose_factor,
            target_modules=targets,
        )


# ---------------------------------------------------------------------------- OFT


class OftOptions(_LayerOptions):
    #: Size of each orthogonal block; must divide the input width of every target.
    block_size: int = Field(32, ge=1, le=65536)
    #: Constrained OFT (keep the rotation within eps of the identity).
    coft: bool = False
    #: The constraint radius for coft.
    eps: float = Field(6e-5, gt=0, le=1)
    #: Share one rotation across all blocks of a layer.
    block_share: bool = False
    #: Probability of skipping a whole adapted module in a training step.
    module_dropout: float = Field(0.0, ge=0, lt=1)


class Oft(_LayerMethod):
    name = "oft"
    description = "OFT: block-diagonal orthogonal rotations of layer inputs via peft"
    Options = OftOptions
    capabilities = Capabilities(
        mergeable=True,
        layer_kinds=("float", "torchao", "bnb-8bit", "bnb-4bit", "gptq"),
        layer_note="the kinds tested with peft 0.21; others are untested",
    )

    def peft_config(self, model, options, targets):
        from peft import OFTConfig

        widths = {m.in_features for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features")}
        bad = sorted(w for w in widths if w % options.block_size)
        if bad:
            raise ConfigError("peft.options.block_size", f"{options.block_size} does not divide the input width {bad[0]} of a target layer")
        return OFTConfig(
            task_type="CAUSAL_LM",
            r=0,
            oft_block_size=options.block_size,
            coft=options.coft,
            eps=options.eps,
            block_share=options.block_share,
            module_dropout=options.module_dropout,
            target_modules=targets,
        )


# ---------------------------------------------------------------------------- prompt learning


def _freeze(peft_model):
    # peft leaves the prompt encoder requiring grad in inference mode.
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model


def _load_prompt_learning(model, adapter_dir, trainable):
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if not trainable:
        return _freeze(PeftModel.from_pretrained(model, adapter_dir, is_trainable=False))
    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, load_peft_weights(adapter_dir, device="cpu"))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"could not load the prompt adapter in {adapter_dir} for training: {result.unexpected_keys[:3]}")
    return peft_model


class _PromptLearning(PeftPlugin):
    # packing=False: peft drops position_ids for prompt learning (see module notes).
    capabilities = Capabilities(mergeable=False, packing=False)

    def load_adapter(self, model, adapter_dir, ctx, *, trainable=False):
        return _load_prompt_learning(model, adapter_dir, trainable)

    def merge(self, model):
        raise NotImplementedError(f"{self.name} cannot be merged: {NO_MERGE_PROMPT}")


class PromptOptions(Options):
    #: Learned embeddings prepended to every input.
    num_virtual_tokens: int = Field(16, ge=1, le=4096)
    #: "text" = start as the embeddings of init_text's tokens (repeated); "random" = peft's init.
    init: Literal["text", "random"] = "text"
    #: Text whose token embeddings start the prompt.
    init_text: str = Field("Answer the following clearly and accurately.", min_length=1)


class Prompt(_PromptLearning):
    name = "prompt"
    description = "Prompt tuning: learned virtual-token embeddings via peft"
    Options = PromptOptions

    def attach(self, model, options, ctx):
        import torch
        from peft import PromptTuningConfig, get_peft_model

        peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=options.num_virtual_tokens))
        how = "random"
        tok = getattr(ctx, "tokenizer", None)
        if options.init == "text" and tok is not None:
            # What peft's prompt_tuning_init="TEXT" does, without re-loading the tokenizer by path.
            ids = tok(options.init_text, add_special_tokens=False)["input_ids"] or [0]
            ids = (ids * (options.num_virtual_tokens // len(ids) + 1))[: options.num_virtual_tokens]
            emb = peft_model.get_base_model().get_input_embeddings().weight
            weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
            with torch.no_grad():
                weight.copy_(emb[torch.tensor(ids, device=emb.device)].detach().to(weight.dtype))
            how = f"embeddings of {options.init_text!r}"
        ctx.notes.append(f"prompt: {options.num_virtual_tokens} virtual tokens, init {how}")
        return peft_model


class PtuningOptions(Options):
    #: Learned virtual tokens prepended to every input (through the prompt encoder).
    num_virtual_tokens: int = Field(16, ge=1, le=4096)
    #: The prompt encoder: an MLP or an LSTM followed by an MLP (Liu et al. 2021).
    encoder: Literal["MLP", "LSTM"] = "MLP"
    #: Hidden width of the prompt encoder (default: the model's hidden size).
    encoder_hidden_size: int | None = Field(None, ge=1, le=1_048_576)
    #: Dropout inside the prompt encoder.
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


class Ptuning(_PromptLearning):
    name = "ptuning"
    description = "P-tuning: virtual tokens produced by a trained prompt encoder via peft"
    Options = PtuningOptions

    def attach(self, model, options, ctx):
        from peft import PromptEncoderConfig, get_peft_model

        config = PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            encoder_reparameterization_type=options.encoder,
            encoder_hidden_size=options.encoder_hidden_size or model.config.hidden_size,
            encoder_dropout=options.encoder_dropout,
        )
        ctx.notes.append(f"ptuning: {options.num_virtual_tokens} virtual tokens, {options.encoder} encoder")
        return get_peft_model(model, config)


@hookimpl
def qpeft_register_peft_methods(register):
    for plugin in (IA3(), Vera(), Loha(), Lokr(), Oft(), Prompt(), Ptuning()):
        register(plugin)

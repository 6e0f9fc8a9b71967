"""PEFT method ``prefix``: prefix tuning (learned key/value prefixes in every attention layer) via peft.

Field notes (peft 0.21.2, transformers 5.23), each guarded below:

* peft initialises a plain prefix (no re-parameterization) as ``nn.Embedding`` does, N(0, 1)
  keys and values: on SmolLM2-135M that alone takes validation perplexity from 18.6 to 1137
  before any training (and the quickstart's 3 steps end at 1464). A zero prefix is harmless
  (20.6) but every virtual token then gets the same gradient forever (they never become
  different). The default ``init: text`` starts the prefix as the model's own keys/values for
  a short text, so the model starts as if it had read that text (19.6) with distinct tokens;
  ``normal`` is N(0, 0.02) (20.6); ``peft`` keeps peft's init. With ``reparameterize`` the
  MLP's last layer starts at zero (peft's ``init_weights="zero"``; 20.6, vs 25.2 for peft's).
* Prefix tuning cannot be combined with gradient checkpointing (peft raises a bare ValueError
  in ``get_peft_model``); the capability makes the orchestrator turn checkpointing off under
  "auto", and :meth:`Prefix.attach` refuses a checkpointed model with the config key to change.
* With ``use_cache=False`` ``generate()`` crashes (``mat1 and mat2 shapes cannot be
  multiplied``): peft hands the model its prefix as a ``DynamicCache``; the model appends to it
  and returns it even without caching, generate feeds it back, and peft's
  ``prepare_inputs_for_generation`` then trims ``input_ids`` to the last token while
  ``position_ids`` still cover the whole sequence. The cache only changes speed, so
  :func:`guard_generation` forces ``use_cache=True`` (from kwargs and generation configs).
* ``PeftModel.from_pretrained(..., is_trainable=True)`` refuses every prompt-learning
  adapter, and with ``is_trainable=False`` it leaves the prompt encoder requiring grad.
  :meth:`Prefix.load_adapter` freezes everything for inference, and for training builds a
  fresh prefix with the saved config and loads the saved weights into it.
* With ``reparameterize`` (peft's ``prefix_projection``) peft saves the *projected* prefix
  (the MLP is folded away), so the adapter reloads for inference exactly, but cannot be
  loaded back into the MLP for more training: training resumes on the saved prefix directly
  (``prefix_projection`` off), which is the same model.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, PeftPlugin
from qpeft.errors import ConfigError

SERVE_HINT = "serve it on its base model instead: qpeft generate --adapter ADAPTER_DIR"
DEFAULT_INIT_TEXT = "The following text is clear, accurate and to the point."
NORMAL_STD = 0.02


class PrefixOptions(Options):
    #: Length of the learned key/value prefix added to every attention layer.
    num_virtual_tokens: int = Field(16, ge=1, le=4096)
    #: Train the prefix through a 2-layer MLP (peft's ``prefix_projection``, as in Li & Liang
    #: 2021) for more stable optimisation; the saved adapter holds the projected prefix only.
    reparameterize: bool = False
    #: Hidden width of the re-parameterization MLP (default: the model's key/value width).
    encoder_hidden_size: int | None = Field(None, ge=1, le=1_048_576)
    #: How the prefix starts: "text" = the model's own keys/values for ``init_text`` (near
    #: the base model's quality, distinct virtual tokens); "normal" = N(0, 0.02); "peft" =
    #: peft's N(0, 1), which wrecks the base model's predictions until trained (see notes).
    init: Literal["text", "normal", "peft"] = "text"
    #: Text whose keys/values start the prefix (repeated to num_virtual_tokens tokens).
    init_text: str = Field(DEFAULT_INIT_TEXT, min_length=1)


def is_checkpointing(model) -> bool:
    """Whether activation (gradient) checkpointing is on, without transformers 5's
    deprecation warning for ``is_gradient_checkpointing`` where the new name exists."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(type(model), attr, None)
        if value is not None:
            return bool(getattr(model, attr))
    return False


def guard_generation(peft_model):
    """Make ``generate()`` on a prefix-tuned model always use the KV cache (see module notes).

    Returns the same model, whose ``generate`` now turns ``use_cache=False`` (from a keyword or
    a generation config) into ``use_cache=True`` with a warning. Idempotent.
    """
    base = peft_model.get_base_model()
    if getattr(base, "generation_config", None) is not None and base.generation_config.use_cache is False:
        base.generation_config.use_cache = True
    if getattr(peft_model, "_qpeft_generation_guard", False):
        return peft_model
    original = peft_model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        gen_cfg = kwargs.get("generation_config")
        forced = kwargs.get("use_cache") is False or (gen_cfg is not None and getattr(gen_cfg, "use_cache", None) is False)
        if forced:
            warnings.warn(
                "prefix tuning generates with use_cache=True: with use_cache=False peft 0.21 + transformers 5 "
                "feed the prefix cache back and crash (the cache only changes speed, not the result)",
                stacklevel=2,
            )
            kwargs["use_cache"] = True
            if gen_cfg is not None and getattr(gen_cfg, "use_cache", None) is False:
                import copy

                kwargs["generation_config"] = gen_cfg = copy.deepcopy(gen_cfg)
                gen_cfg.use_cache = True
        return original(*args, **kwargs)

    peft_model.generate = generate
    peft_model._qpeft_generation_guard = True
    return peft_model


def _layer_kv(cache):
    """[(keys, values)] per layer of a transformers cache (5.x ``.layers``, 4.x lists, legacy tuples)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(kv[0], kv[1]) for kv in cache]


def prefix_from_text(model, tokenizer, num_tokens: int, text: str):
    """The keys/values ``model`` computes for ``text`` (repeated to ``num_tokens`` tokens), laid
    out as peft's prefix-tuning embedding: ``[num_tokens, layers * 2 * kv_width]``, per layer
    keys then values (the layout ``PeftModel.get_prompt`` reads). Post-RoPE keys at positions
    0..n-1, where peft's prefix sits, so the model starts as if it had read the text."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("init_text encodes to no tokens")
    ids = (ids * (num_tokens // len(ids) + 1))[:num_tokens]
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    finally:
        model.train(was_training)
    rows = []
    for keys, values in _layer_kv(out.past_key_values):  # each [1, kv_heads, n, head_dim]
        for t in (keys, values):
            rows.append(t[0].transpose(0, 1).reshape(num_tokens, -1))
    return torch.cat(rows, dim=1).float()


def init_prefix(peft_model, options, ctx) -> str:
    """Set the starting prefix of a fresh, non-re-parameterized adapter; return what was done."""
    import torch

    weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
    n = weight.shape[0]
    how = f"normal (std {NORMAL_STD})"
    if options.init == "text":
        tokenizer = getattr(ctx, "tokenizer", None)
        if tokenizer is None:
            how += ", as no tokenizer was given for init: text"
        else:
            values = prefix_from_text(peft_model.get_base_model(), tokenizer, n, options.init_text)
            if values.shape == weight.shape:
                with torch.no_grad():
                    weight.copy_(values.to(weight.dtype))
                return f"keys/values of {options.init_text!r}"
            how += f", as the model's cache {tuple(values.shape)} does not match the prefix {tuple(weight.shape)}"
    with torch.no_grad():
        weight.normal_(mean=0.0, std=NORMAL_STD)
    return how


class Prefix(PeftPlugin):
    name = "prefix"
    description = "Prefix tuning (learned key/value prefixes per layer) via peft"
    Options = PrefixOptions
    # packing=False: transformers only builds per-document masks from position ids when no
    # past key values are given, and prefix tuning passes its prefix as past key values, so
    # packed documents would silently attend to each other.
    capabilities = Capabilities(mergeable=False, grad_checkpointing=False, packing=False)

    def check(self, options, ctx):
        if options.encoder_hidden_size is not None and not options.reparameterize:
            raise ConfigError(
                "peft.options.encoder_hidden_size",
                "is the width of the re-parameterization MLP; it needs peft.options.reparameterize: true",
            )

    def attach(self, model, options, ctx):
        from peft import PrefixTuningConfig, get_peft_model

        if is_checkpointing(model):
            raise ConfigError(
                "gradient_checkpointing",
                "prefix tuning does not work with gradient checkpointing (the model has it on); set it to false or auto",
            )
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.reparameterize,
            encoder_hidden_size=options.encoder_hidden_size,
            # The MLP's output layer starts at zero (a zero prefix); its hidden layer keeps the
            # virtual tokens distinct once training starts.
            init_weights="zero" if options.reparameterize and options.init != "peft" else None,
        )
        peft_model = get_peft_model(model, config)
        cfg = peft_model.peft_config["default"]
        if options.init == "peft":
            how = "peft's default init"
        elif options.reparameterize:
            how = "zero (re-parameterization MLP output layer at zero)"
        else:
            how = init_prefix(peft_model, options, ctx)
        ctx.notes.append(
            f"prefix: {cfg.num_virtual_tokens} virtual tokens x {cfg.num_layers} layers "
            f"(key/value width {cfg.token_dim}{', re-parameterized' if cfg.prefix_projection else ''}), init {how}"
        )
        return guard_generation(peft_model)

    def load_adapter(self, model, adapter_dir, ctx, *, trainable=False):
        import torch
        from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
        from peft.utils import load_peft_weights

        if not trainable:
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
            # peft leaves the prompt encoder requiring grad in inference mode; freeze everything.
            for p in peft_model.parameters():
                p.requires_grad_(False)
            return guard_generation(peft_model)
        # peft refuses is_trainable=True for prompt learning ("Cannot set a prompt learning
        # adapter to trainable"): build a fresh trainable prefix and load the saved one into it.
        config = PeftConfig.from_pretrained(adapter_dir)
        if getattr(config, "prefix_projection", False):
            # The checkpoint holds the projected prefix, not the MLP: train that prefix directly.
            config.prefix_projection = False
            ctx.notes.append("prefix: adapter was re-parameterized; training resumes on its saved prefix directly")
        config.inference_mode = False
        peft_model = get_peft_model(model, config)
        weights = load_peft_weights(adapter_dir, device="cpu")
        set_peft_model_state_dict(peft_model, weights)
        loaded = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
        saved = weights.get("prompt_embeddings")
        if saved is None or saved.shape != loaded.shape or not torch.equal(loaded.detach().cpu(), saved.to(loaded.dtype)):
            raise RuntimeError(f"could not load the prefix saved in {adapter_dir} for training")  # peft format change
        return guard_generation(peft_model)

    def merge(self, model):
        raise NotImplementedError(
            "prefix tuning cannot be merged: it adds learned key/value prefixes to every attention layer, "
            f"which no base weight can hold; {SERVE_HINT}"
        )


@hookimpl
def qpeft_register_peft_methods(register):
    register(Prefix())

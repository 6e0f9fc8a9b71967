"""PEFT method ``lora``: low-rank adapters (with rsLoRA and DoRA switches) through peft."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Capabilities, Options, PeftPlugin, implements
from qpeft.errors import ConfigError, QpeftError
from qpeft.model_source import resolve_model_path
from qpeft.modeling import check_target_modules, find_linear_targets


class LoraOptions(Options):
    #: Rank of the low-rank update (A is r × in, B is out × r).
    r: int = Field(16, ge=1, le=4096)
    #: Scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).
    alpha: float = Field(32, gt=0, le=1e6)
    #: Dropout on the adapter's input (0 trains fastest).
    dropout: float = Field(0.0, ge=0, lt=1)
    #: "all-linear" = every linear layer except the output head, found for any architecture.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    #: Which biases train: none, all of the model's, or only those of adapted layers.
    bias: Literal["none", "all", "lora_only"] = "none"
    #: rsLoRA: scale by alpha / sqrt(r), which keeps updates stable at high ranks.
    use_rslora: bool = False
    #: DoRA: learn a magnitude per output and the direction by LoRA (slower per step).
    use_dora: bool = False
    #: Modules trained in full and saved with the adapter (e.g. ["lm_head"]).
    modules_to_save: list[str] | None = None
    #: How A and B start. "default": A Kaiming-uniform, B zero; "gaussian": A normal(1/r), B
    #: zero; "pissa"/"olora": A and B from the principal singular vectors / a QR of each weight,
    #: which peft subtracts from the base weight (float bases only; the saved adapter is converted
    #: to a plain LoRA of rank 2r against the original weights, so it loads and merges anywhere).
    #: "loftq": A and B from the rank-r SVD of W - dequantize(Q), W read from the checkpoint, so
    #: that the quantized base + adapter starts close to the full-precision model (quantizers that
    #: implement ``dequantized_weight``). "eva": A from the principal components of each layer's
    #: inputs on the first ``eva_batches`` training batches (ranks redistributed by explained
    #: variance, up to ``eva_rho`` × r per layer), B zero. "corda" is refused (docs/methods.md,
    #: "LoRA initialisations").
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "eva", "corda"] = "default"
    #: EVA: training batches (of the trainer's batch_size) whose layer inputs are analysed.
    eva_batches: int = Field(8, ge=1, le=4096)
    #: EVA: a layer may get up to eva_rho × r of the total rank budget (1 = every layer keeps r).
    eva_rho: float = Field(2.0, ge=1, le=1000)
    #: EVA: a layer's components count as converged when their cosine similarity between two
    #: passes reaches this (peft's tau); lower converges in fewer passes over the batches.
    eva_tau: float = Field(0.99, gt=0, le=1)


#: Initialisations that rewrite the base weights (W - BA), so they need a float base.
REWRITES_BASE = ("pissa", "olora")
REFUSED_INIT = {
    "corda": "CorDA needs covariance statistics from a calibration pass (peft's preprocess_corda), "
    "which qpeft's run does not do yet; use default or gaussian",
}


def _quantizer(ctx):
    """The run's quantizer plugin (None when unknown)."""
    if ctx.quantizer is not None:
        return ctx.quantizer
    from qpeft.registry import load_registry

    return load_registry().backends["quantizer"].get(ctx.config.quantizer.name)


def _quantizer_layers(ctx) -> str | None:
    """The ``linear_layers`` kind of the run's quantizer (None when unknown)."""
    quant = _quantizer(ctx)
    return quant.capabilities.linear_layers if quant is not None else None


def _check_eva(options, ctx) -> None:
    from qpeft.registry import load_registry

    trainer = load_registry().backends["trainer"].get(ctx.config.trainer.name)
    kind = getattr(trainer, "data_kind", "lm")
    if kind != "lm":
        raise ConfigError(
            "peft.options.init",
            f"'eva' analyses the layer inputs of language-modelling batches; trainer {ctx.config.trainer.name!r} trains on {kind!r} rows",
        )
    if ctx.fsdp:
        raise ConfigError("peft.options.init", "'eva' under FSDP: each rank would analyse its own batches and pick other ranks per layer")
    if options.use_dora:
        raise ConfigError("peft.options.init", "'eva' with use_dora: DoRA's magnitudes are computed before EVA sets A")


def _check_loftq(options, ctx) -> None:
    quant = _quantizer(ctx)
    if quant is None or not implements(quant, "dequantized_weight"):
        from qpeft.registry import load_registry

        able = sorted(n for n, q in load_registry().backends["quantizer"].items() if implements(q, "dequantized_weight"))
        raise ConfigError(
            "peft.options.init",
            f"'loftq' corrects the quantization error of the base, which needs quantizer {ctx.config.quantizer.name!r} to expose "
            f"the weights its layers compute with (QuantizerPlugin.dequantized_weight), and it does not; quantizers that do: "
            f"{', '.join(able)}",
        )
    if options.use_dora:
        raise ConfigError("peft.options.init", "'loftq' with use_dora: DoRA's magnitudes are computed before LoftQ sets A and B")


class Lora(PeftPlugin):
    name = "lora"
    description = "LoRA low-rank adapters (rsLoRA, DoRA) via peft"
    Options = LoraOptions
    capabilities = Capabilities(mergeable=True, fsdp=True)

    def check(self, options, ctx):
        if options.init in REFUSED_INIT:
            raise ConfigError("peft.options.init", f"{options.init!r}: {REFUSED_INIT[options.init]}")
        if options.init == "loftq":
            _check_loftq(options, ctx)
        if options.init == "eva":
            _check_eva(options, ctx)
        if options.init in REWRITES_BASE:
            kind = _quantizer_layers(ctx)
            if kind != "float":
                raise ConfigError(
                    "peft.options.init",
                    f"{options.init!r} rewrites the base weights (W - BA), which quantizer {ctx.config.quantizer.name!r} holds "
                    f"quantized ({kind or 'undeclared'} layers) and frozen; use it with quantizer none, or init default/gaussian",
                )
            if options.use_dora:
                raise ConfigError("peft.options.init", f"{options.init!r} with use_dora is not supported by peft's weight conversion")
            if (ctx.config.trainer.options or {}).get("save_steps"):
                raise ConfigError(
                    "trainer.options.save_steps",
                    f"checkpoints hold the unconverted {options.init} adapter, which --resume cannot rebuild; drop save_steps or use init default",
                )

    def attach(self, model, options, ctx):
        from peft import LoraConfig, get_peft_model

        if options.target_modules == "all-linear":
            targets = find_linear_targets(model)
        else:
            targets = list(options.target_modules)
            check_target_modules(model, targets, "peft.options.target_modules")
        if options.modules_to_save:
            check_target_modules(model, options.modules_to_save, "peft.options.modules_to_save")
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=options.r,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            target_modules=targets,
            bias=options.bias,
            use_rslora=options.use_rslora,
            use_dora=options.use_dora,
            modules_to_save=options.modules_to_save,
            # loftq: peft's own LoftQ (init_lora_weights="loftq") quantizes float weights with
            # bitsandbytes itself; qpeft starts from a plain init and replaces A and B below.
            init_lora_weights={"default": True, "loftq": True}.get(options.init, options.init),
            **_eva_config(options),
        )
        ctx.notes.append(f"lora targets: {', '.join(targets)}")
        peft_model = get_peft_model(model, config)
        if options.init in REWRITES_BASE:
            # peft's recipe: save the initial adapter (marked as a plain init so loading it does
            # not re-run the SVD/QR), then convert the trained one against it at save time.
            import tempfile

            init_dir = tempfile.mkdtemp(prefix=f"qpeft-{options.init}-init-")
            peft_model.peft_config["default"].init_lora_weights = True
            peft_model.save_pretrained(init_dir, safe_serialization=True)
            peft_model.peft_config["default"].init_lora_weights = options.init
            peft_model._qpeft_init_dir = init_dir
            ctx.notes.append(
                f"lora init {options.init}: base weights rewritten to W - BA; the saved adapter is converted to rank {2 * options.r}"
            )
        elif options.init == "eva":
            ranks = eva_initialise(peft_model, options, ctx)
            ctx.notes.append(
                f"lora init eva: {options.eva_batches} batches, ranks {min(ranks.values())}-{max(ranks.values())} "
                f"over {len(ranks)} layers (budget {options.r} each)"
            )
        elif options.init == "loftq":
            quant = _quantizer(ctx)
            model_path = resolve_model_path(ctx.config.model.name_or_path)
            q_options = ctx.quantizer_options or quant.Options.model_validate(ctx.config.quantizer.options or {})
            stats = loftq_initialise(peft_model, quant, q_options, model_path)
            ctx.notes.append(
                f"lora init loftq: {stats['layers']} quantized layers, ||W - Q|| reduced by "
                f"{100 * (1 - stats['error_after'] / stats['error_before']):.1f}% (Frobenius, summed over layers)"
            )
        elif options.init != "default":
            ctx.notes.append(f"lora init {options.init}")
        return peft_model

    def save(self, model, out_dir):
        init_dir = getattr(model, "_qpeft_init_dir", None)
        if init_dir is None:
            return super().save(model, out_dir)
        model.save_pretrained(out_dir, safe_serialization=True, path_initial_model_for_weight_conversion=init_dir)

    def merge(self, model):
        return model.merge_and_unload()


def _eva_config(options) -> dict:
    if options.init != "eva":
        return {}
    from peft import EvaConfig

    return {"eva_config": EvaConfig(rho=options.eva_rho, tau=options.eva_tau)}


#: peft's EVA cycles over the batches until every layer converged, with no limit of its own.
EVA_MAX_CYCLES = 100


class _EvaDidNotConverge(Exception):
    pass


def eva_initialise(peft_model, options, ctx) -> dict:
    """Run peft's ``initialize_lora_eva_weights`` on the first ``options.eva_batches`` batches of
    the run's training data (``ctx.train_data``); return each adapted layer's rank. The saved
    config then records a plain init and the rank pattern, so it reloads anywhere."""
    from peft.tuners.lora import LoraLayer, initialize_lora_eva_weights

    from qpeft.data import collate

    data = ctx.train_data
    if data is None or not len(data):
        raise QpeftError("lora init eva needs the run's training data, and none was given to the adapter")
    batch = int((ctx.config.trainer.options or {}).get("batch_size", 4))
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer is not None else 0
    n = min(len(data), batch * options.eva_batches)
    batches = [collate([data[i] for i in range(start, min(start + batch, n))], pad) for start in range(0, n, batch)]
    device = next(p for p in peft_model.parameters() if p.device.type != "meta").device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    limit, calls = EVA_MAX_CYCLES * len(batches), [0]

    def forward(model, inputs):
        calls[0] += 1
        if calls[0] > limit:
            raise _EvaDidNotConverge
        return model(**inputs)

    try:
        initialize_lora_eva_weights(peft_model, batches, forward_fn=forward, show_progress_bar=False)
    except _EvaDidNotConverge:
        raise QpeftError(
            f"lora init eva: the layer inputs' components did not converge in {EVA_MAX_CYCLES} passes over {len(batches)} "
            f"batches (peft loops until they do); lower peft.options.eva_tau (now {options.eva_tau}) or raise eva_batches"
        ) from None
    if ctx.quantizer is not None:  # EVA's forward passes ran in eval mode (docs/architecture.md, library facts)
        ctx.quantizer.ensure_training_kernels(peft_model, ctx.quantizer_options)
    peft_model.peft_config["default"].init_lora_weights = True
    return {n: m.r["default"] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and "default" in m.r}


def loftq_initialise(peft_model, quant, q_options, model_path: str, adapter: str = "default") -> dict:
    """Set A and B of every LoRA layer on a quantized linear layer of ``peft_model`` so that
    ``dequantize(Q) + scale * B @ A`` is the best rank-r approximation of the full-precision ``W``
    (peft's ``replace_lora_weights_loftq``, for any quantizer implementing
    ``dequantized_weight``; one LoftQ iteration, the base stays as loaded). ``W`` is read from
    the safetensors checkpoint in ``model_path`` one layer at a time. Returns the number of
    layers and the summed Frobenius errors ``||W - Q||`` before and after."""
    import math

    import torch
    from peft.tuners.lora import LoraLayer

    from qpeft.checkpoint_weights import CheckpointWeights

    weights = CheckpointWeights(model_path)
    prefix = getattr(peft_model.get_base_model(), "base_model_prefix", "")
    stats = {"layers": 0, "error_before": 0.0, "error_after": 0.0}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
                continue
            deq = quant.dequantized_weight(module.get_base_layer(), q_options)
            if deq is None:  # a layer the quantizer left in full precision: nothing to correct
                continue
            key = name.removeprefix("base_model.model.") + ".weight"
            if key not in weights and prefix and key.startswith(prefix + "."):
                key = key[len(prefix) + 1 :]
            w = weights.get(key)
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            if w is None or tuple(w.shape) != (b.shape[0], a.shape[1]) or not w.is_floating_point():
                found = "absent" if w is None else f"{w.dtype} {tuple(w.shape)}"
                raise QpeftError(
                    f"lora init loftq needs the full-precision weight {key!r} ({b.shape[0]} x {a.shape[1]}) in {model_path}, "
                    f"found {found}: point model.name_or_path at the float checkpoint the quantizer loads from"
                )
            residual = w.to(deq.device, torch.float32) - deq.float()
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            r = module.r[adapter]
            # peft splits sqrt(S) over B and A; dividing by sqrt(scale) makes scale * B @ A the
            # rank-r part of the residual (peft's replace_lora_weights_loftq ignores the scale,
            # so with alpha = 2r its adapter does not reduce the error at all: docs/reliability.md).
            root = s[:r].sqrt() / math.sqrt(module.scaling[adapter])
            new_b, new_a = u[:, :r] * root, root[:, None] * vh[:r]
            a.data = new_a.to(a.device, a.dtype).contiguous()
            b.data = new_b.to(b.device, b.dtype).contiguous()
            stats["layers"] += 1
            stats["error_before"] += float(residual.norm())
            stats["error_after"] += float((residual - module.scaling[adapter] * new_b @ new_a).norm())
            del residual, u, s, vh, w, deq
    if not stats["layers"]:
        raise QpeftError(f"lora init loftq: quantizer {quant.name!r} reported no quantized layer under the LoRA targets")
    return stats


@hookimpl
def qpeft_register_peft_methods(register):
    register(Lora())

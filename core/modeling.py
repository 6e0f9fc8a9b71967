"""Model helpers shared by the orchestrator and plugins (transformers/torch only)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import resource
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .data import IGNORE, collate
from .distributed import local_rank
from .errors import ConfigError, QpeftError
from .hookspecs import hookimpl


def device_map_for(ctx):
    """``device_map`` to load with: the config's, else the whole model on ``ctx.device``."""
    dm = ctx.config.model.device_map
    if dm is not None:
        return dm
    # Under `accelerate launch` each rank holds a whole (quantized) copy on its own GPU.
    return {"": local_rank()} if ctx.device == "cuda" else {"": "cpu"}


def load_causal_lm(model_path: str, ctx, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with qpeft's dtype/device/remote-code policy.

    Only safetensors checkpoints are read (``use_safetensors=True``): pickled ``.bin`` files
    can run code when loaded; ``model.allow_pickle`` opts in, with a warning. The folder's
    weight files are checked first (:func:`qpeft.model_source.check_weight_files`).
    """
    from .model_source import check_weight_files

    trust, allow_pickle = ctx.config.model.trust_remote_code, ctx.config.model.allow_pickle
    check_weight_files(model_path, allow_pickle=allow_pickle)
    for flag, on in (("trust_remote_code", trust), ("allow_pickle", allow_pickle)):
        if on:
            logging.getLogger("qpeft").warning("model.%s is on: loading %s may run code it contains", flag, model_path)
    kwargs.setdefault("dtype", ctx.torch_dtype)
    cache = _BASE_CACHE
    key = cache.key(model_path, ctx, kwargs) if cache is not None else None
    if key is not None:
        t0 = time.perf_counter()
        model = cache.copy(key)
        if model is not None:
            cache.record(key, cached=True, seconds=time.perf_counter() - t0)
            return model
    t0 = time.perf_counter()
    model = _from_pretrained(model_path, ctx, trust, allow_pickle, kwargs)
    if key is not None:
        seconds = time.perf_counter() - t0
        cache.record(key, cached=False, seconds=seconds)
        cache.put(key, model, seconds)
    return model


def _from_pretrained(model_path: str, ctx, trust: bool, allow_pickle: bool, kwargs: dict):
    from transformers import AutoModelForCausalLM

    qc = kwargs.get("quantization_config")
    # Weights the config declares but the checkpoint lacks are initialised at random by
    # transformers (it only prints a report): checked for full-precision loads, which bitsandbytes
    # quantizes while loading; a pre-quantized checkpoint (GPTQ) has its own layout.
    check_missing = qc is None or type(qc).__name__ == "BitsAndBytesConfig"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_path,
            device_map=device_map_for(ctx),
            trust_remote_code=trust,
            use_safetensors=None if allow_pickle else True,
            output_loading_info=True,
            **kwargs,
        )
    except MemoryError:
        raise QpeftError(
            f"cannot load model {model_path!r}: out of memory building the model its config.json describes "
            "(check that config.json matches the weights, or use a smaller model or a quantizer)"
        ) from None
    except OSError as exc:
        raise QpeftError(
            f"cannot load model {model_path!r}: {str(exc).splitlines()[0]} (qpeft runs offline; for a hub id set QPEFT_ALLOW_HUB=1)"
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ConfigError(
                "model.trust_remote_code",
                f"{model_path} needs its own Python code to load; set model.trust_remote_code: true only if you trust its author",
            ) from None
        raise QpeftError(f"cannot load model {model_path!r}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    missing = sorted((info or {}).get("missing_keys") or []) if check_missing else []
    if missing:
        raise QpeftError(
            f"model {model_path!r}: its checkpoint lacks {len(missing)} weights that its config.json declares "
            f"(e.g. {missing[0]!r}); transformers would initialise them at random: config.json does not match the weights, "
            "download or convert the model again"
        )
    return model


class BaseModelCache:
    """Untouched copies of base models as ``from_pretrained`` returned them (quantized, when
    bitsandbytes quantized them while loading), for a process that loads the same base many
    times: a ``qpeft bench`` worker (``isolation: worker``). While one is active
    (:func:`base_model_cache`), :func:`load_causal_lm` returns a deep copy of the kept model
    instead of reading and quantizing the checkpoint again: the same tensors a fresh load gives
    (bitsandbytes quantizes deterministically), from a model that has never run a forward pass
    (bitsandbytes repacks 4-bit weights on the first eval forward on some CPUs), and the
    quantizer's own steps after loading run on the copy as on a fresh load.

    Only CPU loads of local model folders, unquantized or quantized by bitsandbytes, without
    remote code, are cached; others load as usual. At most ``max_entries`` bases are kept (the
    least recently used is dropped first). The key is everything the load depends on: the
    folder and its files' sizes and times, dtype, device map, the quantization config.
    ``loads`` lists every load since :meth:`clear_loads` (cached or not, seconds; for a cached
    one also the seconds of the real load it copies), so records can say where a load came from.
    """

    def __init__(self, max_entries: int = 1):
        self.max_entries = max_entries
        self.entries: dict[tuple, tuple[Any, float]] = {}  # key -> (untouched model, seconds of its real load)
        self.loads: list[dict] = []

    def key(self, model_path: str, ctx, kwargs: dict) -> tuple | None:
        """The cache key of a load, or None when such a load is not cached."""
        model_cfg = ctx.config.model
        qc = kwargs.get("quantization_config")
        if ctx.device != "cpu" or model_cfg.device_map is not None or model_cfg.trust_remote_code:
            return None
        if qc is not None and type(qc).__name__ != "BitsAndBytesConfig":
            return None  # e.g. GPTQ kernels: not known to copy faithfully
        folder = Path(model_path)
        if not folder.is_dir():
            return None
        files = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))
        rest = sorted((k, repr(v)) for k, v in kwargs.items() if k != "quantization_config")
        quant = json.dumps(qc.to_dict(), sort_keys=True, default=str) if qc is not None else None
        return (str(folder.resolve()), files, repr(device_map_for(ctx)), bool(model_cfg.allow_pickle), repr(rest), quant)

    def copy(self, key: tuple):
        """A deep copy of the kept model for ``key`` (the most recently used now), or None."""
        if key not in self.entries:
            return None
        self.entries[key] = self.entries.pop(key)
        return copy.deepcopy(self.entries[key][0])

    def put(self, key: tuple, model, seconds: float) -> None:
        """Keep a deep copy of ``model`` (which must not have run a forward pass yet), loaded for
        real in ``seconds``; a model that cannot be deep-copied is not kept."""
        self.entries.pop(key, None)
        while self.entries and len(self.entries) >= self.max_entries:
            self.entries.pop(next(iter(self.entries)))  # drop the oldest before copying the new one
        if self.max_entries > 0:
            try:
                self.entries[key] = (copy.deepcopy(model), seconds)
            except Exception:  # noqa: BLE001 - then this base simply loads from its files each time
                logging.getLogger("qpeft").warning("base model cache: %s cannot be copied; it is loaded each time", type(model).__name__)

    def record(self, key: tuple, *, cached: bool, seconds: float) -> None:
        load = {"cached": cached, "seconds": round(seconds, 3)}
        if cached:
            load["uncached_seconds"] = round(self.entries[key][1], 3)
        self.loads.append(load)

    def clear_loads(self) -> None:
        self.loads = []

    def held_gib(self) -> float:
        """Memory of the kept models' parameters and buffers."""
        return sum(model.get_memory_footprint() for model, _ in self.entries.values()) / 2**30

    def clear(self) -> None:
        self.entries.clear()


_BASE_CACHE: BaseModelCache | None = None


@contextlib.contextmanager
def base_model_cache(cache: BaseModelCache | None) -> Iterator[BaseModelCache | None]:
    """Serve :func:`load_causal_lm` from ``cache`` inside the block (None: no cache)."""
    global _BASE_CACHE
    previous, _BASE_CACHE = _BASE_CACHE, cache
    try:
        yield cache
    finally:
        _BASE_CACHE = previous


def release_model(model) -> None:
    """Undo what a training loop left on the model: accelerate's mixed-precision ``prepare``
    replaces ``model.forward`` with an autocast wrapper that outlives training, so later
    evaluation, the reload check and a merge would silently run under autocast."""
    from accelerate.utils import extract_model_from_parallel

    extract_model_from_parallel(model, keep_fp32_wrapper=False)


def forget_load_conversions(model) -> None:
    """Make ``save_pretrained`` write ``model`` as it writes a model of its class built in memory.

    transformers 5 records on a model the weight conversions its ``from_pretrained`` applied
    (``_weight_conversions``) and reverses them in ``save_pretrained``. A model read from a saved
    quantized folder records its quantizer's deserialization (torchao's), which has no reverse:
    once its weights are plain again (dequantized for a merge), saving it raised
    NotImplementedError (tests/test_quantized_cache.py). Without the record, transformers reverses
    the default conversions of the model's class, as for any model it did not load."""
    if hasattr(model, "_weight_conversions"):
        model._weight_conversions = None


def align_pad_token(model, tokenizer) -> None:
    """Record the tokenizer's pad token (which qpeft may have chosen) in the model's config and
    generation config, as the transformers Trainer would otherwise do itself, with a warning."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant gradient checkpointing, with inputs that require grad so a frozen
    base still back-propagates into adapters (transformers#26377)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def freeze(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts at their logical size (:func:`qpeft.accounting.parameter_counts`;
    a run asks its quantizer, :meth:`qpeft.api.QuantizerPlugin.count_parameters`)."""
    from .accounting import parameter_counts

    return parameter_counts(model)


def _is_linear(module) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    # Quantized linear layers that do not subclass nn.Linear (e.g. GPTQ QuantLinear).
    return type(module).__name__.endswith("Linear") and hasattr(module, "in_features") and hasattr(module, "out_features")


def find_linear_targets(model) -> list[str]:
    """Leaf names of every linear layer except the output head, for any architecture."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for full_name, module in model.named_modules():
        if module is head or not _is_linear(module):
            continue
        names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def module_leaf_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}


def check_target_modules(model, requested: Iterable[str], key: str) -> None:
    """Raise a ConfigError listing the candidates if a requested module name does not exist."""
    leaves = module_leaf_names(model)
    missing = [m for m in requested if m not in leaves and not any(n.endswith(m) for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(
            key,
            f"no module named {missing[0]!r} in {type(model).__name__}; linear candidates: {', '.join(find_linear_targets(model))}",
        )


def evaluate_perplexity(model, data: list[dict], pad_id: int, batch_size: int = 4) -> dict:
    """Token-weighted mean NLL over the label tokens of ``data``, and its perplexity."""
    import torch

    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in collate(data[i : i + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            # prompt learning (prompt, ptuning) returns logits for its virtual tokens first
            logits = logits[:, logits.size(1) - batch["input_ids"].size(1) :]
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            nll += losses.item()
            count += int((labels != IGNORE).sum())
    model.train(was_training)
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count}


def logits_for(model, example: dict, pad_id: int):
    """Float32 logits of one example in eval mode (for save/reload and merge checks)."""
    import torch

    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    batch = collate([example], pad_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    model.train(was_training)
    return out.float().cpu()


def render_prompt(tok, prompt: str, chat_template: bool = True) -> str:
    """The prompt as the model saw prompts in training (chat template when it has one)."""
    if chat_template and getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def generate_text(model, tok, prompt: str, max_new_tokens: int = 48, chat_template: bool = True) -> dict:
    """Greedy generation; returns the completion text and tokens/s."""
    import time

    import torch

    device = next(p.device for p in model.parameters())
    from .tokenizer import chat_turn_end_id

    text = render_prompt(tok, prompt, chat_template)
    # Stop at EOS and at the chat template's end of turn, should they differ.
    stop_ids = sorted({tok.eos_token_id, chat_turn_end_id(tok) or tok.eos_token_id})
    enc = tok(text, return_tensors="pt", add_special_tokens=False).to(device)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tok.pad_token_id,
        )
    seconds = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1] :]
    stopped = bool(len(new) and int(new[-1]) in stop_ids)
    return {
        "prompt": prompt,
        "completion": tok.decode(new, skip_special_tokens=True),
        "new_tokens": int(len(new)),
        "stopped_at_eos": stopped,
        "tokens_per_s": len(new) / seconds if seconds > 0 else 0.0,
    }


@contextlib.contextmanager
def kv_cache_off(model):
    """Turn the model's KV cache off for training, restoring the setting afterwards.

    Training needs no cache, and with one transformers silently ignores the per-document
    structure of packed rows: it derives block-diagonal masks from position ids only when no
    past key values exist, and Llama-style models create an empty cache whenever
    ``config.use_cache`` is true — packed documents would then attend to each other.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    old = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None and old is not None:
            config.use_cache = old


class StepTimer:
    """Wall-clock time, process CPU time and tokens seen at every step a trainer reports
    (``qpeft_on_step_end``), for throughput and step time after warm-up. Use as
    ``with StepTimer(registry.pm) as t:``; it is a lifecycle plugin registered for the block."""

    def __init__(self, plugin_manager=None):
        self.plugin_manager = plugin_manager
        self.marks: list[tuple[int, float, float, int]] = []

    def __enter__(self) -> StepTimer:
        if self.plugin_manager is not None:
            self.plugin_manager.register(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.plugin_manager is not None:
            self.plugin_manager.unregister(self)

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        """Record (step, wall time, process CPU time, tokens) of one logged step."""
        self.marks.append((int(step), time.perf_counter(), time.process_time(), int(logs.get("tokens", 0))))

    def summary(self) -> dict:
        """Throughput after warm-up: the first fifth of the logged steps (1 to 10 of them) is left
        out (compilation, allocator and cache warm-up); None when fewer than two were logged.
        ``cpu_seconds_per_step_after_warmup`` is this process's CPU time per step (all threads):
        unlike wall time it barely grows when other processes compete for the cores."""
        keys = ("warmup_steps", "tokens_per_s_after_warmup", "step_seconds_after_warmup", "cpu_seconds_per_step_after_warmup")
        if len(self.marks) < 2:
            return dict.fromkeys(keys)
        skip = min(10, max(1, len(self.marks) // 5))
        (s0, t0, c0, k0), (s1, t1, c1, k1) = self.marks[skip - 1], self.marks[-1]
        seconds, steps = max(t1 - t0, 1e-9), max(s1 - s0, 1)
        return dict(zip(keys, (s0, round((k1 - k0) / seconds, 1), round(seconds / steps, 4), round((c1 - c0) / steps, 4))))


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> dict:
    """Peak accelerator memory (allocated and reserved) on CUDA, peak process RSS on CPU (since
    :func:`reset_process_peak_rss`, if that was called)."""
    if device == "cuda":
        import torch

        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    if _rss_peak_reset:
        return {"peak_rss_gib": _proc_status_kib("VmHWM") / 2**20}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


_rss_peak_reset = False


def reset_process_peak_rss() -> bool:
    """Start this process's peak RSS afresh (Linux: ``/proc/self/clear_refs``; a process that
    runs one piece of work after another, such as a ``qpeft bench`` worker, measures each
    piece's peak); from then on :func:`peak_memory_gib` reads the peak since the last reset.
    False where the system cannot (the peak then stays the process's)."""
    global _rss_peak_reset
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
    except (OSError, ValueError, KeyError):
        return False
    _rss_peak_reset = True
    return True


def current_rss_gib() -> float | None:
    """This process's resident memory now (Linux), or None."""
    try:
        return _proc_status_kib("VmRSS") / 2**20
    except (OSError, ValueError, KeyError):
        return None


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def weight_memory_gib(model, quantizer=None, options=None) -> float:
    """GiB of weights ``model`` holds (what quantization shrinks): the quantizer's own count
    (:meth:`qpeft.api.QuantizerPlugin.storage_bytes`) when given, else every storage reachable
    from the model counted once (:func:`qpeft.accounting.held_bytes`)."""
    if quantizer is not None:
        return quantizer.storage_bytes(model, options) / 2**30
    from .accounting import held_bytes

    return held_bytes(model) / 2**30


def param_groups(named_params, lr: float, loraplus_lr_ratio: float | None):
    """Parameters as optimizer groups: LoRA+ puts peft's ``lora_B`` / ``lora_embedding_B`` at
    ``lr * loraplus_lr_ratio`` and the rest at ``lr``; without a ratio, one group."""
    named = list(named_params)
    if not loraplus_lr_ratio:
        return [{"params": [p for _, p in named]}]
    b = [p for n, p in named if "lora_B" in n or "lora_embedding_B" in n]
    if not b:
        from qpeft.errors import ConfigError

        raise ConfigError("trainer.options.loraplus_lr_ratio", "LoRA+ needs LoRA B matrices (peft lora_B); this adapter has none")
    ids = {id(p) for p in b}
    return [{"params": [p for _, p in named if id(p) not in ids], "lr": lr}, {"params": b, "lr": lr * loraplus_lr_ratio}]

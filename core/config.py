"""The run configuration: one YAML file, validated in full before any weight is loaded.

Validation happens in two stages, both raising :class:`ConfigError` naming the key:

1. :func:`load_config` parses YAML, applies ``--set key.path=value`` overrides and validates
   the top-level schema (:class:`RunConfig`).
2. :func:`resolve` looks up the named backends in the registry, validates each backend's
   ``options`` with its own pydantic model, resolves device and dtype, and checks the
   combination against the declared capabilities.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import difflib
import functools
import inspect
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .distributed import fsdp_version
from .errors import ConfigError

DEFAULT_MODEL = "smollm2"
DEFAULT_PROMPT = "What does the Python 'with' statement do?"
#: Prompts made for the embedded data: the default and configs/quickstart.yaml's. A run on
#: other data that generates from one of them is told so.
EMBEDDED_DATA_PROMPTS = (DEFAULT_PROMPT, 'Explain the Python topic "The assert statement" briefly.')


INT64_MAX = 2**63 - 1


@functools.cache
def comment_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comment block above each field of ``cls`` (Sphinx's attribute-comment style,
    which qpeft's config and plugin options use), joined into one line per field."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        field = re.match(r"(\w+)\s*:", text)
        if field and pending:
            docs.setdefault(field.group(1), " ".join(pending))
        pending = []
    return docs


#: False while the plugin registry only checks that each Options model has a JSON schema: the
#: comments are read by parsing each class's source file, most of the registry's start-up time.
FIELD_DOCS = contextvars.ContextVar("qpeft_field_docs", default=True)


def _describe_fields(schema: dict, cls: type) -> None:
    """JSON schema hook: each field's description from its ``#:`` comment, in its class or the
    nearest base class that has one (a ``Field(description=...)`` wins)."""
    if not FIELD_DOCS.get():
        return
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            docs.update(comment_docs(klass))
    for name, prop in schema.get("properties", {}).items():
        if "description" not in prop and name in docs:
            prop["description"] = docs[name]


class StrictModel(BaseModel):
    """Base of every config and plugin options model: unknown keys are errors, numbers are
    finite and fit in 64 bits, text holds no NUL character (each would fail later, after the
    weights were loaded, deep inside torch or the OS)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=_describe_fields)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``true`` given for a number option (pydantic reads it as 1) is an error."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            types = typing.get_args(annotation) or (annotation,)
            if bool not in types and any(t in (int, float) for t in types):
                raise ValueError(f"expected a number, not the boolean {str(value).lower()}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _sane_scalars(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            raise ValueError(f"{value:.3g} is out of range (at most {INT64_MAX:,} in absolute value)")
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value


_Strict = StrictModel

_UNSET_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(value: str) -> str:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded once, in validation, so that every consumer
    (qpeft's own writers, the HF Trainer's checkpoints, ``--resume``) sees the same path; a
    variable that is not set is an error rather than a folder literally named ``$VAR``."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = _UNSET_VAR.search(expanded)
    if unset:
        raise ValueError(f"{unset.group(0)} is not set in the environment")
    return expanded


def _expand(value: str | None) -> str | None:
    return value if value is None else expand_path(value)


#: ``device_map`` strings that name a placement strategy (accelerate's), not a device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def device_map_gpus(device_map) -> list[int]:
    """The GPU indices a ``device_map`` names (``cuda`` is GPU 0; a strategy names none)."""
    if device_map is None or isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        return []
    devices = device_map.values() if isinstance(device_map, dict) else [device_map]
    found = []
    for d in devices:
        if type(d) is int:
            found.append(d)
        elif isinstance(d, str) and d.startswith("cuda"):
            found.append(int(d.partition(":")[2] or 0))
    return found


class ModelConfig(_Strict):
    """Which base model to load and how."""

    #: "smollm2" (the embedded SmolLM2-135M-Instruct), a local Hugging Face model folder,
    #: or a hub id (needs network).
    name_or_path: str = Field(DEFAULT_MODEL, min_length=1)
    #: Weights/compute dtype; "auto" = bfloat16 on GPUs that support it, else float16, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: "auto" = cuda when available, else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Passed to ``from_pretrained``; null puts the whole model on ``device``.
    device_map: str | dict[str, Any] | None = None
    #: Allow a model folder's own Python code to run. Off unless asked; logged when on.
    trust_remote_code: bool = False
    #: Read pickled checkpoints (``pytorch_model.bin``, ``adapter_model.bin``), which can run
    #: code when loaded. Off unless asked (safetensors only); logged when on.
    allow_pickle: bool = False
    #: Cache quantized bases on disk (qpeft.quantized_cache): true = under $QPEFT_CACHE/quantized
    #: (default ~/.cache/qpeft/quantized), a folder path = there, false = quantize every load.
    quantized_cache: bool | str = True

    _expand_name = field_validator("name_or_path", mode="after")(_expand)

    @field_validator("quantized_cache", mode="after")
    @classmethod
    def _cache_folder(cls, value: bool | str) -> bool | str:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("expected true, false or a folder path")
            return expand_path(value)
        return value

    @field_validator("device_map", mode="after")
    @classmethod
    def _device_map(cls, value: Any) -> Any:
        """A placement transformers can load onto and qpeft can train: a strategy or a device
        (cpu, cuda, cuda:N, N), for the whole model or per module; never meta or disk (qpeft
        reads, trains and saves every weight, none of which may be left unloaded)."""
        if value is None:
            return value
        if isinstance(value, str):
            if value in DEVICE_MAP_STRATEGIES or _DEVICE.fullmatch(value):
                return value
            raise ValueError(f"expected one of {', '.join(DEVICE_MAP_STRATEGIES)}, cpu, cuda or cuda:N")
        if not value:
            raise ValueError("an empty mapping places no module; leave device_map out to put the model on model.device")
        for module, device in value.items():
            ok = isinstance(device, str) and _DEVICE.fullmatch(device) or type(device) is int and device >= 0
            if not ok:
                raise ValueError(
                    f"module {module!r}: expected a device (cpu, cuda, cuda:N or a GPU index), got {device!r}; "
                    "qpeft keeps every weight loaded (no meta or disk offload)"
                )
        return value


class BackendRef(_Strict):
    """A backend chosen by name, with options validated by the backend's own model."""

    #: The backend's name (``qpeft plugins`` lists them).
    name: str = Field(min_length=1)
    #: The backend's own options (``qpeft config schema kind:name`` prints their schema).
    options: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    """Training and validation data."""

    #: "embedded:instruct" / "embedded:text" (shipped with qpeft), a .jsonl/.json/.csv/
    #: .parquet/.txt file, or a folder written by ``datasets.Dataset.save_to_disk``.
    path: str = "embedded:instruct"
    #: Validation file; default: the embedded set's own val split, or a tail of ``path``.
    val_path: str | None = None
    #: "auto" detects from the columns: text | prompt/response | messages (chat).
    format: Literal["auto", "text", "prompt_response", "chat"] = "auto"
    #: Fraction of ``path`` held out for validation when no ``val_path`` is given.
    val_fraction: float = Field(0.1, gt=0, lt=1)
    #: Sequences are cut to this many tokens (with ``packing``: the width of a packed row).
    max_length: int = Field(256, ge=8, le=1_048_576)
    #: What to do with a record longer than ``max_length``: cut it (and say which rows were
    #: cut), drop it, or stop with an error naming the file and row.
    too_long: Literal["truncate", "drop", "error"] = "truncate"
    #: Concatenate training records into rows of ``max_length`` tokens. Attention never
    #: crosses documents: position ids restart per document and transformers builds a
    #: block-diagonal mask from them; each document's first token is never a target.
    packing: bool = False
    #: Use at most this many training examples, counted from the start (null = all).
    max_train_examples: int | None = Field(None, ge=1)
    #: Use at most this many validation examples, counted from the start (null = all).
    max_val_examples: int | None = Field(32, ge=1)

    _expand_paths = field_validator("path", "val_path", mode="after")(_expand)


class GenerateConfig(_Strict):
    """The generation made after reloading the saved adapter."""

    #: The prompt generated from after training (the quickstart's question by default: set
    #: one that fits your data).
    prompt: str = DEFAULT_PROMPT
    #: Generate at most this many tokens (generation also stops at EOS).
    max_new_tokens: int = Field(48, ge=1, le=8192)
    #: Render the prompt with the tokenizer's chat template when it has one.
    chat_template: bool = True


class EvalRef(BackendRef):
    """An evaluator chosen by name (``qpeft plugins`` lists them), run before and after training."""

    #: Where its results go: ``summary.json``'s ``eval.<label>`` and the bench report's columns
    #: (default: the evaluator's name; set it to run one evaluator twice with other options).
    label: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RunConfig(_Strict):
    """Top level of a qpeft YAML config."""

    #: The base model.
    model: ModelConfig = Field(default_factory=ModelConfig)
    #: How the base is loaded: a quantizer name (bnb-nf4, bnb-8bit, gptq, none, ...) or
    #: {name, options}.
    quantizer: BackendRef
    #: The PEFT method: a name (lora, prefix, adapters, ...) or {name, options}.
    peft: BackendRef
    #: The training loop: a name (hf, native) or {name, options}.
    trainer: BackendRef
    #: Training and validation data.
    data: DataConfig = Field(default_factory=DataConfig)
    #: Where adapter/, summary.json, resolved_config.yaml and checkpoints/ are written.
    output_dir: str = Field("runs/qpeft", min_length=1)
    #: Seed of every random number generator (initialization, data order, dropout).
    seed: int = Field(0, ge=0, le=2**32 - 1)
    #: true / false, or "auto": on unless the PEFT method or quantizer cannot use it.
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    #: Run the evaluators (``eval``) before and after training; false turns them all off.
    evaluate: bool = True
    #: Evaluators run before and after training: names or {name, options, label}
    #: (perplexity, generation, lm-eval, ...); null = [perplexity] (the validation split's).
    eval: list[EvalRef] | None = None
    #: The generation made after reloading the saved adapter.
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    #: Experiment trackers that record the run (none by default): names (tensorboard, mlflow,
    #: wandb; ``qpeft plugins`` lists them) or {name, options}.
    trackers: list[BackendRef] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        return normalize_shorthands(data)

    @field_validator("eval", mode="after")
    @classmethod
    def _eval_labels(cls, value: list[EvalRef] | None) -> list[EvalRef] | None:
        seen: dict[str, int] = {}
        for i, ref in enumerate(value or []):
            label = ref.label or ref.name
            if label in seen:
                raise ValueError(
                    f"eval.{seen[label]} and eval.{i} both store their results as {label!r}; give one a label: (a name of its own)"
                )
            seen[label] = i
        return value

    def eval_refs(self) -> list[EvalRef]:
        """The evaluators this run uses: ``eval``, or the default ``[perplexity]``; none when
        ``evaluate`` is false."""
        if not self.evaluate:
            return []
        return list(self.eval) if self.eval is not None else [EvalRef(name="perplexity")]

    @field_validator("output_dir", mode="after")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        value = expand_path(value)
        where = os.path.abspath(value)
        if where in (os.path.abspath(os.sep), os.path.abspath(os.path.expanduser("~"))):
            what = "the root folder" if where == os.path.abspath(os.sep) else "your home folder"
            raise ValueError(f"{value} is {what}; qpeft writes adapter/, summary.json and checkpoints/ there: name a folder of its own")
        return value


def normalize_shorthands(data: Any) -> Any:
    """Expand ``quantizer: bnb-nf4`` to ``{name: bnb-nf4}``, ``model: path`` to ``{name_or_path: path}``
    and ``eval: [perplexity]`` to ``[{name: perplexity}]``."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for key in ("quantizer", "peft", "trainer"):
        if isinstance(data.get(key), str):
            data[key] = {"name": data[key]}
    if isinstance(data.get("model"), str):
        data["model"] = {"name_or_path": data["model"]}
    if isinstance(data.get("eval"), str):
        data["eval"] = [data["eval"]]
    if isinstance(data.get("eval"), list):
        data["eval"] = [{"name": e} if isinstance(e, str) else e for e in data["eval"]]
    if isinstance(data.get("trackers"), str):  # `trackers: tensorboard`
        data["trackers"] = [data["trackers"]]
    if isinstance(data.get("trackers"), list):
        data["trackers"] = [{"name": t} if isinstance(t, str) else t for t in data["trackers"]]
    return data


# ---------------------------------------------------------------------------- errors


def _key(loc: tuple) -> str:
    """Dotted key of an error location; a part with spaces or unprintable characters is quoted."""
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ".".join(p if p and p.isprintable() and not any(c.isspace() for c in p) else repr(p) for p in parts)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (for 'unknown key' messages)."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), ann)
    return sorted(getattr(current, "model_fields", {}) or [])


def _field_loc(model: type[BaseModel], loc: tuple) -> tuple:
    """``loc`` without pydantic's union-member tags (``gradient_checkpointing.bool``,
    ``target_modules.list[str]``): keep field names, unknown keys and list indices."""
    out: list = []
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is not None:
            out.append(part)
            ann = fields[part].annotation if part in fields else None
            current = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), ann)
        elif isinstance(part, int):
            out.append(part)
        # else: a union member's tag (current stays the union's field)
    return tuple(out)


#: Key names from other tools (transformers' TrainingArguments, peft's LoraConfig, axolotl)
#: and qpeft's name for each, suggested when the name is not a key where it was given.
KEY_ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler",
    "optimizer": "optim",
    "lora_r": "r",
    "rank": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "model_name_or_path": "name_or_path",
    "base_model": "name_or_path",
    "torch_dtype": "dtype",
    "dataset": "path",
    "data_path": "path",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "output": "output_dir",
}


def suggest_key(key: str, valid: list[str]) -> str | None:
    """The valid key ``key`` most likely meant: qpeft's name for another tool's key, else the
    closest spelling."""
    alias = KEY_ALIASES.get(key.lower())
    if alias in valid:
        return alias
    close = difflib.get_close_matches(key, valid, n=1)
    return close[0] if close else None


def validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> ConfigError:
    """Turn pydantic's first error into a one-line ConfigError naming the key."""
    errors = exc.errors()
    err = errors[0]
    loc = _field_loc(model, tuple(err["loc"]))
    key = ".".join(p for p in (prefix, _key(loc)) if p)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        msg = f"unknown key {str(loc[-1])!r}"
        hint = suggest_key(str(loc[-1]), valid)
        if valid:
            msg += f"; valid keys: {', '.join(valid)}"
        if hint:
            msg += f" (did you mean {hint!r}?)"
        return ConfigError(key, msg)
    if err["type"] == "missing":
        return ConfigError(key, "required key is missing")
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    # A value no member of a union accepts: say what each member wanted.
    msgs = list(
        dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors if _field_loc(model, tuple(e["loc"]))[: len(loc)] == loc)
    )
    return ConfigError(key, f"{'; or: '.join(msgs[:4])} (got {shown})")


# ---------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value``; the value is read as YAML (``1e-4`` -> float, ``[a,b]`` -> list)."""
    if "=" not in item:
        raise ConfigError("--set", f"expected key.path=value, got {item!r}")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError("--set", f"bad key {key!r} in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(key.strip(), f"the --set value is nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with every ``key.path=value`` applied."""
    data = copy.deepcopy(normalize_shorthands(data))
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is {type(nxt).__name__}, cannot set {'.'.join(parts)}")
            node = nxt
        node[parts[-1]] = value
        data = normalize_shorthands(data)
    return data


#: Limits on a config file: its size, how deep it nests, and how many values it holds once
#: YAML aliases are expanded (an "alias bomb" of 1 KB expands to billions).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_VALUES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_size(data, p: Path) -> None:
    """Walk ``data`` as a consumer would (shared aliases counted each time they are reached) and
    stop at the first limit: cycles, depth, expanded size."""
    count = 0
    stack = [(data, 0, ())]
    while stack:
        value, depth, path = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError("", f"{p}: more than {MAX_CONFIG_VALUES:,} values once its YAML aliases are expanded")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError("", f"{p}: nested deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(value, (dict, list)):
            if id(value) in path:
                raise ConfigError("", f"{p}: a YAML alias refers to itself")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1, (*path, id(value))) for child in children)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from ``path`` with errors that name the file. Refused: files over
    1 MiB or not regular files, keys given twice, nesting deeper than 32 levels, aliases that
    refer to themselves or expand past 100,000 values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file not found: {p}")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError("", f"{p}: {p.stat().st_size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except RecursionError:
        raise ConfigError("", f"{p}: nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None and isinstance(exc, yaml.constructor.ConstructorError) else ""
        raise ConfigError("", f"{p}: not valid YAML: {str(exc).splitlines()[0]}{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
    _check_size(data, p)
    return data


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Parse and validate a config file (or dict) with ``--set`` overrides applied."""
    data = source if isinstance(source, dict) else read_yaml(source)
    data = apply_overrides(data, overrides or [])
    # The limits of a config file hold for what --set added (a YAML value, aliases and all).
    _check_size(data, "the config" if isinstance(source, dict) else f"{source} with its --set values")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, RunConfig) from None


# ---------------------------------------------------------------------------- resolving


@dataclass
class ResolvedRun:
    """A config whose backends were found, options validated and combination checked."""

    config: RunConfig
    quantizer: Any
    quantizer_options: Any
    peft: Any
    peft_options: Any
    trainer: Any
    trainer_options: Any
    device: str
    dtype: str
    grad_checkpointing: bool
    notes: list[str]
    #: The evaluators (:class:`ResolvedEval`), in the config's order.
    evaluators: list = dataclasses.field(default_factory=list)
    #: (tracker plugin, validated options) for each entry of ``config.trackers``.
    trackers: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        """The fully resolved config, defaults filled in, as written beside every output."""
        d = self.config.model_dump(mode="json")
        d["quantizer"]["options"] = self.quantizer_options.model_dump(mode="json")
        d["peft"]["options"] = self.peft_options.model_dump(mode="json")
        d["trainer"]["options"] = self.trainer_options.model_dump(mode="json")
        d["model"]["device"] = self.device
        d["model"]["dtype"] = self.dtype
        d["gradient_checkpointing"] = self.grad_checkpointing
        d["eval"] = [e.to_dict() for e in self.evaluators]
        d["trackers"] = [{"name": t.name, "options": o.model_dump(mode="json")} for t, o in self.trackers]
        return d


@dataclass
class ResolvedEval:
    """One evaluator of a run: its label, plugin and validated options."""

    label: str
    plugin: Any
    options: Any

    def to_dict(self) -> dict:
        return {"name": self.plugin.name, "options": self.options.model_dump(mode="json"), "label": self.label}


def resolve_evaluators(config: RunConfig, registry, ctx) -> list[ResolvedEval]:
    """Find each evaluator of ``config``, validate its options and let it check them (its
    library installed, its files present), before any weight loads; errors name ``eval.N``."""
    out = []
    for i, ref in enumerate(config.eval_refs()):
        plugin = registry.get("evaluator", ref.name, key=f"eval.{i}.name")
        opts = validate_options(plugin, ref.options, f"eval.{i}.options")
        if ctx.device not in plugin.capabilities.devices:
            raise ConfigError(
                f"eval.{i}.name",
                f"evaluator {plugin.name!r} does not run on {ctx.device}; it supports: {', '.join(plugin.capabilities.devices)}",
            )
        try:
            plugin.check(opts, ctx)
        except ConfigError as exc:  # the plugin names its option; the user's key is eval.N.options.<option>
            raise ConfigError(f"eval.{i}.options" + (f".{exc.key}" if exc.key else ""), exc.message) from None
        out.append(ResolvedEval(ref.label or ref.name, plugin, opts))
    return out


def validate_options(plugin, options: dict, key: str):
    """Validate ``options`` with the plugin's Options model; errors name ``key.<field>``."""
    try:
        return plugin.Options.model_validate(options)
    except ValidationError as exc:
        raise validation_error(exc, plugin.Options, prefix=key) from None


def resolve_device(cfg: ModelConfig) -> tuple[str, str]:
    """Resolve "auto" device and dtype: cuda+bf16 (fp16 without bf16 support), else cpu+fp32.

    torch is imported (and CUDA queried) only when the config leaves something to decide.
    """
    if cfg.device == "cpu":
        # bf16 is ~16x slower than fp32 on AVX2 CPUs (docs/architecture.md, library facts)
        return "cpu", "float32" if cfg.dtype == "auto" else cfg.dtype
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif not torch.cuda.is_available():
        raise ConfigError("model.device", "'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    dtype = cfg.dtype
    if dtype == "auto":
        if device == "cuda":
            dtype = "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16"
        else:
            dtype = "float32"
    return device, dtype


def resolve(config: RunConfig, registry, *, device: str | None = None) -> ResolvedRun:
    """Find the backends, validate their options and check the combination — no weights loaded."""
    from .context import RunContext

    quant = registry.get("quantizer", config.quantizer.name)
    peft = registry.get("peft", config.peft.name)
    trainer = registry.get("trainer", config.trainer.name)
    q_opts = validate_options(quant, config.quantizer.options, "quantizer.options")
    p_opts = validate_options(peft, config.peft.options, "peft.options")
    t_opts = validate_options(trainer, config.trainer.options, "trainer.options")

    check_combination(quant, peft, trainer)
    check_data_kind(config, trainer)

    if device is None:
        dev, dtype = resolve_device(config.model)
    else:
        dev, dtype = device, ("float32" if device == "cpu" else "bfloat16")
    gpus = device_map_gpus(config.model.device_map)
    if gpus and dev != "cuda":
        raise ConfigError("model.device_map", f"places modules on GPU {gpus[0]}, but this run is on {dev}; use cpu there")
    if gpus:
        import torch

        if max(gpus) >= torch.cuda.device_count():
            raise ConfigError("model.device_map", f"names GPU {max(gpus)}, but this machine has {torch.cuda.device_count()}")
    for kind, plugin in (("quantizer", quant), ("peft", peft), ("trainer", trainer)):
        if dev not in plugin.capabilities.devices:
            raise ConfigError(
                f"{kind}.name",
                f"{kind} {plugin.name!r} does not run on {dev}; it supports: {', '.join(plugin.capabilities.devices)}",
            )

    notes: list[str] = []
    gc = config.gradient_checkpointing
    blockers = [p for p in (quant, peft) if not p.capabilities.grad_checkpointing]
    if gc is True and blockers:
        raise ConfigError(
            "gradient_checkpointing",
            f"{blockers[0].name!r} does not work with gradient checkpointing; set it to false or auto",
        )
    if gc == "auto":
        gc = not blockers
        if blockers:
            notes.append(f"gradient checkpointing turned off: {blockers[0].name!r} does not support it")

    if not config.data.path.startswith("embedded:") and config.generate.prompt in EMBEDDED_DATA_PROMPTS:
        notes.append(
            f"generate.prompt is the quickstart's ({config.generate.prompt!r}), not one like your data's: "
            "set generate.prompt to see what the adapter learned"
        )

    if config.data.packing and not peft.capabilities.packing:
        raise ConfigError("data.packing", f"peft {peft.name!r} does not work with packed rows; set data.packing to false")

    ctx = RunContext(
        config=config, device=dev, dtype=dtype, output_dir=config.output_dir, fsdp=fsdp_version(), quantizer=quant, quantizer_options=q_opts
    )
    if ctx.fsdp is not None:
        check_fsdp(ctx, {"quantizer": quant, "peft": peft, "trainer": trainer}, registry)
    quant.check(q_opts, ctx)
    peft.check(p_opts, ctx)
    trainer.check(t_opts, ctx)
    evaluators = resolve_evaluators(config, registry, ctx)
    trackers = resolve_trackers(config, registry, ctx)
    notes.extend(ctx.notes)
    return ResolvedRun(
        config, quant, q_opts, peft, p_opts, trainer, t_opts, dev, dtype, gc, notes, evaluators=evaluators, trackers=trackers
    )


def resolve_trackers(config: RunConfig, registry, ctx) -> list:
    """``(plugin, options)`` for each tracker the config names: known names, valid options,
    each named once, their packages installed (all before any weight loads)."""
    trackers, seen = [], set()
    for i, ref in enumerate(config.trackers):
        plugin = registry.get("tracker", ref.name, key=f"trackers.{i}.name")
        if plugin.name in seen:
            raise ConfigError(f"trackers.{i}.name", f"tracker {plugin.name!r} is named twice; name each tracker once")
        seen.add(plugin.name)
        options = validate_options(plugin, ref.options, f"trackers.{i}.options")
        plugin.check(options, ctx)
        trackers.append((plugin, options))
    return trackers


def check_fsdp(ctx, plugins: dict, registry) -> None:
    """Refuse, before loading, what qpeft does not run under FSDP: version 1 (qpeft reads the
    trained adapter back from FSDP2's sharded parameters), CPUs (accelerate runs FSDP on
    accelerators only) and backends whose FSDP run was never tested. A plugin's own ``check``
    refuses its options that do not work under FSDP."""
    if ctx.fsdp != 2:
        raise ConfigError(
            "accelerate: fsdp_version",
            f"launched with FSDP version {ctx.fsdp}; qpeft trains under FSDP version 2 (fully_shard): "
            "accelerate launch --use_fsdp --fsdp_version 2 ...",
        )
    if ctx.device != "cuda":
        raise ConfigError("model.device", f"FSDP runs on GPUs (accelerate runs FSDP on accelerators only); this run is on {ctx.device}")
    for kind, plugin in plugins.items():
        if not plugin.capabilities.fsdp:
            ok = sorted(n for n, p in registry.backends[kind].items() if p.capabilities.fsdp)
            raise ConfigError(f"{kind}.name", f"{kind} {plugin.name!r} is not tested under FSDP; under FSDP use one of: {', '.join(ok)}")


def check_data_kind(config: RunConfig, trainer) -> None:
    """The trainer's ``data_kind`` is one qpeft reads; a trainer of another objective gets that
    kind's embedded set when the config names no ``data.path``, and is refused packed rows."""
    from .data.objectives import DATA_KINDS, EMBEDDED_FOR_KIND

    kind = getattr(trainer, "data_kind", "lm")
    if kind not in DATA_KINDS:
        raise ConfigError("trainer.name", f"trainer {trainer.name!r} declares data_kind {kind!r}; valid: {', '.join(DATA_KINDS)}")
    if kind == "lm":
        return
    if "path" not in config.data.model_fields_set:
        config.data.path = EMBEDDED_FOR_KIND[kind]
    if config.data.packing:
        raise ConfigError(
            "data.packing", f"trainer {trainer.name!r} trains on {DATA_KINDS[kind].split(':')[0]}, which are not packed; set it to false"
        )


def check_combination(quant, peft, trainer) -> None:
    """Refuse combinations that a plugin's capabilities rule out, naming the reason."""
    plugins = {"quantizer": quant, "peft": peft, "trainer": trainer}
    for kind, plugin in plugins.items():
        for other_kind, other in plugins.items():
            reason = plugin.capabilities.incompatible.get(other.name)
            if other is not plugin and reason:
                raise ConfigError(
                    f"{other_kind}.name",
                    f"{other_kind} {other.name!r} does not work with {kind} {plugin.name!r}: {reason}",
                )
    # After the named reasons above, which say why (a quantizer may name the trainers it refuses).
    if not quant.capabilities.trainable:
        raise ConfigError("quantizer.name", f"adapters cannot be trained on quantizer {quant.name!r}")
    from .capability_table import layer_refusal

    reason = layer_refusal(quant, peft)
    if reason:
        raise ConfigError("quantizer.name", f"quantizer {quant.name!r} does not work with peft {peft.name!r}: {reason}")


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

"""An adapter folder is data: what its metadata may decide, and what only the user may.

``qpeft generate --adapter DIR`` and ``qpeft merge --adapter DIR`` rebuild the run an adapter
came from out of its ``qpeft.json`` (or, for an adapter written by plain peft, its
``adapter_config.json``). An adapter may come from anyone, so its metadata is read through an
allow-list:

* from the metadata: the base model's identity (an embedded name, a hub id, or an absolute
  local folder), the quantizer's name and options (validated by the quantizer's own schema),
  and the PEFT method's name;
* never from the metadata: anything that widens trust or reaches outside what the user named:
  ``trust_remote_code``, ``allow_pickle``, ``device_map``, relative or ``~`` paths (which would
  resolve against the user's current folder), and every other key. These come only from the
  user's own ``--set`` (e.g. ``--set model.trust_remote_code=true``); metadata that asked for
  them is reported as ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import QpeftError
from .io import MetadataError, read_json_file
from .model_source import EMBEDDED

METADATA_FILE = "qpeft.json"

#: peft_type in adapter_config.json -> qpeft PEFT plugin, for adapters trained with plain peft.
PEFT_TYPES = {"LORA": "lora", "PREFIX_TUNING": "prefix", "QPEFT_BOTTLENECK": "adapters"}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

#: Model settings an adapter's metadata may ask for but never gets (only the user's --set).
TRUST_KEYS = ("trust_remote_code", "allow_pickle", "device_map")


def read_json_object(path: Path) -> dict:
    """A JSON object from ``path``, or a one-line error naming the file."""
    try:
        data = read_json_file(path)
    except MetadataError as exc:
        raise QpeftError(f"{path} is corrupt: {exc.reason}") from None
    if not isinstance(data, dict):
        raise QpeftError(f"{path} is corrupt: expected a JSON object")
    return data


def read_adapter_metadata(adapter_dir: str | Path) -> dict:
    """The adapter's metadata as written: ``qpeft.json`` when qpeft saved it, else what plain
    peft's ``adapter_config.json`` says (base model, method; full-precision base). Untrusted:
    pass it through :func:`trusted_run_sections` before use."""
    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise QpeftError(f"{path} is not an adapter folder (no adapter_config.json)")
    if (path / METADATA_FILE).is_file():
        return read_json_object(path / METADATA_FILE)
    cfg = read_json_object(path / "adapter_config.json")
    method = PEFT_TYPES.get(str(cfg.get("peft_type")))
    if method is None or not cfg.get("base_model_name_or_path"):
        raise QpeftError(
            f"{path}: adapter_config.json has peft_type {cfg.get('peft_type')!r} and base model "
            f"{cfg.get('base_model_name_or_path')!r}; qpeft reads {', '.join(PEFT_TYPES)} adapters with a base model path"
        )
    return {"model": {"name_or_path": cfg["base_model_name_or_path"]}, "quantizer": {"name": "none"}, "peft": {"name": method}}


def trusted_run_sections(meta: dict, adapter_dir: str | Path, user_keys: set[str]) -> tuple[dict, list[str]]:
    """The ``model``, ``quantizer`` and ``peft`` sections that an adapter's metadata may set,
    and notes on what it asked for and did not get. ``user_keys`` are the dotted keys the user
    sets on the command line (``model.name_or_path`` there makes the metadata's base moot)."""
    source = Path(adapter_dir) / METADATA_FILE
    if not source.is_file():
        source = Path(adapter_dir) / "adapter_config.json"

    def section(name: str) -> dict:
        value = meta.get(name)
        if not isinstance(value, dict):
            raise QpeftError(f"{source}: {name!r} must be an object, not {type(value).__name__}")
        return value

    model, quantizer, peft = section("model"), section("quantizer"), section("peft")
    notes = [
        f"ignored {key}={model[key]!r} from {source}: an adapter cannot turn this on; only your own --set model.{key}=... can"
        for key in TRUST_KEYS
        if model.get(key) not in (None, False)
    ]
    base = model.get("name_or_path")
    if "model.name_or_path" not in user_keys:
        if not isinstance(base, str) or not base:
            raise QpeftError(f"{source}: model.name_or_path must be a non-empty string; pass --set model.name_or_path=BASE")
        _check_base(base, source)
    for key, value in (("quantizer.name", quantizer.get("name")), ("peft.name", peft.get("name"))):
        if not isinstance(value, str) or not value:
            raise QpeftError(f"{source}: {key} must be a non-empty string")
    _check_method(peft["name"], adapter_dir, source)
    options = quantizer.get("options", {})
    if not isinstance(options, dict):
        raise QpeftError(f"{source}: quantizer.options must be an object")
    if not user_keys & {"quantizer", "quantizer.name", "quantizer.options"}:
        for key, value in options.items():
            if f"quantizer.options.{key}" not in user_keys:
                _check_option_path(f"quantizer.options.{key}", value, source)
    sections = {
        "model": {"name_or_path": base} if isinstance(base, str) and base else {},
        "quantizer": {"name": quantizer["name"], "options": options},
        "peft": {"name": peft["name"]},  # options describe training, not loading
    }
    return sections, notes


def _fixed_absolute(path: str) -> bool:
    """``path`` names one place whatever the current folder: absolute, without ``..``, and not
    under ``/proc`` or ``/dev``, whose magic links (``/proc/self/cwd``, ``/dev/fd/N``) lead back
    to the current folder or to open files."""
    if not os.path.isabs(path) or ".." in Path(path).parts:
        return False
    return Path(os.path.normpath(path)).parts[1:2] not in (("proc",), ("dev",))


def _check_base(base: str, source: Path) -> None:
    """An adapter may name an embedded model, a hub id or an absolute local folder; a relative
    or ``~`` path (or ``/proc/self/cwd/...``) would resolve against wherever the user happens to
    run qpeft."""
    if base in EMBEDDED:
        return
    if _fixed_absolute(base):
        return
    if _HUB_ID.fullmatch(base) and not Path(base).exists():  # a name that is not also a folder here
        return
    raise QpeftError(
        f"{source} names the base model {base!r}, a path qpeft will not resolve from an adapter's metadata "
        "(it would be relative to your current folder); pass --set model.name_or_path=PATH to name the base yourself"
    )


def _check_method(method: str, adapter_dir: str | Path, source: Path) -> None:
    """The method ``qpeft.json`` names must be the one ``adapter_config.json`` holds (which is
    what peft loads): otherwise qpeft checks one method's capabilities (can it merge?) while
    peft loads another. Methods qpeft does not map to a peft_type are not compared."""
    config = Path(adapter_dir) / "adapter_config.json"
    if source == config:
        return
    peft_type = read_json_object(config).get("peft_type")
    saved = PEFT_TYPES.get(str(peft_type))
    if (saved is not None or method in PEFT_TYPES.values()) and saved != method:
        raise QpeftError(
            f"{source} names the method {method!r}, but {config} holds a {peft_type!r} adapter"
            f"{f' (qpeft method {saved!r})' if saved else ''}; the metadata does not describe this adapter"
        )


def _check_option_path(key: str, value, source: Path) -> None:
    """A quantizer option from an adapter's metadata that names a file or folder (a GPTQ
    ``quantized_path`` is the base's weights, its ``calibration`` a file read) obeys the rule of
    the base path: absolute, no ``..``. A relative or ``~`` one would be resolved against the
    user's current folder (a bare file name counts when it has an extension and is there)."""
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, str) or _fixed_absolute(item):
            continue
        if os.sep in item or item.startswith(("~", ".", "$")) or ("." in item and os.path.lexists(item)):
            raise QpeftError(
                f"{source} sets {key} to {item!r}, a path qpeft will not resolve from an adapter's metadata "
                f"(it would be relative to your current folder); pass --set {key}=PATH to name it yourself"
            )


#: adapter_config.json fields that peft matches against module names as regular expressions
#: (a string ``target_modules``/``exclude_modules``; ``layers_pattern``, ``modules_to_save``
#: entries and ``rank_pattern``/``alpha_pattern`` keys are pasted into its own patterns).
REGEX_FIELDS = ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save", "rank_pattern", "alpha_pattern")
#: A pattern from an adapter is at most this long and has at most this many repeats (``*``,
#: ``+``, ``{m,n}``): with no repeat nested in another, matching one module name then takes
#: polynomial time of a small degree, never the exponential time of ``(.|.)*``.
MAX_PATTERN_CHARS = 1000
MAX_PATTERN_REPEATS = 4


def _pattern_problem(pattern: str) -> str | None:
    """Why matching ``pattern`` could take exponential (or high-polynomial) time, else None."""
    try:
        from re import _parser as parser
    except ImportError:  # Python 3.10
        import sre_parse as parser  # noqa: PLC0415
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        tree = parser.parse(pattern)
    except Exception as exc:  # noqa: BLE001 - re.error, RecursionError, OverflowError
        return f"not a valid regular expression ({exc})"
    repeats = 0

    def walk(sub, in_repeat: bool) -> str | None:
        nonlocal repeats
        for op, av in sub:
            name = str(op)
            children, inner = [], in_repeat
            if name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "it refers back to a group"
            if name.endswith("REPEAT"):
                many = av[1] == parser.MAXREPEAT or av[1] > 1
                if many and in_repeat:
                    return "a repeat inside a repeat"
                repeats += many
                children, inner = [av[2]], in_repeat or many
            elif name == "BRANCH":
                if in_repeat:
                    return "an alternative inside a repeat"
                children = av[1]
            elif name == "SUBPATTERN":
                children = [av[3]]
            elif name in ("ASSERT", "ASSERT_NOT"):
                children = [av[1]]
            elif name == "ATOMIC_GROUP":
                children = [av]
            for child in children:
                problem = walk(child, inner)
                if problem:
                    return problem
        return None

    problem = walk(tree, False)
    if problem is None and repeats > MAX_PATTERN_REPEATS:
        problem = f"more than {MAX_PATTERN_REPEATS} repeats"
    return problem


def check_adapter_config(adapter_dir: str | Path) -> None:
    """``adapter_config.json`` is read by peft as it is: refuse, before peft reads it, what would
    make loading the adapter run code or never end. It must be a JSON object of bounded size;
    its regular expressions (:data:`REGEX_FIELDS`) must match in bounded time; and it must not
    ask peft to import a module (``megatron_config``)."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = read_json_object(path)
    if cfg.get("megatron_config"):
        raise QpeftError(f"{path}: megatron_config makes peft import the module named by megatron_core; qpeft does not load such adapters")
    for field in REGEX_FIELDS:
        value = cfg.get(field)
        if field in ("target_modules", "exclude_modules") and not isinstance(value, str):
            continue  # a list of names is matched by equality and suffix, not as patterns
        patterns = list(value) if isinstance(value, (list, dict)) else [value]
        for pattern in patterns:
            if pattern is None:
                continue
            problem = "not a string" if not isinstance(pattern, str) else _pattern_problem(pattern)
            if problem:
                shown = pattern if not isinstance(pattern, str) or len(pattern) <= 60 else pattern[:57] + "..."
                raise QpeftError(
                    f"{path}: {field} pattern {shown!r} is refused ({problem}); peft would match it against every "
                    "module name, which could take forever: list the module names instead"
                )


def absolute_base(name_or_path: str) -> str:
    """What an adapter's metadata records as its base: a local folder as an absolute path (so
    the adapter can be used from any folder), embedded names and hub ids as they are."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in EMBEDDED and path.exists():
        return str(path.resolve())
    return name_or_path


#: How :func:`base_fingerprint` reads a model folder (recorded beside the digest).
FINGERPRINT_SCHEME = "qpeft-sampled-v1"
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def _model_folder(model_path: str) -> Path | None:
    """The local folder of a resolved base: a folder as it is; a hub id's cached snapshot."""
    path = Path(model_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_path, "config.json")
    except Exception:  # noqa: BLE001 - an id the hub client refuses: no fingerprint
        return None
    return Path(found).parent if isinstance(found, str) else None


def base_fingerprint(model_path: str) -> dict | None:
    """A fingerprint of a base model's content, cheap for any size: SHA-256 over its
    ``config.json`` and, for each safetensors file, its name, size, header (every tensor's
    name, dtype, shape and offsets) and 16 blocks of 64 KiB spread evenly over its tensor data.
    Two bases with different weights differ in nearly every block; equal fingerprints mean the
    same architecture and, with near certainty, the same weights. None for a base with no
    local files (a hub id not in the cache)."""
    import hashlib
    import struct

    folder = _model_folder(model_path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256()
    digest.update((folder / "config.json").read_bytes())
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            n = min(n, size - 8) if size >= 8 else 0
            digest.update(head + fh.read(n))
            start = 8 + n
            span = max(0, size - start - _SAMPLE_BYTES)
            for i in range(_SAMPLES):
                fh.seek(start + span * i // max(1, _SAMPLES - 1))
                digest.update(fh.read(_SAMPLE_BYTES))
    return {"scheme": FINGERPRINT_SCHEME, "sha256": digest.hexdigest(), "weight_files": len(files)}


def check_base_fingerprint(meta: dict, model_path: str) -> str | None:
    """A note when the base resolved here is not the one the adapter was trained on (by
    :func:`base_fingerprint`); None when they match or either side has no fingerprint."""
    saved = meta.get("base_model_fingerprint")
    if not isinstance(saved, dict) or saved.get("scheme") != FINGERPRINT_SCHEME or not isinstance(saved.get("sha256"), str):
        return None
    here = base_fingerprint(model_path)
    if here is None or here["sha256"] == saved["sha256"]:
        return None
    return (
        f"the base model {model_path} differs from the one this adapter was trained on (fingerprint "
        f"{here['sha256'][:12]} here, {saved['sha256'][:12]} in {METADATA_FILE}); its outputs may be wrong"
    )


def record_base(adapter_dir: str | Path, base: str) -> None:
    """Name the base in ``adapter_config.json`` as ``qpeft.json`` does (peft writes the path it
    loaded from, which for the embedded model is qpeft's cache on this machine)."""
    from .io import atomic_write_json

    path = Path(adapter_dir) / "adapter_config.json"
    cfg = read_json_object(path)
    cfg["base_model_name_or_path"] = base
    atomic_write_json(path, cfg)

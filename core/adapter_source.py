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

import json
import os
import re
from pathlib import Path

from .errors import QpeftError
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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QpeftError(f"{path} is corrupt: {getattr(exc, 'msg', exc)}") from None
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
    options = quantizer.get("options", {})
    if not isinstance(options, dict):
        raise QpeftError(f"{source}: quantizer.options must be an object")
    sections = {
        "model": {"name_or_path": base} if isinstance(base, str) and base else {},
        "quantizer": {"name": quantizer["name"], "options": options},
        "peft": {"name": peft["name"]},  # options describe training, not loading
    }
    return sections, notes


def _check_base(base: str, source: Path) -> None:
    """An adapter may name an embedded model, a hub id or an absolute local folder; a relative
    or ``~`` path would resolve against wherever the user happens to run qpeft."""
    if base in EMBEDDED:
        return
    if os.path.isabs(base) and ".." not in Path(base).parts:
        return
    if _HUB_ID.fullmatch(base) and not Path(base).exists():  # a name that is not also a folder here
        return
    raise QpeftError(
        f"{source} names the base model {base!r}, a path qpeft will not resolve from an adapter's metadata "
        "(it would be relative to your current folder); pass --set model.name_or_path=PATH to name the base yourself"
    )


def absolute_base(name_or_path: str) -> str:
    """What an adapter's metadata records as its base: a local folder as an absolute path (so
    the adapter can be used from any folder), embedded names and hub ids as they are."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in EMBEDDED and path.exists():
        return str(path.resolve())
    return name_or_path

"""``qpeft run --check``: validate every file a config names, without loading a weight.

What it reads (and nothing more):

* the base model: an embedded name must be installed (or already converted); a local folder
  must hold ``config.json`` naming an architecture transformers knows, a tokenizer, and
  weight files whose safetensors headers and shard index are whole (no tensor is read); a
  pickle checkpoint needs ``model.allow_pickle``; a hub id must be in the local Hugging Face
  cache unless downloads are allowed (``QPEFT_ALLOW_HUB=1``);
* the data: each file must exist, be a regular file (stat only: a FIFO is never opened) of a
  supported type, and its first :data:`CHECK_ROWS` rows must pass the checks a run makes
  (:func:`qpeft.data.records.iter_records`, the format detected from the first row,
  :func:`qpeft.data.records.check_rows`). Nothing is tokenized.

Errors are :class:`~qpeft.errors.ConfigError` naming the key, as in a run.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from .errors import ConfigError

#: Rows of each data file that ``--check`` validates (the run validates every row as it
#: tokenizes; a bad row further down is reported then, naming the row).
CHECK_ROWS = 5000


def check_files(config, data_kind: str = "lm") -> list[str]:
    """Validate the files ``config`` (a :class:`qpeft.config.RunConfig`) names, its data as the
    trainer's ``data_kind``; return notes on what was checked."""
    notes = [check_model(config.model)]
    if data_kind == "lm":
        notes.extend(check_data(config.data))
    else:
        from .data.objectives import check_objective_rows

        notes.extend(check_objective_rows(config.data, data_kind, CHECK_ROWS))
    return [n for n in notes if n]


def check_model(model) -> str | None:
    """The base model is there and whole, as far as can be told without loading a weight."""
    from .model_source import EMBEDDED, cache_root, check_tokenizer_files, check_weight_files, embedded_gguf, resolve_model_path

    name = model.name_or_path
    if name in EMBEDDED:
        if not (cache_root() / "models" / EMBEDDED[name][2] / "config.json").is_file():
            embedded_gguf(name)  # installed? (converted on the first run)
        return None
    path = resolve_model_path(name)  # a local folder's config.json, weight headers, shards; missing paths
    if Path(path).is_dir():
        check_tokenizer_files(path)
        check_weight_files(path, allow_pickle=model.allow_pickle)
        return None
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _hub_cached(path):
        raise ConfigError(
            "model.name_or_path",
            f"{name!r} is neither a local folder nor in the Hugging Face cache, and downloads are off: "
            "name a local model folder, or set QPEFT_ALLOW_HUB=1 to download it",
        )
    return None


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return True
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub client refuses: the run reports it
        return True


def check_data(data, max_rows: int = CHECK_ROWS) -> list[str]:
    """The data files exist, are regular files of a supported type, and their first
    ``max_rows`` rows are records of one format that a run accepts."""
    from .data.records import check_rows, check_source, data_sources, iter_records
    from .data.store import first_record_format

    train_path, val_path, val_key = data_sources(data)
    check_source(train_path, "data.path")
    if val_path is not None:
        check_source(val_path, val_key)
    fmt = first_record_format(train_path, "data.path", data.path, data.format)
    sources = [(train_path, data.path, "data.path")]
    if val_path is not None:
        sources.append((val_path, data.val_path or f"{data.path} (validation split)", val_key))
    notes = []
    for path, source, key in sources:
        rows = check_rows(iter_records(path, key), fmt, source, key)
        n = sum(1 for _ in itertools.islice(rows, max_rows + 1))
        whole = n <= max_rows
        if key == "data.path" and val_path is None and whole and n < 2:
            raise ConfigError("data.path", f"{data.path}: needs at least 2 records to hold one out for validation")
        if not source.startswith("embedded:"):
            checked = f"all {n:,} records" if whole else f"the first {max_rows:,} records"
            notes.append(f"{source}: {checked} checked ({fmt})")
    return notes


def check_context_length(model_path: str, max_length: int) -> str | None:
    """A note when rows may be longer than the base model's trained context
    (``max_position_embeddings`` in its config.json) and the config sets no RoPE scaling: the
    positions past it are extrapolated, which transformers does silently (unsloth, for one,
    switches on linear RoPE scaling there instead). Reads config.json only."""
    import json

    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    limit = cfg.get("max_position_embeddings")
    if not isinstance(limit, int) or max_length <= limit:
        return None
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in (None, "default"):
        return None
    return (
        f"data.max_length {max_length} is longer than the model's max_position_embeddings {limit} and its config sets no "
        "RoPE scaling: positions past it are extrapolated, which degrades what the model learns there; shorten data.max_length "
        "or use a base trained (or rope-scaled) for longer rows"
    )

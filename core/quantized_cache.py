"""Quantized bases cached on disk, so that a bench matrix (or a run and its ``qpeft merge``)
quantizes each base once.

An entry is the folder a quantizer's :meth:`~qpeft.api.QuantizerPlugin.save_quantized` wrote,
read back with its :meth:`~qpeft.api.QuantizerPlugin.load_quantized`. It is keyed by everything
the quantized weights depend on: the base's content fingerprint
(:func:`qpeft.adapter_source.base_fingerprint`), the quantizer's name and resolved options, the
run's dtype, device and FSDP mode, the versions of qpeft, torch, transformers, safetensors and of
the quantizer's own ``backend_packages``, and whatever the quantizer adds
(:meth:`~qpeft.api.QuantizerPlugin.cache_key`, e.g. a digest of calibration data). The full key
is stored in the entry and compared, not only its hash.

Entries are written atomically (:func:`qpeft.io.atomic_dir`) before the model has run any forward
pass (some kernels repack their weights on the first one), with a manifest of every file's size
and SHA-256. An entry whose manifest, files or load do not check out is never trusted: the base
is quantized again and the entry replaced. Quantizers that cannot save their models
(``saves_quantized="none"``), full-precision ones, and those whose ``cache_key`` returns None are
never cached. ``model.quantized_cache: false`` turns the cache off; a folder path moves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

from . import __version__

#: The file in each entry that holds its key and its files' sizes and digests.
MANIFEST = "qpeft-quantized-cache.json"
LAYOUT = 1
#: Packages whose versions key every entry (the quantizer adds its own ``backend_packages``).
CORE_PACKAGES = ("torch", "transformers", "safetensors")

log = logging.getLogger("qpeft")


def cache_folder(ctx) -> Path | None:
    """Where quantized bases are cached for this run: ``model.quantized_cache`` when it is a
    folder, else ``$QPEFT_CACHE/quantized`` (default ``~/.cache/qpeft/quantized``); None when off."""
    from .model_source import cache_root

    setting = getattr(ctx.config.model, "quantized_cache", True)
    if setting is False:
        return None
    if isinstance(setting, str):
        return Path(setting).expanduser()
    return cache_root() / "quantized"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cache_key(quant, model_path: str, options, ctx) -> dict | None:
    """The key of ``model_path`` quantized by ``quant`` with ``options`` in this run, or None
    when such a base is not cached (see the module docstring)."""
    from .adapter_source import base_fingerprint

    if quant.capabilities.saves_quantized == "none" or quant.bits(options) is None:
        return None
    extra = quant.cache_key(options)
    if extra is None:
        return None
    fingerprint = base_fingerprint(model_path)
    if fingerprint is None:  # a hub id with no local files: nothing to fingerprint
        return None
    model_cfg = ctx.config.model
    return {
        "layout": LAYOUT,
        "base": fingerprint,
        "quantizer": quant.name,
        "options": options.model_dump(mode="json"),
        "extra": extra,
        "dtype": ctx.dtype,
        "device": ctx.device,
        "device_map": model_cfg.device_map,
        "fsdp": ctx.fsdp,
        "versions": {"qpeft": __version__} | {p: _version(p) for p in (*CORE_PACKAGES, *quant.backend_packages)},
    }


def entry_dir(root: Path, quant, key: dict) -> Path:
    """The entry folder of ``key`` under ``root``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / f"{quant.name}-{digest}"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, dict]:
    return {
        str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": _file_digest(f)}
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }


def verify_entry(entry: Path, key: dict) -> str | None:
    """Why ``entry`` cannot be trusted for ``key`` (missing, another key, a file missing,
    added, truncated or changed), or None when every file matches its manifest."""
    from .io import MetadataError, read_json_file

    if not entry.is_dir():
        return "no entry"
    try:
        manifest = read_json_file(entry / MANIFEST)
    except (OSError, MetadataError) as exc:
        return f"unreadable manifest ({exc})"
    if not isinstance(manifest, dict) or manifest.get("key") != json.loads(json.dumps(key)):
        return "manifest of another key"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    here = {str(f.relative_to(entry)) for f in entry.rglob("*") if f.is_file() and f.name != MANIFEST}
    if here != set(files):
        return f"files differ from the manifest ({sorted(here ^ set(files))[:3]})"
    for name, want in files.items():
        path = entry / name
        if not isinstance(want, dict) or path.stat().st_size != want.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, the manifest {want.get('bytes') if isinstance(want, dict) else want!r}"
        if _file_digest(path) != want.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def load_base(quant, model_path: str, options, ctx, *, training: bool, say=None):
    """The base ``model_path`` quantized by ``quant``: from the cache when a verified entry
    exists, else quantized with ``quant.load`` and written to the cache (when cacheable).

    What happened is in ``ctx.notes`` ("quantized base from cache ..."). A cache that cannot be
    written (disk full, read-only) costs a note, never the run."""
    from .errors import QpeftError

    root = cache_folder(ctx)
    key = cache_key(quant, model_path, options, ctx) if root is not None else None
    if key is None:
        return quant.load(model_path, options, ctx, training=training)
    entry = entry_dir(root, quant, key)
    problem = verify_entry(entry, key)
    if problem is None:
        try:
            model = quant.load_quantized(str(entry), options, ctx, training=training)
        except Exception as exc:  # noqa: BLE001 - any failure means: quantize again
            problem = f"does not load ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        else:
            _note(ctx, f"quantized base from cache {entry}", say)
            return model
    if problem != "no entry":
        _note(ctx, f"quantized-base cache entry {entry} not trusted ({problem}): quantizing again", say)
    model = quant.load(model_path, options, ctx, training=training)
    try:
        write_entry(quant, model, entry, key, options, ctx)
    except (OSError, QpeftError, NotImplementedError, RuntimeError, ValueError) as exc:
        _note(ctx, f"quantized base not cached ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})", say)
    else:
        _note(ctx, f"quantized base cached at {entry}", say)
    return model


def write_entry(quant, model, entry: Path, key: dict, options, ctx) -> None:
    """Save ``model`` (quantized, before any forward pass) into ``entry`` with its manifest, atomically."""
    from .io import atomic_dir, atomic_write_json

    with atomic_dir(entry, replace=True) as tmp:
        quant.save_quantized(model, str(tmp), options, ctx)
        atomic_write_json(tmp / MANIFEST, {"key": key, "files": _files(tmp)})


def _note(ctx, text: str, say) -> None:
    ctx.notes.append(text)
    log.info(text)
    if say is not None:
        say(text)

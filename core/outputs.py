"""Where qpeft writes: never over its own inputs, never over files it did not write.

Checked before any weight is loaded:

* ``qpeft run``: ``output_dir`` is not ``/`` or the home folder (also refused by the config),
  does not lie inside (or equal) the model folder or a data file/folder, and no input lies
  where the run writes (``adapter/``, ``summary.json``, ``resolved_config.yaml``,
  ``checkpoints/``, ``eval/``). An existing ``adapter/`` without qpeft's metadata, a ``summary.json`` or
  ``resolved_config.yaml`` that qpeft did not write, or anything there that is not the kind of
  file qpeft writes (a symlink, a device) is refused, naming it: qpeft replaces only its own.
* ``qpeft merge``: ``--out`` (and ``OUT-QUANTIZER`` with ``--requantize``) does not overlap the
  adapter or the base model folder, and ``--force`` replaces only a folder that qpeft wrote as
  a merge output (it holds :data:`MERGE_MARKER`).

One ``qpeft run`` per output folder at a time is :func:`qpeft.io.folder_lock`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from .adapter_source import METADATA_FILE
from .errors import QpeftError
from .io import MetadataError, read_json_file, read_metadata_bytes

#: What ``qpeft merge`` writes into its output folder; ``--force`` replaces only such folders.
MERGE_MARKER = "qpeft_merge.json"
#: What ``qpeft run`` writes into ``output_dir``.
RUN_OUTPUTS = ("adapter", "summary.json", "resolved_config.yaml", "checkpoints", "eval")


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or inside it (both real paths)."""
    return path == folder or folder in path.parents


def system_folder(path: str | Path) -> str | None:
    """'the root folder' / 'your home folder' when ``path`` is one of them, else None."""
    real = _real(path)
    if real == Path("/"):
        return "the root folder"
    if real == _real("~"):
        return "your home folder"
    return None


def _run_inputs(cfg) -> list[tuple[str, Path]]:
    """The run's inputs that are files or folders here: an embedded model is its cached folder
    (the folder the run loads), hub ids are none."""
    from .model_source import EMBEDDED, cache_root

    model = cfg.model.name_or_path
    found = []
    if model in EMBEDDED:  # also before its first conversion, which writes the folder
        found.append(("model.name_or_path", _real(cache_root() / "models" / EMBEDDED[model][2])))
    for key, value in (("model.name_or_path", model), ("data.path", cfg.data.path), ("data.val_path", cfg.data.val_path)):
        if value and os.path.exists(value) and not (key == "model.name_or_path" and value in EMBEDDED):
            found.append((key, _real(value)))
    return found


def _not_ours(path: Path, why: str) -> QpeftError:
    return QpeftError(
        f"output_dir: {path} {why}, so qpeft did not write it and will not replace it; move it away or use another output_dir"
    )


def _read_json(path: Path):
    try:
        return read_json_file(path)
    except (OSError, MetadataError):
        return None


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(read_metadata_bytes(path).decode("utf-8"))
    except (OSError, MetadataError, ValueError, RecursionError, yaml.YAMLError):
        return None


def check_run_output(cfg) -> None:
    """Refuse an ``output_dir`` that overlaps the run's inputs or holds files qpeft did not write."""
    out = _real(cfg.output_dir)
    where = system_folder(out)
    if where:
        raise QpeftError(
            f"output_dir: {cfg.output_dir} is {where}; qpeft writes adapter/, summary.json and checkpoints/ there: name a folder of its own"
        )
    for key, path in _run_inputs(cfg):
        if _within(out, path):
            raise QpeftError(f"output_dir: {out} is inside the {key} {path}; qpeft would write into its own input: use another output_dir")
        for name in RUN_OUTPUTS:
            if _within(path, out / name):
                raise QpeftError(
                    f"output_dir: the {key} {path} is where the run writes {out / name}: move the input or use another output_dir"
                )
    if not out.is_dir():
        return  # a file here is refused with the OS's own error when the folder is made
    adapter = out / "adapter"
    if os.path.lexists(adapter):
        if adapter.is_symlink() or not adapter.is_dir():
            raise _not_ours(adapter, "is not a folder")
        if not (adapter / METADATA_FILE).is_file():
            raise _not_ours(adapter, f"has no {METADATA_FILE}")
    summary = out / "summary.json"
    if os.path.lexists(summary):
        data = _read_json(summary) if _regular(summary) else None
        if not isinstance(data, dict) or "qpeft_version" not in data:
            raise _not_ours(summary, "is not a qpeft run summary")
    resolved = out / "resolved_config.yaml"
    if os.path.lexists(resolved):
        data = _read_yaml(resolved) if _regular(resolved) else None
        if not isinstance(data, dict) or not {"quantizer", "peft", "trainer", "output_dir"} <= set(data):
            raise _not_ours(resolved, "is not a qpeft run config")
    for name in ("checkpoints", "eval"):
        folder = out / name
        if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
            raise _not_ours(folder, "is not a folder")


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_merge_output(out: str | Path, *, force: bool, inputs: dict[str, str | Path]) -> None:
    """Refuse a merge output that overlaps an input (``inputs``: label → path) or that
    ``--force`` would replace although qpeft did not write it as a merge output."""
    out = Path(out)
    real = _real(out)
    where = system_folder(real)
    if where:
        raise QpeftError(f"--out: {out} is {where}; name a folder of its own")
    for label, path in inputs.items():
        if path and os.path.exists(path):
            p = _real(path)
            if _within(real, p) or _within(p, real):
                raise QpeftError(
                    f"--out: {out} overlaps the {label} {p}; writing it would change or replace the {label}: use another --out"
                )
    if not os.path.lexists(out):
        return
    if not force:
        raise QpeftError(f"{out} exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise QpeftError(f"--force: {out} is not a folder, so not a merge output of qpeft; refusing to replace it")
    if not (out / MERGE_MARKER).is_file():
        raise QpeftError(f"--force: {out} has no {MERGE_MARKER}, so it is not a merge output of qpeft; refusing to replace it")

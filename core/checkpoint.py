"""Training checkpoints and ``qpeft run --resume``.

Layout: ``OUTPUT_DIR/checkpoints/checkpoint-STEP/``. A checkpoint counts only once it holds
the marker file :data:`MARKER`, written atomically as the very last step of saving it. A
checkpoint without a marker was interrupted while being written (kill -9, full disk); resume
deletes it and uses the newest complete one. The HF Trainer writes its checkpoints in place
(not atomically), so the marker is what makes them safe to resume from; the native trainer
writes each checkpoint into a temporary folder renamed into place (:func:`qpeft.io.atomic_dir`)
and marks it too.

The marker holds a fingerprint of the parts of the config that decide training (model,
quantizer, PEFT method, trainer, data, seed); resuming with a config whose fingerprint differs
is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from .errors import ConfigError
from .io import MetadataError, atomic_write_json, read_json_file

CHECKPOINTS = "checkpoints"
PREFIX = "checkpoint-"
MARKER = "qpeft-checkpoint.json"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")
#: Trainer options that may change between an interrupted run and its resumption.
_FREE_TRAINER_KEYS = ("save_steps", "save_total_limit", "logging_steps")


def checkpoint_root(output_dir: str | Path) -> Path:
    """The folder that holds a run's checkpoints."""
    return Path(output_dir) / CHECKPOINTS


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of optimizer step ``step`` lives."""
    return checkpoint_root(output_dir) / f"{PREFIX}{step}"


def fingerprint(config) -> str:
    """A hash of everything in a :class:`qpeft.config.RunConfig` that decides the trained
    adapter (not output paths, evaluation, generation or checkpoint frequency)."""
    d = config.model_dump(mode="json")
    trainer = dict(d["trainer"])
    trainer["options"] = {k: v for k, v in (trainer.get("options") or {}).items() if k not in _FREE_TRAINER_KEYS}
    keep = {k: d[k] for k in ("model", "quantizer", "peft", "data", "seed", "gradient_checkpointing")}
    keep["trainer"] = trainer
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def mark_complete(path: str | Path, *, step: int, trainer: str, config_fingerprint: str, data_position: dict | None = None) -> None:
    """Write the marker that makes ``path`` a complete checkpoint (call it last).

    ``data_position``: where in the training data the run is after ``step``
    (:meth:`qpeft.data.DataSchedule.position`); ``--resume`` refuses other data and continues
    from there."""
    marker = {"step": step, "trainer": trainer, "fingerprint": config_fingerprint}
    if data_position is not None:
        marker["data_position"] = data_position
    atomic_write_json(Path(path) / MARKER, marker)


def read_marker(path: str | Path) -> dict | None:
    """The marker of a checkpoint folder, or None if it is incomplete or unreadable (missing,
    not a regular file, too large, too deeply nested, not JSON, not an object)."""
    try:
        marker = read_json_file(Path(path) / MARKER)
    except (OSError, MetadataError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("step"), int) else None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)


def discard_incomplete(output_dir: str | Path) -> list[str]:
    """Delete checkpoint folders that lack a marker, and leftover temporary folders of
    interrupted atomic writes; return the names removed."""
    root = checkpoint_root(output_dir)
    removed = []
    for _, p in _step_dirs(root):
        if read_marker(p) is None:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def latest_complete(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    complete = [p for _, p in _step_dirs(checkpoint_root(output_dir)) if read_marker(p) is not None]
    return complete[-1] if complete else None


def prune(output_dir: str | Path, keep: int) -> None:
    """Keep only the ``keep`` newest complete checkpoints (``keep`` ≥ 1)."""
    complete = [p for _, p in _step_dirs(checkpoint_root(output_dir)) if read_marker(p) is not None]
    for p in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(p, ignore_errors=True)


def find_resume_point(config, trainer_name: str) -> tuple[Path | None, list[str]]:
    """For ``--resume``: clean up interrupted checkpoints, then return the newest complete one
    (None if there is none) and notes for the user. A checkpoint made with another training
    config or another trainer is refused with a :class:`ConfigError`."""
    removed = discard_incomplete(config.output_dir)
    notes = [f"removed incomplete checkpoint {name}" for name in removed]
    path = latest_complete(config.output_dir)
    if path is None:
        notes.append(f"no complete checkpoint in {checkpoint_root(config.output_dir)}; starting from step 0")
        return None, notes
    marker = read_marker(path)
    if marker.get("trainer") != trainer_name:
        raise ConfigError("trainer.name", f"{path} was written by trainer {marker.get('trainer')!r}, not {trainer_name!r}")
    if marker.get("fingerprint") != fingerprint(config):
        raise ConfigError(
            "--resume",
            f"{path} was made with a different training config (model, quantizer, peft, trainer, data or seed changed); "
            "resume with the original config or use another output_dir",
        )
    notes.append(f"resuming from {path} (step {marker['step']})")
    return path, notes

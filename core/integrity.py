"""What qpeft refuses to write or load as a result: NaN and ±inf, and adapters that apply to
nothing.

* **Training** stops at the first non-finite loss (:class:`DivergenceGuard`, used by both
  built-in trainers), and at a non-finite gradient norm where no dynamic loss scaler handles it
  (fp16 with a ``GradScaler`` overflows on purpose now and then: that step is skipped by the
  scaler, so only the unscaled loss decides there). The error is one line
  (:class:`~qpeft.errors.TrainingDiverged`) naming the step, the last finite loss, the last good
  checkpoint and what to try; no adapter is saved, an earlier ``adapter/`` stays.
* **Weights**: an adapter is never written with non-finite tensors, an adapter folder holding
  them is refused when loaded (``qpeft generate``/``merge``), and a merge never writes
  non-finite merged weights (:func:`check_finite`, :func:`check_adapter_files`), each a one-line
  :class:`~qpeft.errors.NonFiniteError` naming a tensor.
* **Adapter keys**: an adapter none of whose saved tensors lands in the model it is loaded on
  (peft only warns, and a merge would write a copy of the base) is refused, naming the adapter
  and a key (:func:`check_adapter_applied`).
* **JSON** never holds ``NaN``/``Infinity``: :func:`qpeft.io.atomic_write_json` writes them as
  ``null``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import NonFiniteError, QpeftError, TrainingDiverged


def first_non_finite(named_tensors: Iterable) -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first floating-point tensor holding NaN/inf, or None."""
    import torch

    for name, t in named_tensors:
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            return name, int((~torch.isfinite(t)).sum()), t.numel()
    return None


def check_finite(named_tensors: Iterable, what: str) -> None:
    """Raise a one-line :class:`NonFiniteError` if any tensor holds NaN/inf; ``what`` says
    what they are and what happens instead (e.g. "refusing to save the adapter")."""
    bad = first_non_finite(named_tensors)
    if bad is not None:
        name, count, size = bad
        raise NonFiniteError(f"{what}: tensor {name!r} holds {count} NaN/inf values (of {size})")


def check_adapter_files(adapter_dir: str | Path, what: str | None = None) -> None:
    """Refuse an adapter folder whose safetensors files hold a non-finite tensor (read one
    tensor at a time), or whose ``adapter_config.json`` would make peft run code or never
    finish (:func:`qpeft.adapter_source.check_adapter_config`). Headers were checked before
    (:func:`qpeft.model_source.check_weight_files`)."""
    from safetensors import safe_open

    from .adapter_source import check_adapter_config

    adapter_dir = Path(adapter_dir)
    if os.path.lexists(adapter_dir / "adapter_config.json"):  # (a training checkpoint has none)
        check_adapter_config(adapter_dir)
    for file in sorted(adapter_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors = ((k, f.get_tensor(k)) for k in f.keys())
            check_finite(
                tensors,
                what or f"adapter {adapter_dir} is not usable ({file.name}; a run that diverged, or a damaged file)",
            )


class DivergenceGuard:
    """What a trainer asks after every loss and every gradient norm; raises
    :class:`TrainingDiverged` with the message the user sees."""

    def __init__(self, ctx, options, precision: str):
        self.output_dir = ctx.output_dir
        self.lr = options.lr
        self.max_grad_norm = options.max_grad_norm
        self.fp16 = precision == "fp16" or ctx.dtype == "float16"
        #: (step, loss) of the last optimizer step whose loss and gradient norm were finite.
        self.last: tuple[int, float] | None = None

    def check_loss(self, step: int, loss: float) -> None:
        """``loss``: the unscaled loss of a micro-batch (or of the step)."""
        if not math.isfinite(loss):
            raise self.diverged(step, f"the training loss is {loss}")

    def check_grad_norm(self, step: int, norm: float, step_loss: float | None = None) -> None:
        """Call only where no dynamic loss scaler handles overflowing gradients."""
        if not math.isfinite(norm):
            at = f" {step_loss:.4f}" if step_loss is not None and math.isfinite(step_loss) else ""
            raise self.diverged(step, f"the gradient norm is {norm} (with a finite loss{at})")

    def step_done(self, step: int, loss: float) -> None:
        self.last = (step, loss)

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        from .checkpoint import latest_complete

        last = f"last finite loss {self.last[1]:.4f} at step {self.last[0]}" if self.last else "no earlier step"
        kept = latest_complete(self.output_dir)
        kept = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint was written"
        tries = [f"a lower trainer.options.lr (now {self.lr:g})"]
        if self.fp16:
            tries.append("bf16 or float32 instead of fp16 (trainer.options.mixed_precision / model.dtype)")
        if self.max_grad_norm > 0:
            tries.append(f"a lower trainer.options.max_grad_norm (now {self.max_grad_norm:g})")
        else:
            tries.append("gradient clipping (trainer.options.max_grad_norm: 1.0)")
        check = "check the data and the base model's weights for NaN/inf"
        # Non-finite from the first step on points at the inputs; later, at the optimisation.
        advice = f"{check}, then try {', '.join(tries)}" if self.last is None else f"try {', '.join(tries)}; {check}"
        return TrainingDiverged(
            f"training diverged at step {step}: {what} ({last}); no adapter was saved and {kept}; {advice}",
            step=step,
        )


def check_adapter_applied(model, adapter_dir: str | Path) -> None:
    """Refuse an adapter none of whose saved tensors became a tensor of ``model`` (a
    ``peft.PeftModel`` it was just loaded onto): its keys name modules the base does not have."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    if not isinstance(model, PeftModel):
        return
    adapter_dir = Path(adapter_dir)
    saved: list[str] = []
    for file in sorted(adapter_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            saved.extend(f.keys())
    if not saved:
        return
    # save_embedding_layers=False: peft's "auto" would look for the base's config.json under the
    # adapter's base name (an embedded name or hub id: a warning, or a hub request) to decide
    # whether embeddings were resized; the check needs only the adapter's own keys.
    loaded = set(get_peft_model_state_dict(model, adapter_name=model.active_adapter, save_embedding_layers=False))
    if not loaded.intersection(saved):
        example = sorted(loaded)[0] if loaded else "none"
        raise QpeftError(
            f"adapter {adapter_dir} does not apply to this base: none of its {len(saved)} tensors matches a module of the model "
            f"(e.g. {sorted(saved)[0]!r}; the base expects keys like {example!r}); load it on the base model it was trained on"
        )

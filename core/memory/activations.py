"""Memory-budget mode for gradient checkpointing: keep the activations of as many decoder layers
as the card holds (those layers are not recomputed in backward), instead of checkpointing every
layer. ``keep_last`` turns checkpointing off for the last *n* checkpointed layers; ``AutoKeep``
chooses *n* from measurements on the run's own model and card:

1. before training, one decoder layer's kept activations are measured on short probe rows (two
   lengths, so that growth faster than linear in the row length is seen and extrapolated), by
   the CUDA allocator's count around that layer's forward, checkpointed and not;
2. the first optimizer step runs with every layer checkpointed; its peak memory, scaled to the
   longest micro-batch the run can see (batch size × data.max_length tokens), plus the kept
   activations of *n* layers at that length must fit ``budget`` × the card's memory (less what
   other processes hold); the largest such *n* is applied from the second step on.

Checkpointing a layer or not changes no number (the recompute replays the forward, dropout masks
included), so this trades memory for the time of *n* layer recomputes only.
"""

from __future__ import annotations

import math


def checkpointed_layers(model) -> list:
    """The decoder layers whose gradient checkpointing is on, in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def keep_last(layers: list, n: int):
    """Turn gradient checkpointing off for the last ``n`` of ``layers``; return a function that
    turns it back on."""
    kept = layers[len(layers) - n :] if n > 0 else []
    for layer in kept:
        layer.gradient_checkpointing = False

    def undo() -> None:
        for layer in kept:
            layer.gradient_checkpointing = True

    return undo


def layers_that_fit(budget: float, peak: float, per_layer: float, n_layers: int) -> int:
    """How many layers' activations (``per_layer`` bytes each) fit between a step's estimated
    ``peak`` with every layer checkpointed and ``budget`` (both in bytes)."""
    if per_layer <= 0:
        return 0
    return max(0, min(n_layers, math.floor((budget - peak) / per_layer)))


def extrapolate(lengths: tuple[int, int], sizes: tuple[float, float], length: int) -> float:
    """A size measured at two row lengths, extrapolated to ``length`` with the growth exponent
    the two show (at least linear: attention without a fused kernel grows quadratically)."""
    (t1, t2), (s1, s2) = lengths, sizes
    if s1 <= 0 or s2 <= 0:
        return max(s1, s2, 0.0) * length / t2
    exponent = max(1.0, math.log(s2 / s1) / math.log(t2 / t1))
    return s2 * (length / t2) ** exponent


class AutoKeep:
    """``keep_activations: auto`` on CUDA: :meth:`probe` before training, :meth:`decide` after the
    first optimizer step (see the module docstring)."""

    PROBE_LENGTHS = (256, 512)

    def __init__(self, model, layers: list, max_tokens: int, budget: float):
        self.model, self.layers, self.max_tokens, self.budget = model, layers, max_tokens, budget
        self.probe_sizes = (0.0, 0.0)
        self.start_allocated = 0
        self.first_tokens = 0

    def _layer_deltas(self, length: int, device) -> tuple[float, float]:
        """Bytes the last layer (checkpointing off) and the one before it (on) leave allocated
        after their forward, for one row of ``length`` tokens."""
        import torch

        probe, reference = self.layers[-1], self.layers[-2]
        deltas: dict = {}

        def before(module, args, kwargs):
            deltas[module] = torch.cuda.memory_allocated(device)

        def after(module, args, kwargs, output):
            deltas[module] = torch.cuda.memory_allocated(device) - deltas[module]

        handles = [m.register_forward_pre_hook(before, with_kwargs=True) for m in (probe, reference)]
        handles += [m.register_forward_hook(after, with_kwargs=True) for m in (probe, reference)]
        undo = keep_last(self.layers, 1)
        try:
            ids = torch.zeros((1, length), dtype=torch.long, device=device)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
            del out
        finally:
            undo()
            for h in handles:
                h.remove()
        return float(deltas[probe]), float(deltas[reference])

    def probe(self, device) -> None:
        """Measure one layer's kept activations at the probe lengths (RNG state untouched, no
        gradient left behind)."""
        import torch

        sizes = []
        with torch.random.fork_rng(devices=[device]):
            for length in self.PROBE_LENGTHS:
                kept, checkpointed = self._layer_deltas(length, device)
                sizes.append(max(kept - checkpointed, 0.0))
        self.probe_sizes = tuple(sizes)
        self.start_allocated = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    def decide(self, device, step_tokens: int) -> tuple[int, str]:
        """After the first optimizer step (``step_tokens``: the largest micro-batch it ran, in
        tokens): keep the last n layers' activations from now on; return (n, a note)."""
        import torch

        gib = 2**30
        peak = torch.cuda.max_memory_allocated(device)
        held = torch.cuda.memory_allocated(device)  # weights, adapter and now the optimizer state
        longest = max(self.max_tokens, step_tokens)  # a trainer may be handed rows longer than data.max_length
        per_layer = extrapolate(self.PROBE_LENGTHS, self.probe_sizes, longest)
        estimate = held + (peak - self.start_allocated) * longest / max(step_tokens, 1)
        free, total = torch.cuda.mem_get_info(device)
        others = total - free - torch.cuda.memory_reserved(device)  # other processes on the card
        budget = self.budget * total - max(others, 0)
        n = layers_that_fit(budget, estimate, per_layer, len(self.layers))
        keep_last(self.layers, n)
        note = (
            f"native: keep_activations auto: {n} of {len(self.layers)} decoder layers keep their activations "
            f"({per_layer / gib:.2f} GiB each at {longest} tokens; estimated peak "
            f"{(estimate + n * per_layer) / gib:.1f} GiB of a {budget / gib:.1f} GiB budget)"
        )
        return n, note

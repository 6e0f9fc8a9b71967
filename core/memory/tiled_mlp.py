"""Tiled MLP for long rows: each decoder layer's gated MLP runs on a tile of ``tokens`` rows at a
time, each tile checkpointed, so its intermediate activations (gate, up, the activation and their
product: four ``tokens × intermediate_size`` tensors, plus what LoRA keeps) exist for one tile at a
time instead of for the whole batch.

A gated MLP (``down(act(gate(x)) * up(x))``) treats every token on its own, so tiling changes
nothing but the order of floating-point sums inside the matrix products. The price is one more
forward pass of the MLP in backward (each tile is recomputed there); what it saves grows with the
row length — with gradient checkpointing, the recompute of one layer for backward otherwise holds
the MLP intermediates of every token of the batch at once. Mixture-of-experts blocks (routing and
load-balancing losses look across tokens) are left alone.
"""

from __future__ import annotations

from collections.abc import Callable

#: The attributes of a gated MLP module (Llama, Mistral, Qwen2, Gemma, SmolLM, ...).
GATED = ("gate_proj", "up_proj", "down_proj")


def gated_mlps(model) -> list:
    """The gated MLP module of each decoder layer of ``model`` (see :data:`GATED`); mixture-of-
    experts blocks are not among them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = []
    for layer in model.modules():
        if not isinstance(layer, GradientCheckpointingLayer):
            continue
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and all(hasattr(mlp, a) for a in GATED) and not hasattr(mlp, "experts"):
            found.append(mlp)
    return found


def _tiled(forward: Callable, tokens: int) -> Callable:
    import torch
    from torch.utils.checkpoint import checkpoint

    def tiled_forward(x, *args, **kwargs):
        if args or kwargs or x.dim() < 2 or x.numel() <= tokens * x.shape[-1] or not torch.is_grad_enabled():
            return forward(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        # Each tile keeps only its input (a view of x) for backward; its intermediates are
        # recomputed there. preserve_rng_state (the default) recomputes the same dropout masks.
        out = [checkpoint(forward, tile, use_reentrant=False) for tile in flat.split(tokens)]
        return torch.cat(out).reshape(*x.shape[:-1], -1)

    return tiled_forward


def tile_mlps(model, tokens: int) -> tuple[int, Callable[[], None]]:
    """Make each gated MLP of ``model`` (:func:`gated_mlps`) run ``tokens`` rows at a time while
    gradients are recorded (see the module docstring); evaluation and generation run as before.
    Returns (how many MLPs are tiled, a function that undoes it). Wraps whatever forward each MLP
    instance has now (a kernel library's replacement included)."""
    if tokens < 1:
        raise ValueError(f"tokens per tile must be >= 1 (got {tokens})")
    mlps = gated_mlps(model)
    saved = []
    for mlp in mlps:
        saved.append((mlp, mlp.__dict__.get("forward")))  # an instance-level forward, if any
        mlp.forward = _tiled(mlp.forward, tokens)

    def undo() -> None:
        for mlp, previous in saved:
            if previous is None:
                mlp.__dict__.pop("forward", None)
            else:
                mlp.forward = previous

    return len(mlps), undo

"""What qpeft needs to know about the launch it runs under. qpeft writes no distributed code:
``accelerate launch`` starts the ranks, accelerate (or the transformers Trainer) wraps the model
for DDP or FSDP, and torch does the communication. This module only reads how the run was
launched and, after FSDP training, asks torch for the full values of the sharded adapter."""

from __future__ import annotations

import os


def rank() -> int:
    """This process's global rank (0 when not launched for several processes)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine, i.e. the index of its GPU (0 when not launched for
    several processes)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """How many ranks train together (1 when not launched for several processes)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_version() -> int | None:
    """The FSDP version ``accelerate launch --use_fsdp`` (or an accelerate config with
    ``distributed_type: FSDP``) asked for, read from the environment accelerate sets for its
    ranks; None when the run is not launched for FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def gather_trainable_state(model) -> tuple[dict, int]:
    """Full CPU copies of the trainable tensors of a model that FSDP2 may have sharded, and how
    many of them were sharded. Every rank must call it (gathering a sharded tensor is a
    collective); every rank gets the full values."""
    from torch.distributed.tensor import DTensor

    state, sharded = {}, 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if isinstance(param, DTensor):
            sharded += 1
            param = param.full_tensor()
        state[name] = param.detach().to("cpu", copy=True)
    return state, sharded

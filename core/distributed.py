"""What qpeft needs to know about the launch it runs under. qpeft writes no distributed code:
``accelerate launch`` starts the ranks, accelerate (or the transformers Trainer) wraps the model
for DDP or FSDP, and torch does the communication. This module only reads how the run was
launched, checks that a launch over several machines shares its output folder, and, after FSDP
training, asks torch for the full values of the sharded adapter."""

from __future__ import annotations

import os
import secrets
import socket
import time
from datetime import timedelta
from pathlib import Path

from .errors import QpeftError


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


def several_machines() -> bool:
    """Whether the ranks run on more than one machine: ``torchrun`` (and ``accelerate launch``,
    which starts it) gives each rank ``LOCAL_WORLD_SIZE``, the ranks on its own machine; fewer than
    ``WORLD_SIZE`` means other machines take part. Without it (another launcher) qpeft cannot
    tell, and assumes several machines."""
    if world_size() == 1:
        return False
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return local is None or int(local) < world_size()


#: The file rank 0 writes into ``output_dir`` for :func:`check_shared_output_dir` (then removes).
SHARED_TOKEN_PREFIX = ".qpeft-shared-"


def check_shared_output_dir(output_dir: str | Path, *, resume: bool, cpu: bool = False, wait_s: float = 3.0) -> str | None:
    """On a launch over several machines, check that every rank sees the same ``output_dir``.

    Rank 0 writes a file with a random name and content into ``output_dir``, sends the name to
    every rank, and each rank looks for it (for up to ``wait_s`` seconds, for a network
    filesystem's caches); every rank then learns what all the others saw, so all of them decide
    alike. Only rank 0 writes the adapter, the summary and the checkpoints, so a run without
    ``--resume`` works on folders the nodes do not share (the outputs land on rank 0's machine):
    the returned note says so. ``--resume`` reads the checkpoint on every rank (the trainable
    tensors, the optimizer state: under FSDP each rank reads the full optimizer state and keeps
    its shard), so a rank that does not see rank 0's folder would start from another step, or
    from step 0: that is refused with a :class:`QpeftError` on every rank.

    Returns None on one machine (nothing checked, no process group started) or when the folder
    is shared. Every rank must call it, before the trainer starts: it starts the process group
    the way accelerate does (``PartialState(cpu=cpu)``, gloo on CPUs, NCCL on GPUs; a 30-minute
    timeout), which accelerate and the transformers Trainer then use."""
    if not several_machines():
        return None
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    # 30 minutes, the transformers Trainer's ddp_timeout (torch's NCCL default is 10): the group
    # started here is the one the trainers keep.
    PartialState(cpu=cpu, timeout=timedelta(minutes=30))
    if not cpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    out = Path(output_dir)
    box = [None, None]  # the nonce, or why rank 0 could not write it (every rank then fails alike)
    if rank() == 0:
        box[0] = secrets.token_hex(16)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{SHARED_TOKEN_PREFIX}{box[0]}").write_text(box[0])
        except OSError as exc:
            box[1] = f"output_dir: rank 0 cannot write into {out}: {exc.strerror or exc}"
    dist.broadcast_object_list(box, src=0)
    nonce, failed = box
    if failed:
        raise QpeftError(failed)
    token = out / f"{SHARED_TOKEN_PREFIX}{nonce}"
    deadline = time.monotonic() + wait_s
    while not (seen := _holds(token, nonce)) and time.monotonic() < deadline:
        time.sleep(0.2)
    views = [None] * world_size()
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if rank() == 0:
        token.unlink(missing_ok=True)
    blind: dict[str, list[int]] = {}
    for r, (ok, host) in enumerate(views):
        if not ok:
            blind.setdefault(host, []).append(r)
    if not blind:
        return None
    who = "; ".join(f"{_ranks(rs)} on {host}" for host, rs in blind.items())
    if resume:
        raise QpeftError(
            f"output_dir: {out} is not the same folder on every node ({who} cannot see the file rank 0 wrote there); "
            "--resume on several nodes reads the checkpoint on every rank, so output_dir must be on a filesystem all nodes share"
        )
    return (
        f"output_dir {out} is not shared by the nodes ({who} cannot see rank 0's files): rank 0 writes the adapter, "
        "summary and checkpoints on its own node; --resume needs output_dir on a filesystem all nodes share"
    )


def _ranks(ranks: list[int]) -> str:
    """'rank 3', 'ranks 8-15' or 'ranks 3, 5, 9' (the first few of many)."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks[-1] - ranks[0] == len(ranks) - 1:
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks[:4])) + (f" and {len(ranks) - 4} more" if len(ranks) > 4 else "")


def _holds(path: Path, nonce: str) -> bool:
    try:
        return path.read_text() == nonce
    except (OSError, UnicodeDecodeError):
        return False


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

"""Which examples each optimizer step trains on: one seed-fixed order shared by every trainer,
and the data position a checkpoint records so that ``--resume`` continues exactly there."""

from __future__ import annotations

import math

from ..errors import ConfigError


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch).

    Every trainer iterates data in this order, so two trainers given the same data and seed
    see the same batches and their loss curves can be compared step by step.
    """
    return _permutation(n, seed, epoch).tolist()


def _permutation(n: int, seed: int, epoch: int):
    import torch

    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g)


def plan_steps(n_examples: int, per_step: int, epochs: float, max_steps: int | None) -> tuple[int, int]:
    """(optimizer steps, whole epochs of data to lay out) for ``epochs`` or ``max_steps``."""
    if max_steps:
        return max_steps, math.ceil(max_steps * per_step / n_examples)
    return math.ceil(epochs * n_examples / per_step), math.ceil(epochs)


class OrderedExamples:
    """``data`` laid out for ``epochs`` epochs, each in :func:`epoch_order`, as a map-style
    dataset of ``epochs × len(data)`` examples read lazily (one epoch's permutation in memory:
    8 bytes per example). Reading it in index order is the order every trainer follows."""

    def __init__(self, data, seed: int, epochs: int):
        self.data, self.seed, self.epochs = data, seed, epochs
        self._epoch, self._perm = None, None

    def __len__(self) -> int:
        return len(self.data) * self.epochs

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        epoch, index = self.locate(i)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, _permutation(len(self.data), self.seed, epoch)
        return self.data[int(self._perm[index])]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, index in that epoch's order) of the example at ``position``; a position past
        the end wraps around, as a data loader restarted from the beginning would."""
        q = position % len(self)
        return q // len(self.data), q % len(self.data)


def ordered_examples(data, seed: int, epochs: int) -> OrderedExamples:
    """``data`` repeated for ``epochs`` epochs, each epoch in :func:`epoch_order` (lazily)."""
    return OrderedExamples(data, seed, epochs)


class DataSchedule:
    """The examples of every optimizer step, for trainers that run their own loop.

    Step ``s`` (counted from 1) trains on the ``per_step`` examples after the first
    ``(s - 1) × per_step`` of :class:`OrderedExamples`; under data parallelism rank ``r`` of
    ``world`` takes the ``r``-th equal slice of them (:meth:`rank_examples`). :meth:`position`
    says where in the data a step ends, which a checkpoint stores; :meth:`resume` continues
    from a stored position exactly (also when the number of ranks changed).
    """

    def __init__(self, data, *, seed: int, per_rank: int, world: int = 1, epochs: float = 1.0, max_steps: int | None = None):
        self.data = data
        self.per_rank, self.world = per_rank, world
        self.per_step = per_rank * world
        self.max_steps, n_epochs = plan_steps(len(data), self.per_step, epochs, max_steps)
        self.ordered = OrderedExamples(data, seed, n_epochs)
        self._base_step, self._base_seen = 0, 0

    def start(self, step: int) -> int:
        """Position (examples consumed) before step ``step`` + 1."""
        return self._base_seen + (step - self._base_step) * self.per_step

    def step_examples(self, step: int) -> list[dict]:
        """Every rank's examples of optimizer step ``step`` (1-based), rank 0's first."""
        pos = self.start(step - 1)
        n = len(self.ordered)
        return [self.ordered[(pos + i) % n] for i in range(self.per_step)]

    def rank_examples(self, examples: list[dict], rank: int) -> list[dict]:
        """Rank ``rank``'s slice of a step's examples."""
        return examples[rank * self.per_rank : (rank + 1) * self.per_rank]

    def position(self, step: int) -> dict:
        """Where in the data the run is after step ``step``: examples consumed, the epoch and the
        index in its order of the next example, and the dataset's fingerprint (if it has one)."""
        seen = self.start(step)
        epoch, index = self.ordered.locate(seen)
        return {
            "examples_seen": seen,
            "epoch": epoch,
            "index": index,
            "per_step": self.per_step,
            "data": getattr(self.data, "fingerprint", None),
        }

    def resume(self, step: int, position: dict | None) -> None:
        """Continue after step ``step`` of a checkpoint whose data position was ``position``
        (None for checkpoints written before positions were stored: derived from the step).
        That the data are the checkpoint's, qpeft checked before the trainer started
        (:func:`check_same_data`)."""
        if position is None:
            return
        self._base_step, self._base_seen = step, int(position["examples_seen"])


def check_same_data(position: dict | None, data) -> None:
    """Refuse to resume on other data than the checkpoint was trained on (the store key of a
    token store hashes the source's bytes: an edited file is other data)."""
    stored = (position or {}).get("data")
    current = getattr(data, "fingerprint", None)
    if stored and current and stored != current:
        raise ConfigError(
            "--resume",
            "the training data differ from those the checkpoint was trained on (the data file's content, the tokenizer, "
            "max_length or packing changed); resume with the original data or use another output_dir",
        )

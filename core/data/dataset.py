"""What trainers receive: map-style datasets of tokenized examples, read lazily from a store."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .encode import IGNORE
from .store import TokenStore


class TokenDataset(Sequence):
    """Documents ``lo``..``hi`` of a :class:`~qpeft.data.store.TokenStore` as training examples.

    ``len(ds)`` is the number of examples, ``ds[i]`` one example as a dict of lists:
    ``input_ids``, ``labels`` (``-100`` where no loss is taken) and, for packed data,
    ``position_ids``; ``ds[i:j]`` a list of them. Nothing is read until an example is asked
    for, so the dataset costs a few bytes per document whatever the corpus size.

    With ``packed``, consecutive documents are concatenated into rows of at most
    ``max_length`` tokens (documents are never split; see :func:`qpeft.data.pack`, whose
    rows these are, built lazily from the store).
    """

    def __init__(self, store: TokenStore, lo: int, hi: int, *, max_length: int, packed: bool = False):
        import numpy as np

        self.store, self.lo, self.hi = store, lo, hi
        self.max_length, self.packed = max_length, packed
        self._rows = None
        if packed:
            lengths = np.diff(store.offsets[lo : hi + 1])
            starts = [lo]
            width = 0
            for i, n in enumerate(lengths.tolist()):
                if width and width + n > max_length:
                    starts.append(lo + i)
                    width = 0
                width += n
            starts.append(hi)
            self._rows = np.array(starts if hi > lo else [lo], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows) - 1 if self.packed else self.hi - self.lo

    @property
    def n_documents(self) -> int:
        return self.hi - self.lo

    @property
    def n_tokens(self) -> int:
        """Tokens of all examples (padding not counted)."""
        off = self.store.offsets
        return int(off[self.hi] - off[self.lo])

    @property
    def fingerprint(self) -> str:
        """Identifies the examples: the store's key, the documents and the packing."""
        text = f"{self.store.key}:{self.lo}:{self.hi}:{self.max_length if self.packed else 0}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} of {n}")
        if not self.packed:
            ids, targets = self.store.document(self.lo + i)
            return _example(ids, targets)
        return self._packed_row(int(self._rows[i]), int(self._rows[i + 1]))

    def _packed_row(self, first: int, end: int) -> dict:
        import numpy as np

        off = self.store.offsets
        lo, hi = int(off[first]), int(off[end])
        ids = self.store.tokens[lo:hi].astype(np.int64)
        labels = np.where(self.store.targets[lo:hi] != 0, ids, IGNORE)
        starts = off[first:end] - lo
        labels[starts] = IGNORE  # a document's first token is never a target (it would be predicted from the last one)
        lengths = np.diff(off[first : end + 1])
        positions = np.arange(hi - lo) - np.repeat(starts, lengths)
        return {"input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": positions.tolist()}

    def label_tokens(self) -> int:
        """Loss targets of all examples (after packing's masking of first tokens)."""
        off = self.store.offsets
        total = int(self.store.targets[int(off[self.lo]) : int(off[self.hi])].sum(dtype="int64"))
        if self.packed and self.hi > self.lo:
            total -= int(self.store.targets[off[self.lo : self.hi]].sum(dtype="int64"))
        return total

    def __repr__(self) -> str:
        kind = f"packed into rows of {self.max_length}" if self.packed else "documents"
        return f"TokenDataset({len(self)} examples, {kind}, {self.n_tokens:,} tokens, store {self.store.key})"


def _example(ids, targets) -> dict:
    import numpy as np

    ids = ids.astype(np.int64)
    return {"input_ids": ids.tolist(), "labels": np.where(targets != 0, ids, IGNORE).tolist()}

"""The token store: a data source tokenized once into flat, memory-mapped arrays on disk.

A store is a folder under ``$QPEFT_CACHE/tokens/`` (default ``~/.cache/qpeft/tokens``) named
by a key that hashes everything that decides its contents: the bytes of the source (a file,
or every file of a ``datasets`` folder), the tokenizer (its vocabulary, merges, normalizer,
special tokens and chat template), the data format, ``max_length``, ``too_long`` and
:data:`STORE_VERSION`. Change any of these, even by rewriting a file with the same size and
time stamp, and the key changes; the same source seen again, by a later run or by another
rank, maps the existing store instead of tokenizing it again.

Layout (every array little-endian, ``n`` documents, ``t`` tokens)::

    tokens.bin   uint16 or uint32 [t]   token ids of every kept document, back to back
    targets.bin  uint8 [t]              1 where the token is a loss target (labels = ids there)
    offsets.bin  int64 [n + 1]          document i is tokens[offsets[i]:offsets[i + 1]]
    records.bin  int64 [n]              the source record (0-based, counting every record
                                        read) each document came from; splits select by it
    meta.json                           counts, format, key parts, the rows that were cut,
                                        truncated, dropped or skipped (replayed as messages)

A store is built in a temporary folder and renamed into place (never half-written); a
lock file makes concurrent builders of one key wait for the first one instead of repeating
it. Records are read one at a time and tokenized in chunks by a pool of worker processes,
so neither the source nor its tokens are ever held in memory whole.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..io import MetadataError, atomic_dir, folder_lock, read_json_file
from .encode import IGNORE, encode_rows, report
from .records import check_rows, detect_format, iter_records

#: Bumped whenever the encoding of a record changes, so that old stores are not reused.
STORE_VERSION = 1
#: Records per chunk handed to a tokenizing worker.
CHUNK_RECORDS = 512
#: Sources smaller than this are tokenized in the calling process (a pool costs ~1 s to start).
POOL_MIN_BYTES = 4 << 20
_FILES = ("tokens.bin", "targets.bin", "offsets.bin", "records.bin")


def cache_root() -> Path:
    """Folder holding token stores: ``$QPEFT_CACHE/tokens`` or ``~/.cache/qpeft/tokens``."""
    return Path(os.environ.get("QPEFT_CACHE") or Path.home() / ".cache" / "qpeft") / "tokens"


def source_digest(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a data file's bytes, or of every file in a folder (names and bytes, sorted).

    The whole source is read every time (about 1.5 GB/s): a size and time stamp can stay the
    same while the content changes, and a stale store would train on the old data."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def tokenizer_digest(tok) -> str:
    """sha256 of what decides a tokenizer's output: its model (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens), special tokens and chat template."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    special = {k: str(v) for k, v in sorted(getattr(tok, "special_tokens_map", {}).items())}
    h.update(json.dumps([special, tok.eos_token_id, tok.bos_token_id, getattr(tok, "chat_template", None)], default=str).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class StoreSpec:
    """What a store is built from (its key is a hash of all of it except ``name``)."""

    path: Path  # the data file or folder
    source: str  # how messages name it (the path as the user wrote it)
    key: str  # the config key that names it, for errors
    fmt: str
    max_length: int
    too_long: str

    def store_key(self, tok, digest: str | None = None) -> str:
        parts = {
            "version": STORE_VERSION,
            "source": digest or source_digest(self.path),
            "tokenizer": tokenizer_digest(tok),
            "format": self.fmt,
            "max_length": self.max_length,
            "too_long": self.too_long,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


class TokenStore:
    """A built store, memory-mapped read-only. ``offsets`` and ``records`` are small (one
    entry per document) and read into memory; ``tokens`` and ``targets`` stay on disk and are
    paged in as documents are read."""

    def __init__(self, folder: Path):
        import numpy as np

        self.folder = Path(folder)
        self.meta = read_json_file(self.folder / "meta.json")
        self.key = self.meta["key"]
        n, t = self.meta["documents"], self.meta["tokens"]
        dtype = np.dtype(self.meta["dtype"])
        expected = {"tokens.bin": t * dtype.itemsize, "targets.bin": t, "offsets.bin": (n + 1) * 8, "records.bin": n * 8}
        for name, size in expected.items():
            actual = (self.folder / name).stat().st_size
            if actual != size:
                raise ValueError(f"{self.folder / name}: {actual} bytes, expected {size}")
        self.tokens = _map(self.folder / "tokens.bin", dtype, t)
        self.targets = _map(self.folder / "targets.bin", np.uint8, t)
        self.offsets = np.fromfile(self.folder / "offsets.bin", dtype=np.int64)
        self.records = np.fromfile(self.folder / "records.bin", dtype=np.int64)

    @property
    def n_documents(self) -> int:
        return len(self.records)

    @property
    def n_records(self) -> int:
        """Records read from the source (kept or not)."""
        return self.meta["records"]

    def document(self, i: int) -> tuple:
        """(token ids, target mask) of document ``i`` as numpy views of the mapped files."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[lo:hi], self.targets[lo:hi]

    def replay_messages(self, say) -> None:
        """Say again what was cut, truncated, dropped or skipped when the store was built."""
        m = self.meta
        report(m["source"], m["max_length"], m["too_long"], m["long_rows"], m["cut_rows"], m["empty_rows"], say)


def _map(path: Path, dtype, count: int):
    import numpy as np

    if count == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def first_record_format(path: Path, key: str, source: str, fmt: str) -> str:
    """``fmt``, or (for "auto") the format detected from the source's first record."""
    if fmt != "auto":
        return fmt
    first = next(iter_records(path, key))
    return detect_format(first, source, "data.format")


def open_store(spec: StoreSpec, tok, *, say=None, workers: int | None = None) -> TokenStore:
    """The store for ``spec`` and ``tok``: mapped if it exists, else built first (rows are
    validated and tokenized as they are read; a bad row fails with :class:`ConfigError`
    naming the file and row, and leaves no store behind)."""
    digest = source_digest(spec.path)
    key = spec.store_key(tok, digest)
    folder = cache_root() / key
    store = _try_open(folder)
    if store is None:
        # Ranks and concurrent runs that need the same store take turns: the first builds it,
        # the others then find it built.
        with folder_lock(cache_root() / ".locks" / key, "building a token store", wait=True):
            store = _try_open(folder)
            if store is None:
                _build(spec, tok, key, digest, folder, say, workers)
                store = _try_open(folder)
        if store is None:
            raise ConfigError(spec.key, f"{spec.source}: the token store {folder} could not be read back after building it")
    elif say:
        say(f"{spec.source}: token store {folder} ({store.meta['tokens']:,} tokens)")
    if say:
        store.replay_messages(say)
    return store


def _try_open(folder: Path) -> TokenStore | None:
    if not (folder / "meta.json").is_file():
        return None
    try:
        return TokenStore(folder)
    except (OSError, ValueError, KeyError, TypeError, MetadataError):
        return None  # damaged (by hand: stores are written atomically): built again


def _workers(requested: int | None, size: int) -> int:
    if requested is not None:
        return requested
    if size < POOL_MIN_BYTES:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


def _build(spec: StoreSpec, tok, key: str, digest: str, folder: Path, say, workers: int | None) -> None:
    import numpy as np

    size = sum(p.stat().st_size for p in spec.path.rglob("*") if p.is_file()) if spec.path.is_dir() else spec.path.stat().st_size
    n_workers = _workers(workers, size)
    dtype = np.uint16 if len(tok) <= 1 << 16 else np.uint32
    meta = {
        "key": key,
        "version": STORE_VERSION,
        "source": spec.source,
        "path": str(spec.path),
        "source_sha256": digest,
        "format": spec.fmt,
        "max_length": spec.max_length,
        "too_long": spec.too_long,
        "dtype": np.dtype(dtype).name,
        "records": 0,
        "documents": 0,
        "tokens": 0,
        "targets": 0,
        **{name: {"first": [], "count": 0} for name in ("long_rows", "cut_rows", "empty_rows")},
    }
    progress = _Progress(spec.source, say)
    with atomic_dir(folder) as tmp:
        files = {name: (tmp / name).open("wb") for name in _FILES}
        try:
            files["offsets.bin"].write(np.zeros(1, dtype=np.int64).tobytes())
            rows = check_rows(iter_records(spec.path, spec.key), spec.fmt, spec.source, spec.key)
            # closing(): on an error or Ctrl-C the pool is shut down here, before the process may
            # exit, not whenever the suspended generator is collected (workers still starting
            # would then find their parent gone and print a traceback).
            with contextlib.closing(_encoded_chunks(rows, spec, tok, n_workers)) as chunks:
                for chunk in chunks:
                    _append(files, chunk, meta, dtype)
                    progress.update(meta["records"], meta["tokens"])
        finally:
            for f in files.values():
                f.close()
            progress.close()
        meta["seconds"] = round(progress.elapsed, 2)
        meta["workers"] = n_workers
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if say:
        rate = meta["tokens"] / max(progress.elapsed, 1e-9)
        say(
            f"{spec.source}: tokenized {meta['records']:,} records into {meta['documents']:,} documents, {meta['tokens']:,} tokens "
            f"in {progress.elapsed:.1f}s ({rate:,.0f} tokens/s, {max(n_workers, 1)} process{'es' if n_workers > 1 else ''}); store {folder}"
        )


def _append(files: dict, chunk: dict, meta: dict, dtype) -> None:
    import numpy as np

    lengths = chunk["lengths"]
    files["tokens.bin"].write(chunk["tokens"].astype(dtype, copy=False).tobytes())
    files["targets.bin"].write(chunk["targets"].tobytes())
    files["offsets.bin"].write((meta["tokens"] + np.cumsum(lengths, dtype=np.int64)).tobytes())
    files["records.bin"].write((meta["records"] + chunk["records"]).tobytes())
    meta["records"] += chunk["n_records"]
    meta["documents"] += len(lengths)
    meta["tokens"] += int(lengths.sum())
    meta["targets"] += int(chunk["targets"].sum())
    for name in ("long_rows", "cut_rows", "empty_rows"):
        seen = meta[name]  # messages name the first few rows and count them all
        seen["first"].extend(chunk[name][: max(0, 5 - len(seen["first"]))])
        seen["count"] += len(chunk[name])


def _encoded_chunks(rows, spec: StoreSpec, tok, n_workers: int):
    """Encoded chunks of ``rows`` in order: in this process, or by ``n_workers`` processes
    with at most two chunks each in flight (memory stays bounded)."""
    batches = _batches(rows, CHUNK_RECORDS)
    args = (spec.fmt, spec.max_length, spec.too_long, spec.source)
    if n_workers == 0:
        for batch in batches:
            yield _encode_chunk(batch, tok, *args)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads and a model
    pool = ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker, initargs=(pickle.dumps(tok),))
    pending = collections.deque()
    try:
        for batch in batches:
            pending.append(_submit(pool, batch, args))
            if len(pending) >= 2 * n_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _submit(pool, batch: list, args: tuple):
    """``pool.submit`` with SIGINT blocked in this thread: a worker process the submit starts
    inherits the blocked signal through exec, so a Ctrl-C while it is still importing cannot
    print its traceback (its initializer then ignores SIGINT for good); a Ctrl-C meanwhile
    reaches this process as soon as the submit returns."""
    if not hasattr(signal, "pthread_sigmask"):
        return pool.submit(_encode_chunk, batch, None, *args)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(_encode_chunk, batch, None, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _batches(rows, size: int):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_WORKER_TOKENIZER = None


def _init_worker(tok_bytes: bytes) -> None:
    global _WORKER_TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _WORKER_TOKENIZER = pickle.loads(tok_bytes)


def _encode_chunk(rows: list, tok, fmt: str, max_length: int, too_long: str, source: str) -> dict:
    """Encode a chunk of rows into flat arrays (runs in a worker when ``tok`` is None)."""
    import numpy as np

    enc = encode_rows(rows, fmt, tok or _WORKER_TOKENIZER, max_length, too_long=too_long, source=source)
    ids = [np.asarray(i, dtype=np.int64) for i, _ in enc.examples]
    labels = [np.asarray(l, dtype=np.int64) for _, l in enc.examples]
    tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    targets = labels != IGNORE
    if not np.array_equal(labels[targets], tokens[targets]):  # the store keeps labels as a mask of the ids
        raise AssertionError("a label differs from its input id")
    return {
        "tokens": tokens,
        "targets": targets.astype(np.uint8),
        "lengths": np.array([len(i) for i in ids], dtype=np.int64),
        "records": np.array(enc.indices, dtype=np.int64),
        "n_records": len(rows),
        "long_rows": enc.long_rows,
        "cut_rows": enc.cut_rows,
        "empty_rows": enc.empty_rows,
    }


class _Progress:
    """A spinner with records and tokens on a terminal; a line every 10 s otherwise."""

    def __init__(self, source: str, say):
        self.source, self.say = source, say
        self.t0 = self.last = time.perf_counter()
        self.live = None
        if say and sys.stdout.isatty():
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.live = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True)
            self.live.start()
            self.task = self.live.add_task(f"tokenizing {source}")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, records: int, tokens: int) -> None:
        text = f"tokenizing {self.source}: {records:,} records, {tokens:,} tokens"
        if self.live is not None:
            self.live.update(self.task, description=text)
        elif self.say and time.perf_counter() - self.last > 10:
            self.last = time.perf_counter()
            self.say(text)

    def close(self) -> None:
        if self.live is not None:
            with contextlib.suppress(Exception):
                self.live.stop()
            self.live = None

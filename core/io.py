"""Atomic writes: a crash or an interrupt never leaves a half-written output where a later
run would read it, and never destroys the previous complete output.

* Every output is written under a hidden temporary name beside its target (``.NAME.qpeft-PID-…``),
  flushed to disk, then renamed over the target in one step. A folder replaces an existing
  folder with Linux's ``renameat2(RENAME_EXCHANGE)``, so the target path always holds a
  complete folder, old or new; elsewhere the old folder is moved aside first and put back by
  the next write if the writer died in between.
* The writer holds an exclusive ``flock`` on its temporary file or folder until it is renamed
  into place: the next write to the same target removes only temporaries whose lock it can
  take, i.e. what a killed writer (``kill -9``, power loss) left behind — never a live writer's,
  whatever process or PID namespace it runs in (a PID says nothing across namespaces or
  machines sharing a file system). Where the file system has no locks, nothing is removed.
* :func:`folder_lock`: one writer per output folder (``qpeft run``).
* An OS-level write failure (disk full, quota, file size limit, permissions) becomes a
  one-line :class:`~qpeft.errors.QpeftError` naming the target and saying that the previous
  version is unchanged.
* JSON outputs are valid JSON: NaN and ±inf are written as ``null`` (:func:`finite_json`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

from .errors import QpeftError

#: Rust writers (safetensors) report OS errors as text: "... (os error 28)".
_OS_ERROR_TEXT = re.compile(r"os error (\d+)")
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: Failures of the write itself; others (a missing input file, say) propagate unchanged.
_WRITE_ERRNOS = _SPACE_ERRNOS | {errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


#: The lock file of :func:`folder_lock`.
LOCK_FILE = ".qpeft.lock"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.qpeft-{os.getpid()}-"


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive flock on ``fd`` without waiting: True, False (someone holds it), or
    None where the file system cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        return None
    return True


def _hold(path: Path) -> int | None:
    """Open ``path`` (file or folder) and lock it: the fd to keep open while writing it, or
    None (already gone, or no locks here)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    if _try_lock(fd):
        return fd
    os.close(fd)
    return None


def _release(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


#: A temporary that was just created and is not locked yet; cleaned only when this old.
_UNLOCKED_GRACE_S = 600


def is_stale(entry: str | Path) -> bool:
    """True when ``entry`` (a writer's temporary) has no live writer: its lock can be taken.

    False while any process, in any PID namespace or on any machine sharing the file system,
    holds it, and where the file system cannot lock at all (then nothing is removed)."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return not os.path.lexists(entry) or os.path.islink(entry)
    try:
        return bool(_try_lock(fd))
    finally:
        os.close(fd)  # closing releases the probe's lock


def clean_stale(target: str | Path) -> None:
    """Remove temporary files and folders that a killed writer left beside ``target``, and
    put back a previous ``target`` that a killed writer had moved aside (non-Linux fallback).
    Only entries whose writer's lock can be taken are touched (:func:`is_stale`)."""
    target = Path(target)
    prefix = f".{target.name}."
    try:
        entries = [e for e in target.parent.iterdir() if e.name.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        m = re.fullmatch(r"qpeft-\d+-[^.]*\.(tmp|new)|qpeft-old-\d+", entry.name[len(prefix) :])
        if not m or not is_stale(entry):
            continue
        if m.group(1) == "new":  # created, not yet locked by its writer: only when long dead
            with contextlib.suppress(OSError):
                if time.time() - entry.lstat().st_mtime < _UNLOCKED_GRACE_S:
                    continue
        if m.group(1) is None and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(folder: bool) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the process's umask: the temporaries
    (``mkstemp``: 0600, ``mkdtemp``: 0700) become what the user expects of an output."""
    return (0o777 if folder else 0o666) & ~_umask()


def _locked_temp(target: Path, *, folder: bool) -> tuple[Path, int | None]:
    """A new temporary beside ``target``, locked by this process before it takes the name
    that :func:`clean_stale` removes when unlocked: (path, fd holding the lock)."""
    make = tempfile.mkdtemp if folder else tempfile.mkstemp
    made = make(prefix=_tmp_prefix(target), suffix=".new", dir=target.parent)
    new = Path(made if folder else made[1])
    if folder:
        fd = _hold(new)
    else:
        fd = made[0]
        _try_lock(fd)  # where the file system cannot lock, clean_stale removes nothing either
        os.fchmod(fd, _mode(folder=False))
    tmp = new.with_name(new.name[: -len(".new")] + ".tmp")
    try:
        os.rename(new, tmp)
    except BaseException:
        _release(fd)
        shutil.rmtree(new, ignore_errors=True) if folder else new.unlink(missing_ok=True)
        raise
    return tmp, fd


class OutputBusy(QpeftError):
    """Another process is writing to the same output folder."""


def _open_lock_file(path: Path) -> int:
    """Open (creating) the lock file itself: never what a symlink planted in its place points
    at (the lock's text would overwrite it, and its removal would leave it), never a FIFO or
    device (``O_NONBLOCK``: opening one does not wait)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise QpeftError(f"{path} is a symbolic link, not qpeft's lock file; qpeft will not write through it: remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QpeftError(f"{path} is not a regular file, so not qpeft's lock file: remove it")
    return fd


@contextlib.contextmanager
def folder_lock(directory: str | Path, what: str = "qpeft run", *, wait: bool = False):
    """Hold ``DIRECTORY/.qpeft.lock`` (an exclusive ``flock``) while ``what`` writes there.

    A second holder fails at once with :class:`OutputBusy` naming the folder and the holder
    (pid, host and start time, read from the lock file), or with ``wait`` blocks until the
    first one is done. The lock file is removed on release (a kill leaves it; the next holder
    takes it, since the kernel released the lock)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    while True:
        fd = _open_lock_file(path)
        got = _try_lock(fd)
        if got is False and wait:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a Ctrl-C interrupts the wait
            except BaseException:
                os.close(fd)
                raise
            got = True
        if got is False:
            try:
                holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "a process that has not said who it is"
            finally:
                os.close(fd)
            raise OutputBusy(
                f"{directory} is in use by another writer ({holder}; lock file {path}); wait for it to finish or use another output folder"
            )
        try:  # the holder before us may have removed the file between our open and our lock
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same or got is None:
            break
        os.close(fd)
    try:
        info = f"{what}, pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode() + b"\n", 0)
        yield path
    finally:
        if got:
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).renameat2
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step (Linux ``RENAME_EXCHANGE``); False where the
    kernel, libc or file system cannot, so the caller falls back to two renames."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class WriteError(QpeftError):
    """An OS-level write failure (``errno``), reported in one line naming the output."""

    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno = errno_


def write_error(target: Path, exc: BaseException, existed: bool) -> WriteError | None:
    """A one-line error naming ``target`` for an OS-level write failure, else None."""
    code = getattr(exc, "errno", None) if isinstance(exc, (OSError, WriteError)) else None
    if code is None:
        m = _OS_ERROR_TEXT.search(str(exc))
        if not m:
            return None
        code = int(m.group(1))
    if code not in _WRITE_ERRNOS:
        return None
    what = f"the previous {target} is unchanged" if existed else f"nothing was written to {target}"
    hint = "; free some space and run again" if code in _SPACE_ERRNOS else ""
    return WriteError(f"could not write {target}: {os.strerror(code)} (errno {code}); {what}{hint}", code)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    existed = path.exists()
    tmp = fd = None
    try:
        tmp, fd = _locked_temp(path, folder=False)
        view = memoryview(text.encode("utf-8"))
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.replace(tmp, path)  # still locked: no cleaner can take it before the rename
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _release(fd)
        err = write_error(path, exc, existed)
        if err is not None:
            raise err from None
        raise
    _release(fd)
    _fsync_dir(path.parent)


#: The most qpeft reads of a metadata file (a config.json, qpeft.json, adapter_config.json, a
#: shard index, summary.json): any real one is far smaller; a larger (or sparse) one is not read
#: into memory.
MAX_METADATA_BYTES = 64 << 20


class MetadataError(QpeftError):
    """A metadata file that cannot be read as what it claims to be; ``reason`` without the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_metadata_bytes(path: str | Path, max_bytes: int = MAX_METADATA_BYTES) -> bytes:
    """The bytes of a small file qpeft reads as metadata: never waits on a FIFO or device
    (``O_NONBLOCK``, regular files only), never reads more than ``max_bytes``. OS errors (a
    missing file) propagate as they are."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MetadataError(path, "not a regular file (a FIFO, socket or device would block the read)")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > max_bytes:
        raise MetadataError(path, f"larger than {max_bytes:,} bytes, which no metadata file qpeft reads is")
    return raw


def read_json_file(path: str | Path, max_bytes: int = MAX_METADATA_BYTES):
    """Parse a JSON metadata file (:func:`read_metadata_bytes`); anything wrong with its content
    (not UTF-8, not JSON, nested past Python's recursion limit) is a :class:`MetadataError`."""
    raw = read_metadata_bytes(path, max_bytes)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MetadataError(Path(path), "not UTF-8 text") from None
    except RecursionError:
        raise MetadataError(Path(path), "nested too deeply to be metadata") from None
    except ValueError as exc:
        raise MetadataError(Path(path), f"not valid JSON ({getattr(exc, 'msg', exc)})") from None


def finite_json(data):
    """``data`` with every non-finite float (NaN, ±inf) replaced by None.

    JSON has no NaN or Infinity (Python's ``json`` writes them as bare ``NaN``/``Infinity``,
    which strict parsers refuse). A non-finite number in what qpeft writes means "could not be
    computed" — a perplexity that overflowed (``exp`` of a large finite loss: the loss itself is
    in the file), a comparison of logits that were not finite — so it is written as ``null``,
    like any missing value. Runs whose loss or weights are non-finite fail before writing
    (:mod:`qpeft.integrity`)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def dumps_json(data, **kwargs) -> str:
    """``json.dumps`` that never writes NaN/Infinity (:func:`finite_json`); other objects as ``str``."""
    kwargs.setdefault("default", str)
    return json.dumps(finite_json(data), allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, data) -> None:
    """Write ``data`` as indented, valid JSON atomically: non-finite floats become ``null``
    (:func:`finite_json`), and ``allow_nan=False`` guarantees none is left."""
    atomic_write_text(path, dumps_json(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, replace: bool = True):
    """Yield a temp folder beside ``target``; on success it replaces ``target`` in one rename.

    The target path holds the old complete folder until the new one is complete and flushed,
    then the new one (swapped in atomically on Linux; elsewhere the old one is moved aside
    first and restored by the next write if the writer was killed in between). On error the
    temp folder is removed and ``target`` is untouched; OS-level write failures (disk full)
    are raised as a one-line QpeftError naming ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists (use --force to replace it)")
    existed = target.exists()
    tmp = old = fd = old_fd = None
    try:
        tmp, fd = _locked_temp(target, folder=True)  # locked until renamed into place
        os.chmod(tmp, _mode(folder=True))
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, _mode(folder=False))  # libraries' own temp-and-rename writers leave 0600
                ffd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(ffd)
                finally:
                    os.close(ffd)
        _fsync_dir(tmp)
        if not target.exists():
            os.replace(tmp, target)
        elif not _exchange(tmp, target):  # after a swap, tmp holds the old folder
            old = target.with_name(f".{target.name}.qpeft-old-{os.getpid()}")
            old_fd = _hold(target)  # no cleaner puts it back while it is aside
            os.replace(target, old)
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _release(fd)
        _release(old_fd)
        err = write_error(target, exc, existed)
        if err is not None:
            raise err from None
        raise
    _release(fd)
    _release(old_fd)
    for leftover in (tmp, old):
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def deferred_interrupts():
    """Hold off Ctrl-C (SIGINT) and SIGTERM for the duration, then raise KeyboardInterrupt if
    one came: for writes that belong together (a run's adapter and its summary), so an
    interrupt leaves both or neither. Outside the main thread it does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def remember(signum, frame):
        caught.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt

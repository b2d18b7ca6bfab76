"""The one atomic writer (and its readers) for every file cfbench writes, and the store's locks.

Every file -- records, models, checkpoints, caches, score arrays, examples, reports and
tables -- is written to a unique temporary name in its target folder (``mkstemp``), flushed,
fsynced, given mode 0644 (``mkstemp`` creates 0600; results are meant to be shared) and
renamed over the target with ``os.replace``: a reader never sees half a file, two writers
never share a temporary name, and a failed write leaves nothing behind.

Leftovers of killed writers.  A ``SIGKILL`` between ``mkstemp`` and ``os.replace`` leaves the
temporary file.  Its name says who wrote it: ``.<target>.<host>.<pid>.<random>.tmp``.  It is
*stale* when its host is this host and its process is gone, or -- a temporary of another host
or of an older cfbench, whose writer cannot be asked -- when it is older than
:data:`STALE_AGE_SECONDS` (no write takes that long).  The writer removes the stale
temporaries of the file it has just written (so a rerun that rewrites a file also removes
what its killed predecessor left), the runner sweeps a run folder before using it, and
``cfbench doctor --fix`` sweeps a whole store.  A live writer's temporary is never touched.

An ``OSError`` (disk full, read-only file system, no permission) leaves no temporary and no
partial target, and carries the target's path (``e.filename``) so the message names it.

Locks: :func:`file_lock` is an exclusive ``fcntl.flock`` on a lock file; the kernel releases
it when its holder dies, so a killed holder never blocks anyone.  Lock files are left in
place (removing one while another process waits on it would let two holders in).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
LOCK_SUFFIX = ".lock"
#: a temporary whose writer cannot be checked (another host, an older cfbench) is stale after this
STALE_AGE_SECONDS = 3600.0

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
#: ``.<target>.<host>.<pid>.<random>.tmp`` (host, pid and the mkstemp part contain no dots)
_TMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<rand>[a-z0-9_]+)\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def temp_target(path: str | Path) -> str | None:
    """The target file name of a temporary written by :func:`atomic_write` (or by an older
    cfbench, ``.<target>.<random>.tmp``), or None if ``path`` is not such a temporary."""
    name = Path(path).name
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    m = _TMP_RE.match(name)
    if m:
        return m.group("target")
    stem = name[1:-len(TMP_SUFFIX)]
    return stem.rpartition(".")[0] or None


def is_stale_temp(path: str | Path, *, now: float | None = None) -> bool:
    """True if ``path`` is a temporary of :func:`atomic_write` whose writer is gone (see the
    module docstring); False for a live writer's temporary and for any other file."""
    path = Path(path)
    if temp_target(path) is None:
        return False
    m = _TMP_RE.match(path.name)
    if m and m.group("host") == _HOST:
        return not _pid_alive(int(m.group("pid")))
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_AGE_SECONDS


def stale_temps(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Stale temporaries under ``root`` (sorted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    it = root.rglob(f".*{TMP_SUFFIX}") if recursive else root.glob(f".*{TMP_SUFFIX}")
    return sorted(p for p in it if p.is_file() and is_stale_temp(p))


def remove_stale_temps(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Remove the stale temporaries under ``root``; returns the removed paths."""
    out = []
    for p in stale_temps(root, recursive=recursive):
        with contextlib.suppress(OSError):  # gone already, or a read-only store: best effort
            p.unlink()
            out.append(p)
    return out


def _sweep_target(path: Path) -> None:
    """Remove stale temporaries of ``path`` (its own killed predecessors) from its folder."""
    try:
        for p in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
            if temp_target(p) == path.name and is_stale_temp(p):
                p.unlink(missing_ok=True)
    except OSError:  # cleaning up is best effort; the write itself succeeded
        pass


@contextlib.contextmanager
def file_lock(path: str | Path, *, blocking: bool = True, on_wait: Callable[[], None] | None = None
              ) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the lock file ``path`` (created, parents too).

    Yields True once held.  With ``blocking=False`` it yields False at once if another process
    holds it; otherwise ``on_wait()`` is called once before waiting.  Released on exit, and by
    the kernel if this process dies.

    In a folder this process cannot write (a read-only file system, no permission) an existing
    lock file is locked read-only (``flock`` needs no write access), and a missing one is not
    needed: this process cannot write there either, so it has nothing to guard -- reading a
    finished result from a read-only store works, and a write fails with its own clear error."""
    import fcntl

    path = Path(path)
    waited = False
    while True:
        fd = _open_lock(path)
        if fd is None:
            yield True
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                os.close(fd)
                yield False
                return
            if on_wait is not None and not waited:
                on_wait()
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        # the file may have been moved or removed while we waited (a run folder replaced by
        # --force): the lock that counts is the one on the file now at ``path``
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _open_lock(path: Path) -> int | None:
    """A descriptor of the lock file (created if need be), or None where it cannot exist and is
    not needed (see :func:`file_lock`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lock_path(path: str | Path) -> Path:
    """The lock file guarding ``path``: ``.<name>.lock`` next to it."""
    path = Path(path)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


def is_locked(path: str | Path) -> bool:
    """True if another process holds the lock file ``path`` right now."""
    if not Path(path).exists():
        return False
    with file_lock(path, blocking=False) as held:
        return not held


def clean(obj: Any) -> Any:
    """JSON-safe: NaN becomes None, inf 'inf', tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object opened on a unique
    temporary file next to ``path``; it is fsynced, made 0644 and renamed over ``path``.

    On any failure the temporary is removed and the target is left as it was; an ``OSError``
    without a file name gets ``path`` as its ``filename``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=TMP_SUFFIX,
                                   dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise
    _sweep_target(path)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Pretty JSON (NaN/inf made JSON-safe first; never emits NaN)."""
    return atomic_write_text(path, json.dumps(clean(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_tensors_atomic(path: str | Path, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """A safetensors file (torch tensors) with ``meta`` as JSON under the ``cfbench`` metadata key."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"cfbench": json.dumps(clean(meta or {}), default=str)})
    return atomic_write_bytes(path, data)


def load_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and ``cfbench`` metadata of a file written by :func:`save_tensors_atomic` (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("cfbench", "{}"))
    return load_file(str(path)), meta


def read_tensor_meta(path: str | Path) -> dict[str, Any]:
    """Only the ``cfbench`` metadata of a safetensors file (tensors are not read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("cfbench", "{}"))


def save_npz_atomic(path: str | Path, arrays: dict[str, Any]) -> Path:
    """A compressed ``.npz`` of plain numeric arrays (read back with ``allow_pickle=False``)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())

"""The life of a run folder: one worker per run id, reuse, ``--force`` staging, recovery.

Layout of a store ``OUT``::

    OUT/<run-id>/              the run: splits.npz, model.safetensors, ..., record.json (written
                               last); checkpoints/ while it trains
    OUT/<run-id>/.lock         the run's lock (``flock``): one process works on a run id at a time
                               (carried into the new folder by a --force swap, so the lock file a
                               waiter holds stays the one in place)
    OUT/.staging/<run-id>/     a ``--force`` attempt; it replaces OUT/<run-id> only once its own
                               record says ``ok``
    OUT/.trash/<run-id>/       the replaced run while the new one is swapped in (removed at once)

Promises, and how a kill at any instant keeps them:

* **A finished result is replaced only by a finished result.**  ``--force`` runs in
  ``.staging/<run-id>``; when its record is written, :func:`swap_in` renames the old folder
  to ``.trash`` and the new one into place.  A kill between the two renames leaves a
  finished staging folder, and :func:`recover` (called under the run's lock before anything
  else) completes the swap.  A failed or killed ``--force`` leaves the old run untouched
  (its attempt stays in ``.staging`` for inspection, until the next ``--force`` or
  ``cfbench doctor --fix``).
* **A finished run's checkpoints are never resumed.**  The runner deletes ``checkpoints/``
  (and the evaluators' resumable state, ``*_state.safetensors``) after the record's rename;
  if it is killed in between, the next invocation finds the finished record, reuses it and
  deletes the leftovers (:func:`clean_finished`); ``--force`` never looks at them (a fresh
  staging folder).
* **A record that cannot be read is an unfinished run**, never a crash: its command runs
  again (resuming from checkpoints if any) and replaces it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .io import file_lock, remove_stale_temps
from .record import MODEL, RECORD, problems, upgrade

LOCK = ".lock"
STAGING = ".staging"
TRASH = ".trash"
CHECKPOINTS = "checkpoints"
ERROR = "error.txt"
#: an evaluator's resumable state in the run folder is ``<name>`` + this suffix (e.g. AutoAttack's
#: ``autoattack_state.safetensors``): kept until the run's record is written, so that a run killed
#: in a later evaluator does not redo a finished one, then removed with the checkpoints
EVAL_STATE_SUFFIX = "_state.safetensors"


def eval_state_path(run_dir: str | Path, evaluator: str) -> Path:
    """Where ``evaluator`` keeps its resumable state in ``run_dir``."""
    return Path(run_dir) / f"{evaluator}{EVAL_STATE_SUFFIX}"


def eval_state_files(run_dir: str | Path) -> list[Path]:
    """The evaluators' resumable state files in ``run_dir`` (see :data:`EVAL_STATE_SUFFIX`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob(f"*{EVAL_STATE_SUFFIX}") if p.is_file() and not p.is_symlink())


def run_lock_path(out: str | Path, run_id: str) -> Path:
    return Path(out) / run_id / LOCK


@contextlib.contextmanager
def run_lock(out: str | Path, run_id: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the run id's lock (waiting for another process working on it, if any)."""
    with file_lock(run_lock_path(out, run_id), on_wait=on_wait):
        yield


def staging_dir(out: str | Path, run_id: str) -> Path:
    return Path(out) / STAGING / run_id


def trash_dir(out: str | Path, run_id: str) -> Path:
    return Path(out) / TRASH / run_id


def read_record_file(run_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)`` for a usable record (upgraded), ``(None, reason)`` otherwise
    (missing, unreadable, not a JSON object, wrong fields).  Never raises for a bad file."""
    path = Path(run_dir) / RECORD
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    bad = problems(rec)
    if bad:
        return None, "; ".join(bad)
    return upgrade(rec), None


def finished_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's record if the run finished (usable record, status ``ok``, model present),
    else None.  A record written by a newer cfbench is a :class:`UsageError` rather than an
    unfinished run (recomputing would overwrite it)."""
    rec, why = read_record_file(run_dir)
    if rec is None:
        if why and "newer than this cfbench" in why:
            raise UsageError(f"{Path(run_dir) / RECORD}: {why}; or recompute it with --force.")
        return None
    if rec.get("status") != "ok" or not (Path(run_dir) / MODEL).is_file():
        return None
    return rec


def clean_finished(run_dir: str | Path) -> list[Path]:
    """Remove what a finished run no longer needs: its checkpoints, the evaluators' resumable
    state, the ``error.txt`` of an earlier failed attempt and stale temporaries.  Returns what
    was removed."""
    run_dir = Path(run_dir)
    removed = remove_stale_temps(run_dir)
    ck = run_dir / CHECKPOINTS
    if ck.is_dir() and not ck.is_symlink():
        shutil.rmtree(ck, ignore_errors=True)
        removed.append(ck)
    for st in eval_state_files(run_dir):
        with contextlib.suppress(OSError):
            st.unlink()
            removed.append(st)
    err = run_dir / ERROR
    if err.is_file():
        with contextlib.suppress(OSError):  # a read-only store: the finished run is still usable
            err.unlink()
            removed.append(err)
    return removed


def fresh_staging(out: str | Path, run_id: str) -> Path:
    """An empty ``.staging/<run-id>`` (an earlier attempt's folder is removed first)."""
    st = staging_dir(out, run_id)
    if st.exists():
        shutil.rmtree(st)
    st.mkdir(parents=True)
    return st


def swap_in(staging: Path, run_dir: Path, trash: Path) -> None:
    """Replace ``run_dir`` by the finished ``staging`` folder (two renames; see the module
    docstring for a kill in between)."""
    if trash.exists():
        shutil.rmtree(trash)
    trash.parent.mkdir(parents=True, exist_ok=True)
    lock, new_lock = run_dir / LOCK, staging / LOCK
    if lock.exists() and not new_lock.exists():
        os.link(lock, new_lock)  # the same lock file (inode) in the new folder: waiters stay excluded
    if run_dir.exists():
        os.rename(run_dir, trash)
    os.rename(staging, run_dir)
    shutil.rmtree(trash, ignore_errors=True)


def recover(out: str | Path, run_id: str) -> list[str]:
    """Finish what a killed process left half done for ``run_id`` (call under its lock):
    complete an interrupted ``--force`` swap, restore a run left only in ``.trash``, remove
    the trash.  Returns a description of each action."""
    out = Path(out)
    run_dir, st, tr = out / run_id, staging_dir(out, run_id), trash_dir(out, run_id)
    actions = []
    if st.is_dir() and finished_record(st) is not None:
        swap_in(st, run_dir, tr)
        actions.append(f"completed the interrupted --force of {run_id}: the finished attempt replaced the old run")
    elif tr.is_dir() and finished_record(run_dir) is None and finished_record(tr) is not None:
        # the run folder holds no finished run (at most its lock file) but the trash does: put it back
        swap_in(tr, run_dir, trash_dir(out, run_id + ".replaced"))
        actions.append(f"restored {run_dir} from {tr} (an interrupted replacement)")
    if tr.exists():
        shutil.rmtree(tr, ignore_errors=True)
        actions.append(f"removed {tr}")
    for d in (st.parent, tr.parent):
        with contextlib.suppress(OSError):
            d.rmdir()  # only if empty
    return actions


__all__ = [
    "CHECKPOINTS",
    "ERROR",
    "LOCK",
    "STAGING",
    "TRASH",
    "clean_finished",
    "finished_record",
    "fresh_staging",
    "read_record_file",
    "recover",
    "run_lock",
    "run_lock_path",
    "staging_dir",
    "swap_in",
    "trash_dir",
]

"""``cfbench doctor [--fix] [--out DIR]``: what killed processes and damaged files left in a store.

cfbench repairs most of this by itself on the next run of the same command (the writer
removes the stale temporaries of each file it rewrites, a run sweeps its folder, a reused
run drops its leftover checkpoints, a truncated cached model is trained again, a corrupt
signal file is recomputed).  ``doctor`` finds all of it at once, in every run of a store,
including what no later run would touch:

================== ===========================================================  =====================================
finding            what                                                         ``--fix``
================== ===========================================================  =====================================
leftover-temp      ``.<file>.<host>.<pid>.<random>.tmp`` of a writer that is    removed
                   gone (a kill between ``mkstemp`` and the rename); legacy
                   ``.<file>.<random>.tmp`` / ``splits.npz.tmp.npz`` older
                   than an hour
stale-checkpoint   ``checkpoints/`` of a finished run, ``<i>.ckpt/`` of a       removed (never resumed anyway)
                   cached model that exists (a kill between the rename of the
                   record / model and the cleanup); ``error.txt`` or an
                   evaluator's ``*_state.safetensors`` of a
                   finished run; a batched group's ``group-<hash>.ckpt/``
                   once every member it names is a finished model
corrupt-cache      a ``_cache`` safetensors file that cannot be read            removed (recomputed when next needed)
                   (truncated: its header does not cover the file) or a
                   reference model without its metadata; a ``.npz`` that is
                   not a readable zip
corrupt-checkpoint a ``checkpoints/last.safetensors`` (or a ``.ckpt/`` one)      removed (that training restarts)
                   that cannot be read
corrupt-record     a ``record.json`` that is not a JSON object (truncated,      renamed to ``record.json.corrupt``: the
                   ``[]``, ``null``) -- the run counts as unfinished            run is unfinished, its command reruns it
staged-run         a finished ``--force`` attempt whose swap a kill            swap completed
                   interrupted
abandoned-attempt  a failed or killed ``--force`` attempt in ``.staging``;      removed
                   a replaced run left in ``.trash``                            (``.trash``: restored if the run is gone)
================== ===========================================================  =====================================

Nothing that a live process is using is touched: a run whose lock is held, a cached model
whose lock is held and a live writer's temporary are skipped.  Symbolic links are never
followed.  Exit status: 0 if nothing is wrong (or everything found was fixed), 1 if
problems remain; a missing ``--out`` is a usage error (2).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .store.io import (
    STALE_AGE_SECONDS,
    file_lock,
    is_locked,
    is_stale_temp,
    lock_path,
    read_tensor_meta,
    temp_target,
)
from .store.lifecycle import (
    CHECKPOINTS,
    ERROR,
    STAGING,
    TRASH,
    eval_state_files,
    finished_record,
    read_record_file,
    recover,
    run_lock_path,
)
from .store.query import CACHE_DIR
from .store.record import RECORD

#: the training loop's checkpoint file name (``cfbench.training.checkpoint.CKPT_NAME``; not imported
#: here so that building the command line does not import torch -- tests check they agree)
CKPT_NAME = "last.safetensors"


def checkpoint_problem(path: Path) -> str | None:
    from .training.checkpoint import checkpoint_problem as problem

    return problem(path)


def model_file_problem(path: Path) -> str | None:
    from .execution.jobs import model_file_problem as problem

    return problem(path)

KINDS = ("leftover-temp", "stale-checkpoint", "corrupt-cache", "corrupt-checkpoint", "corrupt-record",
         "staged-run", "abandoned-attempt")


@dataclass
class Finding:
    kind: str          # one of KINDS
    path: Path
    reason: str
    action: str        # what --fix does
    fixed: bool = False
    error: str | None = None


def _walk(root: Path):
    """``(dir, subdirs, files)`` under ``root``, symbolic links never followed."""
    yield from os.walk(root, followlinks=False)


def _legacy_temp(p: Path, now: float) -> bool:
    if not p.name.endswith(".tmp.npz"):
        return False
    try:
        return now - p.lstat().st_mtime > STALE_AGE_SECONDS
    except FileNotFoundError:
        return False


def _temps(root: Path, out: list[Finding]) -> None:
    now = time.time()
    for d, _, files in _walk(root):
        for name in files:
            p = Path(d) / name
            if p.is_symlink():
                continue
            if temp_target(p) is not None and is_stale_temp(p, now=now):
                out.append(Finding("leftover-temp", p, f"temporary of {temp_target(p)} whose writer is gone",
                                   "remove"))
            elif _legacy_temp(p, now):
                out.append(Finding("leftover-temp", p, "temporary of an older cfbench", "remove"))


def _run_dirs(root: Path):
    """Folders of runs (holding a record.json or checkpoints/), outside the cache and hidden folders."""
    for d, subdirs, files in _walk(root):
        rel = Path(d).relative_to(root).parts
        if any(part == CACHE_DIR or part.startswith(".") for part in rel):
            subdirs[:] = []
            continue
        if RECORD in files or CHECKPOINTS in subdirs or RECORD in subdirs:
            yield Path(d)


def _runs(root: Path, out: list[Finding]) -> None:
    for run in _run_dirs(root):
        if run == root and not (run / RECORD).exists():
            continue
        if is_locked(run_lock_path(run.parent, run.name)):
            continue  # a process is working on it right now
        rec_path = run / RECORD
        if rec_path.exists() or rec_path.is_symlink():
            rec, why = read_record_file(run)
            if rec is None and why != "missing" and _not_a_json_object(rec_path):
                out.append(Finding("corrupt-record", rec_path, f"{why}; the run counts as unfinished",
                                   "rename to record.json.corrupt"))
        try:
            done = finished_record(run) is not None
        except UsageError:  # written by a newer cfbench: leave it alone
            done = True
        ck = run / CHECKPOINTS
        if done:
            if ck.is_dir() and not ck.is_symlink():
                out.append(Finding("stale-checkpoint", ck, "checkpoints of a finished run", "remove"))
            if (run / ERROR).is_file():
                out.append(Finding("stale-checkpoint", run / ERROR, "error.txt of an earlier attempt of a finished run",
                                   "remove"))
            for st in eval_state_files(run):
                out.append(Finding("stale-checkpoint", st, "resumable evaluator state of a finished run", "remove"))
        elif (ck / CKPT_NAME).is_file():
            problem = checkpoint_problem(ck / CKPT_NAME)
            if problem:
                out.append(Finding("corrupt-checkpoint", ck / CKPT_NAME, problem, "remove (training restarts)"))


def _not_a_json_object(path: Path) -> bool:
    """True if the file's content cannot be a record at all (as opposed to a record with a bad
    field, or one from a newer cfbench, which doctor leaves alone)."""
    try:
        return not isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return True


def _attempts(root: Path, out: list[Finding]) -> None:
    for d, subdirs, _ in _walk(root):
        here = Path(d)
        if here.name == STAGING or here.name == TRASH:
            store = here.parent
            for name in sorted(subdirs):
                path = here / name
                if is_locked(run_lock_path(store, name)):
                    continue
                if here.name == TRASH:
                    gone = finished_record(store / name) is None
                    out.append(Finding("abandoned-attempt", path, "a replaced run left by an interrupted --force",
                                       "restore it (the run is gone)" if gone else "remove"))
                elif finished_record(path) is not None:
                    out.append(Finding("staged-run", path, "a finished --force attempt whose swap was interrupted",
                                       "complete the swap"))
                else:
                    rec, _ = read_record_file(path)
                    state = f"failed: {rec.get('reason')}" if rec else "interrupted"
                    out.append(Finding("abandoned-attempt", path, f"a --force attempt that did not finish ({state})",
                                       "remove"))
            subdirs[:] = []
        elif here.name == CACHE_DIR:
            subdirs[:] = []


def _cache(root: Path, out: list[Finding]) -> None:
    for d, subdirs, files in _walk(root):
        here = Path(d)
        if CACHE_DIR not in here.relative_to(root).parts:
            continue
        in_refmodels = "refmodels" in here.relative_to(root).parts
        # a checkpoint folder (`<i>.ckpt/`, a batched group's `group-<hash>.ckpt/`) holds training
        # checkpoints, not cached models: it is judged as a whole below, from its parent
        for name in ([] if here.name.endswith(".ckpt") else files):
            p = here / name
            if p.is_symlink() or temp_target(p) is not None:
                continue
            if name.endswith(".safetensors"):
                if is_locked(lock_path(p)):
                    continue
                problem = model_file_problem(p) if in_refmodels else _safetensors_problem(p)
                if problem:
                    out.append(Finding("corrupt-cache", p, problem, "remove (recomputed when next needed)"))
            elif name.endswith(".npz"):
                problem = _npz_problem(p)
                if problem:
                    out.append(Finding("corrupt-cache", p, problem, "remove (recomputed when next needed)"))
        for name in subdirs:
            if not name.endswith(".ckpt"):
                continue
            ck = here / name
            if name.startswith("group-"):
                _group_checkpoint_findings(ck, out)
                continue
            model = here / (name[: -len(".ckpt")] + ".safetensors")
            if ck.is_symlink() or is_locked(lock_path(model)):
                continue
            if model.is_file() and model_file_problem(model) is None:
                out.append(Finding("stale-checkpoint", ck, f"checkpoints of {model.name}, which is finished", "remove"))
            elif (ck / CKPT_NAME).is_file() and checkpoint_problem(ck / CKPT_NAME):
                out.append(Finding("corrupt-checkpoint", ck / CKPT_NAME, checkpoint_problem(ck / CKPT_NAME) or "",
                                   "remove (training restarts)"))


def _group_checkpoint_findings(ck: Path, out: list) -> None:
    """A batched group's ``group-<hash>.ckpt/``: corrupt if unreadable, stale once every member
    it names is a finished model (another group, e.g. after a restart with another pool split,
    trained them); left alone while a member trains or is still missing (it may resume)."""
    f = ck / CKPT_NAME
    if ck.is_symlink() or not f.is_file():
        return
    from .training.checkpoint import checkpoint_meta

    meta, problem = checkpoint_meta(f)
    if meta is None:
        out.append(Finding("corrupt-checkpoint", f, problem, "remove (training restarts)"))
        return
    members = [ck.parent / m for m in meta.get("extra", {}).get("members", [])]
    if not members or any(is_locked(lock_path(m)) for m in members):
        return
    if all(m.is_file() and model_file_problem(m) is None for m in members):
        out.append(Finding("stale-checkpoint", ck, f"checkpoint of a batched group of {len(members)} models, "
                           "all finished", "remove"))


def _safetensors_problem(p: Path) -> str | None:
    try:
        read_tensor_meta(p)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def _npz_problem(p: Path) -> str | None:
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
        return f"member {bad} is damaged" if bad else None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        return f"unreadable ({type(e).__name__}: {e})"


def diagnose(out: str | Path) -> list[Finding]:
    """Everything wrong under the store ``out`` (nothing is changed)."""
    root = Path(out)
    if not root.is_dir():
        raise UsageError(f"{str(out)!r} is not a directory; pass --out DIR with the directory that "
                         "`cfbench run --out DIR` wrote to.")
    found: list[Finding] = []
    _temps(root, found)
    _runs(root, found)
    _attempts(root, found)
    _cache(root, found)
    return found


def repair(findings: list[Finding]) -> list[Finding]:
    """Apply each finding's action (in place: ``fixed`` / ``error``); returns the findings."""
    for f in findings:
        try:
            _apply(f)
            f.fixed = True
        except OSError as e:
            f.error = f"{type(e).__name__}: {e}"
    return findings


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _apply(f: Finding) -> None:
    if f.kind in ("leftover-temp", "stale-checkpoint", "corrupt-checkpoint"):
        _remove(f.path)
    elif f.kind == "corrupt-cache":
        _remove(f.path)
        ck = f.path.with_suffix(".ckpt")  # a cached model's checkpoints belong to the file that is gone
        if ck.is_dir() and not ck.is_symlink():
            shutil.rmtree(ck)
    elif f.kind == "corrupt-record":
        target = f.path.with_name(RECORD + ".corrupt")
        n = 1
        while target.exists():
            n += 1
            target = f.path.with_name(f"{RECORD}.corrupt{n}")
        os.rename(f.path, target)
    elif f.kind == "staged-run" or (f.kind == "abandoned-attempt" and f.path.parent.name == TRASH):
        store, run_id = f.path.parent.parent, f.path.name
        with file_lock(run_lock_path(store, run_id), blocking=False) as held:
            if not held:
                raise BlockingIOError(errno.EAGAIN, "a process is working on this run right now", str(f.path))
            recover(store, run_id)
    elif f.kind == "abandoned-attempt":
        _remove(f.path)
    with contextlib.suppress(OSError):  # empty .staging / .trash folders
        if f.path.parent.name in (STAGING, TRASH):
            f.path.parent.rmdir()


def doctor(out: str | Path, *, fix: bool = False) -> list[Finding]:
    findings = diagnose(out)
    return repair(findings) if fix else findings


def cmd_doctor(args) -> int:
    findings = doctor(args.out, fix=args.fix)
    if not findings:
        print(f"cfbench doctor: {args.out}: nothing to fix")
        return 0
    width = max(len(f.kind) for f in findings)
    for f in findings:
        status = ("fixed: " + f.action) if f.fixed else (f"NOT fixed ({f.error})" if f.error else "--fix: " + f.action)
        print(f"{f.kind:<{width}}  {f.path}\n{'':<{width}}    {f.reason}; {status}")
    left = [f for f in findings if not f.fixed]
    if not args.fix:
        print(f"cfbench doctor: {len(findings)} problem{'s' if len(findings) != 1 else ''} in {args.out}; "
              f"`cfbench doctor --fix --out {args.out}` repairs them")
    elif left:
        print(f"cfbench doctor: fixed {len(findings) - len(left)} of {len(findings)}; {len(left)} could not be fixed",
              file=sys.stderr)
    else:
        print(f"cfbench doctor: fixed {len(findings)} problem{'s' if len(findings) != 1 else ''} in {args.out}")
    return 1 if left else 0


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor", help="find (and with --fix repair) leftovers of killed runs and corrupt cache files",
        description="List what killed processes and damaged files left in a store: temporaries of interrupted "
                    "writes, checkpoints of finished runs, unreadable cache entries (reference models, signals), "
                    "unreadable records and checkpoints, interrupted --force attempts. With --fix, remove or "
                    "repair each (never touching a run or file a live process is using).")
    p.add_argument("--out", default="runs", help="the store: the directory `cfbench run --out` wrote to; default runs/")
    p.add_argument("--fix", action="store_true", help="repair what was found")
    p.set_defaults(func=cmd_doctor)

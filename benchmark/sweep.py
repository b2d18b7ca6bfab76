"""``cfbench sweep grid.toml [more.toml ...]``: a grid of runs, executed locally or on Ray, then
tabulated.  Several grid files run one after the other in one pool (:func:`run_local`).

The grid file (TOML)::

    defense = ["erm", "pgd-at"]      # each top-level list is an axis: defense, dataset,
    dataset = ["digits"]             # model, seed, evaluators (comma-separated names)
    seed = [0, 1, 2]
    evaluators = ["clean,pgd,autoattack,mia"]
    [set]                            # any --set key; a list is an axis, a scalar is fixed
    epochs = 30
    eps = [0.05, 0.1]

Optional top-level keys: ``device`` (default cpu), ``data_dir``.  A scalar anywhere is a
fixed value.  Recipes that need their own settings go into ``[[grid]]`` sub-grids: each is
merged over the top level (its ``[grid.set]`` over the top ``[set]``) and expanded on its
own; the sweep is the concatenation::

    dataset = "digits"
    [set]
    epochs = 15
    [[grid]]
    defense = "cf-at"
    [grid.set]
    p = [0.95, 0.5]
    [[grid]]
    defense = ["erm", "pgd-at"]
  The grid is the Cartesian product of the axes in the order defense, dataset,
model, seed, evaluators, then the ``[set]`` keys as written.

Every point is resolved with :func:`cfbench.config.make_config` *before anything starts*: an
unknown key, defense, dataset, model or evaluator, or a value of the wrong type, is a
:class:`~cfbench.errors.UsageError` (exit 2) naming the point and the bad entry.  Points whose
finished record (same config hash) is already in ``--out`` are skipped.  The rest run as
independent processes -- a local process pool (``--workers``, default the machine's cores)
or Ray tasks (``--executor ray``, ``--address`` for an existing cluster, retried by Ray on
worker loss) -- each run with its declared jobs in-process (so N runs use N cores) and the
reference-model cache shared through its file locks (two runs of one recipe never train
the same reference model twice).  A worker (or, on Ray, a CPU) with no run left to start
(a sweep's tail, or fewer runs than workers) helps a running run: it trains that run's
declared reference models, last first, while the run trains its target and evaluates
(:func:`prefetch_jobs`; the run finds them cached, and every result is the same).  A worker
killed mid-run (local pool) breaks the pool; the sweep starts a new pool and re-submits the
unfinished runs, which resume from their checkpoints.  Runs start seed by seed (every
recipe's first seed before any second seed, grid order within a seed), so a sweep stopped
part-way holds every recipe once.  Progress: one line per finished run and an overall bar with an ETA; at the end
a summary table and the sweep's leaderboards (``--leaderboards``, default ``<out>/leaderboards``).
Each run's own progress (one timestamped line per epoch of each model it trains, per attack and
batch of AutoAttack, per evaluator, and its helpers' models) is appended to
``<out>/_cache/logs/<run id>.log`` (:func:`run_log_path`), so an hours-long run can be followed
with ``tail -f`` and a resumed attempt's lines follow the killed one's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing as mp
import os
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig, make_config
from .errors import UsageError, suggest
from .store import RECORD, read_record

AXES = ("defense", "dataset", "model", "seed", "evaluators")
OPTIONS = ("device", "data_dir")
MAX_RESTARTS = 3
#: seconds a helper waits for its run to start (take its lock) before giving up
HELPER_START_TIMEOUT = 120.0


@dataclass
class Point:
    index: int
    label: str
    cfg: RunConfig
    settings: dict[str, Any]
    #: which grid file of the sweep it comes from (0 for the first): the runs of an earlier grid
    #: get the free workers' help before a later grid's runs start
    stage: int = 0


def _axis(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def load_grid(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read the grid file {str(path)!r}: {e.strerror or e}.") from e
    try:
        grid = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}.") from e
    _check(grid, str(path), top=True)
    subs = grid.get("grid")
    if subs is not None:
        if not isinstance(subs, list) or not all(isinstance(g, dict) for g in subs):
            raise UsageError(f"{path}: `grid` must be an array of tables ([[grid]]).")
        for i, sub in enumerate(subs):
            _check(sub, f"{path} [[grid]] {i + 1}", top=False)
    return grid


def _check(grid: dict[str, Any], where: str, *, top: bool) -> None:
    valid = (*AXES, *OPTIONS, "set") + (("grid",) if top else ())
    for key in grid:
        if key not in valid:
            raise UsageError(f"{where}: unknown key {key!r}. Valid keys: {', '.join(valid)}." + suggest(key, valid))
    if "set" in grid and not isinstance(grid["set"], dict):
        raise UsageError(f"{where}: `set` must be a table ([set]) of --set keys, got {type(grid['set']).__name__}.")
    for key in AXES:
        for v in _axis(grid.get(key, [])):
            want = int if key == "seed" else str
            if not isinstance(v, want) or isinstance(v, bool):
                raise UsageError(f"{where}: {key} values must be {want.__name__}s, got {v!r}.")


def subgrids(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's sub-grids merged over its top level (the grid itself when it has none)."""
    top = {k: v for k, v in grid.items() if k != "grid"}
    if "grid" not in grid:
        return [top]
    out = []
    for sub in grid["grid"]:
        merged = {**top, **{k: v for k, v in sub.items() if k != "set"}}
        merged["set"] = {**top.get("set", {}), **sub.get("set", {})}
        out.append(merged)
    return out


def expand(grid: dict[str, Any], source: str = "grid") -> list[Point]:
    """Every point of the grid, resolved and validated (raises UsageError naming the bad one)."""
    points: list[Point] = []
    for sub in subgrids(grid):
        points += _expand_one(sub, source, start=len(points))
    ids = [p.cfg.run_id() for p in points]
    if len(set(ids)) < len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise UsageError(f"{source}: two grid points resolve to the same run {dup} (a repeated value?).")
    return points


def _expand_one(grid: dict[str, Any], source: str, start: int) -> list[Point]:
    sets = grid.get("set", {})
    axes: list[tuple[str, list[Any]]] = [(k, _axis(grid.get(k, [None]))) for k in AXES]
    axes += [(f"set.{k}", _axis(v)) for k, v in sets.items()]
    names = [k for k, _ in axes]
    points = []
    for i, combo in enumerate(itertools.product(*(vals for _, vals in axes)), start=start):
        chosen = dict(zip(names, combo))
        settings = {k[4:]: (",".join(map(str, v)) if isinstance(v, list) else v)
                    for k, v in chosen.items() if k.startswith("set.")}
        evaluators = chosen["evaluators"]
        label = ", ".join(f"{k}={v}" for k, v in chosen.items() if v is not None and len(dict(axes)[k]) > 1) \
            or f"point {i + 1}"
        try:
            cfg = make_config(dataset=chosen["dataset"] or "digits", defense=chosen["defense"] or "erm",
                              model=chosen["model"], seed=chosen["seed"] if chosen["seed"] is not None else 0,
                              sets=settings,
                              evaluators=[e.strip() for e in evaluators.split(",")] if evaluators else None,
                              device=grid.get("device", "cpu"), data_dir=grid.get("data_dir"))
        except UsageError as e:
            raise UsageError(f"{source}: grid point {i + 1} ({label}): {e}") from e
        points.append(Point(i, label, cfg, settings))
    return points


def finished(cfg: RunConfig, out: Path) -> dict | None:
    path = out / cfg.run_id() / RECORD
    if not path.exists():
        return None
    try:
        rec = read_record(path.parent)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("status") == "ok" else None


def _declared_paths(cfg: RunConfig, out: Path) -> list[Path]:
    """The cache paths of the jobs (membership reference models) run ``cfg`` declares in a
    sweep into ``out``: what ``run_progress`` counts and ``unfinished_state`` lists."""
    from .runner import declared_jobs
    from .store import CACHE_DIR
    from .training.recipe import load_data

    return [Path(j.path) for j in declared_jobs(cfg, load_data(cfg), Path(out) / CACHE_DIR)]


def run_progress(cfg: RunConfig, out: str | Path) -> str:
    """Where an unfinished run of ``out`` stands, in words, from its files alone (nothing is
    loaded but file headers): ``""`` for a run not started; else whether another process holds
    its lock (running) or not (interrupted), the target's state (trained, or the epoch of its
    last checkpoint), how many of its declared reference models are trained (and how many
    half-trained), and which evaluators left resumable state.  ``--dry-run`` prints it next
    to each run it would start, so a sweep that spans sessions shows what a resume reuses."""
    from .store.io import is_locked
    from .store.lifecycle import CHECKPOINTS, EVAL_STATE_SUFFIX, eval_state_files, run_lock_path
    from .store.record import MODEL
    from .training.checkpoint import CKPT_NAME, checkpoint_meta

    out = Path(out)
    run_dir = out / cfg.run_id()
    if not run_dir.is_dir():
        return ""
    parts = ["running" if is_locked(run_lock_path(out, cfg.run_id())) else "interrupted"]
    if (run_dir / MODEL).is_file():
        parts.append("target trained")
    else:
        meta, _ = checkpoint_meta(run_dir / CHECKPOINTS / CKPT_NAME)
        parts.append(f"target at epoch {meta['epoch']}/{cfg.train.epochs}" if meta else "target not trained")
    jobs = _declared_paths(cfg, out)
    if jobs:
        done = sum(p.is_file() for p in jobs)
        half = sum(not p.is_file() and (p.with_suffix(".ckpt") / CKPT_NAME).is_file() for p in jobs)
        parts.append(f"reference models {done}/{len(jobs)} trained" + (f", {half} half-trained" if half else ""))
    states = [f.name[:-len(EVAL_STATE_SUFFIX)] for f in eval_state_files(run_dir)]
    if states:
        parts.append("state of " + ", ".join(states))
    return "; ".join(parts)


def unfinished_state(grid_path: str | Path | Sequence[str | Path], out: str | Path) -> list[Path]:
    """The files that hold the progress of the grid's *unfinished* runs in ``out``: every file
    of a started run's folder (its splits, per-epoch checkpoints, evaluator state such as
    AutoAttack's) and, in the shared cache, every trained or half-trained model of the jobs an
    unfinished run declares, started or not (the membership reference models and their
    ``<i>.ckpt/`` checkpoints: a pool trained by seed 0 of a recipe is the pool its seeds 1
    and 2 read, so it is kept until every run that declares it has finished), and -- if any
    file is listed -- the cache's derived entries outside ``refmodels/`` and ``logs/`` (MIA
    signals, inversion networks, counterfactual generators): all of them, since no file names
    the run it serves, and they are small next to a pool.  Lock files, ``error.txt``,
    finished runs' folders and pools only finished runs declare are excluded; each path once,
    in grid order, the derived entries last.

    ``cfbench sweep GRID --out OUT --list-state`` prints them, so a sweep longer than the life
    of its working copy (a session, a preemptible machine) can carry its progress in version
    control (``git add -f``; these paths are ignored by default) and resume from a clean
    clone: every listed file is one a resumed run reads instead of recomputing."""
    from .store import CACHE_DIR
    from .store.io import LOCK_SUFFIX
    from .store.lifecycle import ERROR

    out = Path(out)

    def keep(f: Path) -> bool:
        return f.is_file() and not f.is_symlink() and not f.name.endswith(LOCK_SUFFIX) and f.name != ERROR

    files: list[Path] = []
    for p in (p for _, pts in expand_files(grid_path) for p in pts):
        run_dir = out / p.cfg.run_id()
        if finished(p.cfg, out) is not None:
            continue
        files += sorted(f for f in run_dir.rglob("*") if keep(f)) if run_dir.is_dir() else []
        for path in _declared_paths(p.cfg, out):
            files += [path] if keep(path) else []
            ckpt = path.with_suffix(".ckpt")
            files += sorted(f for f in ckpt.rglob("*") if keep(f)) if ckpt.is_dir() else []
    cache = out / CACHE_DIR
    if files and cache.is_dir():
        files += sorted(f for f in cache.rglob("*")
                        if keep(f) and f.relative_to(cache).parts[0] not in ("refmodels", "logs"))
    return list(dict.fromkeys(files))


# -- one run (the body of a pool worker or a Ray task) ------------------------------------

def _init(plugin_files: tuple[str, ...]) -> None:
    import torch

    torch.set_num_threads(1)
    from .registry import load_plugin_file

    for p in plugin_files:
        load_plugin_file(p)


RUN_LOGS = "logs"


def run_log_path(out: str | Path, run_id: str) -> Path:
    """The progress log of run ``run_id`` in a sweep into ``out``: inside the cache folder, which
    the store, the leaderboards and ``cfbench doctor`` do not read as runs (and .gitignore keeps
    out of a committed runs folder)."""
    from .store import CACHE_DIR

    return Path(out) / CACHE_DIR / RUN_LOGS / f"{run_id}.log"


@contextlib.contextmanager
def _run_log(out: str | Path, run_id: str, who: str):
    """stdout and stderr of this worker appended to the run's progress log (line-buffered; the
    run and its helpers append to one file, one whole line per write) -- or, if the log cannot
    be opened (a read-only or full disk), no progress at all: a log never fails a run.  Yields whether
    the log is open (the caller's ``progress``)."""
    path = run_log_path(out, run_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:
        yield False
        return
    from .progress import log_line

    with f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        log_line(f"{who} (pid {os.getpid()}) started")
        try:
            yield True
        finally:
            log_line(f"{who} (pid {os.getpid()}) stopped")


def run_point(cfg: RunConfig, out: str, plugin_files: tuple[str, ...] = ()) -> dict[str, Any]:
    """Execute one run (its jobs in-process) and return a summary; never raises for a failed
    run (its record says why), so one failure does not stop the sweep.  Its progress goes to
    :func:`run_log_path`."""
    from .execution.local import _job_determinism
    from .progress import log_line
    from .registry import plugin_files as loaded
    from .runner import execute

    if set(plugin_files) - set(loaded()):
        _init(plugin_files)
    _job_determinism(cfg)   # this worker may have run a run (or a helper) of another setting
    t0 = time.perf_counter()
    try:
        with _run_log(out, cfg.run_id(), "run") as logging:
            outcome = execute(cfg, out, progress=logging, log=lambda *a: print(*a, file=sys.stderr))
            if logging:
                log_line(f"status {outcome.record['status']}" + (" (reused)" if outcome.reused else ""))
        rec = outcome.record
        return {"run_id": rec["run_id"], "status": rec["status"], "reused": outcome.reused,
                "seconds": time.perf_counter() - t0, "metrics": _headline(rec)}
    except Exception as e:  # noqa: BLE001 - recorded in the run's record; the sweep goes on
        return {"run_id": cfg.run_id(), "status": "failed", "reason": f"{type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0, "metrics": {}}


def _headline(rec: dict) -> dict[str, Any]:
    m = rec.get("metrics", {})

    def v(key):
        x = m.get(key)
        return x.get("value") if isinstance(x, dict) else x

    return {"clean": v("clean.accuracy"), "autoattack": v("robust.autoattack.accuracy"),
            "pgd": v("robust.pgd.accuracy"), "mia_auc": v("mia.best.auc")}


# -- the sweep ----------------------------------------------------------------------------

def _pool(workers: int, plugin_files: tuple[str, ...]) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_init, initargs=(plugin_files,))


def prefetch_jobs(cfg: RunConfig, out: str, plugin_files: tuple[str, ...] = ()) -> int:
    """Idle-core helper of a local sweep: train the jobs that ``cfg``'s evaluators declare up
    front (the membership reference models) and that nobody has trained or is training, last
    first, into the shared cache; returns how many it trained.

    The run itself trains its jobs first to last and defers one whose lock another process
    holds, so the run and its helpers split the pool without ever training a model twice (the
    file lock of :func:`~cfbench.execution.jobs.run_job`), and a job is a pure function of
    (recipe, subset, seed): the models, and so every metric, are the ones the run would have
    trained itself (the run's record lists them as ``cached``).  Never raises: a failure here
    only means the run trains that model itself."""
    from .execution.jobs import run_job
    from .execution.local import _job_determinism
    from .registry import plugin_files as loaded
    from .runner import declared_jobs
    from .store import CACHE_DIR
    from .store.io import is_locked, lock_path
    from .store.lifecycle import run_lock_path
    from .training.recipe import load_data

    if set(plugin_files) - set(loaded()):
        _init(plugin_files)
    run_lock = run_lock_path(out, cfg.run_id())
    # help only a run that is running: wait (briefly) for it to take its lock, and stop once it
    # has released it (finished or failed) -- a helper never trains for a run that is over
    deadline = time.monotonic() + HELPER_START_TIMEOUT
    while not is_locked(run_lock):
        if (run_lock.parent / RECORD).exists() or time.monotonic() > deadline:   # over (ok or failed)
            return 0
        time.sleep(0.2)
    trained = 0
    try:
        with _run_log(out, cfg.run_id(), "helper") as logging:
            _job_determinism(cfg)
            data = load_data(cfg)
            cache = Path(out) / CACHE_DIR
            for job in reversed(declared_jobs(cfg, data, cache)):
                path = Path(job.path)
                if not is_locked(run_lock):
                    break
                if path.exists() or is_locked(lock_path(path)):
                    continue
                run_job(job, progress=logging)
                trained += 1
    except Exception as e:  # noqa: BLE001 - the run trains what its helper could not
        print(f"cfbench sweep: a helper for {cfg.run_id()} stopped ({type(e).__name__}: {e}); "
              "the run trains its remaining models itself", file=sys.stderr)
    return trained


def _helper_target(running, helping, helped: set[int]) -> Point | None:
    """The running run a free worker should help: the one with the fewest helpers, oldest
    first, among those whose helper has not come back empty (None: none left)."""
    cands = [p for p in running if p.index not in helped]
    if not cands:
        return None
    helping = list(helping)
    return min(cands, key=lambda q: sum(h.index == q.index for h in helping))


def run_local(points: list[Point], out: Path, workers: int, plugin_files: tuple[str, ...],
              on_done: Callable[[Point, dict], None], *, helpers: bool = True) -> None:
    """Run ``points`` on a pool of ``workers`` processes, at most ``workers`` at a time, in the
    order given (the sweep's: grid file by grid file, seed by seed).  When fewer runs than
    workers are left (a sweep's tail, or a sweep of one run), each free worker becomes a helper
    of a running run (:func:`prefetch_jobs`, ``helpers=True``): it trains that run's reference
    models while the run trains its target and runs its other evaluators, so no core idles
    while a run still has independent work.  Across grid files (``Point.stage``) a free worker
    helps a running run of an earlier file first and starts the next file's run once that
    helper comes back with nothing left to train: the earlier file finishes first, and no core
    waits for its tail."""
    pending = {p.index: p for p in points}
    restarts = 0
    while pending:
        pool = _pool(workers, plugin_files)
        queue = list(pending.values())
        runs: dict[Any, Point] = {}
        helping: dict[Any, Point] = {}
        helped: set[int] = set()     # runs whose helper came back: nothing free was left to train

        def fill() -> None:
            while len(runs) + len(helping) < workers:
                # a free worker helps a running run of an earlier grid file before it starts a
                # later file's run (one file: only in the tail, when no run waits to start)
                earlier = [q for q in runs.values() if not queue or q.stage < queue[0].stage]
                p = _helper_target(earlier, helping.values(), helped) if helpers else None
                if p is not None:
                    helping[pool.submit(prefetch_jobs, p.cfg, str(out), plugin_files)] = p
                elif queue:
                    p = queue.pop(0)
                    runs[pool.submit(run_point, p.cfg, str(out), plugin_files)] = p
                else:
                    return

        broken = False
        try:
            fill()
            while runs:
                done, _ = wait(list(runs) + list(helping), return_when=FIRST_COMPLETED)
                for f in done:
                    if f in helping:
                        helped.add(helping.pop(f).index)
                        try:
                            f.result()
                        except BrokenProcessPool:
                            broken = True
                        continue
                    p = runs.pop(f)
                    try:
                        res = f.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    pending.pop(p.index, None)
                    on_done(p, res)
                if broken:
                    break
                fill()
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)
        if broken:
            restarts += 1
            if restarts > MAX_RESTARTS:
                for p in pending.values():
                    on_done(p, {"run_id": p.cfg.run_id(), "status": "failed", "seconds": 0.0, "metrics": {},
                                "reason": f"worker processes died {restarts} times"})
                return
            print(f"cfbench sweep: a worker process died; restarting the pool for {len(pending)} unfinished "
                  "run(s) (they resume from their checkpoints)", file=sys.stderr)


def run_ray(points: list[Point], out: Path, address: str | None, workers: int | None,
            plugin_files: tuple[str, ...], on_done: Callable[[Point, dict], None], *,
            helpers: bool = True) -> None:
    """Every point as a Ray task (1 CPU, and 1 GPU for ``device = "cuda"``), retried on worker
    loss.  When fewer runs are unfinished than the cluster has CPUs (the sweep's tail), the free
    CPUs get helper tasks for the running CPU runs (:func:`prefetch_jobs`, as on the local
    executor; a run on a GPU gets none: its helper would wait for a GPU).  Helpers still going
    when the last run is done are cancelled (an interrupted model resumes from its checkpoint)."""
    from .execution.ray_executor import MAX_RETRIES, init_ray

    ray = init_ray(address, workers)
    task = ray.remote(run_point)
    helper = ray.remote(prefetch_jobs)
    cpus = int(ray.cluster_resources().get("CPU", 0))

    def gpus(p: Point) -> int:
        return 1 if str(p.cfg.device).startswith("cuda") else 0

    refs = {}
    for p in points:
        refs[task.options(num_cpus=1, num_gpus=gpus(p), max_retries=MAX_RETRIES).remote(
            p.cfg, str(out), plugin_files)] = p
    helping: dict[Any, Point] = {}
    helped: set[int] = set()

    def fill() -> None:
        while helpers and len(refs) + len(helping) < cpus:
            p = _helper_target([q for q in refs.values() if not gpus(q)], helping.values(), helped)
            if p is None:
                return
            helping[helper.options(num_cpus=1, max_retries=0).remote(p.cfg, str(out), plugin_files)] = p

    fill()
    while refs:
        done, _ = ray.wait(list(refs) + list(helping), num_returns=1)
        for r in done:
            if r in helping:
                helped.add(helping.pop(r).index)
                try:
                    ray.get(r)
                except Exception:  # noqa: BLE001 - a lost helper: its run trains the models itself
                    pass
                continue
            p = refs.pop(r)
            try:
                res = ray.get(r)
            except Exception as e:  # noqa: BLE001 - a task that failed after its retries
                res = {"run_id": p.cfg.run_id(), "status": "failed", "seconds": 0.0, "metrics": {},
                       "reason": f"{type(e).__name__}: {e}"}
            on_done(p, res)
        fill()
    for r in helping:
        ray.cancel(r)


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) else "n/a"


def summary_table(rows: list[tuple[Point, dict]]) -> str:
    head = ["run", "status", "clean %", "AutoAttack %", "PGD %", "MIA AUC", "seconds"]
    lines = [head]
    for p, r in sorted(rows, key=lambda t: t[0].index):
        m = r.get("metrics", {})
        auc = m.get("mia_auc")
        status = r["status"] + (" (reused)" if r.get("reused") else "")
        lines.append([r["run_id"], status, _pct(m.get("clean")), _pct(m.get("autoattack")), _pct(m.get("pgd")),
                      f"{auc:.3f}" if isinstance(auc, (int, float)) else "n/a", f"{r.get('seconds', 0):.0f}"])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)


def _n_workers(n: int) -> str:
    return f", {n} worker" + ("s" if n != 1 else "")


def sweep_command(grid_path: str | Path, out: str | Path, leaderboards: str | Path | None = None) -> str:
    """The command that reproduces a sweep's runs (the executor and workers change no result).
    Paths are normalised (``os.path.normpath``: ``./a//b.toml`` is ``a/b.toml``), so one sweep
    file typed two ways is one command and one entry of ``sweeps.json``."""
    import shlex

    parts = ["cfbench", "sweep", os.path.normpath(grid_path), "--out", os.path.normpath(out)]
    if leaderboards is not None:
        parts += ["--leaderboards", os.path.normpath(leaderboards)]
    return " ".join(shlex.quote(p) for p in parts)


def expand_files(grid_paths: str | Path | Sequence[str | Path]) -> list[tuple[str, list[Point]]]:
    """Each grid file with its points, every point numbered across the files and tagged with its
    file's position (``Point.stage``); every file is resolved before anything starts (a bad
    one is a :class:`UsageError` naming it)."""
    paths = [grid_paths] if isinstance(grid_paths, (str, Path)) else list(grid_paths)
    if not paths:
        raise UsageError("no grid file given.")
    out, n = [], 0
    for stage, path in enumerate(paths):
        pts = [dataclasses.replace(p, index=n + i, stage=stage)
               for i, p in enumerate(expand(load_grid(path), str(path)))]
        n += len(pts)
        out.append((str(path), pts))
    return out


def sweep(grid_path: str | Path | Sequence[str | Path], *, out: str | Path = "runs", executor: str = "local",
          workers: int | None = None, address: str | None = None, leaderboards: str | Path | None = None,
          dry_run: bool = False, log=print) -> list[tuple[Point, dict]]:
    """Run the grid file ``grid_path`` -- or several, one after the other in one pool of
    workers (a later file's runs start once the earlier files' runs are all started and their
    free reference models claimed, see :func:`run_local`) -- and build the leaderboards."""
    from .execution.local import EXECUTORS, default_workers
    from .registry import plugin_files

    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}. Valid choices: {', '.join(EXECUTORS)}.")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers} is not valid: give a number >= 1.")
    if address is not None and executor != "ray":
        raise UsageError("--address applies to --executor ray only.")
    if executor == "ray":
        from .execution.ray_executor import check_address, init_ray  # noqa: F401 - fail early on a bad address

        if address is not None:
            check_address(address)
    out = Path(out)
    files = expand_files(grid_path)
    seen: set[str] = set()
    points = []
    for _, pts in files:     # a run two files share runs once, with the first file
        points += [p for p in pts if not (p.cfg.run_id() in seen or seen.add(p.cfg.run_id()))]
    todo, rows = [], []
    for p in points:
        rec = finished(p.cfg, out)
        if rec is not None:
            rows.append((p, {"run_id": rec["run_id"], "status": "ok", "reused": True, "seconds": 0.0,
                             "metrics": _headline(rec)}))
        else:
            todo.append(p)
    # seed by seed: every recipe's first seed starts before any recipe's second, so a sweep
    # stopped part-way (a session, a budget) holds every recipe once rather than a few recipes
    # three times; grid order within a seed (a stable sort)
    todo.sort(key=lambda p: (p.stage, p.cfg.seed))
    log(f"cfbench sweep: {len(points)} runs in the grid" + (f"s ({len(files)} files)" if len(files) > 1 else "")
        + f", {len(rows)} already finished, {len(todo)} to run "
        f"({executor}" + (_n_workers(workers or default_workers()) if executor == "local" else "") + ")")
    if dry_run:
        for p in todo:
            where = run_progress(p.cfg, out)
            log(f"  would run {p.cfg.run_id()}  [{p.label}]" + (f"  ({where})" if where else ""))
        return rows
    from .present.leaderboard import record_sweep
    from .progress import Progress, is_terminal

    for path, pts in files:  # each file is its own entry: the command that reproduces its rows
        record_sweep(out, path, sweep_command(path, out, leaderboards), [p.cfg.run_id() for p in pts])
    # a terminal: a bar with k/K and an ETA, each finished run written above it; a log file:
    # one timestamped line per finished run with the overall k/K, elapsed time and ETA
    bar = Progress(len(todo), "sweep", "run", enabled=bool(todo))
    if todo:
        log(f"cfbench sweep: each run's progress is appended to {run_log_path(out, '<run id>')}")
    done_count = [0]

    def on_done(p: Point, res: dict) -> None:
        done_count[0] += 1
        rows.append((p, res))
        extra = f" ({res.get('reason')})" if res["status"] != "ok" else ""
        line = f"{res['run_id']} {res['status']} in {res.get('seconds', 0):.0f}s" + extra
        if bar.bar is not None and is_terminal():
            bar.bar.write(f"[{done_count[0]}/{len(todo)}] {line}", file=sys.stderr)
            bar.update(1)
        else:
            bar.update(1, finished=line)

    plugins = tuple(plugin_files())
    try:
        if todo and executor == "local":
            run_local(todo, out, workers or default_workers(), plugins, on_done)
        elif todo:
            run_ray(todo, out, address, workers, plugins, on_done)
    finally:
        bar.close()
    log(summary_table(rows))
    ok = [r for _, r in rows if r["status"] == "ok"]
    if ok:
        from .present.leaderboard import build
        from .present.report import write_run_reports
        from .present.writers import write_tables

        target = Path(leaderboards) if leaderboards is not None else out / "leaderboards"
        boards = build(out)
        try:
            # the same rules as `cfbench leaderboard`: never overwrite another protocol's (or
            # another runs folder's) table, remove this build's stale ones, link every row
            all_paths, _ = write_tables(boards, target, runs=str(out), log=log)
        except UsageError as e:
            log(f"cfbench sweep: leaderboards not written: {e}")
        else:
            write_run_reports(boards, log=log)
            for lb, paths in zip(boards, all_paths):
                log(f"leaderboard {lb.name}: {paths['md']}")
    return rows

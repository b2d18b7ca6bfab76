"""Reliability (issue 21): every failure clean, nothing lost.

* kill trials: a run is SIGKILLed right before or right after one of its file events (every
  ``os.replace`` of the one writer, every ``os.rename`` of a ``--force`` swap, every
  ``shutil.rmtree`` of a cleanup) or at a random instant, run again, and must end with the
  same record, metrics, weights, splits, scores and cached models as an uninterrupted run --
  byte for byte where the bytes are deterministic -- and with no leftover (no temporary, no
  checkpoint, no staging folder; ``cfbench doctor`` finds nothing);
* environment errors (a full disk, a read-only file system, no permission) -- injected into
  the writer, and for real on a small tmpfs / read-only mount / as an unprivileged user
  where possible -- end in one ``cfbench: error:`` line, exit status 1, nothing half-written
  and every finished result untouched;
* ``--force`` replaces a finished result only after the new one succeeded;
* hostile store files never crash a command, never block a rerun;
* locks: two processes never train the same model twice;
* names that could leave ``--out`` are refused; bad values are usage errors (status 2);
* ``cfbench doctor`` lists and repairs leftovers.

The fast kill trials fork this (already initialised) process: the child runs the command and
kills itself with SIGKILL at the chosen event, so no cleanup code runs, exactly like a kill
from outside; the slow ones start real ``cfbench`` processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cfbench import registry
from cfbench.cli import main
from cfbench.errors import PluginError, UsageError
from cfbench.store import io as store_io

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
#: a digits run of about a second: cnn8 of width 8, 128 members, 2 epochs, 64 test images
TINY = ["--set", "epochs=2", "--set", "model.width=8", "--set", "data.pool_size=256", "--set", "data.test_size=64"]
RUN = ["run", "--quiet", "--threads", "1", "--workers", "1", *TINY]
CLEAN = [*RUN, "--evaluators", "clean"]
#: with two membership reference models (cached in _cache/refmodels) and their signal files
MIA = [*RUN, "--evaluators", "clean,mia", "--set", "mia.reference_models=2", "--set", "mia.adversarial=false",
       "--set", "mia.label_only=false"]
#: with example images (examples.safetensors) after the model
PGD = [*RUN, "--evaluators", "clean,pgd", "--set", "pgd.n_examples=32", "--set", "pgd.steps=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: ``cfbench run`` writes report.html after the record; that takes 80% of a tiny run, so the
#: kill trials switch it off except where the report is the point (``reports(True)``)
_REPORTS = {"on": False}


@pytest.fixture(autouse=True, scope="module")
def _optional_reports():
    from cfbench.present import report

    real = report.report_after_run
    mp = pytest.MonkeyPatch()
    mp.setattr(report, "report_after_run", lambda run_dir: real(run_dir) if _REPORTS["on"] else None)
    yield
    mp.undo()


@contextlib.contextmanager
def reports(on: bool = True):
    before = _REPORTS["on"]
    _REPORTS["on"] = on
    try:
        yield
    finally:
        _REPORTS["on"] = before


@contextlib.contextmanager
def cwd(path: Path):
    old = os.getcwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def cli(args, where: Path) -> int:
    """``cfbench <args>`` in this process, in folder ``where`` (stores are ``runs/``, relative)."""
    with cwd(where):
        return main([*args, "--out", "runs"] if args and args[0] in ("run", "doctor") else list(args))


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _arrays_npz(path: Path) -> dict[str, bytes]:
    with np.load(path, allow_pickle=False) as z:
        return {k: (str(z[k].dtype), z[k].shape, z[k].tobytes()) for k in z.files}


def _tensors(path: Path) -> dict[str, bytes]:
    from safetensors.numpy import load_file

    return {k: (str(v.dtype), v.shape, v.tobytes()) for k, v in load_file(str(path)).items()}


def result(out: Path) -> dict:
    """Everything an interrupted-then-rerun store must share with an uninterrupted one.

    The record is compared whole except what is not a result: ``created``, ``timings``,
    ``versions``, every ``...seconds`` entry, the resume note and whether each job was trained
    or found in the cache.  ``model.safetensors`` is compared byte for byte (its metadata is
    deterministic); ``.npz`` files and cached models array by array (a zip member carries its
    write time, a cached model its training seconds)."""
    (run,) = run_dirs(out)
    rec = _without_bookkeeping(json.loads((run / "record.json").read_text(encoding="utf-8")))
    for k in ("created", "timings", "versions"):
        rec.pop(k)
    got = {"record": rec, "model": (run / "model.safetensors").read_bytes(),
           "splits": _arrays_npz(run / "splits.npz"),
           "files": sorted(p.name for p in run.iterdir() if p.name != "report.html")}
    if (run / "mia_scores.npz").exists():
        got["scores"] = _arrays_npz(run / "mia_scores.npz")
    if (run / "examples.safetensors").exists():
        got["examples"] = (run / "examples.safetensors").read_bytes()
    cache = out / "_cache"
    got["cache"] = {str(p.relative_to(cache)): _tensors(p) for p in sorted(cache.rglob("*.safetensors"))} \
        if cache.exists() else {}
    return got


def _without_bookkeeping(obj):
    """A record without what says how it was computed rather than what: seconds, whether a
    training resumed, whether a job was trained or found in the cache."""
    if isinstance(obj, dict):
        return {k: _without_bookkeeping(v) for k, v in obj.items()
                if not (k.endswith("seconds") or "seconds_" in k or k in ("resumed_from_epoch", "executor")
                        or k.startswith(("reference_models_reused", "reference_models_trained", "signals_computed",
                                         "signals_reused")))}
    if isinstance(obj, list):
        return [_without_bookkeeping(v) for v in obj]
    return obj


def leftovers(out: Path) -> list[str]:
    """Anything a finished store must not hold: temporaries, checkpoints, staging/trash, error.txt."""
    bad = []
    for p in out.rglob("*"):
        n = p.name
        if n.endswith((".tmp", ".tmp.npz", ".ckpt")) or n in ("checkpoints", "error.txt", ".staging", ".trash"):
            bad.append(str(p.relative_to(out)))
    return sorted(bad)


def assert_clean_and_equal(out: Path, reference: dict) -> None:
    from cfbench.doctor import diagnose

    assert leftovers(out) == []
    assert diagnose(out) == []
    got = result(out)
    assert got.keys() == reference.keys()
    for key, want in reference.items():
        assert got[key] == want, (key, differences(got[key], want)[:5])


def differences(a, b, where: str = "") -> list[str]:
    """The paths at which two JSON-like values differ (for readable failures)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in (differences(a.get(k), b.get(k), f"{where}.{k}") if k in a and k in b else [f"{where}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:60]} != {str(b)[:60]}"]


# -- killing a forked child at a file event ----------------------------------------------

class Events:
    """Counts the file events of a run: ``os.replace`` (every write of the one writer),
    ``os.rename`` (the --force swap) and ``shutil.rmtree`` (cleanups), as ``(kind, name)``."""

    def __init__(self, kill: tuple[str, str, int, str] | None = None):
        self.seen: list[tuple[str, str]] = []
        self.kill = kill  # (kind, file name, occurrence, "before" | "after")

    def _event(self, kind: str, target, when: str) -> None:
        if self.kill is None:
            return
        k, name, nth, at = self.kill
        if at == when and kind == k and Path(target).name == name and self.seen.count((k, name)) == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self, mp) -> None:
        real_replace, real_rename, real_rmtree = os.replace, os.rename, shutil.rmtree

        def wrap(kind, real, arg):
            def f(*a, **k):
                target = a[arg]
                self.seen.append((kind, Path(target).name))
                self._event(kind, target, "before")
                out = real(*a, **k)
                self._event(kind, target, "after")
                return out
            if hasattr(real, "avoids_symlink_attacks"):
                f.avoids_symlink_attacks = real.avoids_symlink_attacks
            return f

        mp.setattr(os, "replace", wrap("replace", real_replace, 1))
        mp.setattr(os, "rename", wrap("rename", real_rename, 1))
        mp.setattr(shutil, "rmtree", wrap("rmtree", real_rmtree, 0))


def killed_at(args, where: Path, kill: tuple[str, str, int, str], timeout: float = 300) -> bool:
    """Run ``cfbench <args>`` in a forked child that SIGKILLs itself at ``kill``; True if it
    was killed there (False: it finished without reaching that event)."""
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        code = 99
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            mp = pytest.MonkeyPatch()
            Events(kill).install(mp)
            code = cli(args, where)
        except BaseException:  # noqa: BLE001
            code = 98
        finally:
            os._exit(code)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child running {args} did not finish in {timeout} s")
        time.sleep(0.02)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"the child exited with {os.WEXITSTATUS(status)}"
    return False


def events_of(args, where: Path, monkeypatch) -> tuple[list[tuple[str, str]], dict]:
    """An uninterrupted run's file events and its result."""
    ev = Events()
    with monkeypatch.context() as mp:
        ev.install(mp)
        assert cli(args, where) == 0
    return ev.seen, result(where / "runs")


def occurrences(events: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    out, count = [], {}
    for kind, name in events:
        count[(kind, name)] = count.get((kind, name), 0) + 1
        out.append((kind, name, count[(kind, name)]))
    return out


def kill_trial(args, tmp_path: Path, kill, reference: dict, *, pre=None, doctor_first: bool = False) -> None:
    """Kill at ``kill``, check what the kill left (a finished record is never half-written),
    optionally repair with ``cfbench doctor --fix`` first, rerun, compare with ``reference``."""
    where = tmp_path / "killed"
    if pre is not None:
        pre(where)
    assert killed_at(args, where, kill), f"the run never reached {kill}"
    out = where / "runs"
    for rec in out.rglob("record.json"):  # whatever is there is a whole record (atomic rename)
        json.loads(rec.read_text(encoding="utf-8"))
    if doctor_first:
        assert cli(["doctor", "--fix"], where) == 0
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert cli(args, where) == 0
    assert_clean_and_equal(out, reference)


@pytest.fixture(scope="module")
def clean_reference(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        where = tmp_path_factory.mktemp("clean-ref")
        return events_of(CLEAN, where, mp)
    finally:
        mp.undo()


FAST_KILLS = [
    ("replace", "splits.npz", 1, "after"),
    ("replace", "last.safetensors", 1, "before"),   # a checkpoint's temporary is left
    ("replace", "last.safetensors", 1, "after"),    # mid-training: the rerun resumes
    ("replace", "model.safetensors", 1, "after"),
    ("replace", "record.json", 1, "before"),        # the record's temporary is left, no record
    ("replace", "record.json", 1, "after"),         # between the record's rename and the cleanup
    ("rmtree", "checkpoints", 1, "before"),
]


@pytest.mark.parametrize("kill", FAST_KILLS, ids=lambda k: f"{k[3]}-{k[0]}-{k[1]}-{k[2]}")
def test_kill_at_a_file_event_then_rerun_equals_an_uninterrupted_run(kill, tmp_path, clean_reference):
    events, reference = clean_reference
    assert kill[:3] in occurrences(events)
    kill_trial(CLEAN, tmp_path, kill, reference)


def test_kill_while_writing_the_report_then_rerun(tmp_path, clean_reference):
    """report.html is written after the record: a kill there leaves its temporary, which the
    rerun (a reuse) removes while it writes the report again."""
    _, reference = clean_reference
    with reports():
        where = tmp_path / "w"
        assert killed_at(CLEAN, where, ("replace", "report.html", 1, "before"))
        (run,) = run_dirs(where / "runs")
        assert [p.name.split(".")[1] for p in run.glob(".*.tmp")] == ["report"]
        assert cli(CLEAN, where) == 0
        assert (run / "report.html").stat().st_size > 1000
    assert_clean_and_equal(where / "runs", reference)


def test_kill_between_record_and_cleanup_leaves_a_checkpoint_that_is_removed_never_resumed(tmp_path,
                                                                                           clean_reference):
    """The gap of the issue: the record is renamed, the kill falls before checkpoints/ is removed."""
    _, reference = clean_reference
    where = tmp_path / "w"
    assert killed_at(CLEAN, where, ("replace", "record.json", 1, "after"))
    (run,) = run_dirs(where / "runs")
    assert (run / "checkpoints" / "last.safetensors").exists()
    from cfbench.doctor import diagnose

    assert [f.kind for f in diagnose(where / "runs")] == ["stale-checkpoint"]
    record_before = (run / "record.json").read_bytes()
    assert cli(CLEAN, where) == 0                                # reused, and the leftover removed
    assert (run / "record.json").read_bytes() == record_before  # not recomputed
    assert_clean_and_equal(where / "runs", reference)


def test_kill_then_doctor_fix_then_rerun(tmp_path, clean_reference):
    _, reference = clean_reference
    kill_trial(CLEAN, tmp_path, ("replace", "last.safetensors", 2, "before"), reference, doctor_first=True)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_at_every_file_event_of_a_run(when, tmp_path, clean_reference):
    events, reference = clean_reference
    trials = occurrences(events)
    assert len(trials) >= 7
    for i, (kind, name, nth) in enumerate(trials):
        kill_trial(CLEAN, tmp_path / f"t{i}", (kind, name, nth, when), reference)


@pytest.fixture(scope="module")
def mia_reference(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        return events_of(MIA, tmp_path_factory.mktemp("mia-ref"), mp)
    finally:
        mp.undo()


def test_kill_while_caching_reference_models_then_rerun(tmp_path, mia_reference):
    events, reference = mia_reference
    assert ("replace", "1.safetensors", 1) in occurrences(events)
    kill_trial(MIA, tmp_path, ("replace", "1.safetensors", 1, "before"), reference)


@pytest.mark.slow
def test_kill_at_every_file_event_of_a_run_with_reference_models(tmp_path, mia_reference):
    events, reference = mia_reference
    trials = occurrences(events)
    assert len(trials) >= 14
    for i, (kind, name, nth) in enumerate(trials):
        kill_trial(MIA, tmp_path / f"t{i}", (kind, name, nth, "before" if i % 2 else "after"), reference)


# -- --force ------------------------------------------------------------------------------

def _finished_store(where: Path, args=CLEAN) -> dict[str, bytes]:
    assert cli(args, where) == 0
    return snapshot(where / "runs")


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a store and its bytes (lock files excluded: a command may create one)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def force_reference(tmp_path_factory):
    """A finished run, then the same run with --force: the events of the forced run."""
    where = tmp_path_factory.mktemp("force-ref")
    assert cli(CLEAN, where) == 0
    mp = pytest.MonkeyPatch()
    try:
        events, ref = events_of([*CLEAN, "--force"], where, mp)
    finally:
        mp.undo()
    return events, ref


FORCE_KILLS = [
    ("replace", "model.safetensors", 1, "after"),   # the attempt is half done in .staging
    ("replace", "record.json", 1, "after"),         # the attempt is finished, not swapped in
    ("rename", "digits-erm-cnn8-s0", 1, "after"),   # old run moved to .trash, new one not in place
    ("rename", "digits-erm-cnn8-s0", 2, "after"),   # swapped; .trash not yet removed
]


def _force_kill(kill, run_id: str):
    kind, name, nth, when = kill
    return (kind, run_id, nth, when) if name == "digits-erm-cnn8-s0" else kill


@pytest.mark.parametrize("kill", FORCE_KILLS, ids=lambda k: f"{k[3]}-{k[0]}-{k[1]}-{k[2]}")
def test_kill_during_force_never_loses_the_finished_run(kill, tmp_path, force_reference):
    events, reference = force_reference
    run_id = reference["record"]["run_id"]
    kill = _force_kill(kill, run_id)
    assert kill[:3] in occurrences(events)

    def pre(where):
        assert cli(CLEAN, where) == 0

    where = tmp_path / "killed"
    pre(where)
    assert killed_at([*CLEAN, "--force"], where, kill)
    out = where / "runs"
    # at every instant a finished record exists: in the run folder or in a finished staging folder
    finished = [p for p in out.rglob("record.json") if json.loads(p.read_text())["status"] == "ok"]
    assert finished
    assert cli([*CLEAN, "--force"] if kill[1] == "model.safetensors" else CLEAN, where) == 0
    assert_clean_and_equal(out, reference)


@pytest.mark.slow
def test_kill_at_every_file_event_of_a_force(tmp_path, force_reference):
    events, reference = force_reference
    for i, (kind, name, nth) in enumerate(occurrences(events)):
        for when in ("before", "after"):
            where = tmp_path / f"t{i}{when}"
            assert cli(CLEAN, where) == 0
            assert killed_at([*CLEAN, "--force"], where, (kind, name, nth, when))
            out = where / "runs"
            assert any(json.loads(p.read_text())["status"] == "ok" for p in out.rglob("record.json"))
            # a plain rerun either completes the finished attempt's swap or keeps the old run ...
            assert cli(CLEAN, where) == 0
            assert len(run_dirs(out)) == 1 and not (out / ".trash").exists()
            # ... and a --force rerun always ends with the new result and nothing left over
            assert cli([*CLEAN, "--force"], where) == 0
            assert_clean_and_equal(out, reference)


# -- real processes killed from outside ---------------------------------------------------

def _cfbench(args, where: Path, **kw) -> subprocess.Popen:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([PY, "-m", "cfbench.cli", *args, "--out", "runs"], cwd=where, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def subprocess_reference(tmp_path_factory):
    """An uninterrupted run of MIA (reports on: real processes write them) in its own process."""
    where = tmp_path_factory.mktemp("sub-ref")
    proc = _cfbench(MIA, where)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return result(where / "runs")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_a_random_instant_then_rerun(seed, tmp_path, subprocess_reference):
    """A real ``cfbench run`` process group SIGKILLed at a random instant (seeded) of its work --
    counted from the moment it takes its run lock, so the kill does not fall into Python's
    start-up -- then run again."""
    delay = random.Random(seed).uniform(0.0, 2.5)
    where = tmp_path / "w"
    proc = _cfbench(MIA, where)
    deadline = time.time() + 300
    while not list(where.glob("runs/*/.lock")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        pass
    finished = proc.poll() == 0
    _kill_group(proc)
    print(f"killed after {delay:.2f} s of work" if not finished else "finished before the kill")
    again = _cfbench(MIA, where)
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert_clean_and_equal(where / "runs", subprocess_reference)


@pytest.mark.slow
def test_sigkill_of_the_parent_while_pool_workers_train_reference_models(tmp_path, subprocess_reference):
    """With the default executor (a pool of worker processes), kill only the parent the moment
    the first reference model appears: the orphaned workers may still write into the cache,
    the rerun waits for their locks, and the result is the uninterrupted one."""
    i = MIA.index("--workers")
    args = MIA[:i] + MIA[i + 2:]
    where = tmp_path / "w"
    proc = _cfbench(args + ["--workers", "2"], where)
    deadline = time.time() + 300
    while time.time() < deadline and not list((where / "runs").glob("_cache/refmodels/*/*.safetensors")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # the parent only
    proc.wait()
    again = _cfbench(args + ["--workers", "2"], where)
    assert again.wait(timeout=600) == 0, again.stderr.read()
    time.sleep(0.5)
    _kill_group(proc)  # whatever orphan is left
    assert_clean_and_equal(where / "runs", subprocess_reference)


# -- --force replaces a finished result only after the new one succeeded -------------------

#: a 28x28 dataset read from --data-dir (a miniature MNIST written by the test)
MNIST = [*[a if a != "model.width=8" else "model.width=4" for a in RUN], "--dataset", "mnist", "--evaluators",
         "clean", "--model", "cnn28", "--set", "model.hidden=16"]


def test_a_failing_force_keeps_the_finished_record_and_model(tmp_path, capsys):
    from cfbench.data.formats import make_miniature_mnist

    make_miniature_mnist(tmp_path / "mnist", 300, 100)
    args = MNIST
    good = [*args, "--data-dir", str(tmp_path / "mnist")]
    assert cli(good, tmp_path) == 0
    out = tmp_path / "runs"
    (run,) = run_dirs(out)
    before = snapshot(out)
    capsys.readouterr()
    # a mistyped --data-dir: the data never load
    assert cli([*args, "--data-dir", str(tmp_path / "mnits"), "--force"], tmp_path) == 2
    err = capsys.readouterr().err
    assert "cfbench: error: dataset 'mnist' not found" in err and "Traceback" not in err
    assert f"the finished run in runs/{run.name} is kept" in err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith(".staging/")} == before
    attempt = json.loads(after[f".staging/{run.name}/record.json"])
    assert attempt["status"] == "failed" and "DatasetError" in attempt["reason"]
    # the leaderboard still has the finished run, and only it
    from cfbench.present.leaderboard import build

    [lb] = build(out)
    assert len(lb.records) == 1 and not lb.unusable
    # doctor lists the abandoned attempt; --fix removes it
    from cfbench.doctor import diagnose

    assert [(f.kind, f.path.name) for f in diagnose(out)] == [("abandoned-attempt", run.name)]
    assert cli(["doctor", "--fix"], tmp_path) == 0 and not (out / ".staging").exists()
    # a --force that succeeds replaces the run (a new record), leaving nothing behind
    assert cli([*good, "--force"], tmp_path) == 0
    assert json.loads((run / "record.json").read_text())["created"] and leftovers(out) == []
    assert (run / "model.safetensors").read_bytes() == before[f"{run.name}/model.safetensors"]  # deterministic


def test_a_force_killed_by_a_full_disk_keeps_the_finished_run(tmp_path, monkeypatch, capsys):
    assert cli(PGD, tmp_path) == 0
    out = tmp_path / "runs"
    before = snapshot(out)
    disk_full_from(monkeypatch, "model.safetensors")
    capsys.readouterr()
    assert cli([*PGD, "--force"], tmp_path) == 1
    err = capsys.readouterr().err
    assert "cfbench: error: No space left on device" in err and "Traceback" not in err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith(".staging/")} == before
    assert not [k for k in after if k.endswith(".tmp")]


# -- environment errors --------------------------------------------------------------------

def disk_full_from(mp, first: str, err: int = errno.ENOSPC) -> list[Path]:
    """From the first write of a file named ``first`` on, every write of the one writer fails
    with ``err`` after writing its data (as a full disk fails: at write or fsync time)."""
    real = store_io.atomic_write
    failed: list[Path] = []

    def atomic_write(path, write):
        def w(f):
            write(f)
            if failed or Path(path).name == first:
                failed.append(Path(path))
                raise OSError(err, os.strerror(err))
        return real(path, w)

    mp.setattr(store_io, "atomic_write", atomic_write)
    return failed


@pytest.fixture(scope="module")
def pgd_reference(tmp_path_factory):
    where = tmp_path_factory.mktemp("pgd-ref")
    assert cli(PGD, where) == 0
    return result(where / "runs")


@pytest.mark.parametrize("first", ["splits.npz", "last.safetensors", "model.safetensors", "examples.safetensors",
                                   "record.json"])
def test_a_full_disk_is_one_error_line_nothing_half_written_and_the_rerun_completes(first, tmp_path, monkeypatch,
                                                                                 capsys, pgd_reference):
    # another finished run in the same store must not change at all
    assert cli([*CLEAN, "--seed", "3"], tmp_path) == 0
    out = tmp_path / "runs"
    other = snapshot(out)
    with monkeypatch.context() as mp:
        failed = disk_full_from(mp, first)
        capsys.readouterr()
        assert cli(PGD, tmp_path) == 1
        err = capsys.readouterr().err
    assert failed and failed[0].name == first
    assert err.count("cfbench: error: No space left on device: ") == 1 and "Traceback" not in err
    assert f"{failed[-1]}" in err or str(failed[-1].name) in err
    assert "free some space and run the same command again" in err
    now = snapshot(out)
    assert {k: now[k] for k in other} == other                      # untouched
    assert not [k for k in now if k.endswith(".tmp")]                # nothing half-written ...
    assert not [k for k, v in now.items() if not v]                  # ... no empty file
    for k, v in now.items():                                         # ... no finished record of this run
        if k.endswith("record.json") and k not in other:
            assert json.loads(v)["status"] == "failed"
    # with space again, the same command finishes: the same result as if nothing had happened
    assert cli(PGD, tmp_path) == 0
    shutil.rmtree(out / next(k for k in other if k.endswith("record.json")).split("/")[0])
    assert_clean_and_equal(out, pgd_reference)


def test_a_full_disk_at_the_report_only_warns(tmp_path, monkeypatch, capsys):
    with reports(), monkeypatch.context() as mp:
        disk_full_from(mp, "report.html")
        assert cli(CLEAN, tmp_path) == 0
    err = capsys.readouterr().err
    assert "warning: could not write the run's report" in err and "No space left" in err
    assert leftovers(tmp_path / "runs") == []


@pytest.mark.parametrize("code, text, hint", [
    (errno.EROFS, "Read-only file system", "the file system is read-only"),
    (errno.EACCES, "Permission denied", "no permission to write there"),
])
def test_read_only_and_permission_errors_are_one_error_line(code, text, hint, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as mp:
        disk_full_from(mp, "splits.npz", err=code)
        assert cli(CLEAN, tmp_path) == 1
    err = capsys.readouterr().err
    assert f"cfbench: error: {text}: " in err and hint in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and
                (p.name.endswith(".tmp") or p.name == "record.json" and json.loads(p.read_text())["status"] == "ok")]


def _mount(args: list[str]) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if not _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the fault-injection tests cover it")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def test_a_real_full_disk_and_a_real_read_only_file_system(tmp_path, capsys, clean_reference):
    """A 1 MB tmpfs, nearly full: the first checkpoint does not fit.  Then, with space, the run
    finishes; then, the file system remounted read-only, reusing it works and a new run is one
    error line."""
    _, reference = clean_reference
    with tmpfs(tmp_path / "disk", "1m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (1024 * 1024 - 160 * 1024))
        assert cli(CLEAN, disk) == 1
        err = capsys.readouterr().err
        assert "cfbench: error: No space left on device" in err and "Traceback" not in err
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
        filler.unlink()
        assert cli(CLEAN, disk) == 0
        assert_clean_and_equal(disk / "runs", reference)
        before = snapshot(disk / "runs")
        assert _mount(["-o", "remount,ro", str(disk)])
        capsys.readouterr()
        assert cli(CLEAN, disk) == 0                       # a finished run is read, not written
        assert cli([*CLEAN, "--seed", "1"], disk) == 1     # a new one cannot start
        err = capsys.readouterr().err
        assert "cfbench: error: Read-only file system" in err and "give a writable directory" in err
        assert "Traceback" not in err
        assert snapshot(disk / "runs") == before


@pytest.mark.slow
def test_a_real_permission_error_as_root_without_dac_override(tmp_path):
    """Root ignores file modes; without CAP_DAC_OVERRIDE (``setpriv``) it does not."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    store = tmp_path / "w" / "runs"
    store.mkdir(parents=True)
    store.chmod(0o555)
    try:
        proc = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", PY, "-m",
                               "cfbench.cli", *CLEAN, "--out", "runs"], cwd=store.parent, capture_output=True,
                              text=True, timeout=300, check=False)
    finally:
        store.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert "cfbench: error: Permission denied" in proc.stderr and "Traceback" not in proc.stderr
    assert list(store.iterdir()) == []


# -- hostile and damaged store files -------------------------------------------------------

HOSTILE = {
    "truncated": None,  # the first half of a real record
    "empty-list": "[]",
    "null": "null",
    "config-list": None,  # a real record whose config is a list
    "binary": b"\xff\xfe\x00garbage\x00",
    "nested": "[" * 100_000 + "]" * 100_000,
    "newer-schema": None,
    "is-a-folder": "DIR",
}


def _plant_hostile(out: Path, good: dict) -> None:
    text = json.dumps(good)
    for name, content in HOSTILE.items():
        d = out / name
        d.mkdir(parents=True)
        if name == "truncated":
            content = text[: len(text) // 2]
        elif name == "config-list":
            content = json.dumps({**good, "config": ["not", "a", "dict"]})
        elif name == "newer-schema":
            content = json.dumps({**good, "schema_version": 99})
        if content == "DIR":
            (d / "record.json").mkdir()
        elif isinstance(content, bytes):
            (d / "record.json").write_bytes(content)
        else:
            (d / "record.json").write_text(content, encoding="utf-8")


def test_hostile_record_files_never_crash_leaderboard_doctor_or_report(tmp_path, capsys):
    assert cli(CLEAN, tmp_path) == 0
    out = tmp_path / "runs"
    (run,) = run_dirs(out)
    _plant_hostile(out, json.loads((run / "record.json").read_text()))
    capsys.readouterr()
    assert cli(["leaderboard", "--runs", "runs", "--out", "lb", "--quiet"], tmp_path) == 0
    res = capsys.readouterr()
    assert "Traceback" not in res.err
    assert f"{len(HOSTILE)} record files under runs could not be used" in res.err
    for name in HOSTILE:
        assert f"runs/{name}/record.json" in res.err
    assert "1 rows from 1 runs" in res.out or "1 row" in res.out
    from cfbench.doctor import diagnose

    found = {f.path.parent.name: f.kind for f in diagnose(out)}
    # what cannot be a record at all is reported; a record with a bad field or from a newer
    # cfbench is not doctor's to touch (the leaderboard lists it)
    assert found == {n: "corrupt-record" for n in ("truncated", "empty-list", "null", "binary", "nested",
                                                   "is-a-folder")}
    assert cli(["report", "runs/truncated"], tmp_path) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_truncated_record_does_not_block_the_rerun_of_its_command(tmp_path, capsys, clean_reference):
    _, reference = clean_reference
    assert cli(CLEAN, tmp_path) == 0
    (run,) = run_dirs(tmp_path / "runs")
    text = (run / "record.json").read_text()
    (run / "record.json").write_text(text[: len(text) // 3])
    assert cli(CLEAN, tmp_path) == 0          # an unfinished run: computed again
    assert "Traceback" not in capsys.readouterr().err
    assert_clean_and_equal(tmp_path / "runs", reference)


def test_a_record_of_a_newer_cfbench_is_not_overwritten(tmp_path, capsys):
    assert cli(CLEAN, tmp_path) == 0
    (run,) = run_dirs(tmp_path / "runs")
    rec = json.loads((run / "record.json").read_text())
    (run / "record.json").write_text(json.dumps({**rec, "schema_version": 99}))
    before = snapshot(tmp_path / "runs")
    assert cli(CLEAN, tmp_path) == 2
    err = capsys.readouterr().err
    assert "newer than this cfbench" in err and "--force" in err
    assert snapshot(tmp_path / "runs") == before


def test_a_truncated_cached_reference_model_is_trained_again_not_a_failure_of_every_run(tmp_path, capsys,
                                                                                       mia_reference):
    _, reference = mia_reference
    assert cli(MIA, tmp_path) == 0
    out = tmp_path / "runs"
    (ref0,) = out.glob("_cache/refmodels/*/0.safetensors")
    good = _tensors(ref0)
    ref0.write_bytes(ref0.read_bytes()[: ref0.stat().st_size // 2])   # truncated
    (ref0.with_suffix(".ckpt")).mkdir()                                 # and a stale checkpoint folder
    from cfbench.doctor import diagnose

    assert sorted(f.kind for f in diagnose(out)) == ["corrupt-cache"]
    # another run of the same recipe (another seed shares the reference models)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="0.safetensors unreadable"):
        assert cli([*MIA, "--seed", "1"], tmp_path) == 0
    assert _tensors(ref0) == good                   # retrained, to the very same weights
    assert not ref0.with_suffix(".ckpt").exists()
    from cfbench.doctor import diagnose

    assert leftovers(out) == [] and diagnose(out) == []
    cached = {str(p.relative_to(out / "_cache")): _tensors(p) for p in sorted(out.glob("_cache/refmodels/*/*.safetensors"))}
    assert cached == {k: v for k, v in reference["cache"].items() if k.startswith("refmodels/")}


def test_corrupt_signal_and_cache_files_are_found_and_recomputed(tmp_path, mia_reference):
    _, reference = mia_reference
    assert cli(MIA, tmp_path) == 0
    out = tmp_path / "runs"
    sig = min(out.glob("_cache/signals/*.safetensors"))
    sig.write_bytes(sig.read_bytes()[:100])
    from cfbench.doctor import diagnose

    assert [(f.kind, f.path) for f in diagnose(out)] == [("corrupt-cache", sig)]
    assert cli(["doctor", "--fix"], tmp_path) == 0 and not sig.exists()
    (run,) = run_dirs(out)
    (run / "record.json").unlink()            # recompute the run: the signal file is recomputed too
    assert cli(MIA, tmp_path) == 0
    assert_clean_and_equal(out, reference)


def test_a_corrupt_checkpoint_is_refused_with_its_remedy_and_doctor_removes_it(tmp_path, capsys, clean_reference):
    _, reference = clean_reference
    assert killed_at(CLEAN, tmp_path, ("replace", "last.safetensors", 1, "after"))
    (ck,) = (tmp_path / "runs").glob("*/checkpoints/last.safetensors")
    ck.write_bytes(ck.read_bytes()[:-10])
    capsys.readouterr()
    assert cli(CLEAN, tmp_path) == 1
    err = capsys.readouterr().err
    assert "cfbench: run failed: checkpoint" in err and "cfbench doctor --fix" in err and "Traceback" not in err
    from cfbench.doctor import diagnose

    assert [f.kind for f in diagnose(tmp_path / "runs")] == ["corrupt-checkpoint"]
    assert cli(["doctor", "--fix"], tmp_path) == 0
    assert cli(CLEAN, tmp_path) == 0
    assert_clean_and_equal(tmp_path / "runs", reference)


def test_a_finished_runs_checkpoint_is_never_resumed_into_another_result(tmp_path, clean_reference):
    """A checkpoint planted in a finished run (here: epoch 1 of another seed) is removed by the
    next run of its command and ignored by --force: the result is the run's own."""
    _, reference = clean_reference
    other = tmp_path / "other"
    assert killed_at([*CLEAN, "--seed", "5"], other, ("replace", "last.safetensors", 1, "after"))
    (foreign,) = other.glob("runs/*/checkpoints/last.safetensors")
    assert cli(CLEAN, tmp_path) == 0
    (run,) = run_dirs(tmp_path / "runs")
    for args in (CLEAN, [*CLEAN, "--force"]):
        (run / "checkpoints").mkdir(exist_ok=True)
        shutil.copy(foreign, run / "checkpoints" / "last.safetensors")
        assert cli(args, tmp_path) == 0
        assert "resumed_from_epoch" not in json.loads((run / "record.json").read_text())["notes"]["defense"]
        assert_clean_and_equal(tmp_path / "runs", reference)


# -- locks: two processes never do the same work twice -------------------------------------

def test_two_threads_needing_one_model_train_it_once(tmp_path, monkeypatch):
    """``run_job`` holds an flock while it trains; flock locks of separate opens exclude each
    other within one process too, so two threads show it (the executor's worker processes
    rely on the same lock)."""
    import cfbench.execution.jobs as J
    from cfbench.execution.reference import reference_job
    from cfbench.testing.tiny import tiny_config, tiny_data

    cfg = tiny_config()
    job = reference_job(cfg, tiny_data(cfg), 0, tmp_path / "_cache")
    calls, real = [], J.fit_recipe

    def slow_fit(*a, **k):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # both threads are past their first look for the file by now
        return real(*a, **k)

    monkeypatch.setattr(J, "fit_recipe", slow_fit)
    barrier = threading.Barrier(2)
    paths = []

    def work():
        barrier.wait()
        paths.append(J.run_job(job))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert paths == [job.path, job.path] and len(calls) == 1
    assert J.model_file_problem(job.path, job) is None


COUNTING = textwrap.dedent('''
    import os, sys
    import cfbench.execution.jobs as J, cfbench.runner as R
    log = os.environ["FIT_LOG"]
    def counted(real):
        def fit(*a, **k):
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {k.get('desc')}\\n")
            return real(*a, **k)
        return fit
    J.fit_recipe, R.fit_recipe = counted(J.fit_recipe), counted(R.fit_recipe)
    if os.environ.get("CFBENCH_TEST_NO_LOCKS"):  # shows that the test can fail: no locks, double work
        import contextlib
        J.file_lock = lambda *a, **k: contextlib.nullcontext(True)
        R.run_lock = lambda *a, **k: contextlib.nullcontext()
    from cfbench.cli import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [(0, 0), (0, 1)], ids=["identical-runs", "runs-sharing-reference-models"])
def test_concurrent_runs_train_each_model_once(seeds, tmp_path):
    """Two processes at once: identical runs (the run lock: the second waits, then reuses the
    first's record) and two seeds of one recipe (the job lock: their reference models are
    trained once).  Every training is logged by a wrapper around ``fit_recipe``."""
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    log = tmp_path / "fits.log"
    env = {**os.environ, "FIT_LOG": str(log), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([PY, str(script), *MIA, "--seed", str(s), "--out", "runs"], cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for s in seeds]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    fits = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    targets = [f for f in fits if "target" in f]
    refs = [f for f in fits if "reference" in f]
    assert len(targets) == len(set(seeds)) and len(refs) == len(set(refs)) == 2, fits
    out = tmp_path / "runs"
    assert len(run_dirs(out)) == len(set(seeds)) and leftovers(out) == []
    for run in run_dirs(out):
        assert json.loads((run / "record.json").read_text())["status"] == "ok"


# -- names that could leave --out, plugins that exit, bad values ---------------------------

@pytest.fixture()
def fresh_registry(monkeypatch):
    monkeypatch.delenv("CFBENCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    registry.reset()
    yield
    registry.reset()


ESCAPING = textwrap.dedent('''
    import torch.nn.functional as F
    from dataclasses import dataclass
    from cfbench.defenses import Defense

    @dataclass(frozen=True)
    class Params:
        pass

    class Escaped(Defense):
        name = "{name}"
        Params = Params

        def loss(self, model, x, y, batch):
            logits = model(x)
            return F.cross_entropy(logits, y), logits
''')


@pytest.mark.parametrize("name", ["../../../escaped", "a/b", ".hidden", "Upper", "", "x" * 101, "sp ace"])
def test_a_component_name_that_could_leave_out_is_refused_naming_the_pattern(name, tmp_path, capsys,
                                                                             fresh_registry):
    f = tmp_path / "plugin.py"
    f.write_text(ESCAPING.format(name=name))
    code = main(["--plugin", str(f), *CLEAN, "--defense", name or "x", "--out", str(tmp_path / "w" / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    if name:  # an empty name is no component at all (a class without a name is not registered)
        assert "[a-z0-9][a-z0-9._-]*" in err and repr(name) in err and str(f) in err
    assert not (tmp_path / "escaped").exists() and not list((tmp_path / "w").rglob("*"))


def test_an_entry_point_with_such_a_name_is_listed_with_its_error_and_refused(tmp_path, monkeypatch, capsys,
                                                                            fresh_registry):
    site = tmp_path / "site"
    site.mkdir()
    (site / "esc_mod.py").write_text(ESCAPING.format(name="../../../escaped"))
    info = site / "esc-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: esc\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[cfbench.defenses]\n../../../escaped = esc_mod:Escaped\n")
    monkeypatch.syspath_prepend(str(site))
    assert main(["list", "defense"]) == 0
    out = capsys.readouterr().out
    assert "../../../escaped" in out and "not a valid component name" in out
    with pytest.raises(PluginError, match=r"\[a-z0-9\]\[a-z0-9\._-\]\*"):
        registry.get("defense", "../../../escaped")
    assert "esc_mod" not in sys.modules  # refused without importing it


def test_run_ids_are_single_safe_folder_names():
    import dataclasses

    from cfbench.config import make_config, safe_name

    cfg = make_config(evaluators=("clean",))
    assert safe_name("pgd-at") == "pgd-at" and safe_name("cifar10") == "cifar10"   # valid names unchanged
    for bad in ("../../../escaped", "a/b\\c", "..", ".x", "a b"):
        rid = dataclasses.replace(cfg, defense=bad).run_id()
        assert "/" not in rid and "\\" not in rid and not rid.startswith(".") and " " not in rid
        root = Path("/store")
        assert (root / rid).resolve().parent == root


def test_a_plugin_calling_sys_exit_at_import_is_a_plugin_error_naming_the_file(tmp_path, capsys, fresh_registry):
    f = tmp_path / "exits.py"
    f.write_text("import sys\nsys.exit(3)\n")
    assert main(["--plugin", str(f), "list"]) == 2
    err = capsys.readouterr().err
    assert f"cfbench: error: plugin file {f} called sys.exit(3)" in err and f"{f}:2" in err
    with pytest.raises(PluginError, match="called sys.exit"):
        registry.load_plugin_file(f)


def test_an_entry_point_calling_sys_exit_is_an_error_only_when_used(tmp_path, monkeypatch, capsys, fresh_registry):
    site = tmp_path / "site"
    site.mkdir()
    (site / "exit_mod.py").write_text("import sys\nsys.exit(3)\n")
    info = site / "exiter-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exiter\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[cfbench.defenses]\nexiter = exit_mod:X\n")
    monkeypatch.syspath_prepend(str(site))
    assert main(["run", *CLEAN[1:], "--defense", "exiter", "--out", str(tmp_path / "runs")]) == 2
    assert "SystemExit: 3" in capsys.readouterr().err
    sys.modules.pop("exit_mod", None)


@pytest.mark.parametrize("args, needle", [
    (["--threads", "-1"], "--threads -1 is not valid"),
    (["--evaluators", ","], "has an empty name"),
    (["--evaluators", "clean,,pgd"], "has an empty name"),
    (["--evaluators", "clean,clean"], "listed twice"),
    (["--set", "epochs=abc", "--set", "epochs=1"], "train.epochs is given twice ('abc' and '1')"),
    (["--set", "eps=inf"], "threat.eps=inf is outside the valid range for the Linf threat model: 0 <= eps <= 1"),
    (["--set", "eps=5"], "threat.eps=5.0 is outside the valid range for the Linf threat model: 0 <= eps <= 1"),
    (["--set", "threat.norm=L2", "--set", "eps=8.01"], "0 <= eps <= sqrt(C*H*W) = sqrt(64) = 8"),
    (["--set", "eps=nan"], "threat.eps"),
])
def test_bad_values_are_usage_errors_naming_value_and_valid_range(args, needle, tmp_path, capsys):
    base = [a for a in RUN if a != "epochs=2"]
    base.remove("--set")  # the --set of epochs=2: this test gives its own
    assert main([*base, "--evaluators", "clean", *args, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cfbench: error: ") and needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_the_edges_of_the_eps_range_are_accepted():
    from cfbench.config import make_config

    assert make_config(sets={"eps": 1}, evaluators=("clean",)).eps == 1.0
    assert make_config(sets={"threat.norm": "L2", "eps": 8}, evaluators=("clean",)).eps == 8.0
    assert make_config(sets={"eps": 0}, evaluators=("clean",)).eps == 0.0
    with pytest.raises(UsageError, match=r"sqrt\(784\) = 28"):
        make_config(dataset="mnist", sets={"threat.norm": "L2", "eps": 29}, evaluators=("clean",))


def test_a_closed_pipe_is_a_quiet_exit():
    for cmd in ("list",):
        proc = subprocess.run(f"{PY} -m cfbench.cli {cmd} | head -1", shell=True, capture_output=True, text=True,
                              cwd=REPO, timeout=300, executable="/bin/bash", check=False)
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_another_broken_pipe_is_still_an_error(monkeypatch, capsys, tmp_path):
    """Only stdout's reader going away is quiet; a broken pipe elsewhere is an error."""
    import cfbench.cli as C

    def boom(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(C, "cmd_list", boom)  # the parser binds it when main() builds it
    capsys.readouterr()
    assert main(["list"]) == 1
    assert "cfbench: error: Broken pipe" in capsys.readouterr().err


# -- the writer's temporaries and locks ----------------------------------------------------

def test_a_temporary_is_stale_only_when_its_writer_is_gone(tmp_path):
    from cfbench.store.io import STALE_AGE_SECONDS, is_stale_temp, temp_target

    host = store_io._HOST
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = tmp_path / f".record.json.{host}.{os.getpid()}.abc_12de.tmp"
    gone = tmp_path / f".record.json.{host}.{dead.pid}.abc_12de.tmp"
    other_host = tmp_path / f".0.safetensors.otherhost.{dead.pid}.abcdefgh.tmp"
    legacy = tmp_path / ".model.safetensors.k3j4h5g6.tmp"
    plain = tmp_path / "notes.tmp"
    for p in (live, gone, other_host, legacy, plain):
        p.write_bytes(b"x")
    assert [temp_target(p) for p in (live, gone, other_host, legacy, plain)] == \
        ["record.json", "record.json", "0.safetensors", "model.safetensors", None]
    assert not is_stale_temp(live) and is_stale_temp(gone) and not is_stale_temp(plain)
    # a writer that cannot be asked (another host, an older cfbench): stale after an hour
    assert not is_stale_temp(other_host) and not is_stale_temp(legacy)
    old = time.time() - STALE_AGE_SECONDS - 10
    for p in (other_host, legacy):
        os.utime(p, (old, old))
        assert is_stale_temp(p)


def test_the_writer_removes_its_killed_predecessors_temporaries_and_only_those(tmp_path):
    from cfbench.store.io import atomic_write_text

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = store_io._HOST
    mine = tmp_path / f".record.json.{host}.{dead.pid}.aaaaaaaa.tmp"
    live = tmp_path / f".record.json.{host}.{os.getpid()}.bbbbbbbb.tmp"
    other = tmp_path / f".model.safetensors.{host}.{dead.pid}.cccccccc.tmp"
    for p in (mine, live, other):
        p.write_bytes(b"half")
    atomic_write_text(tmp_path / "record.json", "{}")
    assert not mine.exists() and live.exists() and other.exists()
    assert (tmp_path / "record.json").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path):
    from cfbench.store.io import atomic_write, atomic_write_text

    target = atomic_write_text(tmp_path / "a.json", "old")

    def fails(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:
        atomic_write(target, fails)
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    from cfbench.store.io import file_lock, is_locked

    lock = tmp_path / ".x.lock"
    holder = subprocess.Popen([PY, "-c", textwrap.dedent(f'''
        import sys, time
        from cfbench.store.io import file_lock
        with file_lock({str(lock)!r}):
            print("held", flush=True)
            time.sleep(600)
    ''')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_locked(lock)
        with file_lock(lock, blocking=False) as got:
            assert got is False
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with file_lock(lock, blocking=False) as got:   # the kernel released it
            assert got is True
    finally:
        holder.kill()
        holder.wait()


# -- cfbench doctor ------------------------------------------------------------------------

def test_doctor_lists_then_fixes_every_kind_of_leftover(tmp_path, capsys, mia_reference):
    assert cli(MIA, tmp_path) == 0
    out = tmp_path / "runs"
    (run,) = run_dirs(out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = store_io._HOST
    (run / f".record.json.{host}.{dead.pid}.aaaaaaaa.tmp").write_bytes(b"{")
    (run / f".report.html.{host}.{dead.pid}.bbbbbbbb.tmp").write_bytes(b"<")
    (sig_dir := out / "_cache" / "signals").mkdir(exist_ok=True)
    (sig_dir / f".x.safetensors.{host}.{dead.pid}.cccccccc.tmp").write_bytes(b"")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.safetensors").write_bytes(b"x")
    (ref0,) = out.glob("_cache/refmodels/*/0.safetensors")
    ref0.with_suffix(".ckpt").mkdir()
    (ref1,) = out.glob("_cache/refmodels/*/1.safetensors")
    ref1.write_bytes(ref1.read_bytes()[:50])
    live = run / f".model.safetensors.{host}.{os.getpid()}.dddddddd.tmp"
    live.write_bytes(b"in progress")
    capsys.readouterr()
    assert cli(["doctor"], tmp_path) == 1                       # problems found, nothing changed
    listing = capsys.readouterr().out
    kinds = sorted(line.split()[0] for line in listing.splitlines()
                   if line and not line.startswith((" ", "cfbench")))
    assert kinds == ["corrupt-cache", "leftover-temp", "leftover-temp", "leftover-temp", "stale-checkpoint",
                          "stale-checkpoint"] and "--fix" in listing
    assert (run / "checkpoints").exists() and ref1.exists()
    assert cli(["doctor", "--fix"], tmp_path) == 0
    assert "fixed 6 problems" in capsys.readouterr().out
    assert live.exists()                                        # a live writer's temporary is never touched
    live.unlink()
    assert cli(["doctor"], tmp_path) == 0 and "nothing to fix" in capsys.readouterr().out
    assert not ref1.exists() and leftovers(out) == []
    assert cli(MIA, tmp_path) == 0                              # reused; and a new run retrains ref 1


def test_doctor_of_a_missing_store_is_a_usage_error(tmp_path, capsys):
    assert main(["doctor", "--out", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_doctor_skips_a_run_a_live_process_is_working_on(tmp_path):
    from cfbench.doctor import diagnose
    from cfbench.store.io import file_lock
    from cfbench.store.lifecycle import run_lock_path

    assert killed_at(CLEAN, tmp_path, ("replace", "record.json", 1, "after"))
    (run,) = run_dirs(tmp_path / "runs")
    assert [f.kind for f in diagnose(tmp_path / "runs")] == ["stale-checkpoint"]
    holder = subprocess.Popen([PY, "-c", textwrap.dedent(f'''
        import time
        from cfbench.store.io import file_lock
        with file_lock({str(run_lock_path(tmp_path / "runs", run.name))!r}):
            print("held", flush=True)
            time.sleep(600)
    ''')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert diagnose(tmp_path / "runs") == []
    finally:
        holder.kill()
        holder.wait()
    with file_lock(run_lock_path(tmp_path / "runs", run.name), blocking=False) as got:
        assert got


def test_doctor_agrees_with_the_training_loop_on_the_checkpoint_name():
    from cfbench import doctor
    from cfbench.training.checkpoint import CKPT_NAME

    assert doctor.CKPT_NAME == CKPT_NAME


def test_a_run_left_only_in_the_trash_is_restored(tmp_path, clean_reference):
    _, reference = clean_reference
    assert cli(CLEAN, tmp_path) == 0
    out = tmp_path / "runs"
    (run,) = run_dirs(out)
    record = (run / "record.json").read_bytes()
    (out / ".trash").mkdir()
    os.rename(run, out / ".trash" / run.name)     # as if a swap had been interrupted
    run.mkdir()
    (run / ".lock").touch()                      # a process took the run's lock meanwhile
    assert cli(CLEAN, tmp_path) == 0
    assert (run / "record.json").read_bytes() == record   # restored and reused, not recomputed
    assert_clean_and_equal(out, reference)


def test_the_run_lock_excludes_waiters_and_newcomers_across_a_force_swap(tmp_path):
    from cfbench.store.io import file_lock
    from cfbench.store.lifecycle import (
        fresh_staging,
        run_lock,
        run_lock_path,
        swap_in,
        trash_dir,
    )

    out, rid = tmp_path, "digits-x"
    (out / rid).mkdir()
    (out / rid / "old").write_text("old")
    got: list[str] = []

    def waiter():
        with run_lock(out, rid):
            got.append((out / rid / "new").read_text() if (out / rid / "new").exists() else "old only")

    with run_lock(out, rid):
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)
        staging = fresh_staging(out, rid)
        (staging / "new").write_text("new")
        swap_in(staging, out / rid, trash_dir(out, rid))
        time.sleep(0.3)
        assert got == []                                           # the waiter still waits ...
        with file_lock(run_lock_path(out, rid), blocking=False) as newcomer:
            assert newcomer is False                               # ... and a newcomer is refused
    t.join(timeout=30)
    assert got == ["new"]


AA_RUN = [*RUN, "--evaluators", "clean,autoattack,pgd", "--set", "autoattack.n_examples=16",
          "--set", "pgd.n_examples=16", "--set", "pgd.steps=2"]


def test_a_run_killed_after_autoattack_takes_autoattacks_result_from_its_state(tmp_path, monkeypatch):
    """AutoAttack's finished state stays in the run folder until the record is written: a run
    killed in a later evaluator resumes without attacking again, with the uninterrupted result,
    and the state is gone once the run is finished."""
    from cfbench.evaluators.robust import STATE_FILE, PGDRobustness
    from pyautoattack import AutoAttack

    assert cli(AA_RUN, tmp_path / "plain") == 0
    (plain,) = run_dirs(tmp_path / "plain" / "runs")
    assert not (plain / STATE_FILE).exists()
    want = json.loads((plain / "record.json").read_text())["metrics"]

    real_pgd = PGDRobustness.evaluate

    def killed(self, ctx):
        raise KeyboardInterrupt("killed in the evaluator after AutoAttack")

    monkeypatch.setattr(PGDRobustness, "evaluate", killed)
    where = tmp_path / "killed"
    assert cli(AA_RUN, where) == 130                            # interrupted
    (run,) = run_dirs(where / "runs")
    assert (run / STATE_FILE).exists() and not (run / "record.json").exists()

    def no_attack(self, x, y, **kw):
        raise AssertionError("AutoAttack ran again")

    monkeypatch.setattr(PGDRobustness, "evaluate", real_pgd)
    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", no_attack)
    assert cli(AA_RUN, where) == 0
    rec = json.loads((run / "record.json").read_text())
    assert rec["status"] == "ok" and rec["notes"]["robust.autoattack"]["resumed"]
    for k in ("robust.autoattack.accuracy", "robust.pgd.accuracy", "clean.accuracy"):
        assert rec["metrics"][k] == want[k], k
    assert not (run / STATE_FILE).exists()


def test_doctor_removes_the_evaluator_state_a_finished_run_left(tmp_path):
    """A kill between the record's rename and the cleanup leaves autoattack_state.safetensors:
    doctor lists it as stale and --fix removes it; rerunning the command removes it too."""
    from cfbench.doctor import diagnose
    from cfbench.evaluators.robust import STATE_FILE

    where = tmp_path / "w"
    assert killed_at(AA_RUN, where, ("replace", "record.json", 1, "after"))
    (run,) = run_dirs(where / "runs")
    assert (run / STATE_FILE).exists()
    found = {(f.kind, f.path.name) for f in diagnose(where / "runs")}
    assert ("stale-checkpoint", STATE_FILE) in found
    record_before = (run / "record.json").read_bytes()
    assert cli(AA_RUN, where) == 0                              # reused, and the leftovers removed
    assert (run / "record.json").read_bytes() == record_before
    assert not (run / STATE_FILE).exists() and diagnose(where / "runs") == []
    # planted again: doctor --fix removes it
    shutil.copy(run / "model.safetensors", run / STATE_FILE)
    assert [(f.kind, f.path.name) for f in diagnose(where / "runs")] == [("stale-checkpoint", STATE_FILE)]
    assert cli(["doctor", "--fix"], where) == 0
    assert not (run / STATE_FILE).exists()

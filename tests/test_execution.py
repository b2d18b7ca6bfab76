"""Executors and sweeps: results identical whichever executor ran them; bad input exits 2
before anything starts; a sweep skips finished runs and survives a killed worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cfbench.cli import main
from cfbench.errors import UsageError
from cfbench.execution import reference as XR
from cfbench.execution.jobs import run_job
from cfbench.execution.executors import make_executor
from cfbench.execution.local import LocalExecutor
from cfbench.runner import execute
from cfbench.store.io import load_tensors
from cfbench.sweep import expand, load_grid
from cfbench.testing.tiny import tiny_config, tiny_data

REPO = Path(__file__).resolve().parents[1]
TINY_SETS = {"epochs": 2, "data.pool_size": 160, "data.test_size": 64, "mia.reference_models": 2,
             "mia.population_size": 64}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_job_trains_the_same_model_in_process_and_in_a_pool_worker(tmp_path):
    cfg = tiny_config("pgd-at", sets={"defense.steps": 2})
    data = tiny_data(cfg)
    here = run_job(XR.reference_job(cfg, data, 1, tmp_path / "a"))
    with LocalExecutor(workers=2) as ex:
        [there] = ex.run([XR.reference_job(cfg, data, 1, tmp_path / "b")])
        assert ex.modes[str(there)] == "worker"
    assert _same(_weights(here), _weights(there))


def test_deterministic_reaches_pool_workers(tmp_path):
    """`--deterministic` is applied in the worker that trains a job (recorded in the model file's
    metadata), and switched off again for a later job of a run without it (a Ray worker runs
    jobs of several runs)."""
    import dataclasses

    from cfbench.execution.local import _job_determinism
    from cfbench.store.io import read_tensor_meta

    cfg = tiny_config("erm")
    data = tiny_data(cfg)
    strict = dataclasses.replace(cfg, deterministic=True)
    with LocalExecutor(workers=1 + 1) as ex:
        [a] = ex.run([XR.reference_job(strict, data, 0, tmp_path / "a")])
        [b] = ex.run([XR.reference_job(cfg, data, 0, tmp_path / "b")])
        assert ex.modes[str(a)] == ex.modes[str(b)] == "worker"
    assert read_tensor_meta(a)["deterministic_algorithms"] is True
    assert read_tensor_meta(b)["deterministic_algorithms"] is False
    assert _same(_weights(a), _weights(b))     # on CPU the switch changes no result
    try:                                       # one worker, two runs' jobs in turn
        _job_determinism(strict)
        assert torch.are_deterministic_algorithms_enabled()
        _job_determinism(cfg)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize("train_mode", ["serial", "batched"])
def test_a_job_another_process_is_training_is_deferred_not_waited_for(tmp_path, train_mode):
    """Job 0's lock is held elsewhere (another run of the recipe training it): the in-process
    executor trains job 1 first (batched: outside job 0's group), then waits for job 0 and
    returns the paths in job order."""
    import fcntl
    import threading

    from cfbench.store.io import lock_path

    cfg = tiny_config("erm")
    data = tiny_data(cfg)
    jobs = [XR.reference_job(cfg, data, i, tmp_path) for i in range(2)]
    lock = lock_path(jobs[0].path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)                   # "another process" (a separate open file description)
    got: list = []
    t = threading.Thread(target=lambda: got.append(LocalExecutor(workers=1, train_mode=train_mode).run(jobs)),
                         daemon=True)
    t.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not jobs[1].path.exists():
            time.sleep(0.2)
        assert jobs[1].path.exists(), "job 1 was not trained while job 0 was busy elsewhere"
        assert not jobs[0].path.exists() and t.is_alive()      # job 0 still waits for its lock
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    t.join(timeout=120)
    assert got and got[0] == [jobs[0].path, jobs[1].path] and jobs[0].path.exists()


@pytest.mark.parametrize("train_mode", ["serial", "batched"])
def test_the_pool_starts_a_job_another_process_is_training_last_and_never_batches_it(tmp_path, train_mode):
    """Pool path: job 0's lock is held elsewhere, so it is submitted after the free jobs (a
    worker would otherwise block on it while they wait) and alone, never inside a group."""
    import fcntl
    from concurrent.futures import Future

    from cfbench.store.io import lock_path

    cfg = tiny_config("erm")
    data = tiny_data(cfg)
    jobs = [XR.reference_job(cfg, data, i, tmp_path) for i in range(5)]
    lock = lock_path(jobs[0].path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    submitted: list = []

    class FakePool:
        def submit(self, fn, arg):
            submitted.append([Path(j.path) for j in (arg if isinstance(arg, list) else [arg])])
            return Future()

    try:
        ex = LocalExecutor(workers=2, train_mode=train_mode)
        ex._ensure_pool = lambda: FakePool()
        ex.submit(jobs)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert submitted[-1] == [jobs[0].path], submitted
    assert sorted(p for unit in submitted[:-1] for p in unit) == sorted(j.path for j in jobs[1:])
    if train_mode == "batched":
        assert all(len(unit) >= 2 for unit in submitted[:-1]), submitted


def test_a_job_whose_data_changed_in_memory_runs_in_process(tmp_path):
    cfg = tiny_config("erm")
    data = tiny_data(cfg)
    import copy

    changed = copy.deepcopy(data)
    changed.dataset.y_train = (changed.dataset.y_train + 1) % 10        # not reproducible from the recipe
    with LocalExecutor(workers=2) as ex:
        [path] = ex.run([XR.reference_job(cfg, changed, 0, tmp_path)])
        assert ex.modes[str(path)] == "in-process"
    assert path.exists()


def test_a_run_gives_identical_metrics_and_weights_with_a_pool_and_in_process(tmp_path):
    cfg = tiny_config("erm", sets=TINY_SETS, evaluators=("clean", "mia"))
    serial = execute(cfg, tmp_path / "serial", progress=False)
    with LocalExecutor(workers=2) as ex:
        pooled = execute(cfg, tmp_path / "pool", progress=False, executor=ex)
    assert serial.record["metrics"] == pooled.record["metrics"]
    assert _same(_weights(serial.run_dir / "model.safetensors"), _weights(pooled.run_dir / "model.safetensors"))
    modes = {j["executor"] for j in pooled.record["jobs"]}
    assert modes == {"local:worker"}, modes              # the reference models trained in the pool
    assert {j["executor"] for j in serial.record["jobs"]} == {"local:in-process"}


@pytest.mark.parametrize("kwargs, needle", [
    ({"name": "dask"}, "unknown executor 'dask'. Valid choices: local, ray"),
    ({"name": "local", "workers": 0}, "--workers 0 is not valid"),
    ({"name": "local", "address": "127.0.0.1:1"}, "--address applies to --executor ray only"),
    ({"name": "ray", "address": "127.0.0.1:1"}, "unreachable"),
    ({"name": "ray", "address": "nonsense"}, "not HOST:PORT"),
])
def test_bad_executor_settings_are_usage_errors(kwargs, needle):
    pytest.importorskip("ray") if kwargs["name"] == "ray" else None
    with pytest.raises(UsageError, match=needle):
        make_executor(**kwargs)


# -- sweeps -------------------------------------------------------------------------------

GRID = """
defense = ["erm", "pgd-at"]
dataset = "digits"
seed = [0, 1]
evaluators = "clean,pgd"
[set]
epochs = 1
"data.pool_size" = 200
"data.test_size" = 64
"pgd.n_examples" = 32
"pgd.steps" = 2
"defense.steps" = 2
"model.width" = 8
"""


def _grid(tmp_path, text=GRID, name="grid.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def test_the_grid_expands_to_the_product_of_its_axes(tmp_path):
    # pgd-at has `steps`, erm does not: `defense.steps` is fine for erm? no -> erm rejects it
    text = GRID.replace('"defense.steps" = 2\n', "")
    points = expand(load_grid(_grid(tmp_path, text)))
    assert [(p.cfg.defense, p.cfg.seed) for p in points] == [("erm", 0), ("erm", 1), ("pgd-at", 0), ("pgd-at", 1)]
    assert all(p.cfg.train.epochs == 1 and p.cfg.evaluators == ("clean", "pgd") for p in points)
    eps = expand(load_grid(_grid(tmp_path, text.replace("epochs = 1", "epochs = 1\neps = [0.05, 0.1]"), "e.toml")))
    assert len(eps) == 8 and {p.cfg.threat.eps for p in eps} == {0.05, 0.1}


@pytest.mark.parametrize("edit, needle", [
    (lambda g: g.replace('defense = ["erm", "pgd-at"]', 'defense = ["erm", "pgd-att"]'), "unknown defense 'pgd-att'"),
    (lambda g: g.replace('dataset = "digits"', 'dataset = "digitz"'), "digitz"),
    (lambda g: g.replace("epochs = 1", 'epochs = "many"'), "epochs"),
    (lambda g: g.replace("epochs = 1", "epochz = 1"), "unknown setting 'epochz'"),
    (lambda g: "seeds = [0]\n" + g, "unknown key 'seeds'"),
    (lambda g: g.replace("seed = [0, 1]", 'seed = ["zero"]'), "seed values must be ints"),
    (lambda g: g + "\nthis is not toml", "not valid TOML"),
])
def test_a_bad_grid_exits_2_before_anything_starts(tmp_path, capsys, edit, needle):
    g = _grid(tmp_path, edit(GRID.replace('"defense.steps" = 2\n', "")))
    out = tmp_path / "runs"
    assert main(["sweep", str(g), "--out", str(out), "--workers", "1"]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()                      # nothing started


def test_a_sweep_runs_skips_finished_runs_and_builds_its_leaderboard(tmp_path, capsys):
    g = _grid(tmp_path, GRID.replace('"defense.steps" = 2\n', ""))
    out = tmp_path / "runs"
    assert main(["sweep", str(g), "--out", str(out), "--workers", "2"]) == 0
    recs = sorted(out.glob("*/record.json"))
    assert len(recs) == 4 and all(json.loads(p.read_text())["status"] == "ok" for p in recs)
    assert len(list((out / "leaderboards").glob("digits-cnn8-Linf-0.1-*.md"))) == 1  # <name>-<protocol hash>
    assert all((p.parent / "report.html").exists() for p in recs)   # the table's rows link to them
    err = capsys.readouterr().err
    # piped (not a terminal): no bar frames, one timestamped line per finished run with k/K and an ETA
    assert "\r" not in err
    assert [ln.split(" finished ")[0][9:] for ln in err.splitlines() if " finished " in ln] == [
        f"sweep: run {k}/4" for k in range(1, 5)], err
    before = {p: p.stat().st_mtime_ns for p in recs}
    assert main(["sweep", str(g), "--out", str(out), "--dry-run"]) == 0
    assert "4 already finished, 0 to run" in capsys.readouterr().out
    assert main(["sweep", str(g), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in recs} == before     # nothing recomputed
    # the sweep's records equal those of the same runs made one by one in-process
    from cfbench.sweep import expand as _expand

    p0 = _expand(load_grid(g))[0]
    alone = execute(p0.cfg, tmp_path / "alone", progress=False)
    swept = json.loads((out / p0.cfg.run_id() / "record.json").read_text())
    assert alone.record["metrics"] == swept["metrics"]


def test_a_sweep_starts_its_runs_seed_by_seed(tmp_path, capsys):
    """Every recipe's first seed before any second seed (grid order within a seed): a sweep
    stopped part-way holds every recipe once.  The grid's own order is defense-major."""
    g = _grid(tmp_path, GRID.replace('"defense.steps" = 2\n', "").replace("seed = [0, 1]", "seed = [0, 1, 2]"))
    assert [(p.cfg.defense, p.cfg.seed) for p in expand(load_grid(g))][:2] == [("erm", 0), ("erm", 1)]
    assert main(["sweep", str(g), "--out", str(tmp_path / "runs"), "--dry-run"]) == 0
    started = [ln.split()[2] for ln in capsys.readouterr().out.splitlines() if "would run" in ln]
    want = [p.cfg.run_id() for s in (0, 1, 2) for p in expand(load_grid(g)) if p.cfg.seed == s]
    assert started == want and [i.split("-s")[-1][0] for i in started] == list("001122"), started

def test_a_swept_leaderboard_names_the_sweep_that_produced_its_runs(tmp_path):
    """Every table built from a runs folder a sweep wrote into names that sweep's command (from
    the folder's sweeps.json), whether the sweep or `cfbench leaderboard` builds it; a second
    sweep into the folder keeps the first's entry; a damaged sweeps.json is reported, not fatal."""
    import warnings

    from cfbench.present.leaderboard import SWEEPS_FILE, build, read_sweeps
    from cfbench.present.writers import to_json_obj, to_markdown

    text = GRID.replace('"defense.steps" = 2\n', "").replace('defense = ["erm", "pgd-at"]', 'defense = "erm"')
    g1 = _grid(tmp_path, text.replace("seed = [0, 1]", "seed = 0"), "one.toml")
    g2 = _grid(tmp_path, text.replace("seed = [0, 1]", "seed = 1").replace('"model.width" = 8', '"model.width" = 6'),
               "two.toml")
    out = tmp_path / "runs"
    assert main(["sweep", str(g1), "--out", str(out), "--workers", "1"]) == 0
    assert main(["sweep", str(g2), "--out", str(out), "--workers", "1"]) == 0
    # the first sweep file typed another way (its runs are finished: nothing reruns) is the same entry
    assert main(["sweep", f"{tmp_path}/./{g1.name}", "--out", f"{out}//", "--workers", "1"]) == 0
    entries = {e["grid"]: e for e in read_sweeps(out)}
    assert set(entries) == {str(g1), str(g2)}
    assert entries[str(g1)]["command"] == f"cfbench sweep {g1} --out {out}"
    md = sorted((out / "leaderboards").glob("*.md"))
    assert len(md) == 2                                   # widths differ: two protocols
    boards = {lb.records["run_id"].iloc[0]: lb for lb in build(out)}
    for e in entries.values():
        (rid,) = e["run_ids"]
        lb = boards[rid]
        assert lb.produced_by == [e["command"]]           # each table names its own sweep only
        assert f"Runs produced by: `{e['command']}`" in to_markdown(lb)
        assert to_json_obj(lb)["produced_by"] == [e["command"]]
    assert any(f"Runs produced by: `{entries[str(g1)]['command']}`" in p.read_text() for p in md)
    (out / SWEEPS_FILE).write_text("{not json", encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = build(out)
    assert len(rebuilt) == 2 and all(lb.produced_by == [] for lb in rebuilt)
    assert any(SWEEPS_FILE in str(w.message) and "unreadable" in str(w.message) for w in caught)


def test_a_table_built_while_its_sweep_is_unfinished_says_how_far_it_is(tmp_path):
    """A table whose sweep has runs without a finished record names the count next to the
    sweep's command in every format; once they are finished (or for a finished sweep) the
    command stands alone, and the JSON round-trips the count."""
    from cfbench.present.leaderboard import Leaderboard, build, record_sweep
    from cfbench.present.writers import to_csv, to_html, to_json_obj, to_latex, to_markdown
    from cfbench.sweep import sweep_command

    text = GRID.replace('"defense.steps" = 2\n', "").replace('defense = ["erm", "pgd-at"]', 'defense = "erm"')
    g = _grid(tmp_path, text)
    out = tmp_path / "runs"
    assert main(["sweep", str(g), "--out", str(out), "--workers", "1"]) == 0
    (lb,) = build(out)
    cmd = sweep_command(g, out)
    assert lb.produced_by == [cmd] and lb.sweep_progress == [{"finished": 2, "runs": 2}]
    assert f"Runs produced by: `{cmd}`\n" in to_markdown(lb) and "runs finished" not in to_csv(lb)
    # the same grid file grown to three seeds (as a sweep records it when it starts): 2 of 3
    bigger = [p.cfg.run_id() for p in expand(load_grid(_grid(tmp_path, text.replace("seed = [0, 1]", "seed = [0, 1, 2]"),
                                                              "big.toml")))]
    record_sweep(out, str(g), cmd, bigger)
    (lb,) = build(out)
    assert lb.sweep_progress == [{"finished": 2, "runs": 3}]
    note = "(2 of the sweep's 3 runs finished; the table grows as the sweep resumes)"
    assert f"Runs produced by: `{cmd}` {note}" in to_markdown(lb)
    for rendered in (to_csv(lb), to_latex(lb), to_html(lb)):
        assert note in rendered.replace("&#39;", "'"), rendered[:600]
    again = Leaderboard.from_json(json.loads(json.dumps(to_json_obj(lb))))
    assert again.sweep_progress == lb.sweep_progress and again.produced_by_text() == lb.produced_by_text()

@pytest.mark.slow
def test_a_sweep_survives_a_killed_worker(tmp_path):
    """SIGKILL one pool worker in the middle of a run: the sweep restarts the pool, finishes
    every run once, and leaves no temporary or half-written file."""
    text = GRID.replace('"defense.steps" = 2\n', "").replace("epochs = 1", "epochs = 6").replace(
        "seed = [0, 1]", "seed = [0, 1, 2]")
    g = _grid(tmp_path, text)
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "cfbench.cli", "sweep", str(g), "--out", str(out),
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        time.sleep(0.5)
        if any(out.glob("*/checkpoints/*.safetensors")):
            kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            workers = [int(k) for k in kids
                       if "spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="ignore")]
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed = True
    stdout, stderr = proc.communicate(timeout=600)
    assert killed, "no worker to kill"
    assert proc.returncode == 0, stderr
    assert "a worker process died" in stderr
    recs = sorted(out.glob("*/record.json"))
    assert len(recs) == 6 and all(json.loads(p.read_text())["status"] == "ok" for p in recs)
    assert not list(out.rglob("*.tmp")) and not list(out.glob("*/checkpoints"))


def _free_port(lo: int, hi: int) -> int:
    import random
    import socket

    for port in random.Random(os.getpid()).sample(range(lo, hi), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


RAY_GRID = GRID.replace('"defense.steps" = 2\n', "").replace('defense = ["erm", "pgd-at"]', 'defense = ["erm"]')


@pytest.mark.slow
def test_a_sweep_on_a_real_local_ray_cluster_equals_the_local_executor(tmp_path):
    """A Ray head and one extra worker node on loopback; the sweep's records equal the local ones."""
    pytest.importorskip("ray")
    ray_bin = str(Path(sys.executable).parent / "ray")
    # token auth off explicitly: an earlier local `ray.init` on this machine leaves ~/.ray/auth_token,
    # which `ray start` then half-enables (the worker node failed with InvalidAuthToken)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    port = _free_port(7000, 9999)          # below Ray's default worker-port range (10002-19999)
    temp = f"/tmp/ray-{os.getpid()}"
    head = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                           "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert head.returncode == 0, head.stderr
    try:
        node = subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                               "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                              capture_output=True, text=True, env=env, timeout=180)
        assert node.returncode == 0, node.stderr
        g = _grid(tmp_path, RAY_GRID)
        ray_out, local_out = tmp_path / "ray", tmp_path / "local"
        r = subprocess.run([sys.executable, "-m", "cfbench.cli", "sweep", str(g), "--out", str(ray_out),
                            "--executor", "ray", "--address", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        assert main(["sweep", str(g), "--out", str(local_out), "--workers", "1"]) == 0
        for rec in sorted(local_out.glob("*/record.json")):
            other = ray_out / rec.parent.name / "record.json"
            a, b = json.loads(rec.read_text()), json.loads(other.read_text())
            assert a["metrics"] == b["metrics"] and a["config_hash"] == b["config_hash"]
            assert _same(_weights(rec.parent / "model.safetensors"), _weights(other.parent / "model.safetensors"))
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_sub_grids_merge_over_the_top_level_and_concatenate(tmp_path):
    text = """
    dataset = "digits"
    evaluators = "clean"
    [set]
    epochs = 1
    "model.width" = 8
    [[grid]]
    defense = "pgd-at"
    [grid.set]
    "defense.steps" = [2, 3]
    [[grid]]
    defense = ["erm", "trades"]
    seed = [0, 1]
    """
    points = expand(load_grid(_grid(tmp_path, text)))
    got = [(p.cfg.defense, p.cfg.seed, getattr(p.cfg.defense_params, "steps", None)) for p in points]
    assert got == [("pgd-at", 0, 2), ("pgd-at", 0, 3), ("erm", 0, None), ("erm", 1, None),
                   ("trades", 0, 10), ("trades", 1, 10)]
    assert all(p.cfg.train.epochs == 1 for p in points)
    with pytest.raises(UsageError, match=r"\[\[grid\]\] 1: unknown key 'sed'"):
        load_grid(_grid(tmp_path, text.replace('defense = "pgd-at"', 'defense = "pgd-at"\n    sed = 1'), "b.toml"))


# -- every committed sweep file is valid (a typo in a key would only show when it is run) ----

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted([*ROOT.glob("scripts/sweeps/*.toml"), *ROOT.glob("leaderboards/*.toml")])


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.name for p in SWEEP_FILES])
def test_every_committed_sweep_file_expands_to_valid_configs(path):
    from cfbench.sweep import expand, load_grid

    grid = load_grid(path)
    if grid.get("device", "cpu") != "cpu" and not torch.cuda.is_available():
        grid["device"] = "cpu"  # a GPU file (its device is checked when it runs)
    points = expand(grid, str(path))
    assert points and len({p.cfg.config_hash() for p in points}) == len(points), "duplicate grid points"


def test_init_ray_refuses_an_already_connected_ray_of_another_cluster(monkeypatch):
    """A process already connected to one Ray cluster must not silently run a sweep whose
    --address names another; the running connection is reused when it is the one asked for."""
    import socket
    import types

    from cfbench.execution.ray_executor import init_ray

    with socket.socket() as srv:            # check_address needs something listening
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        wanted = f"127.0.0.1:{srv.getsockname()[1]}"
        calls = []
        fake = types.SimpleNamespace(
            is_initialized=lambda: True, init=lambda **kw: calls.append(kw),
            get_runtime_context=lambda: types.SimpleNamespace(gcs_address="10.0.0.7:6379"))
        monkeypatch.setitem(sys.modules, "ray", fake)
        with pytest.raises(UsageError, match=r"connected to '10\.0\.0\.7:6379', not to --address '127\.0\.0\.1"):
            init_ray(wanted, None)
        fake.get_runtime_context = lambda: types.SimpleNamespace(gcs_address=wanted)
        assert init_ray(wanted, None) is fake and calls == []      # the same cluster: reused, no re-init
        assert init_ray(None, 2) is fake and calls == []



STATE_GRID = """
defense = "erm"
dataset = "digits"
seed = [0, 1, 2]
evaluators = "clean,mia"
[set]
epochs = 2
"data.pool_size" = 160
"data.test_size" = 64
"mia.reference_models" = 2
"mia.population_size" = 64
"model.width" = 8
"""


def test_list_state_names_what_an_unfinished_run_resumes_from_and_a_clean_copy_resumes(tmp_path, capsys,
                                                                                       monkeypatch):
    """`cfbench sweep GRID --list-state` prints every file of the started, unfinished runs (run
    folder, its declared reference models, their half-trained checkpoints), no lock and nothing
    of a finished run's folder; the reference pool a finished seed trained stays listed while
    an unstarted seed of the recipe declares it (it is what that seed reads), and not after.
    A fresh store holding only the finished run and the listed files -- a clean clone of a
    commit of them -- resumes the run: its reference models are taken from the cache, its
    target from its checkpoint, and its metrics equal those of an uninterrupted run."""
    import shutil

    from cfbench.evaluators.mia import MembershipInference
    from cfbench.training.recipe import load_data

    g = _grid(tmp_path, STATE_GRID)
    done, cut, unstarted = [p.cfg for p in expand(load_grid(g))]
    out = tmp_path / "runs"
    assert execute(done, out, progress=False).record["status"] == "ok"
    jobs = [Path(j.path) for j in XR.reference_jobs(cut, load_data(cut), 2, out / "_cache")]
    derived = sorted((out / "_cache" / "signals").glob("*"))  # MIA signals (of the finished run)
    assert derived and all(p.is_file() for p in [*jobs, *derived])
    # seed 0 finished, seeds 1 and 2 not started: the pool they share (and seed 0 trained) is listed
    assert main(["sweep", str(g), "--out", str(out), "--list-state"]) == 0
    assert [Path(line) for line in capsys.readouterr().out.splitlines()] == [*jobs, *derived]
    real = MembershipInference.evaluate

    def killed(self, ctx):
        raise KeyboardInterrupt("killed in the membership evaluator")

    monkeypatch.setattr(MembershipInference, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        execute(cut, out, progress=False)
    monkeypatch.setattr(MembershipInference, "evaluate", real)
    cut_dir = out / cut.run_id()
    assert not (cut_dir / "record.json").exists() and (cut_dir / "checkpoints").is_dir()
    planted = jobs[1].with_suffix(".ckpt") / "last.safetensors"   # a reference model killed mid-training
    planted.parent.mkdir()
    shutil.copy(jobs[1], planted)
    (planted.parent / ".last.safetensors.lock").touch()

    assert main(["sweep", str(g), "--out", str(out), "--list-state"]) == 0
    listed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    want = sorted(f for f in cut_dir.rglob("*") if f.is_file() and not f.name.endswith(".lock"))
    assert want and listed == [*want, jobs[0], jobs[1], planted, *derived], listed
    assert not any(p.name.endswith(".lock") or "logs" in p.parts for p in listed)
    assert not (out / unstarted.run_id()).exists()
    # --dry-run says where each run it would start stands (from its files)
    assert main(["sweep", str(g), "--out", str(out), "--dry-run"]) == 0
    lines = {ln.split()[2]: ln for ln in capsys.readouterr().out.splitlines() if "would run" in ln}
    assert lines.keys() == {cut.run_id(), unstarted.run_id()}
    assert lines[cut.run_id()].endswith("(interrupted; target trained; reference models 2/2 trained)"), lines
    assert lines[unstarted.run_id()].endswith("]"), lines
    kept = tmp_path / "kept.safetensors"
    shutil.move(jobs[0], kept)                                   # one model lost, one half-trained
    jobs[0].with_suffix(".ckpt").mkdir()
    shutil.copy(planted, jobs[0].with_suffix(".ckpt") / "last.safetensors")
    from cfbench.sweep import run_progress

    assert run_progress(cut, out) == "interrupted; target trained; reference models 1/2 trained, 1 half-trained"
    assert run_progress(unstarted, out) == ""
    shutil.move(kept, jobs[0])
    shutil.rmtree(jobs[0].with_suffix(".ckpt"))
    shutil.rmtree(planted.parent)
    listed.remove(planted)

    # the clean copy: the finished run (as committed) and the listed files, nothing else
    fresh = tmp_path / "fresh"
    shutil.copytree(out / done.run_id(), fresh / done.run_id())
    for p in listed:
        (fresh / p.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, fresh / p.relative_to(out))
    resumed = execute(cut, fresh, progress=False).record
    whole = execute(cut, tmp_path / "whole", progress=False).record
    assert resumed["status"] == "ok" and resumed["metrics"] == whole["metrics"]
    assert sorted(j["executor"] for j in resumed["jobs"]) == ["local:cached"] * 2
    assert "resumed_from_epoch" in json.dumps(resumed["notes"])
    assert main(["sweep", str(g), "--out", str(fresh), "--list-state"]) == 0
    left = [Path(line) for line in capsys.readouterr().out.splitlines()]
    fresh_derived = sorted((fresh / "_cache" / "signals").glob("*"))
    # nothing started is unfinished any more; the unstarted seed 2 still reads the pool
    assert left == [fresh / p.relative_to(out) for p in jobs] + fresh_derived, left
    assert main(["sweep", str(g), "--out", str(fresh), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(g), "--out", str(fresh), "--list-state"]) == 0
    assert capsys.readouterr().out == ""          # every run finished: nothing to carry


def test_a_cached_model_of_another_subset_is_retrained_and_recorded_in_process(tmp_path):
    """A reference model file that fails its check (here: trained on another subset) is
    removed and trained again; the run's record then says "in-process" for it, not "cached",
    and the run equals one that trained everything itself."""
    import shutil
    import warnings

    from cfbench.training.recipe import load_data

    cfg = tiny_config("erm", sets=TINY_SETS, evaluators=("clean", "mia"))
    out = tmp_path / "runs"
    jobs = [Path(j.path) for j in XR.reference_jobs(cfg, load_data(cfg), 2, out / "_cache")]
    run_job(XR.reference_job(cfg, load_data(cfg), 1, out / "_cache"))
    jobs[0].parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(jobs[1], jobs[0])                        # model 0's file holds model 1 (another subset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = execute(cfg, out, progress=False).record
    assert any("trained on another subset" in str(w.message) for w in caught)
    modes = {Path(j["path"]).name: j["executor"] for j in rec["jobs"]}
    assert modes == {"0.safetensors": "local:in-process", "1.safetensors": "local:cached"}, modes
    assert rec["metrics"] == execute(cfg, tmp_path / "plain", progress=False).record["metrics"]

# -- idle-core helpers of a local sweep --------------------------------------------------

def test_a_sweep_helper_trains_a_running_runs_free_reference_models_and_the_run_reuses_them(tmp_path):
    """prefetch_jobs trains the reference models of a run that holds its lock, skipping one that
    another process is training; the run then finds them cached, and its metrics and models
    equal those of a run that trained everything itself."""
    from cfbench.execution.reference import reference_jobs
    from cfbench.store.io import file_lock, lock_path
    from cfbench.store.lifecycle import run_lock_path
    from cfbench.sweep import prefetch_jobs
    from cfbench.training.recipe import load_data

    cfg = tiny_config("erm", sets={**TINY_SETS, "mia.reference_models": 4}, evaluators=("clean", "mia"))
    out = tmp_path / "helped"
    jobs = reference_jobs(cfg, load_data(cfg), 4, out / "_cache")
    busy = Path(jobs[-1].path)                         # "another process" is training the last one
    with file_lock(run_lock_path(out, cfg.run_id())), file_lock(lock_path(busy)):
        assert prefetch_jobs(cfg, str(out)) == 3
    assert all(Path(j.path).exists() for j in jobs[:-1]) and not busy.exists()
    helped = execute(cfg, out, progress=False)
    plain = execute(cfg, tmp_path / "plain", progress=False)
    assert helped.record["metrics"] == plain.record["metrics"]
    modes = sorted(j["executor"] for j in helped.record["jobs"])
    assert modes == ["local:cached"] * 3 + ["local:in-process"], modes
    for j in jobs:
        twin = tmp_path / "plain" / Path(j.path).relative_to(out)
        assert _same(_weights(Path(j.path)), _weights(twin))


def test_a_sweep_run_and_its_helper_append_their_progress_to_the_runs_log(tmp_path):
    """A sweep worker prints nothing on the sweep's terminal while a run is in progress; its
    progress (the cost plan, one line per epoch of every model, per evaluator, the status) is
    appended to <out>/_cache/logs/<run id>.log -- a resumed (here: reused) attempt after the
    first one's lines, a helper's models in the same file -- as lines, never bar frames."""
    from cfbench.store.lifecycle import run_lock_path
    from cfbench.store.io import file_lock
    from cfbench.sweep import prefetch_jobs, run_log_path, run_point

    cfg = tiny_config("erm", sets={**TINY_SETS, "mia.reference_models": 3}, evaluators=("clean", "mia"))
    out = tmp_path / "runs"
    with file_lock(run_lock_path(out, cfg.run_id())):
        assert prefetch_jobs(cfg, str(out)) == 3
    log = run_log_path(out, cfg.run_id())
    helper = log.read_text()
    assert helper.count("epoch 2/2") == 3 and "helper (pid" in helper, helper
    assert run_point(cfg, str(out))["status"] == "ok"
    text = log.read_text()
    assert text.startswith(helper)                        # appended, nothing overwritten
    own = text[len(helper):]
    assert "run (pid" in own and "evaluating clean ..." in own and "evaluating mia ..." in own, own
    assert own.count("epoch 2/2") == 1                    # its target; the 3 references were cached
    assert "status ok" in own and "\r" not in text
    assert run_point(cfg, str(out))["status"] == "ok"
    assert log.read_text().rstrip().splitlines()[-2].endswith("status ok (reused)")
    # the log is in the cache folder: not a run, not a store problem
    from cfbench.doctor import diagnose
    from cfbench.store import iter_records

    assert [f for f in diagnose(out) if "logs" in str(f.path)] == []
    assert len(list(iter_records(out))) == 1


def test_a_sweep_helper_does_nothing_for_a_run_that_is_not_running(tmp_path, monkeypatch):
    import cfbench.sweep as S

    monkeypatch.setattr(S, "HELPER_START_TIMEOUT", 0.5)
    cfg = tiny_config("erm", sets=TINY_SETS, evaluators=("clean", "mia"))
    assert S.prefetch_jobs(cfg, str(tmp_path)) == 0
    assert not (tmp_path / "_cache").exists()


class _FakeTasks:
    """Fake runs and helpers on threads, recording what started when and the peak concurrency."""

    def __init__(self, durations):
        import threading

        self.durations, self.events, self.running, self.bad = durations, [], set(), []
        self.lock, self.active, self.peak = threading.Lock(), 0, 0

    def _enter(self, kind, name):
        with self.lock:
            self.events.append((kind, name))
            self.active += 1
            self.peak = max(self.peak, self.active)

    def run(self, cfg, out, plugins):
        self._enter("run", cfg.name)
        self.running.add(cfg.name)
        time.sleep(self.durations[cfg.name])
        self.running.discard(cfg.name)
        with self.lock:
            self.active -= 1
        return {"run_id": cfg.name, "status": "ok", "seconds": 0.0, "metrics": {}}

    def help(self, cfg, out, plugins):
        self._enter("help", cfg.name)
        if cfg.name not in self.running:       # recorded: Ray's path swallows a helper's exception
            self.bad.append(f"a helper for {cfg.name}, which is not running")
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
        return 0

    def points(self):
        import types

        from cfbench.sweep import Point

        return [Point(i, n, types.SimpleNamespace(name=n, device="cpu", run_id=lambda n=n: n), {})
                for i, n in enumerate(self.durations)]


class _FakeRay:
    """The part of Ray's API the sweep uses, on a thread pool of ``cpus`` threads."""

    def __init__(self, cpus):
        from concurrent.futures import ThreadPoolExecutor

        self.cpus, self.pool, self.cancelled = cpus, ThreadPoolExecutor(max_workers=cpus), []

    def remote(self, fn):
        ray = self

        class _Task:
            def options(self, **kw):
                return self

            def remote(self, *args):
                return ray.pool.submit(fn, *args)
        return _Task()

    def wait(self, refs, num_returns=1):
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(refs, return_when=FIRST_COMPLETED)
        first = next(r for r in refs if r in done)
        return [first], [r for r in refs if r is not first]

    def get(self, ref):
        return ref.result()

    def cancel(self, ref):
        self.cancelled.append(ref)

    def cluster_resources(self):
        return {"CPU": float(self.cpus)}


def _check_tail_helpers(fake, done):
    assert sorted(done) == ["r0", "r1", "r2"]
    assert fake.bad == [] and fake.peak <= 2
    assert [e for e in fake.events if e[0] == "run"] == [("run", "r0"), ("run", "r1"), ("run", "r2")]
    helps = [i for i, e in enumerate(fake.events) if e[0] == "help"]
    assert [fake.events[i] for i in helps] == [("help", "r0")]            # once, for the run still running
    assert helps[0] > fake.events.index(("run", "r2"))                      # only after the last run started


def test_run_local_sends_free_workers_to_help_running_runs_only_in_the_tail(tmp_path, monkeypatch):
    """Scheduling with fake runs on threads: never more than `workers` tasks at once, runs in
    grid order, and a helper only once no run waits to start, for a run still running, once."""
    from concurrent.futures import ThreadPoolExecutor

    import cfbench.sweep as S

    fake = _FakeTasks({"r0": 1.5, "r1": 0.2, "r2": 0.2})
    monkeypatch.setattr(S, "run_point", fake.run)
    monkeypatch.setattr(S, "prefetch_jobs", fake.help)
    monkeypatch.setattr(S, "_pool", lambda workers, plugins: ThreadPoolExecutor(max_workers=workers))
    points, done = fake.points(), []
    S.run_local(points, tmp_path, 2, (), lambda p, res: done.append(res["run_id"]))
    _check_tail_helpers(fake, done)

    fake.events.clear()
    S.run_local(points[:1], tmp_path, 3, (), lambda p, res: None)     # one run, 3 workers: 2 helpers
    assert fake.events.count(("help", "r0")) == 2
    fake.events.clear()
    S.run_local(points[:1], tmp_path, 3, (), lambda p, res: None, helpers=False)
    assert fake.events == [("run", "r0")]


def test_run_local_helps_an_earlier_grid_files_run_before_starting_a_later_files(tmp_path, monkeypatch):
    """Two grid files in one pool (stages 0 and 1): the free worker first helps the running run
    of file 0, and starts file 1's runs once that helper comes back; within one file nothing
    changes (a helper only in the tail)."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    import cfbench.sweep as S

    fake = _FakeTasks({"r0": 1.0, "r1": 0.2, "r2": 0.2})
    monkeypatch.setattr(S, "run_point", fake.run)
    monkeypatch.setattr(S, "prefetch_jobs", fake.help)
    monkeypatch.setattr(S, "_pool", lambda workers, plugins: ThreadPoolExecutor(max_workers=workers))
    points = [dataclasses.replace(p, stage=0 if p.label == "r0" else 1) for p in fake.points()]
    done = []
    S.run_local(points, tmp_path, 2, (), lambda p, res: done.append(res["run_id"]))
    assert sorted(done) == ["r0", "r1", "r2"] and fake.bad == [] and fake.peak <= 2
    assert fake.events[:3] == [("run", "r0"), ("help", "r0"), ("run", "r1")], fake.events
    assert fake.events.count(("help", "r0")) == 1 and ("run", "r2") in fake.events


def test_a_sweep_of_two_grid_files_runs_the_first_files_runs_first_and_records_each_file(tmp_path, capsys):
    """`cfbench sweep A.toml B.toml`: every file is checked before anything starts; A's runs
    start before B's (seed by seed within each); a run both files name runs once; sweeps.json
    gets one entry per file, with that file's own command and run ids."""
    from cfbench.present.leaderboard import read_sweeps
    from cfbench.sweep import sweep_command

    text = GRID.replace('"defense.steps" = 2\n', "").replace('defense = ["erm", "pgd-at"]', 'defense = "erm"')
    a = _grid(tmp_path, text.replace("seed = [0, 1]", "seed = 1"), "a.toml")
    b = _grid(tmp_path, text, "b.toml")                       # seeds 0 and 1: seed 1 is a's run too
    out = tmp_path / "runs"
    bad = _grid(tmp_path, text.replace('defense = "erm"', 'defense = "ermm"'), "bad.toml")
    assert main(["sweep", str(a), str(bad), "--out", str(out), "--workers", "1"]) == 2
    assert "unknown defense 'ermm'" in capsys.readouterr().err and not out.exists()
    assert main(["sweep", str(a), str(b), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    started = [ln.split()[2] for ln in printed.splitlines() if "would run" in ln]
    ids_a = [p.cfg.run_id() for p in expand(load_grid(a))]
    ids_b = [p.cfg.run_id() for p in expand(load_grid(b))]
    assert "2 runs in the grids (2 files)" in printed
    assert started == ids_a + [i for i in ids_b if i not in ids_a] and len(set(ids_a + ids_b)) == 2
    assert main(["sweep", str(a), str(b), "--out", str(out), "--workers", "2"]) == 0
    capsys.readouterr()
    assert len(list(out.glob("*/record.json"))) == 2
    entries = {e["grid"]: e for e in read_sweeps(out)}
    assert entries[str(a)] == {"grid": str(a), "command": sweep_command(a, out), "run_ids": sorted(ids_a)}
    assert entries[str(b)] == {"grid": str(b), "command": sweep_command(b, out), "run_ids": sorted(ids_b)}
    assert main(["sweep", str(b), "--out", str(out), "--list-state"]) == 0
    assert capsys.readouterr().out == ""

def test_run_ray_sends_free_cpus_to_help_running_runs_only_in_the_tail(tmp_path, monkeypatch):
    """The same on the Ray path (a fake Ray of 2 CPUs: all runs are submitted at once, Ray runs
    two); helpers still going at the end are cancelled."""
    import cfbench.execution.ray_executor as RX
    import cfbench.sweep as S

    fake = _FakeTasks({"r0": 1.5, "r1": 0.2, "r2": 0.2})
    ray = _FakeRay(2)
    monkeypatch.setattr(S, "run_point", fake.run)
    monkeypatch.setattr(S, "prefetch_jobs", fake.help)
    monkeypatch.setattr(RX, "init_ray", lambda address, workers: ray)
    done = []
    S.run_ray(fake.points(), tmp_path, None, 2, (), lambda p, res: done.append(res["run_id"]))
    _check_tail_helpers(fake, done)
    fake.events.clear()
    S.run_ray(fake.points()[:1], tmp_path, None, 2, (), lambda p, res: None, helpers=False)
    assert fake.events == [("run", "r0")]


def test_a_sweep_worker_gives_each_run_its_own_determinism_setting(tmp_path):
    """A pool worker is shared by runs (and helpers) of possibly different --deterministic
    settings: a run without it must not inherit the switch an earlier job left on."""
    from cfbench.sweep import run_point

    cfg = tiny_config("erm", sets={"epochs": 1, "data.pool_size": 96, "data.test_size": 32}, evaluators=("clean",))
    assert not cfg.deterministic
    torch.use_deterministic_algorithms(True)
    try:
        res = run_point(cfg, str(tmp_path))
        assert res["status"] == "ok", res
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)

"""End-to-end runs through the CLI and the Python API: records, reuse, determinism, failures."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from cfbench.cli import main
from cfbench.config import make_config
from cfbench.runner import execute
from cfbench.store import read_record
from cfbench.store.models import load_model

# An undefended model at eps=0.3 leaves AutoAttack nothing to attack after APGD-CE, so the
# later attacks are skipped and the test stays fast (AutoAttack's cost per surviving example is
# fixed by its iteration counts).  The full attack chain is exercised by the benchmarks.
FAST_SETS = ["epochs=3", "autoattack.n_examples=20", "pgd.n_examples=100", "pgd.steps=5", "eps=0.3"]


def _cli(*args):
    return main(list(args))


def _sets():
    return [a for s in FAST_SETS for a in ("--set", s)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code = _cli("run", "--defense", "erm", "--dataset", "digits", "--out", str(out), "--quiet",
                "--evaluators", "clean,pgd,autoattack", *_sets())
    assert code == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")]
    return out, run_dir


def test_record_has_the_documented_schema(finished):
    _, run_dir = finished
    rec = read_record(run_dir)
    for key in ("schema_version", "run_id", "config", "config_hash", "status", "versions", "splits", "timings",
                "warnings", "metrics", "components", "history"):
        assert key in rec, key
    assert rec["status"] == "ok" and rec["reason"] is None
    assert rec["run_id"] == run_dir.name and rec["config_hash"].startswith(run_dir.name.rsplit("-", 1)[1])
    assert rec["versions"]["packages"]["torch"] and rec["versions"]["packages"]["pyautoattack"] == "0.2.0"
    assert rec["components"]["defense"]["distribution"] == "cfbench"
    m = rec["metrics"]
    for key in ("clean.accuracy", "robust.pgd.accuracy", "robust.autoattack.accuracy"):
        assert set(m[key]) >= {"value", "ci_low", "ci_high", "n"}
        assert m[key]["ci_low"] <= m[key]["value"] <= m[key]["ci_high"]
    assert m["robust.autoattack.n"] == 20 and m["robust.autoattack.accuracy"]["n"] == 20
    assert m["robust.autoattack.accuracy"]["value"] <= m["clean.accuracy"]["value"] + 0.2  # 20 vs 500 examples
    assert rec["notes"]["robust.autoattack"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert set(rec["timings"]) >= {"data", "train", "eval.clean", "eval.pgd", "eval.autoattack", "total"}
    assert len(rec["history"]) == 3
    assert rec["splits"]["members"] + rec["splits"]["nonmembers"] == rec["splits"]["pool_size"]
    assert (run_dir / "splits.npz").exists() and (run_dir / "model.safetensors").exists()
    assert not (run_dir / "checkpoints").exists()


def test_load_model_reproduces_the_reported_accuracy(finished, digits):
    _, run_dir = finished
    rec = read_record(run_dir)
    model = load_model(run_dir)
    x = torch.from_numpy(digits.x_test)
    y = torch.from_numpy(digits.y_test)
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    assert correct / len(y) == rec["metrics"]["clean.accuracy"]["value"]


def test_same_config_is_reused_not_recomputed(finished, capsys):
    out, run_dir = finished
    mtime = (run_dir / "record.json").stat().st_mtime_ns
    code = _cli("run", "--defense", "erm", "--out", str(out), "--quiet", "--evaluators", "clean,pgd,autoattack",
                *_sets())
    assert code == 0
    text = capsys.readouterr().out
    assert "reused" in text and str(run_dir / "record.json") in text
    assert (run_dir / "record.json").stat().st_mtime_ns == mtime


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    cfg = make_config(defense="trades", sets={"epochs": 2, "defense.steps": 2, "pgd.n_examples": 50, "pgd.steps": 3},
                      evaluators=["clean", "pgd"])
    a = execute(cfg, tmp_path / "a", progress=False).record
    b = execute(cfg, tmp_path / "b", progress=False).record
    assert a["config_hash"] == b["config_hash"]
    assert a["metrics"] == b["metrics"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_nan_training_is_recorded_as_failed_and_not_reused(tmp_path, capsys):
    args = ("run", "--defense", "erm", "--out", str(tmp_path), "--quiet", "--evaluators", "clean",
            "--set", "lr=1e12", "--set", "epochs=2", "--set", "momentum=0")
    assert _cli(*args) == 1
    err = capsys.readouterr().err
    assert "run failed: training loss became nan" in err
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rec = read_record(run_dir)
    assert rec["status"] == "failed" and "TrainingDiverged" in rec["reason"]
    assert (run_dir / "error.txt").exists()
    assert _cli(*args) == 1  # a failed record is never reused: it ran (and failed) again


@pytest.mark.parametrize("args, needle", [
    (("--defense", "pgd_at"), "unknown defense 'pgd_at'. Did you mean 'pgd-at'"),
    (("--dataset", "cifar"), "unknown dataset 'cifar'"),
    (("--model", "resnet"), "unknown model 'resnet'"),
    (("--set", "eps=-1"), "threat.eps: -1.0 is out of range; it must be >= 0"),
    (("--set", "defense.steps=0", "--defense", "pgd-at"), "defense.steps: 0 is out of range"),
    (("--set", "epochs=1.5"), "train.epochs: expected an integer, got '1.5'"),
    (("--set", "colour=red"), "unknown setting 'colour'"),
    (("--dataset", "mnist", "--data-dir", "/nonexistent-dir"), "/nonexistent-dir"),
])
def test_usage_errors_exit_2_with_a_clear_message(tmp_path, capsys, args, needle):
    assert _cli("run", "--out", str(tmp_path), "--quiet", *args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not any(p.name.startswith("digits") for p in tmp_path.iterdir())


def test_corrupt_dataset_file_exits_2(tmp_path, capsys):
    from cfbench.data.formats import make_miniature_mnist

    make_miniature_mnist(tmp_path / "data", 20, 10)
    img = tmp_path / "data" / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-100])
    assert _cli("run", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                "--quiet", "--evaluators", "clean") == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "truncated" in err


def test_list_shows_components_and_their_parameters(capsys):
    assert _cli("list") == 0
    out = capsys.readouterr().out
    for name in ("erm", "pgd-at", "trades", "digits", "fashion-mnist", "mnist", "cifar10", "cnn8", "cnn28",
                 "gap-cnn", "preact-resnet18", "wrn", "clean", "pgd", "autoattack"):
        assert f"  {name} " in out, name
    assert "beta = 6.0" in out and "train.epochs" in out and "threat.eps" in out


def _cfbench(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cfbench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    args = ["run", "--defense", "pgd-at", "--quiet", "--threads", "1", "--evaluators", "clean",
            "--set", "epochs=12", "--set", "defense.steps=5"]
    proc = _cfbench(*args, "--out", str(tmp_path / "killed"))
    deadline = time.time() + 300
    ckpt = None
    while time.time() < deadline:
        found = list((tmp_path / "killed").glob("*/checkpoints/last.safetensors"))
        if found:
            ckpt = found[0]
            break
        time.sleep(0.05)
    assert ckpt is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()                               # reaps it and closes its pipes
    run_dir = ckpt.parent.parent
    assert not (run_dir / "record.json").exists()
    assert main(args + ["--out", str(tmp_path / "killed")]) == 0
    resumed = read_record(run_dir)
    assert resumed["notes"]["defense"]["resumed_from_epoch"] >= 1
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    straight = read_record(next((tmp_path / "straight").glob("digits-*")))
    assert straight["metrics"] == resumed["metrics"]
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]

"""Batched ensembles (cfbench.training.ensemble, cfbench.execution.batched): a stacked network
computes each member's function and input gradient; batched training matches one-at-a-time
training of the same jobs within the stated tolerance; a member's weights do not depend on the
size of its group; the plan falls back to one at a time where batching is not supported; the
executor records the mode and shares the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfbench.errors import UsageError
from cfbench.execution import reference as XR
from cfbench.execution.batched import plan, run_group
from cfbench.execution.executors import make_executor
from cfbench.execution.jobs import run_job
from cfbench.execution.local import LocalExecutor
from cfbench.models import build_model
from cfbench.store.io import load_tensors
from cfbench.testing.tiny import tiny_config, tiny_data
from cfbench.training import ensemble as E


def _weights(path):
    return load_tensors(path)[0]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name, shape, params", [("cnn8", (1, 8, 8), {"width": 4}),
                                                  ("cnn28", (1, 28, 28), {"width": 2, "hidden": 8})])
def test_a_stacked_net_computes_each_members_logits_and_input_gradient(name, shape, params):
    torch.manual_seed(0)
    members = [build_model(name, shape, 10, (0.3,), (0.4,), params) for _ in range(3)]
    net = E.StackedNet(members)
    b = 5
    x = torch.rand(3 * b, *shape)
    y = torch.randint(0, 10, (3 * b,))
    xs = x.clone().requires_grad_(True)
    out = net(xs)
    (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xs)
    for i, m in enumerate(members):
        xi = x[i * b:(i + 1) * b].clone().requires_grad_(True)
        ref = m(xi)
        (gi,) = torch.autograd.grad(F.cross_entropy(ref, y[i * b:(i + 1) * b], reduction="sum"), xi)
        torch.testing.assert_close(out[i * b:(i + 1) * b], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g[i * b:(i + 1) * b], gi, atol=1e-6, rtol=1e-4)
        # unstacking gives back the member's own weights
        assert _max_diff(net.member_state(i, m), m.state_dict()) == 0


def _test_logits(path, cfg, data):
    model = XR.load_reference(cfg, data, path)
    with torch.no_grad():
        return model(data.x_test)


@pytest.mark.parametrize("defense, sets", [
    ("erm", {"train.augment": True}),                 # per-member augmentation streams
    ("pgd-at", {"defense.steps": 3}),                 # per-member random starts
    ("trades", {"defense.steps": 3, "train.schedule": "step", "train.momentum": 0.5}),
])
def test_batched_training_matches_one_at_a_time_within_the_stated_tolerance(tmp_path, defense, sets):
    cfg = tiny_config(defense, sets={"epochs": 2, **sets})
    data = tiny_data(cfg)
    serial = [run_job(j) for j in XR.reference_jobs(cfg, data, 3, tmp_path / "serial")]
    result = run_group(XR.reference_jobs(cfg, data, 3, tmp_path / "batched"))
    assert [how for _, how in result] == ["batched"] * 3
    adv = defense != "erm"
    w_tol = E.ADV_WEIGHT_ATOL if adv else E.ERM_WEIGHT_ATOL
    l_tol = E.ADV_LOGIT_ATOL if adv else E.LOGIT_ATOL
    for a, (b, _) in zip(serial, result):
        wa, wb = _weights(a), _weights(b)
        assert _max_diff(wa, wb) <= w_tol
        la, lb = _test_logits(a, cfg, data), _test_logits(b, cfg, data)
        assert (la - lb).abs().max().item() <= l_tol
        acc = [(lg.argmax(1) == data.y_test).float().mean().item() * 100 for lg in (la, lb)]
        assert abs(acc[0] - acc[1]) <= E.ACCURACY_POINTS
        ma, mb = load_tensors(a)[1], load_tensors(b)[1]
        assert mb["train_mode"] == "batched" and mb["batch_members"] == 3 and "train_mode" not in ma
        for key in ("kind", "index", "recipe_hash", "train_seed", "subset_sha256", "n_train", "model"):
            assert ma[key] == mb[key], key
        assert mb["final_loss"] == pytest.approx(ma["final_loss"], rel=1e-3 if adv else 1e-5)


def test_batched_training_leaves_the_global_generator_where_serial_training_does(tmp_path):
    cfg = tiny_config("pgd-at", sets={"defense.steps": 2})
    data = tiny_data(cfg)
    for j in XR.reference_jobs(cfg, data, 2, tmp_path / "s"):
        run_job(j)
    after_serial = torch.rand(3)
    torch.manual_seed(123)                              # elsewhere
    run_group(XR.reference_jobs(cfg, data, 2, tmp_path / "b"))
    assert torch.equal(torch.rand(3), after_serial)


def test_the_models_differ_from_each_other_so_the_match_above_is_not_trivial(tmp_path):
    cfg = tiny_config("erm", sets={"epochs": 2})
    data = tiny_data(cfg)
    (a, _), (b, _) = run_group(XR.reference_jobs(cfg, data, 2, tmp_path))
    assert _max_diff(_weights(a), _weights(b)) > 100 * E.ERM_WEIGHT_ATOL


def test_a_members_weights_do_not_depend_on_the_size_of_its_group(tmp_path):
    cfg = tiny_config("pgd-at", sets={"defense.steps": 2})
    data = tiny_data(cfg)
    big = run_group(XR.reference_jobs(cfg, data, 4, tmp_path / "four"))
    jobs = XR.reference_jobs(cfg, data, 4, tmp_path / "two")
    small = run_group(jobs[1:3])
    for (p4, _), (p2, _) in zip(big[1:3], small):
        wa, wb = _weights(p4), _weights(p2)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_plan_batches_only_supported_recipes_and_splits_for_a_pool(tmp_path):
    cfg = tiny_config("pgd-at")
    data = tiny_data(cfg)
    jobs = XR.reference_jobs(cfg, data, 8, tmp_path)
    assert plan(jobs, "serial") == [([j], False) for j in jobs]
    [(unit, batched)] = plan(jobs, "auto", workers=1)
    assert batched and len(unit) == 8
    assert [len(u) for u, b in plan(jobs, "auto", workers=2)] == [4, 4]
    assert [len(u) for u, b in plan(jobs[:3], "auto", workers=2)] == [3]       # groups of >= 2
    assert plan(jobs[:1], "auto") == [(jobs[:1], False)]
    assert plan(jobs[:1], "batched") == [(jobs[:1], True)]
    gap = tiny_config("pgd-at", model="gap-cnn")
    assert "model 'gap-cnn'" in E.batch_problem(gap)
    dp = tiny_config("dp-sgd", sets={"noise_multiplier": 1.0})
    assert "defense 'dp-sgd'" in E.batch_problem(dp)
    assert "optimizer 'adam'" in E.batch_problem(tiny_config("erm", sets={"train.optimizer": "adam"}))
    assert E.batch_problem(cfg) is None
    gjobs = XR.reference_jobs(gap, tiny_data(gap), 3, tmp_path)
    assert all(not b for _, b in plan(gjobs, "auto"))
    with pytest.raises(UsageError, match="unknown train mode 'fast'. Valid choices: auto, serial, batched"):
        plan(jobs, "fast")
    with pytest.raises(UsageError, match="unknown train mode"):
        make_executor("local", train_mode="fast")


def test_subsets_of_different_sizes_are_never_batched_together(tmp_path):
    cfg = tiny_config("erm")
    data = tiny_data(cfg)
    a, b, c = XR.reference_jobs(cfg, data, 3, tmp_path)
    import dataclasses

    sub = np.asarray(c.subset).copy()
    sub[np.flatnonzero(sub)[0]] = False
    c = dataclasses.replace(c, subset=sub)
    units = plan([a, b, c], "auto")
    assert sorted((len(u), bt) for u, bt in units) == [(1, False), (2, True)]


def test_the_executor_records_the_mode_and_shares_the_cache(tmp_path):
    cfg = tiny_config("pgd-at", sets={"defense.steps": 2})
    data = tiny_data(cfg)
    ex = LocalExecutor(train_mode="auto")
    here = ex.run(XR.reference_jobs(cfg, data, 4, tmp_path))
    assert {ex.modes[str(p)] for p in here} == {"batched"}
    ser = LocalExecutor(train_mode="serial")            # the cache is shared: a serial executor finds them
    again = ser.run(XR.reference_jobs(cfg, data, 4, tmp_path))
    assert again == here and {ser.modes[str(p)] for p in again} == {"cached"}
    assert LocalExecutor().train_mode == "serial"
    assert make_executor("local", workers=1, train_mode="auto").train_mode == "auto"


@pytest.mark.slow
def test_a_pool_of_batched_groups_gives_the_in_process_models(tmp_path):
    cfg = tiny_config("pgd-at", sets={"defense.steps": 2})
    data = tiny_data(cfg)
    here = run_group(XR.reference_jobs(cfg, data, 4, tmp_path / "a"))
    with LocalExecutor(workers=2, train_mode="auto") as pool:
        there = pool.run(XR.reference_jobs(cfg, data, 4, tmp_path / "b"))    # two workers, two members each
        assert {pool.modes[str(p)] for p in there} == {"worker-batched"}
    for (p, _), q in zip(here, there):
        wa, wb = _weights(p), _weights(q)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_group_reuses_cached_members_and_resumes_interrupted_ones_alone(tmp_path):
    cfg = tiny_config("erm", sets={"epochs": 2})
    data = tiny_data(cfg)
    jobs = XR.reference_jobs(cfg, data, 4, tmp_path)
    first = run_job(jobs[0])
    stamp = first.stat().st_mtime_ns
    # an interrupted one-at-a-time training of job 1: its checkpoint after epoch 1
    from cfbench.training.checkpoint import CKPT_NAME
    from cfbench.training.recipe import fit_recipe

    ckpt = jobs[1].path.with_suffix(".ckpt")
    mask = torch.from_numpy(np.asarray(jobs[1].subset))
    fit_recipe(tiny_config("erm", sets={"epochs": 1}), data, data.x_pool[mask], data.y_pool[mask],
               seed=jobs[1].seed, checkpoint_dir=ckpt, cache_dir=None, progress=False)
    assert (ckpt / CKPT_NAME).exists()
    res = run_group(jobs)
    assert [how for _, how in res] == ["cached", "serial", "batched", "batched"]
    assert first.stat().st_mtime_ns == stamp
    assert not ckpt.exists()


class _Killed(Exception):
    pass


def test_a_killed_batched_group_resumes_from_its_epoch_checkpoint_bit_for_bit(tmp_path, monkeypatch):
    """A group interrupted in its third epoch resumes from the checkpoint of its second and
    ends with the weights and histories of an uninterrupted group; the checkpoint is removed
    once the members are saved."""
    from cfbench.execution.batched import group_checkpoint_dir
    from cfbench.store.io import read_tensor_meta
    from cfbench.training.checkpoint import CKPT_NAME

    cfg = tiny_config("pgd-at", sets={"defense.steps": 2, "epochs": 3})
    data = tiny_data(cfg)
    whole = run_group(XR.reference_jobs(cfg, data, 2, tmp_path / "whole"))
    jobs = XR.reference_jobs(cfg, data, 2, tmp_path / "killed")
    real = E._batched_loss

    def dies_in_epoch_3(defense, net, xb, yb, batch, gens, m):
        if batch.epoch == 2:
            raise _Killed
        return real(defense, net, xb, yb, batch, gens, m)

    monkeypatch.setattr(E, "_batched_loss", dies_in_epoch_3)
    with pytest.raises(_Killed):
        run_group(jobs)
    ckpt = group_checkpoint_dir(jobs) / CKPT_NAME
    assert ckpt.is_file() and read_tensor_meta(ckpt)["epoch"] == 1
    assert not any(j.path.exists() for j in jobs)
    calls = []

    def counts(defense, net, xb, yb, batch, gens, m):
        calls.append(batch.epoch)
        return real(defense, net, xb, yb, batch, gens, m)

    monkeypatch.setattr(E, "_batched_loss", counts)
    resumed = run_group(jobs)
    assert [how for _, how in resumed] == ["batched", "batched"]
    assert set(calls) == {2}                                   # only the third epoch trained again
    for (a, _), (b, _) in zip(whole, resumed):
        wa, wb = _weights(a), _weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert read_tensor_meta(a)["final_loss"] == read_tensor_meta(b)["final_loss"]
    assert not group_checkpoint_dir(jobs).exists()


def test_doctor_keeps_a_group_checkpoint_that_may_resume_and_removes_it_once_its_members_are_done(
        tmp_path, monkeypatch):
    """Killed group: its checkpoint is kept (members missing); the members then trained another
    way (one at a time): the checkpoint is stale, `cfbench doctor --fix` removes it."""
    from cfbench.doctor import diagnose, repair
    from cfbench.execution.batched import group_checkpoint_dir

    cfg = tiny_config("erm", sets={"epochs": 2})
    data = tiny_data(cfg)
    runs = tmp_path / "runs"
    jobs = XR.reference_jobs(cfg, data, 2, runs / "_cache")
    real = E._batched_loss

    def dies_in_epoch_2(defense, net, xb, yb, batch, gens, m):
        if batch.epoch == 1:
            raise _Killed
        return real(defense, net, xb, yb, batch, gens, m)

    monkeypatch.setattr(E, "_batched_loss", dies_in_epoch_2)
    with pytest.raises(_Killed):
        run_group(jobs)
    ck = group_checkpoint_dir(jobs)
    assert ck.is_dir() and diagnose(runs) == []
    for j in jobs:
        run_job(j)
    [finding] = diagnose(runs)
    assert finding.kind == "stale-checkpoint" and finding.path == ck and "batched group of 2" in finding.reason
    repair([finding])
    assert not ck.exists() and diagnose(runs) == []


def test_a_damaged_group_checkpoint_is_discarded_and_the_group_trains_from_the_start(tmp_path):
    from cfbench.execution.batched import group_checkpoint_dir
    from cfbench.training.checkpoint import CKPT_NAME

    cfg = tiny_config("erm", sets={"epochs": 2})
    data = tiny_data(cfg)
    whole = run_group(XR.reference_jobs(cfg, data, 2, tmp_path / "whole"))
    jobs = XR.reference_jobs(cfg, data, 2, tmp_path / "damaged")
    ckpt = group_checkpoint_dir(jobs) / CKPT_NAME
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a safetensors file")
    res = run_group(jobs)
    assert [how for _, how in res] == ["batched", "batched"]
    for (a, _), (b, _) in zip(whole, res):
        wa, wb = _weights(a), _weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not ckpt.parent.exists()


def test_run_train_mode_flag_default_and_bad_value(capsys, monkeypatch):
    """`cfbench run --train-mode` reaches the executor; the default is serial (bit-identical
    whichever executor); a bad value exits 2 naming the valid choices before anything trains."""
    from cfbench.cli import main
    from cfbench.execution.executors import make_executor

    monkeypatch.delenv("CFBENCH_TRAIN_MODE", raising=False)
    ex = make_executor("local", workers=1)
    try:
        assert ex.train_mode == "serial"
    finally:
        ex.close()
    assert main(["run", "--defense", "erm", "--dataset", "digits", "--train-mode", "fast", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown train mode 'fast'" in err and "auto, serial, batched" in err


def test_doctor_leaves_the_checkpoint_of_an_interrupted_reference_model_alone(tmp_path):
    """`<i>.ckpt/last.safetensors` is a training checkpoint, not a cached model without metadata
    (doctor used to report it as corrupt-cache and --fix removed it)."""
    from cfbench.doctor import diagnose
    from cfbench.training.checkpoint import CKPT_NAME
    from cfbench.training.recipe import fit_recipe

    cfg = tiny_config("erm", sets={"epochs": 2})
    data = tiny_data(cfg)
    runs = tmp_path / "runs"
    [job] = XR.reference_jobs(cfg, data, 1, runs / "_cache")
    ckpt = job.path.with_suffix(".ckpt")
    mask = torch.from_numpy(np.asarray(job.subset))
    fit_recipe(tiny_config("erm", sets={"epochs": 1}), data, data.x_pool[mask], data.y_pool[mask],
               seed=job.seed, checkpoint_dir=ckpt, cache_dir=None, progress=False)
    assert (ckpt / CKPT_NAME).is_file()
    assert diagnose(runs) == []
    (ckpt / CKPT_NAME).write_bytes(b"garbage")
    assert [f.kind for f in diagnose(runs)] == ["corrupt-checkpoint"]

"""Counterfactual adversarial training (cf-at) and its prototype-guided generator (proto-cf)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from cfbench import params as P
from cfbench.attacks.base import ThreatModel
from cfbench.attacks.proto_cf import (
    ProtoCF,
    ProtoCFParams,
    load_tensors,
    nearest_other_class,
)
from cfbench.config import make_config
from cfbench.errors import UsageError
from cfbench.models import build_model
from cfbench.testing.tiny import direct_fit_context
from cfbench_baselines.cf_at import CFAT, EXAMPLES_PREFIX, CFATParams
from cfbench_baselines.erm import ERM

N = 160
EPOCHS = 20   # the generator classifier (= erm) must fit the data for the counterfactuals to be valid
#: a fast generator recipe: the full defaults (1000 x 2 iterations) take minutes per batch
FAST_CF = {"steps": 30, "c_steps": 2, "ae_epochs": 5}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny batches: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    from cfbench.data.specs import Digits

    ds = Digits().load()
    x = torch.from_numpy(ds.x_train[:N].copy())
    y = torch.from_numpy(ds.y_train[:N].copy())
    return ds, x, y


def _model(ds, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn8", ds.shape, ds.num_classes, ds.mean, ds.std, {"width": 16})


def _ctx(tmp_path=None, *, epochs=2, seed=0, run_dir=None):
    return direct_fit_context(epochs=epochs, batch_size=32, seed=seed, run_dir=run_dir, cache_dir=tmp_path,
                              checkpoint_dir=(run_dir / "checkpoints") if run_dir else None)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def classifier(data):
    ds, x, y = data
    m = _model(ds)
    ERM().fit(m, x, y, _ctx(epochs=20))
    return m.eval()


@pytest.fixture(scope="module")
def generator(data):
    ds, x, y = data
    return ProtoCF(ProtoCFParams(**FAST_CF)).fit(x, y, seed=0)


# -- the generator -------------------------------------------------------------------------------

def test_generator_flips_the_large_majority_of_digits(data, classifier, generator):
    _, x, y = data
    nn = generator.nearest_other_class()
    idx = torch.arange(64)
    x0, target = x[nn[idx]], y[idx]
    assert (y[nn[idx]] != target).all()
    res = generator.generate(classifier, x0, target)
    # independent check of validity: the classifier's own argmax on the returned images
    with torch.no_grad():
        pred = classifier(res.x).argmax(1)
    assert torch.equal(res.valid, pred == target)
    flip = res.valid.float().mean().item()
    assert flip > 0.8, f"flip rate {flip:.2f}"          # measured 0.97 with these settings
    assert res.x.min() >= 0 and res.x.max() <= 1
    assert res.x.shape == x0.shape
    # the counterfactual moved: towards the target, away from the explained instance
    assert (res.x - x0).flatten(1).abs().sum(1)[res.valid].min() > 0


def test_l1_threshold_makes_perturbations_sparser(data, classifier, generator):
    _, x, y = data
    nn = generator.nearest_other_class()
    x0, target = x[nn[:24]], y[:24]
    changed = {}
    for beta in (0.0, 0.3):
        g = ProtoCF(dataclasses.replace(generator.params, beta=beta))
        g.ae, g.codes, g.labels, g.x_fit = generator.ae, generator.codes, generator.labels, generator.x_fit
        res = g.generate(classifier, x0, target)
        changed[beta] = ((res.x - x0).abs() > 1e-6).float().flatten(1).sum(1)[res.valid].mean().item()
    assert changed[0.3] < changed[0.0]


def test_nearest_other_class_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(300, 2, 3, 3, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    got = nearest_other_class(codes, labels, chunk=37).numpy()
    c, lab = codes.flatten(1).double().numpy(), labels.numpy()
    for i in range(len(c)):
        d = ((c - c[i]) ** 2).sum(1)
        d[lab == lab[i]] = np.inf
        assert got[i] == int(np.argmin(d))


def test_prototypes_match_brute_force(generator):
    g = torch.Generator().manual_seed(2)
    q = generator.codes[torch.randint(0, N, (20,), generator=g)] + 0.01
    target = torch.randint(0, 10, (20,), generator=g)
    proto = generator.prototypes(q, target).numpy()
    codes, labels = generator.codes.double().numpy(), generator.labels.numpy()
    k = generator.params.proto_k
    for i in range(20):
        pool = codes[labels == int(target[i])]
        d = ((pool - q[i].double().numpy()) ** 2).sum(1)
        np.testing.assert_allclose(proto[i], pool[np.argsort(d, kind="stable")[:k]].mean(0), rtol=1e-5, atol=1e-6)


def test_generator_needs_fit_and_sane_input(data, classifier, generator):
    _, x, y = data
    with pytest.raises(UsageError, match="fit"):
        ProtoCF().perturb(classifier, x[:2], y[:2], ThreatModel("Linf", 0.1))
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        generator.generate(classifier, x[:2] * 3, y[:2])
    with pytest.raises(UsageError, match="target classes"):
        generator.generate(classifier, x[:2], y[:3])


# -- the defense ------------------------------------------------------------------------------------

def test_p0_is_bit_identical_to_erm(data, tmp_path):
    ds, x, y = data
    a, b = _model(ds), _model(ds)
    ctx = _ctx(tmp_path)
    CFAT(P.build(CFATParams, {"p": 0})).fit(a, x, y, ctx)
    ERM().fit(b, x, y, _ctx(tmp_path))
    assert _equal(_state(a), _state(b))
    assert ctx.metrics["cf.replaced"] == 0
    assert not (tmp_path / "cf-at").exists()        # nothing generated


def test_fit_replaces_a_fraction_caches_and_reuses(data, tmp_path, monkeypatch):
    ds, x, y = data
    prm = P.build(CFATParams, {"p": 0.5, **FAST_CF})
    run = tmp_path / "run"
    ctx = _ctx(tmp_path / "cache", run_dir=run, epochs=EPOCHS)
    model = _model(ds)
    CFAT(prm).fit(model, x, y, ctx)
    m = ctx.metrics
    assert m["cf.flip_rate"]["value"] > 0.8
    assert m["cf.replaced"] == round(m["cf.replaced_fraction"] * N)
    assert ctx.notes["counterfactuals"]["requested"] == N // 2
    assert m["cf.replaced"] == N // 2 - ctx.notes["counterfactuals"]["failed_in_chosen"]
    for key in ("cf.l1", "cf.l2", "cf.l1_to_x", "cf.l2_to_x", "cf.ae_error", "cf.ae_error_data",
                "cf.target_flip_rate", "cf.generator.train_accuracy"):
        assert key in m
    assert ctx.notes["counterfactuals"]["cached"] is False

    # the generated set on disk: valid counterfactuals are classified as their label by the generator
    # classifier, which is exactly the run's erm model (same copy, data, seed and recipe)
    cache = tmp_path / "cache" / "cf-at"
    (set_file,) = cache.glob("set-*.safetensors")
    (clf_file,) = cache.glob("clf-*.safetensors")
    gen_set, _ = load_tensors(set_file)
    erm = _model(ds)
    ERM().fit(erm, x, y, _ctx(epochs=EPOCHS))
    clf_state, _ = load_tensors(clf_file)
    assert _equal(clf_state, _state(erm))
    with torch.no_grad():
        pred = erm.eval()(gen_set["x_cf"]).argmax(1)
    v = gen_set["valid"].bool()
    assert torch.equal(pred[v], y[v])
    assert gen_set["x_cf"].min() >= 0 and gen_set["x_cf"].max() <= 1
    assert (y[gen_set["neighbour"]] != y).all()

    # examples for the report, through the run's one example channel
    ex = ctx.examples[EXAMPLES_PREFIX]
    assert ex["clean"].shape == ex["neighbour"].shape == ex["adv"].shape == (16, *ds.shape)
    assert torch.equal(ex["clean"], x[ex["index"]]) and torch.equal(ex["y"], y[ex["index"]])

    # second fit: nothing is regenerated (the generator would raise), the result is identical
    def boom(*a, **k):
        raise AssertionError("regenerated although the cache holds this recipe")

    monkeypatch.setattr(ProtoCF, "neighbour_counterfactuals", boom)
    monkeypatch.setattr(CFAT, "_generator_classifier", boom)
    ctx2 = _ctx(tmp_path / "cache", epochs=EPOCHS)
    again = _model(ds)
    CFAT(prm).fit(again, x, y, ctx2)
    assert ctx2.notes["counterfactuals"]["cached"] is True
    assert _equal(_state(model), _state(again))
    assert ctx2.metrics["cf.replaced"] == m["cf.replaced"]


@pytest.mark.parametrize("key, value, text", [
    ("p", "1.5", "<= 1"), ("p", "-0.1", ">= 0"), ("steps", "0", ">= 1"), ("c_steps", "0", ">= 1"),
    ("gamma", "-1", ">= 0"), ("theta", "-2", ">= 0"), ("beta", "-0.1", ">= 0"), ("cf_lr", "0", "> 0"),
    ("c_init", "inf", "finite"), ("proto_k", "0", ">= 1"),
])
def test_bad_settings_are_clear_errors(key, value, text):
    with pytest.raises(UsageError) as e:
        make_config(dataset="digits", defense="cf-at", sets={key: value}, evaluators=("clean",))
    assert key in str(e.value) and text in str(e.value)


def test_direct_construction_is_checked_too():
    with pytest.raises(UsageError, match=r"p: 2.0 is out of range; it must be <= 1"):
        CFATParams(p=2.0)
    with pytest.raises(UsageError, match="steps"):
        ProtoCFParams(steps=0)
    assert CFATParams().proto_cf_params() == ProtoCFParams()
    assert CFATParams(cf_lr=0.5, cf_batch_size=7).proto_cf_params().lr == 0.5


@pytest.mark.slow
def test_end_to_end_run_on_digits(tmp_path):
    from cfbench.runner import execute

    cfg = make_config(dataset="digits", defense="cf-at", evaluators=("clean",),
                      sets={"epochs": 10, "steps": 50, "c_steps": 2, "ae_epochs": 10})
    out = execute(cfg, tmp_path, progress=False)
    rec = out.record
    assert rec["status"] == "ok"
    assert rec["metrics"]["cf.flip_rate"]["value"] > 0.8
    assert rec["metrics"]["clean.accuracy"]["value"] > 0.5
    assert EXAMPLES_PREFIX in rec["examples"]  # in examples.safetensors with the evaluators' examples
    from cfbench.store.examples import load_examples

    ex = load_examples(out.run_dir)[EXAMPLES_PREFIX]
    assert ex["clean"].shape == ex["adv"].shape == ex["neighbour"].shape


# -- issue 19: momentum, exclude_self, controls, the replaced members -------------------------------

def _alibi_fista(model, x0, target, p: ProtoCFParams, shift: int = 1):
    """Float64 transcription of alibi's CounterfactualProto.attack loop (one round of c, no AE or
    prototype term): apply_grads (step size from global_step = k, then global_step += 1), then the
    shrinkage-thresholding update and the momentum zt = global_step / (global_step + 3).  With
    ``shift = 0`` the momentum is EAD Algorithm 1's k / (k + 3) instead."""
    onehot = torch.nn.functional.one_hot(target, 10).double()
    adv, adv_s = x0.clone(), x0.clone()
    for k in range(p.steps):
        xs = adv_s.clone().requires_grad_(True)
        logits = model(xs)
        z_t = (logits * onehot).sum(1)
        other = logits.masked_fill(onehot.bool(), -float("inf")).amax(1)
        loss = (p.c_init * (other - z_t).clamp_min(-p.kappa) + (xs - x0).pow(2).flatten(1).sum(1)).sum()
        (g,) = torch.autograd.grad(loss, xs)
        with torch.no_grad():
            y_new = adv_s - p.lr * (1 - k / p.steps) ** 0.5 * g.clamp(-p.grad_clip, p.grad_clip)
            step = k + shift
            d = y_new - x0
            new = torch.where(d > p.beta, torch.clamp(y_new - p.beta, max=1.0),
                              torch.where(d.abs() <= p.beta, x0, torch.clamp(y_new + p.beta, min=0.0)))
            zt = step / (step + 3)
            adv_s = (new + zt * (new - adv)).clamp(0, 1)
            adv = new
    return adv


def test_fista_momentum_is_alibis_executed_schedule():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    for q in model.parameters():
        q.requires_grad_(False)
    x0 = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    target = torch.arange(6) % 10
    prm = ProtoCFParams(steps=12, c_steps=1, c_init=10.0, gamma=0.0, theta=0.0, kappa=1e6, lr=0.5, beta=0.001)
    gen = ProtoCF(prm)
    res = gen._batch(model, x0, target, torch.zeros(6, 1, dtype=torch.float64))
    assert not res.valid.any() and (res.x - x0).abs().max() > 0.05   # kappa = 1e6: the moved last iterate
    torch.testing.assert_close(res.x, _alibi_fista(model, x0, target, prm), rtol=0, atol=1e-12)
    assert (res.x - _alibi_fista(model, x0, target, prm, shift=0)).abs().max() > 1e-4   # k/(k+3) differs


def test_exclude_self_leaves_x_out_of_its_prototype(data, generator):
    _, x, y = data
    nn = generator.nearest_other_class()
    q = generator.codes[nn]
    excl = torch.arange(N)
    proto = generator.prototypes(q, y, exclude=excl).double().numpy()
    codes, labels, k = generator.codes.double().numpy(), generator.labels.numpy(), generator.params.proto_k
    hits = 0
    for i in range(N):
        cand = np.flatnonzero(labels == int(y[i]))
        d = ((codes[cand] - q[i].double().numpy()) ** 2).sum(1)
        top = cand[np.argsort(d, kind="stable")[:k]]
        hits += int(i in top)
        keep = cand[cand != i]
        d2 = ((codes[keep] - q[i].double().numpy()) ** 2).sum(1)
        np.testing.assert_allclose(proto[i], codes[keep[np.argsort(d2, kind="stable")[:k]]].mean(0),
                                   rtol=1e-5, atol=1e-6)
    from cfbench_baselines.cf_at import self_in_prototype
    assert self_in_prototype(generator, nn) == pytest.approx(hits / N)
    assert hits > 0                                              # x is (often) among them without exclusion


def test_real_only_control_is_erm_on_the_kept_images(data, tmp_path):
    from cfbench_baselines.cf_at import chosen_indices

    ds, x, y = data
    a, b = _model(ds), _model(ds)
    ctx = _ctx(tmp_path, epochs=3)
    CFAT(P.build(CFATParams, {"p": 0.75, "control": "real-only"})).fit(a, x, y, ctx)
    chosen = chosen_indices(N, 0.75, 0)
    keep = torch.ones(N, dtype=torch.bool)
    keep[chosen] = False
    ERM().fit(b, x[keep], y[keep], _ctx(epochs=3))
    assert _equal(_state(a), _state(b))
    assert int(keep.sum()) == 40 and ctx.notes["counterfactuals"]["replaced"]["train_index"] == sorted(chosen.tolist())
    assert not (tmp_path / "cf-at").exists() and not (tmp_path / "proto-cf").exists()   # nothing generated
    c = _model(ds)                                               # same number of steps instead: 4x the epochs
    ctx_s = _ctx(epochs=3)
    CFAT(P.build(CFATParams, {"p": 0.75, "control": "real-only", "control_budget": "steps"})).fit(c, x, y, ctx_s)
    assert len(ctx_s.history) == 8              # 3 x 5 steps on all 160 = ceil(15 / 2) epochs of 2 on the kept 40
    with pytest.raises(UsageError, match="p < 1"):
        CFAT(P.build(CFATParams, {"p": 1.0, "control": "real-only"})).fit(_model(ds), x, y, _ctx(epochs=1))


def test_neighbour_control_trains_on_x_nn_labelled_y(data, tmp_path):
    from cfbench_baselines.cf_at import chosen_indices

    ds, x, y = data
    prm = P.build(CFATParams, {"p": 0.5, "control": "neighbour", "ae_epochs": 2})
    a, b = _model(ds), _model(ds)
    ctx = _ctx(tmp_path, epochs=2)
    CFAT(prm).fit(a, x, y, ctx)
    gen = ProtoCF(prm.proto_cf_params()).fit(x, y, seed=0, cache_dir=tmp_path)      # the cached autoencoder
    assert gen.ae_cached
    nn = gen.nearest_other_class()
    chosen = chosen_indices(N, 0.5, 0)
    x_mixed = x.clone()
    x_mixed[chosen] = x[nn[chosen]]
    assert (y[nn[chosen]] != y[chosen]).all()
    ERM().fit(b, x_mixed, y, _ctx(epochs=2))
    assert _equal(_state(a), _state(b))
    assert ctx.notes["counterfactuals"]["replaced"]["train_index"] == sorted(chosen.tolist())
    assert not (tmp_path / "cf-at").exists()                     # no counterfactual search


def test_chosen_indices_are_nested_and_seeded():
    from cfbench_baselines.cf_at import chosen_indices

    a, b = chosen_indices(100, 0.5, 3), chosen_indices(100, 0.95, 3)
    assert len(a) == 50 and len(b) == 95 and torch.equal(b[:50], a)
    assert not torch.equal(chosen_indices(100, 0.5, 4), a)


@pytest.mark.parametrize("key, value, text", [("control", "pgd", "real-only"), ("control_budget", "time", "steps")])
def test_bad_control_settings_are_clear_errors(key, value, text):
    with pytest.raises(UsageError) as e:
        make_config(dataset="digits", defense="cf-at", sets={key: value}, evaluators=("clean",))
    assert key in str(e.value) and text in str(e.value)

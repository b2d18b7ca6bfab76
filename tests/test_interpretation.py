"""Interpretation maps (cfbench.explain.cam) and the interpretation-robustness evaluator:
Kendall tau against scipy, top-k overlap against a slow reference (and the reference code's
np.partition bug), the t-interval against scipy, CAM / Grad-CAM / saliency against captum,
the top-k attack, degenerate runs with known answers, and error messages."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cfbench import params as P
from cfbench.errors import UsageError
from cfbench.evaluators.interpretation import (
    InterpretationParams,
    InterpretationRobustness,
    default_grid,
    kendall_tau_b,
    t_interval,
    top_k,
    topk_overlap,
)
from cfbench.explain.cam import default_gradcam_layer, map_shape, maps, resolve_method
from cfbench.models import build_model
from cfbench.testing.tiny import eval_context, fit_context, tiny_config, tiny_data
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

# -- metrics ---------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.integers(-3, 3), min_size=n, max_size=n), min_size=1, max_size=4),
    st.lists(st.lists(st.integers(-3, 3), min_size=n, max_size=n), min_size=1, max_size=4))))
def test_kendall_tau_b_matches_scipy_with_ties(rows):
    a, b = rows
    m = min(len(a), len(b))
    a, b = np.array(a[:m], float), np.array(b[:m], float)
    got = kendall_tau_b(a, b, chunk_elems=50)           # small chunks exercise the batching
    for i in range(m):
        want = stats.kendalltau(a[i], b[i]).statistic
        if np.isnan(want):
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(want, abs=1e-12)


def test_kendall_tau_b_on_continuous_maps_and_shapes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7, 7)), rng.normal(size=(5, 7, 7))
    b[0] = a[0] * 3 + 1                                 # monotone: tau = 1
    got = kendall_tau_b(a, b)
    assert got[0] == pytest.approx(1.0)
    for i in range(5):
        assert got[i] == pytest.approx(stats.kendalltau(a[i].ravel(), b[i].ravel()).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        kendall_tau_b(a, b[:, :6])


def slow_topk_overlap(a, b, k):
    out = []
    for ra, rb in zip(a.reshape(len(a), -1).tolist(), b.reshape(len(b), -1).tolist()):
        ta = set(sorted(range(len(ra)), key=lambda j: -ra[j])[:k])
        tb = set(sorted(range(len(rb)), key=lambda j: -rb[j])[:k])
        out.append(len(ta & tb) / k)
    return out


def test_topk_overlap_matches_a_slow_reference_and_not_the_partition_bug():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, 7, 7, generator=g), torch.rand(6, 7, 7, generator=g)
    b[1] = a[1] + 0.01 * torch.rand(7, 7, generator=g)
    for k in (1, 8, 20, 49):
        assert topk_overlap(a, b, k).tolist() == pytest.approx(slow_topk_overlap(a, b, k))
    # the reference intr_topk: np.partition(x, -k)[-k] is the k-th-from-last *row* of the
    # partitioned matrix (here 8 rows, so row 0 of a 9-row matrix), not each row's k-th
    # largest value; its "top-k" masks then hold the wrong number of cells
    x = torch.rand(9, 49, generator=g).numpy()
    threshold = np.partition(x, -8)[-8]
    assert threshold.shape == (49,)
    counts = (x > threshold[:9, None]).sum(1)            # broadcast as the reference does with [:, None]
    assert (counts != 7).any()                            # 7 cells strictly above each row's 8th value
    ours = torch.zeros(9, 49, dtype=torch.bool).scatter_(1, torch.from_numpy(x).topk(8, dim=1).indices, True)
    assert (ours.sum(1) == 8).all()
    assert topk_overlap(a, a, 8).tolist() == [1.0] * 6
    with pytest.raises(ValueError, match=r"k = 50 must be in 1..49"):
        topk_overlap(a, b, 50)


def test_t_interval_matches_scipy():
    v = np.random.default_rng(1).uniform(-1, 1, 37)
    got = t_interval(v, 0.95)
    ci = stats.ttest_1samp(v, 0).confidence_interval(0.95)
    assert got["value"] == pytest.approx(v.mean()) and got["n"] == 37
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert t_interval([np.nan, 0.5]) == {"value": 0.5, "ci_low": None, "ci_high": None, "n": 1}
    assert t_interval([])["value"] is None


def test_k_and_the_default_grid():
    assert (top_k(49, 0.16), top_k(64, 0.16), top_k(16, 0.16), top_k(4, 0.01)) == (8, 10, 3, 1)
    assert default_grid("Linf", 0.1, 1) == (0.05, 0.1, 0.2, 0.3, 0.35, 0.4)
    assert default_grid("Linf", 8 / 255, 3) == pytest.approx(tuple(8 / 255 * e / 0.3 for e in (0.05, 0.1, 0.2, 0.3, 0.35, 0.4)))


# -- maps ----------------------------------------------------------------------------------

def _model(name, shape, params, classes=10):
    torch.manual_seed(0)
    return build_model(name, shape, classes, (0.5,) * shape[0], (0.25,) * shape[0], params).eval()


def test_gradcam_of_a_gap_network_is_its_cam_over_the_area():
    m = _model("gap-cnn", (1, 8, 8), {"width": 4})
    x, t = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 9])
    assert resolve_method(m) == "cam" and default_gradcam_layer(m) == "body.5"
    cam = maps(m, x, t)
    assert torch.allclose(cam, m.cam(x, t))
    assert torch.allclose(maps(m, x, t, "gradcam"), cam / 64, atol=1e-6)      # captum LayerGradCam


def test_differentiable_gradcam_and_saliency_equal_captums():
    m = _model("cnn8", (1, 8, 8), {"width": 4})
    x, t = torch.rand(4, 1, 8, 8), torch.tensor([1, 5, 7, 0])
    assert resolve_method(m) == "gradcam" and default_gradcam_layer(m) == "convs.6"
    for method in ("gradcam", "saliency"):
        ref = maps(m, x, t, method)
        diff = maps(m, x.clone().requires_grad_(True), t, method, differentiable=True)
        assert diff.requires_grad and torch.allclose(diff, ref, atol=1e-6)
    assert map_shape(m, x) == (4, 4) and map_shape(m, x, "saliency") == (8, 8)
    assert map_shape(m, x, layer="convs.0") == (8, 8)


def test_map_errors_name_the_valid_choices():
    m = _model("cnn8", (1, 8, 8), {"width": 4})
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UsageError, match="valid choices: auto, cam, gradcam, saliency"):
        maps(m, x, [0, 1], "lime")
    with pytest.raises(UsageError, match="has none. Valid choices for it: auto, gradcam, saliency"):
        maps(m, x, [0, 1], "cam")
    with pytest.raises(UsageError, match=r"'nope' is not a submodule .*valid choices: normalize, convs, convs.0, "):
        maps(m, x, [0, 1], "gradcam", layer="nope")
    with pytest.raises(ValueError, match="one class per input"):
        maps(m, x, [0, 1, 2])


# -- the evaluator ---------------------------------------------------------------------------

def _run(model_name="gap-cnn", mp=None, **settings_):
    cfg = tiny_config("erm", model=model_name, sets={"model.width": 8, "train.epochs": 3} if mp is None else mp)
    data = tiny_data(cfg)
    from cfbench.registry import get
    from cfbench.training.recipe import build_model_for

    model = build_model_for(cfg, data, 0)
    get("defense", "erm")().fit(model, data.x_train, data.y_train, fit_context(cfg, data))
    ev = InterpretationRobustness(P.build(InterpretationParams, settings_, where="interpretation."))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = eval_context(cfg, model, Path(tmp), data)
        res = ev.evaluate(ctx)
    return res, ctx, model, data


def test_a_zero_radius_changes_nothing_and_the_grid_at_zero_is_clean_accuracy():
    res, ctx, model, data = _run(n_examples=32, aai_eps=0.0, evasion=False, eps_grid=(0.0,), grid_steps=3)
    m = res.metrics
    assert m["interpretation.aai.unchanged"]["value"] == 1.0
    assert m["interpretation.aai.kendall_tau"]["value"] == pytest.approx(1.0)
    assert m["interpretation.aai.topk_overlap"]["value"] == 1.0
    with torch.no_grad():
        acc = (model(data.x_test[:32]).argmax(1) == data.y_test[:32]).float().mean().item()
    assert m["interpretation.robust_accuracy.0"]["value"] == pytest.approx(acc)
    assert m["interpretation.k"] == 10 and m["interpretation.map_cells"] == 64
    assert set(ctx.examples["interpretation-aai"]) == {"clean", "adv", "y", "map_clean", "map_adv"}


def test_the_aai_attack_lowers_the_clean_top_k_cells_and_scores_match_a_direct_computation():
    res, ctx, model, _ = _run(n_examples=16, aai_steps=10, evasion=False, robust_grid=False)
    ex = ctx.examples["interpretation-aai"]
    x, xa, y = ex["clean"], ex["adv"], ex["y"]
    assert (xa - x).abs().max() <= ctx.threat.eps + 1e-6
    m0, m1 = model.cam(x, y).detach(), model.cam(xa, y).detach()
    top = m0.reshape(len(x), -1).topk(10, dim=1).indices
    assert (m1.reshape(len(x), -1).gather(1, top).sum(1) < m0.reshape(len(x), -1).gather(1, top).sum(1)).all()
    with torch.no_grad():
        same = (model(xa).argmax(1) == model(x).argmax(1)).numpy()
    taus = [stats.kendalltau(a.ravel(), b.ravel()).statistic for a, b, s in zip(m0.numpy(), m1.numpy(), same) if s]
    assert res.metrics["interpretation.aai.kendall_tau"]["value"] == pytest.approx(np.mean(taus))
    assert res.metrics["interpretation.aai.kendall_tau"]["n"] == int(same.sum())
    assert res.metrics["interpretation.aai.unchanged"]["value"] == pytest.approx(same.mean())


def test_a_non_gap_model_gets_gradcam_and_the_evaluator_reports_it():
    res, *_ = _run("cnn8", {"model.width": 8}, n_examples=8, aai_steps=2, evasion_steps=2, eps_grid=(0.1,),
                   grid_steps=2)
    notes = res.notes["interpretation"]
    assert notes["method"] == "gradcam" and notes["layer"] == "convs.6" and notes["map_shape"] == [4, 4]
    assert res.metrics["interpretation.k"] == 3
    assert all(k.startswith("interpretation.") for k in res.metrics)


def test_bad_evaluator_settings_are_usage_errors():
    with pytest.raises(UsageError, match="method"):
        P.build(InterpretationParams, {"method": "lime"}, where="interpretation.")
    with pytest.raises(UsageError, match="topk_fraction"):
        P.build(InterpretationParams, {"topk_fraction": "0"}, where="interpretation.")
    with pytest.raises(UsageError, match="has none. Valid choices for it"):
        _run("cnn8", {"model.width": 8}, n_examples=4, method="cam")

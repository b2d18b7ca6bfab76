"""The counterfactual-quality evaluator: each metric against an independent computation (scipy
Fréchet distance, a float64 transcription of the reference COUT code, numpy distances), the
feature extractor, error paths, and an end-to-end evaluation with ACE on a tiny DDPM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cfbench.errors import UsageError
from cfbench.evaluators.counterfactual import (
    CounterfactualParams,
    CounterfactualQuality,
    PenultimateFeatures,
    cout,
    distances,
    fd_bootstrap,
    frechet_distance,
    paired_differences,
)
from torch import nn


class _Flat(nn.Module):
    num_features = 6

    def forward(self, x):
        return x.flatten(1)[:, :6]


def test_frechet_distance_matches_scipy():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    real = torch.rand(40, 1, 3, 3, generator=g)
    fake = torch.rand(30, 1, 3, 3, generator=g) * 0.7 + 0.2
    a, b = real.flatten(1)[:, :6].double().numpy(), fake.flatten(1)[:, :6].double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(_Flat(), real, fake) == pytest.approx(ref, rel=1e-4)
    assert frechet_distance(_Flat(), real, real) == pytest.approx(0.0, abs=1e-4)


def test_fd_bootstrap_interval():
    from scipy import linalg

    g = torch.Generator().manual_seed(1)
    real = torch.rand(50, 1, 3, 3, generator=g)
    fake = (real + 0.3 * torch.rand(50, 1, 3, 3, generator=g)).clamp(0, 1)
    lo, hi = fd_bootstrap(_Flat(), real, fake, n_boot=100, seed=0)
    # an independent bootstrap: the same resampled indices, numpy/scipy Frechet distance
    a, b = real.flatten(1)[:, :6].double().numpy(), fake.flatten(1)[:, :6].double().numpy()
    rng = np.random.default_rng(0)
    stats = []
    for _ in range(100):
        i = rng.integers(0, 50, 50)
        s1, s2 = np.cov(a[i], rowvar=False), np.cov(b[i], rowvar=False)
        mu = a[i].mean(0) - b[i].mean(0)
        stats.append(mu @ mu + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(stats, [0.025, 0.975])), rel=1e-6)
    assert lo < frechet_distance(_Flat(), real, fake) < hi
    assert fd_bootstrap(_Flat(), real, fake, n_boot=0) == (None, None)
    lo0, hi0 = fd_bootstrap(_Flat(), real, real, n_boot=20)
    assert abs(lo0) < 1e-6 and abs(hi0) < 1e-6           # identical sets: zero in every resample


def test_paired_differences_match_numpy():
    g = torch.Generator().manual_seed(2)
    per = {k: {m: torch.rand(12, generator=g).double() for m in ("l1", "l2", "linf", "sparsity")}
           for k in ("ace", "ace.pre", "pgd")}
    out = paired_differences(per)
    assert set(out) == {f"counterfactual.{a}.{m}_minus_{b}" for a, b in (("ace", "pgd"), ("ace.pre", "pgd"),
                                                                       ("ace", "ace_pre"))
                        for m in ("l1", "l2", "linf", "sparsity")}
    from scipy import stats

    d = (per["ace"]["l1"] - per["pgd"]["l1"]).numpy()
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    v = out["counterfactual.ace.l1_minus_pgd"]
    assert v["value"] == pytest.approx(d.mean()) and (v["ci_low"], v["ci_high"]) == pytest.approx((lo, hi))
    assert paired_differences({"ace": per["ace"]}) == {}


def _reference_cout(model, imgs, cfs, label, target, step):
    """eval_utils/cout_metrics.py (gen_masks 'abs' + calculate_cout), float64, any channel count."""
    masks = (cfs - imgs).abs().sum(1).view(len(imgs), -1)
    masks = masks - masks.min(1, keepdim=True)[0]
    masks = masks / masks.max(1, keepdim=True)[0]
    num_pixels = masks.shape[1]
    n = len(imgs)
    l = torch.arange(n)
    p = torch.softmax(model(imgs), 1)
    c_curve, cp_curve = [p[l, label]], [p[l, target]]
    cur = torch.zeros(n, num_pixels, dtype=imgs.dtype)
    elements = torch.argsort(masks, dim=1, descending=True, stable=True)
    for pixels in range(0, num_pixels, step):
        idx = elements[l, pixels:pixels + step].view(n, -1)
        for i in range(n):
            cur[i, idx[i]] = 1
        m = cur.view(n, 1, *imgs.shape[-2:])
        p = torch.softmax(model(cfs * m + imgs * (1 - m)), 1)
        c_curve.append(p[l, label])
        cp_curve.append(p[l, target])

    def auc(curve):
        return curve[0] / 2 + sum(curve[1:-1]) + curve[-1] / 2

    return (auc(cp_curve) - auc(c_curve)) * step / num_pixels


def test_cout_matches_the_reference_code_on_8x8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(128, 10)).double()   # 2 channels: COUT generalised
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 2, 8, 8, generator=g, dtype=torch.float64)
    x_cf = x.clone()
    x_cf[:, :, 2:6, 1:5] = torch.rand(5, 2, 4, 4, generator=g, dtype=torch.float64)
    c, t = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6, 7, 8, 9])
    with torch.no_grad():
        ref = _reference_cout(model, x, x_cf, c, t, step=1)    # 64 // 50 = 1: equal chunks
    got = cout(model, x, x_cf, c, t)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)
    assert (got.abs() <= 1).all()
    # inserting nothing changes nothing: COUT of x itself is p_t(x) - p_c(x)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    np.testing.assert_allclose(cout(model, x, x.clone(), c, t).numpy(),
                               (p[range(5), t] - p[range(5), c]).numpy(), atol=1e-12)


def test_distances_and_features():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 5, 5, generator=g)
    x_cf = x.clone()
    x_cf[:, :, :2] += 0.1
    d = distances(x, x_cf, 0.5 / 255)
    diff = (x_cf - x).reshape(4, -1).double().numpy()
    np.testing.assert_allclose(d["l1"].numpy(), np.abs(diff).sum(1), rtol=1e-6)
    np.testing.assert_allclose(d["l2"].numpy(), np.linalg.norm(diff, axis=1), rtol=1e-6)
    np.testing.assert_allclose(d["linf"].numpy(), np.abs(diff).max(1), rtol=1e-6)
    np.testing.assert_allclose(d["sparsity"].numpy(), np.full(4, 15 / 25))
    from cfbench.models import build_model

    torch.manual_seed(0)
    m = build_model("cnn8", (1, 8, 8), 10, (0.3,), (0.4,), {"width": 4}).eval()
    xi = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        expected = m.classifier[:-1](m.convs(m.normalize(xi)))
        assert torch.equal(PenultimateFeatures(m)(xi), expected)
    assert PenultimateFeatures(m).num_features == 128


def test_bad_settings_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="'dice' is not a generator. Valid choices: ace, proto-cf, pgd"):
        CounterfactualParams(generators=("ace", "dice"))
    from cfbench.testing.tiny import eval_context, tiny_config, tiny_data
    from cfbench.training.recipe import build_model_for

    cfg = tiny_config("erm", sets={"data.test_size": None})
    data = tiny_data(cfg)
    ev = CounterfactualQuality(CounterfactualParams(generators=("pgd",), n_examples=300))
    with pytest.raises(UsageError, match="first half of the test split \\(250 images.*n_examples <= 250"):
        ev.evaluate(eval_context(cfg, build_model_for(cfg, data, 0).eval(), tmp_path, data))


def test_evaluator_end_to_end_with_ace(tmp_path):
    from cfbench.attacks.ace import ddpm_path, ddpm_recipe, ddpm_split
    from cfbench.diffusion import train_ddpm
    from cfbench.models.ddpm import DDPMParams
    from cfbench.registry import get
    from cfbench.testing.tiny import eval_context, fit_context, tiny_config, tiny_data
    from cfbench.training.recipe import build_model_for

    cfg = tiny_config("erm", sets={"train.epochs": 3})
    data = tiny_data(cfg)
    model = build_model_for(cfg, data, 0)
    get("defense", "erm")().fit(model, data.x_train, data.y_train, fit_context(cfg, data))
    model.eval()
    ds = data.dataset
    params = DDPMParams(channels=(4, 8), norm_num_groups=4, attention=False, epochs=2)
    recipe = ddpm_recipe(ds, params, 0, "shift")
    path = ddpm_path(tmp_path / "_cache", recipe)
    train_ddpm(torch.from_numpy(ds.x_test[ddpm_split(ds)]), params, recipe, path, progress=False)
    ev = CounterfactualQuality(CounterfactualParams(generators=("ace", "pgd"), n_examples=6, ace_iterations=4,
                                                    ace_ddpm=str(path), n_images=3))
    ctx = eval_context(cfg, model, tmp_path)
    res = ev.evaluate(ctx)
    m = res.metrics
    x = data.x_test[:6]
    for g in ("ace", "pgd"):
        assert isinstance(m[f"counterfactual.{g}.seconds"], float)
        for k in ("l1", "l2", "linf", "sparsity", "fd", "cout"):
            v = m[f"counterfactual.{g}.{k}"]
            assert v["n"] == 6 and v["ci_low"] <= v["value"] <= v["ci_high"], (g, k, v)
        assert m[f"counterfactual.{g}.flip_rate"]["n"] == 6
        assert 0 <= m[f"counterfactual.{g}.sparsity"]["value"] <= 1
        # the report's example images are the first explained instances
        ex = ctx.examples[f"counterfactual-{g}"]
        assert torch.equal(ex["clean"], x[:3])
    assert m["counterfactual.ace.pre.flip_rate"]["n"] == 6 and "counterfactual.ace.pre.l1" in m
    assert 0 <= m["counterfactual.ace.mask_fraction"]["value"] <= 1
    # paired differences are the difference of the means (same instances)
    d = m["counterfactual.ace.l1_minus_pgd"]
    assert d["value"] == pytest.approx(m["counterfactual.ace.l1"]["value"] - m["counterfactual.pgd.l1"]["value"])
    assert d["ci_low"] <= d["value"] <= d["ci_high"]
    assert m["counterfactual.ace.l1_minus_ace_pre"]["value"] == pytest.approx(
        m["counterfactual.ace.l1"]["value"] - m["counterfactual.ace.pre.l1"]["value"])
    assert m["counterfactual.n"] == 6 and m["counterfactual.reference.fd"] >= 0
    assert set(ctx.examples) == {"counterfactual-ace", "counterfactual-pgd"}
    assert ctx.examples["counterfactual-ace"]["adv"].shape == (3, 1, 8, 8)
    assert all(k.startswith("counterfactual.") for k in m)
    # the feature classifier is cached: a second evaluation trains nothing new
    files = list((tmp_path / "_cache" / "counterfactual").glob("features-*.safetensors"))
    assert len(files) == 1
    res2 = CounterfactualQuality(CounterfactualParams(generators=("pgd",), n_examples=6, ace_iterations=4,
                                                      n_images=0)).evaluate(eval_context(cfg, model, tmp_path))
    assert res2.metrics["counterfactual.pgd.l1"]["value"] == m["counterfactual.pgd.l1"]["value"]
    assert res2.metrics["counterfactual.reference.fd"] == m["counterfactual.reference.fd"]

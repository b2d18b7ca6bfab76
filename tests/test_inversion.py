"""Explanation leakage (Zhao et al., ICCV 2021): explanations, inversion networks, metrics
against direct computations, and the ``inversion`` evaluator on tiny digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfbench.errors import UsageError
from cfbench.evaluators.inversion import (
    ExplanationInversion,
    InversionParams,
    image_metrics,
    mean_ci,
    newcombe_diff,
    set_metrics,
    welch_diff,
)
from cfbench.explain import methods as X
from cfbench.models import GAPCNN, SmallCNN8
from cfbench.models.inversion import (
    ARCHITECTURES,
    InversionNet,
    crop,
    pad_to,
    reconstruct,
    split_train_val,
    train_inverter,
    working_size,
)
from cfbench.params import build
from scipy import stats
from scipy.signal import correlate2d


def _gap(width: int = 8, size: int = 8, seed: int = 0) -> GAPCNN:
    torch.manual_seed(seed)
    return GAPCNN(1, 10, size, (0.3,), (0.4,), GAPCNN.Params(width=width)).eval()


# -- metrics against direct computations ---------------------------------------------------------

def _ssim64(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    """Wang et al.'s SSIM of two single-channel images in float64, with torchmetrics' border
    convention: Gaussian window of radius r = int(3.5 sigma + 0.5) (normalised), images
    reflect-padded by r, local statistics at every pixel, population (co)variances,
    K1 = 0.01, K2 = 0.03, L = 1; the mean of the H x W map."""
    r = int(3.5 * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    win = np.outer(g, g)
    win /= win.sum()

    def f(z):
        return correlate2d(z, win, mode="valid")

    a, b = np.pad(a, r, mode="reflect"), np.pad(b, r, mode="reflect")

    mu_a, mu_b = f(a), f(b)
    va, vb = np.maximum(f(a * a) - mu_a ** 2, 0), np.maximum(f(b * b) - mu_b ** 2, 0)
    cov = f(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return float(m.mean())


@pytest.mark.parametrize("side, sigma", [(8, None), (28, None), (12, 1.0)])
def test_image_metrics_match_direct_computations(side, sigma):
    g = torch.Generator().manual_seed(side)
    x = torch.rand(5, 1, side, side, generator=g)
    recon = (x + 0.2 * torch.randn(5, 1, side, side, generator=g)).clamp(0, 1)
    out = image_metrics(recon, x, sigma=sigma)
    xd, rd = x.double().numpy(), recon.double().numpy()
    mse = ((rd - xd) ** 2).reshape(5, -1).mean(1)
    np.testing.assert_allclose(out["mse"], mse, rtol=1e-12)
    np.testing.assert_allclose(out["psnr"], 10 * np.log10(1.0 / mse), rtol=1e-6)   # PSNR by its formula (torchmetrics: float32 log)
    s = sigma if sigma is not None else (1.5 if side >= 16 else 0.5)
    ref = [_ssim64(rd[i, 0], xd[i, 0], s) for i in range(5)]
    np.testing.assert_allclose(out["ssim"], ref, rtol=1e-7, atol=1e-9)


def test_identical_images_have_ssim_one_and_zero_mse():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = image_metrics(x.clone(), x)
    np.testing.assert_allclose(out["ssim"], 1.0, rtol=1e-12)
    assert (out["mse"] == 0).all() and np.isinf(out["psnr"]).all()


def test_intervals_match_scipy_and_a_published_example():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, 40), rng.normal(0.2, 0.5, 25)
    m = mean_ci(a, 0.9)
    lo, hi = stats.t.interval(0.9, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    assert m["value"] == pytest.approx(a.mean()) and (m["ci_low"], m["ci_high"]) == pytest.approx((lo, hi))
    w = welch_diff(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (w["ci_low"], w["ci_high"]) == pytest.approx((ci.low, ci.high))
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 - 48/80, method 10
    nd = newcombe_diff(56, 70, 48, 80)
    assert nd["value"] == pytest.approx(0.2)
    assert (round(nd["ci_low"], 4), round(nd["ci_high"], 4)) == (0.0524, 0.3339)


def test_gap_metrics_sign_and_auc_match_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    per = {s: {"mse": rng.uniform(0.01, 0.1, n), "psnr": rng.uniform(10, 20, n), "ssim": rng.uniform(0, 1, n)}
           for s, n in (("members", 30), ("nonmembers", 20), ("test", 10))}
    per["members"]["mse"] *= 0.5                       # members reconstructed better
    correct = {"members": np.r_[np.ones(20), np.zeros(10)].astype(bool),
               "nonmembers": np.r_[np.ones(8), np.zeros(12)].astype(bool), "test": np.ones(10, bool)}
    out = set_metrics("inversion.x", per, correct, 0.95, {"mse": per["members"]["mse"] + 0.01})
    assert out["inversion.x.gap.mse"]["value"] == pytest.approx(per["nonmembers"]["mse"].mean()
                                                                - per["members"]["mse"].mean())
    assert out["inversion.x.gap.mse"]["value"] > 0     # positive = members leak more
    assert out["inversion.x.gap.accuracy"]["value"] == pytest.approx(20 / 30 - 8 / 20)
    labels = np.r_[np.ones(30), np.zeros(20)]
    auc = roc_auc_score(labels, -np.r_[per["members"]["mse"], per["nonmembers"]["mse"]])
    assert out["inversion.x.gap.auc"]["value"] == pytest.approx(auc)
    assert out["inversion.x.gain.mse"]["value"] == pytest.approx(0.01)
    assert out["inversion.x.members.accuracy"]["value"] == pytest.approx(20 / 30)


# -- explanations ----------------------------------------------------------------------------------

def test_minmax_normalises_each_image_alone():
    e = torch.stack([torch.arange(4.0).view(1, 2, 2), torch.full((1, 2, 2), 3.0), -torch.arange(4.0).view(1, 2, 2)])
    out = X.minmax_per_image(e)
    assert torch.equal(out[0], torch.tensor([[[0.0, 1 / 3], [2 / 3, 1.0]]]))
    assert torch.equal(out[1], torch.zeros(1, 2, 2))                      # a constant map becomes 0
    assert torch.equal(out[2], torch.tensor([[[1.0, 2 / 3], [1 / 3, 0.0]]]))


def test_gradcam_weights_are_per_example_not_batch_averaged():
    """GNIME's Grad-CAM averages d f / d A over the batch axis too; captum's (ours) does not."""
    model = _gap()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.arange(6) % 10
    batch = X.raw_explanation(model, x, "gradcam", t)
    alone = torch.cat([X.raw_explanation(model, x[i:i + 1], "gradcam", t[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-7)
    # the GNIME variant: one batch-wide weight vector -- different maps, so the check above can fail
    feats = model.features(x).detach().requires_grad_(True)
    logits = model.fc(feats.mean((2, 3)))
    (g,) = torch.autograd.grad(logits.gather(1, t.view(-1, 1)).sum(), feats)
    gnime = F.relu((g.mean((0, 2, 3), keepdim=True) * feats).sum(1, keepdim=True)).detach()
    assert not torch.allclose(gnime, batch, atol=1e-6)


def test_gradcam_of_a_gap_model_is_relu_cam_over_area():
    model = _gap(size=8)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 3, 5, 9])
    cam = model.cam(x, t).detach().unsqueeze(1)
    h, w = cam.shape[-2:]
    torch.testing.assert_close(X.raw_explanation(model, x, "gradcam", t), F.relu(cam) / (h * w), rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(X.raw_explanation(model, x, "cam", t), cam)


def test_cam_is_upsampled_to_the_input_on_28x28():
    model = _gap(size=28)
    x = torch.rand(2, 1, 28, 28)
    e = X.explain(model, x, "cam")
    assert e.shape == (2, 1, 28, 28) and float(e.amin()) == 0.0 and float(e.amax()) == 1.0


def test_saliency_and_input_x_gradient_are_the_autograd_gradients():
    model = _gap()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    t = torch.tensor([1, 2, 7])
    (g,) = torch.autograd.grad(model(x).gather(1, t.view(-1, 1)).sum(), x)
    torch.testing.assert_close(X.raw_explanation(model, x.detach(), "saliency", t), g.abs())
    torch.testing.assert_close(X.raw_explanation(model, x.detach(), "input_x_gradient", t), x.detach() * g)


def test_integrated_gradients_are_complete():
    """Sundararajan et al.'s completeness axiom: sum of attributions = f(x) - f(0)."""
    model = _gap()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    t = model(x).argmax(1)
    attr = X.raw_explanation(model, x, "integrated_gradients", t, ig_steps=64)
    with torch.no_grad():
        delta = model(x).gather(1, t.view(-1, 1)).squeeze(1) - model(torch.zeros_like(x)).gather(
            1, t.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(attr.flatten(1).sum(1), delta, rtol=2e-2, atol=2e-3)


def test_explanations_default_to_the_predicted_class_and_errors_name_the_choices():
    model = _gap()
    x = torch.rand(3, 1, 8, 8)
    pred = model(x).argmax(1)
    torch.testing.assert_close(X.explain(model, x, "saliency"), X.explain(model, x, "saliency", pred))
    cnn = SmallCNN8(1, 10, 8, (0.3,), (0.4,), SmallCNN8.Params(width=4)).eval()
    with pytest.raises(UsageError, match="needs a model with class activation maps.*Use 'gradcam'"):
        X.explain(cnn, x, "cam")
    assert X.explain(cnn, x, "gradcam").shape == (3, 1, 8, 8)      # Grad-CAM works on any conv net
    with pytest.raises(UsageError, match="unknown explanation 'lime'. Valid choices: cam, saliency"):
        X.explain(model, x, "lime")
    with pytest.raises(UsageError, match="needs a fitted proto-cf generator"):
        X.explain(model, x, "counterfactual")


# -- inversion networks --------------------------------------------------------------------------

@pytest.mark.parametrize("side", [8, 28])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_inversion_networks_map_prediction_and_explanation_to_an_image(arch, side):
    p = working_size(side)
    assert p == {8: 8, 28: 32}[side]
    torch.manual_seed(0)
    net = InversionNet(arch, num_classes=10, image_channels=1, size=p, expl_channels=1, width=8)
    pred = torch.softmax(torch.randn(3, 10), 1)
    e = pad_to(torch.rand(3, 1, side, side), p)
    out = net(pred, e)
    assert out.shape == (3, 1, p, p) and torch.isfinite(out).all()
    assert crop(out, side, side).shape == (3, 1, side, side)
    if arch == "prediction":       # (d) ignores the explanation
        torch.testing.assert_close(out, net(pred, torch.rand_like(e)))
    else:
        assert not torch.allclose(out, net(pred, torch.rand_like(e)))


def test_pad_and_crop_are_inverse_and_bad_networks_are_refused():
    x = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(crop(pad_to(x, 32), 28, 28), x)
    assert pad_to(x, 32)[..., :2, :].abs().sum() == 0
    with pytest.raises(UsageError, match="unknown inversion architecture 'gan'. Valid choices: prediction, flatten"):
        InversionNet("gan", num_classes=10, image_channels=1, size=8)
    with pytest.raises(UsageError, match="power-of-two sides >= 4, got 28"):
        InversionNet("unet", num_classes=10, image_channels=1, size=28)


def test_train_inverter_keeps_the_best_validation_weights():
    g = torch.Generator().manual_seed(0)
    pred = torch.softmax(torch.randn(40, 10, generator=g), 1)
    x = torch.rand(40, 1, 8, 8, generator=g)
    torch.manual_seed(0)
    net = InversionNet("prediction", num_classes=10, image_channels=1, size=8, width=4)
    net, s = train_inverter(net, pred, None, x, lr=1e-2, batch_size=16, max_epochs=30, patience=3, seed=1)
    tr, va = split_train_val(40, 0.2, 1)
    assert (s["n_train"], s["n_val"]) == (32, 8) and len(set(tr.tolist()) | set(va.tolist())) == 40
    val = float(F.mse_loss(reconstruct(net, pred[va], None, 8, 8), x[va]))
    assert val == pytest.approx(s["best_val_mse"], rel=1e-5)
    assert s["best_val_mse"] == min(s["val_mse"]) and s["best_epoch"] == 1 + s["val_mse"].index(min(s["val_mse"]))
    assert s["stopped_early"] == (s["epochs"] < 30) and (not s["stopped_early"] or s["epochs"] - s["best_epoch"] == 3)


# -- the evaluator --------------------------------------------------------------------------------

def _target(model: str = "gap-cnn", epochs: int = 3, pool: int = 256):
    from cfbench.registry import get
    from cfbench.testing.tiny import fit_context, tiny_config, tiny_data
    from cfbench.training.recipe import build_model_for

    cfg = tiny_config("erm", model=model, sets={"train.epochs": epochs, "data.pool_size": pool,
                                                "data.test_size": 64, "train.lr": 0.05})
    data = tiny_data(cfg)
    net = build_model_for(cfg, data, 0)
    get("defense", "erm")().fit(net, data.x_train, data.y_train, fit_context(cfg, data))
    return cfg, data, net.eval()


def _evaluate(cfg, data, model, tmp_path, **settings):
    from cfbench.testing.tiny import eval_context

    ev = ExplanationInversion(build(InversionParams, {k: str(v) for k, v in settings.items()}, where="inversion."))
    ctx = eval_context(cfg, model, tmp_path, data)
    return ev.evaluate(ctx), ctx


FAST = {"architectures": "expmi", "max_epochs": 2, "classifier_epochs": 1, "width": 4, "n_examples": 3}


def test_explanation_aware_inversion_beats_prediction_only_on_members(tmp_path):
    """Zhao et al.'s main claim on tiny data: with Input x Gradient (which outlines the digit)
    ExpMI reconstructs the members with a lower MSE than the prediction alone.  (lr 1e-3 and 40
    epochs instead of the paper's 1e-4 / early stopping, to train in seconds.)"""
    cfg, data, model = _target(pool=400, epochs=5)
    res, _ = _evaluate(cfg, data, model, tmp_path, explanations="input_x_gradient", architectures="expmi",
                       attention_transfer="false", inv_lr=1e-3, max_epochs=40, patience=40, width=8,
                       classifier_epochs=2, n_examples=0)
    m = res.metrics
    pred, expl = m["inversion.prediction.members.mse"], m["inversion.input_x_gradient.expmi.members.mse"]
    assert expl["ci_high"] < pred["ci_low"], (expl, pred)
    gain = m["inversion.input_x_gradient.expmi.gain.mse"]
    assert gain["value"] == pytest.approx(pred["value"] - expl["value"]) and gain["ci_low"] > 0


def test_evaluator_trains_once_and_reuses_its_cache(tmp_path):
    cfg, data, model = _target()
    settings = dict(FAST, explanations="saliency,counterfactual", cf_steps=3, cf_c_steps=1, cf_ae_epochs=1)
    first, ctx = _evaluate(cfg, data, model, tmp_path, **settings)
    nets = first.notes["inversion"]["networks"]
    assert set(nets) == {"prediction", "saliency.expmi", "counterfactual.expmi", "attention_transfer",
                         "attention_transfer.explanation"}
    assert not any(n["cached"] for n in nets.values())
    assert 0 <= first.notes["inversion"]["counterfactual"]["valid_rate"] <= 1
    sizes = first.notes["inversion"]["protocol"]["sizes"]
    assert sizes == {"attacker": 64, "members": 128, "nonmembers": 64, "test": 32, "eval_classifier_train": 32}
    # report grids: members as "clean", reconstructions as "adv"
    clean, adv, y = ctx.examples["inversion-saliency-expmi"]
    assert clean.shape == adv.shape == (3, 1, 8, 8) and len(y) == 3 and 0 <= float(adv.min()) <= float(adv.max()) <= 1
    assert {"inversion-prediction", "inversion-counterfactual-expmi", "inversion-attention-transfer"} <= set(ctx.examples)

    second, _ = _evaluate(cfg, data, model, tmp_path, **settings)
    assert all(n["cached"] for n in second.notes["inversion"]["networks"].values())
    assert all(e["cached"] for e in second.notes["inversion"]["explanations"].values())
    assert second.notes["inversion"]["surrogate"]["cached"] and second.notes["inversion"]["eval_classifier"]["cached"]
    assert second.metrics == first.metrics


def test_cam_is_skipped_with_a_warning_on_a_model_without_cams(tmp_path):
    cfg, data, model = _target(model="cnn8", epochs=1)
    res, _ = _evaluate(cfg, data, model, tmp_path, **dict(FAST, explanations="cam,gradcam",
                                                          attention_transfer="false"))
    assert "cam" in res.notes["inversion"]["skipped"]
    assert any("explanation 'cam' skipped" in w for w in res.warnings)
    assert "inversion.gradcam.expmi.members.mse" in res.metrics
    assert not any(k.startswith("inversion.cam.") for k in res.metrics)


@pytest.mark.parametrize("settings, message", [
    ({"explanations": "cam,lime"}, "unknown explanation 'lime'. Valid choices: cam"),
    ({"architectures": "prediction"}, "'prediction' is not an XAI-aware architecture. Valid choices: flatten, unet"),
    ({"explanations": "cam,cam"}, "must not repeat"),
])
def test_bad_settings_are_usage_errors(settings, message):
    with pytest.raises(UsageError, match=message):
        build(InversionParams, settings, where="inversion.")


def test_too_few_non_members_for_the_attacker_split_is_a_usage_error(tmp_path):
    cfg, data, model = _target(epochs=1)
    with pytest.raises(UsageError, match=r"cannot be split into >= 2 attacker examples.*attacker_fraction=0.01"):
        _evaluate(cfg, data, model, tmp_path, **dict(FAST, attacker_fraction=0.01))


def test_registered_with_a_namespace():
    from cfbench.registry import get

    assert get("evaluator", "inversion") is ExplanationInversion
    assert ExplanationInversion.metric_namespace() == "inversion"
    assert math.isclose(InversionParams().inv_lr, 1e-4) and InversionParams().beta1 == 0.5
    assert InversionParams().inv_batch_size == 128

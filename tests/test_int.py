"""Int (Boopathy et al. 2020): the CAM discrepancy and its gradient against a slow float64
transcription of the reference code, the eps ramp, the lam scaling, the variants, the
paper's MNIST network, the shared PGD's objective over x', and the defense's effect on tiny
data (its interpretation maps move less under attack than ERM's)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cfbench.attacks.pgd import pgd
from cfbench.errors import UsageError
from cfbench.explain.cam import all_class_maps
from cfbench.models import build_model
from cfbench.params import build
from cfbench.testing.tiny import direct_fit_context, fit_context, tiny_config, tiny_data
from cfbench_baselines.int_at import IntAT, IntATParams, discrepancy, ramp_eps

# -- the discrepancy D ---------------------------------------------------------------------

def slow_discrepancy(maps, maps_adv, logits_adv, y, one_class=False):
    """The reference code's cam_diff, one example / class / cell at a time, in Python floats:
    softmax of f(x'), true class zeroed, renormalised; |.| summed over cells."""
    out = []
    for i in range(len(y)):
        yi = int(y[i])
        z = [float(v) for v in logits_adv[i]]
        e = [math.exp(v - max(z)) for v in z]
        p = [v / sum(e) for v in e]
        q = [0.0 if c == yi else p[c] for c in range(len(p))]
        w = [v / sum(q) for v in q]
        def cells(c, i=i):
            return [abs(float(a) - float(b)) for a, b in zip(maps_adv[i, c].flatten(), maps[i, c].flatten())]

        d = sum(cells(yi))
        if not one_class:
            d += sum(w[c] * sum(cells(c)) for c in range(len(p)) if c != yi)
        out.append(d)
    return out


def _inputs(seed=0, n=3, c=4, h=3):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n, c, h, h, generator=g, dtype=torch.float64)
    maps_adv = torch.randn(n, c, h, h, generator=g, dtype=torch.float64)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    return maps, maps_adv, logits, y


@pytest.mark.parametrize("one_class", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discrepancy_matches_the_slow_reference(seed, one_class):
    maps, maps_adv, logits, y = _inputs(seed)
    got = discrepancy(maps, maps_adv, logits, y, one_class=one_class)
    want = slow_discrepancy(maps, maps_adv, logits, y, one_class)
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def test_discrepancy_gradient_matches_finite_differences_of_the_slow_reference():
    maps, maps_adv, logits, y = _inputs(3)
    tensors = [t.clone().requires_grad_(True) for t in (maps, maps_adv, logits)]
    discrepancy(*tensors, y).sum().backward()
    h = 1e-6
    for which, t in enumerate(tensors):
        flat = t.detach().clone().reshape(-1)
        for j in range(flat.numel()):
            args = [u.detach().clone() for u in tensors]
            for sign, store in ((1, "plus"), (-1, "minus")):
                a = args[which].reshape(-1)
                a[j] = flat[j] + sign * h
                val = sum(slow_discrepancy(*args, y))
                if store == "plus":
                    plus = val
                else:
                    minus = val
                a[j] = flat[j]
            fd = (plus - minus) / (2 * h)
            assert t.grad.reshape(-1)[j].item() == pytest.approx(fd, rel=1e-5, abs=1e-6), (which, j)
    # the weights are not detached: D depends on the logits of x' through w
    assert tensors[2].grad.abs().sum() > 0


def test_discrepancy_through_a_gap_network_has_the_finite_difference_gradient():
    torch.manual_seed(0)
    model = build_model("gap-cnn", (1, 8, 8), 3, (0.5,), (0.25,), {"width": 2}).double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        _, maps = all_class_maps(model, x)

    def d_of(xa):
        logits_a, maps_a = all_class_maps(model, xa)
        return discrepancy(maps, maps_a, logits_a, y)

    xa = (x + 0.05 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    assert torch.autograd.gradcheck(d_of, (xa,), eps=1e-6, atol=1e-5)


def test_all_class_maps_give_the_models_cam_and_logits():
    torch.manual_seed(0)
    for name, shape, mp in (("gap-cnn", (1, 8, 8), {"width": 4}), ("int-mnist", (1, 28, 28), {"width": 0.25})):
        model = build_model(name, shape, 10, (0.5,), (0.25,), mp).eval()
        x = torch.rand(3, *shape)
        logits, maps = all_class_maps(model, x)
        assert torch.allclose(logits, model(x), atol=1e-5)
        for c in range(10):
            assert torch.allclose(maps[:, c], model.cam(x, torch.full((3,), c)), atol=1e-5)


# -- schedule, scaling, settings -----------------------------------------------------------

def paper_eps_val(eps, step):
    """train.py's eps_val for MNIST, transcribed."""
    if step <= 2000:
        return 0
    elif step <= 10000:
        return eps * (step - 2000) / 8000
    return eps


def test_ramp_is_the_papers_schedule_on_a_paper_length_run():
    d = IntAT()
    d._total_steps = 110_000
    for step in (0, 1999, 2000, 2001, 5000, 9999, 10000, 10001, 50000):
        assert d.eps_at(step, 0.3) == pytest.approx(paper_eps_val(0.3, step), abs=1e-15)


def test_ramp_is_scaled_for_short_runs_and_unscaled_on_request():
    d = IntAT()
    d._total_steps = 330                            # digits: 11 steps per epoch, 30 epochs
    start, end = d.ramp()
    assert (start, end) == pytest.approx((2000 * 330 / 110000, 10000 * 330 / 110000))
    assert d.eps_at(6, 0.1) == 0.0 and d.eps_at(30, 0.1) == pytest.approx(0.1)
    assert d.eps_at(18, 0.1) == pytest.approx(0.1 * (18 - start) / (end - start))
    fixed = IntAT(IntATParams(ramp_reference_steps=None))
    fixed._total_steps = 330
    assert fixed.ramp() == (2000, 10000) and fixed.eps_at(330, 0.1) == 0.0
    assert ramp_eps(5, 0.3, 4.0, 4.0) == 0.3      # a zero-length ramp jumps to full eps


def test_lam_is_scaled_by_map_area_and_step_size_is_the_papers():
    d = IntAT()
    assert d.lam_for(torch.zeros(1, 10, 7, 7)) == pytest.approx(0.01)
    assert d.lam_for(torch.zeros(1, 10, 8, 8)) == pytest.approx(0.01 * 49 / 64)
    assert IntAT(IntATParams(area_scaling=False)).lam_for(torch.zeros(1, 10, 8, 8)) == 0.01
    assert d.step_size(0.3) == pytest.approx(0.01)      # 40 steps of 0.01 at eps 0.3


def test_bad_settings_are_usage_errors():
    with pytest.raises(UsageError, match=r"ramp_end \(5\) must be >= ramp_start \(10\)"):
        build(IntATParams, {"ramp_start": "10", "ramp_end": "5"})
    with pytest.raises(UsageError, match="variant"):
        build(IntATParams, {"variant": "int3"})
    with pytest.raises(UsageError, match=r"'cnn8' has none\. Valid choices: gap-cnn, int-mnist"):
        tiny_config("int-at")


# -- the inner maximisation (shared PGD with an objective over x') ----------------------------

def test_pgd_objective_is_additive_to_the_logit_loss():
    torch.manual_seed(0)
    model = build_model("cnn8", (1, 8, 8), 10, (0.5,), (0.25,), {"width": 4}).eval()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    torch.manual_seed(1)
    a = pgd(model, x, y, eps=0.1, step_size=0.02, steps=5)
    torch.manual_seed(1)
    b = pgd(model, x, y, eps=0.1, step_size=0.02, steps=5,
            objective=lambda net, xa: F.cross_entropy(net(xa), y, reduction="none"))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        pgd(model, x, y, eps=0.1, step_size=0.02, steps=1, loss_fn=lambda lo, t: lo.sum(),
            objective=lambda net, xa: net(xa).sum(1))
    with pytest.raises(ValueError, match=r"one value per example, shape \(6,\); got \(\)"):
        pgd(model, x, y, eps=0.1, step_size=0.02, steps=1, objective=lambda net, xa: net(xa).sum())


def _gap_batch(variant="int", step=10_000):
    from cfbench.training.context import Batch

    torch.manual_seed(0)
    model = build_model("gap-cnn", (1, 8, 8), 10, (0.5,), (0.25,), {"width": 4})
    ctx = direct_fit_context(eps=0.1)
    d = IntAT(IntATParams(variant=variant, steps=10))
    d._total_steps = 110_000
    x, y = tiny_data(tiny_config("erm")).x_train[:16], tiny_data(tiny_config("erm")).y_train[:16]
    return d, model, x, y, Batch(0, step, torch.arange(16), ctx)


@pytest.mark.parametrize("variant", ["int", "int-one", "int-adv"])
def test_the_inner_maximisation_raises_its_objective_inside_the_ball(variant):
    d, model, x, y, batch = _gap_batch(variant)
    model.eval()
    with torch.no_grad():
        _, maps = all_class_maps(model, x)

    def value(xa):
        with torch.no_grad():
            la, ma = all_class_maps(model, xa)
            v = d.lam_for(maps) * discrepancy(maps, ma, la, y, one_class=variant == "int-one")
            return v + (F.cross_entropy(la, y, reduction="none") if variant == "int-adv" else 0)

    torch.manual_seed(0)
    xa = d.adversarial(model, x, y, batch)
    torch.manual_seed(0)
    start = (x + (torch.rand_like(x) * 2 - 1) * 0.1).clamp(0, 1)     # the uniform start alone
    assert (xa - x).abs().max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert (value(xa) > value(start)).float().mean() >= 0.9


def test_no_perturbation_before_the_ramp_and_int2_uses_cross_entropy_pgd():
    d, model, x, y, batch = _gap_batch("int", step=0)
    assert torch.equal(d.adversarial(model, x, y, batch), x)
    loss, _ = d.per_sample_loss(model, x, y, batch)
    assert torch.allclose(loss, F.cross_entropy(model(x), y, reduction="none"), atol=1e-6)   # D(x, x) = 0
    d2, model, x, y, batch = _gap_batch("int2")
    model.eval()
    torch.manual_seed(0)
    xa = d2.adversarial(model, x, y, batch)
    torch.manual_seed(0)
    want = pgd(model, x, y, eps=0.1, step_size=d2.step_size(0.1), steps=10)
    assert torch.equal(xa, want)


def test_per_sample_loss_is_ce_plus_scaled_discrepancy_and_int_adv_uses_x_adv():
    for variant in ("int", "int-adv"):
        d, model, x, y, batch = _gap_batch(variant)
        xa = d.adversarial(model, x, y, batch)
        loss, logits = d.per_sample_loss(model, x, y, batch, x_adv=xa)
        lg, m = all_class_maps(model, x)
        la, ma = all_class_maps(model, xa)
        on = la if variant == "int-adv" else lg
        want = F.cross_entropy(on, y, reduction="none") + 0.01 * 49 / 64 * discrepancy(m, ma, la, y)
        assert torch.allclose(loss, want, atol=1e-5) and torch.allclose(logits, on)


# -- the paper's MNIST network -------------------------------------------------------------

def test_int_mnist_is_the_papers_network():
    from cfbench.models.base import count_parameters

    torch.manual_seed(0)
    m = build_model("int-mnist", (1, 28, 28), 10, (0.5,), (0.25,), None).eval()
    # conv16 4x4 (272) + conv32 4x4 (8,224) + conv100 7x7 (156,900) + bias-free 100 -> 10 (1,000)
    assert count_parameters(m) == 272 + 8224 + 156900 + 1000 and m.fc.bias is None
    x = torch.rand(4, 1, 28, 28)
    assert tuple(m.features(x).shape) == (4, 100, 7, 7)
    assert (m.features(x) < 0).any()                      # no ReLU after the last convolution
    t = torch.tensor([0, 3, 5, 9])
    assert torch.allclose(m.cam(x, t).mean((1, 2)), m(x)[torch.arange(4), t], atol=1e-5)
    assert tuple(build_model("int-mnist", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, None).features(
        torch.rand(1, 3, 32, 32)).shape) == (1, 100, 8, 8)
    assert m.conv1.weight.std().item() == pytest.approx(1 / 4, rel=0.1)   # N(0, 1/fan_in), fan_in 16


# -- the effect on tiny data --------------------------------------------------------------

@pytest.mark.slow
def test_int_interpretation_robustness_beats_erms_on_digits():
    """gap-cnn (width 16) on the digits members, eps 0.2: under the top-k AAI attack (the
    interpretation evaluator, 20 steps), Int's CAMs keep a higher Kendall tau with the clean
    maps than ERM's -- over all 200 test images and over the unchanged predictions -- and
    fewer of its predictions change; Int still classifies."""
    import tempfile
    from pathlib import Path

    from cfbench.evaluators.interpretation import (
        InterpretationParams,
        InterpretationRobustness,
    )
    from cfbench.registry import get
    from cfbench.testing.tiny import eval_context
    from cfbench.training.recipe import build_model_for

    sets = {"model.width": 16, "train.epochs": 30, "train.optimizer": "adam", "train.lr": 0.003,
            "train.weight_decay": 0, "data.pool_size": None, "data.test_size": None, "threat.eps": 0.2}
    ev = InterpretationRobustness(InterpretationParams(n_examples=200, aai_steps=20, evasion=False,
                                                       robust_grid=False))
    out = {}
    for defense, extra in (("erm", {}), ("int-at", {"defense.steps": 5})):
        cfg = tiny_config(defense, model="gap-cnn", sets={**sets, **extra})
        data = tiny_data(cfg)
        model = build_model_for(cfg, data, 0)
        get("defense", defense)(cfg.defense_params).fit(model, data.x_train, data.y_train, fit_context(cfg, data))
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            m = ev.evaluate(eval_context(cfg, model, Path(tmp), data)).metrics
        with torch.no_grad():
            m["accuracy"] = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
        out[defense] = m
    erm, int_ = out["erm"], out["int-at"]
    assert int_["accuracy"] > 0.85
    assert int_["interpretation.aai.kendall_tau_all"]["ci_low"] > erm["interpretation.aai.kendall_tau_all"]["value"]
    assert int_["interpretation.aai.kendall_tau"]["value"] > erm["interpretation.aai.kendall_tau"]["value"]
    assert int_["interpretation.aai.unchanged"]["value"] > erm["interpretation.aai.unchanged"]["value"] + 0.1

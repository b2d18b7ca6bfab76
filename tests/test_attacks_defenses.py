"""The shared PGD and the defenses' claimed effects, on tiny digits data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cfbench.attacks.base import ThreatModel
from cfbench.attacks.pgd import PGDAttack, PGDParams, pgd, project
from cfbench.models import build_model
from cfbench.registry import get
from cfbench.testing.tiny import direct_fit_context


def _model(ds, width=16, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn8", (1, 8, 8), 10, ds.mean, ds.std, {"width": width})


def _fit(defense, params, d, epochs=6, eps=0.1, seed=0):
    model = _model(d.dataset, seed=seed)
    cls = get("defense", defense)
    from cfbench.params import build
    p = build(cls.Params, params)
    ctx = direct_fit_context(eps=eps, epochs=epochs, batch_size=64, seed=seed)
    cls(p).fit(model, d.x_train, d.y_train, ctx)
    return model


@pytest.fixture(scope="module")
def erm_model(digits_split):
    return _fit("erm", {}, digits_split, epochs=10)


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 0.5)])
def test_pgd_stays_in_the_ball_and_the_box_and_raises_the_loss(erm_model, digits_split, norm, eps):
    x, y = digits_split.x_test[:128], digits_split.y_test[:128]
    x_adv = pgd(erm_model, x, y, eps=eps, step_size=2.5 * eps / 10, steps=10, norm=norm)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(erm_model(x_adv), y) > 2 * F.cross_entropy(erm_model(x), y)
    assert torch.equal(pgd(erm_model, x, y, eps=0.0, step_size=0.1, steps=5), x)


def test_pgd_never_touches_parameter_gradients(erm_model, digits_split):
    for p in erm_model.parameters():
        p.grad = None
    pgd(erm_model, digits_split.x_test[:8], digits_split.y_test[:8], eps=0.1, step_size=0.02, steps=3)
    assert all(p.grad is None for p in erm_model.parameters())


def test_project_l2():
    d = torch.randn(5, 1, 8, 8) * 10
    assert torch.allclose(project(d, "L2", 1.0).flatten(1).norm(dim=1), torch.ones(5), atol=1e-5)
    with pytest.raises(ValueError, match="Linf, L2"):
        project(d, "L1", 1.0)


def test_pgd_restarts_are_at_least_as_strong(erm_model, digits_split):
    x, y = digits_split.x_test[:200], digits_split.y_test[:200]
    threat = ThreatModel("Linf", 0.05)

    def acc(restarts):
        torch.manual_seed(0)
        xa = PGDAttack(PGDParams(steps=5, restarts=restarts)).perturb(erm_model, x, y, threat)
        with torch.no_grad():
            return (erm_model(xa).argmax(1) == y).float().mean().item()

    assert acc(3) <= acc(1)


def _robust_acc(model, d, eps=0.1):
    torch.manual_seed(0)
    x, y = d.x_test, d.y_test
    xa = PGDAttack(PGDParams(steps=10)).perturb(model, x, y, ThreatModel("Linf", eps))
    with torch.no_grad():
        return (model(xa).argmax(1) == y).float().mean().item(), (model(x).argmax(1) == y).float().mean().item()


def test_pgd_at_and_trades_buy_robustness_over_erm(erm_model, digits_split):
    erm_rob, erm_clean = _robust_acc(erm_model, digits_split)
    at_rob, at_clean = _robust_acc(_fit("pgd-at", {"steps": 5}, digits_split, epochs=10), digits_split)
    tr_rob, tr_clean = _robust_acc(_fit("trades", {"steps": 5, "beta": 6.0}, digits_split, epochs=10), digits_split)
    print(f"robust ERM {erm_rob:.3f} PGD-AT {at_rob:.3f} TRADES {tr_rob:.3f}")
    assert erm_clean > 0.85 and at_clean > 0.7 and tr_clean > 0.7
    # measured (10 epochs): ERM 0.41, PGD-AT 0.60, TRADES ~0.6 robust accuracy under PGD-10
    assert at_rob > erm_rob + 0.1, (erm_rob, at_rob)
    assert tr_rob > erm_rob + 0.1, (erm_rob, tr_rob)


def test_trades_with_beta_zero_is_exactly_erm(digits_split):
    a = _fit("erm", {}, digits_split, epochs=2)
    b = _fit("trades", {"beta": 0.0, "steps": 2}, digits_split, epochs=2)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_trades_inner_maximisation_increases_the_kl(erm_model, digits_split):
    from cfbench.defenses import Batch
    from cfbench_baselines.trades import TRADES, TRADESParams, kl_sum

    x, y = digits_split.x_test[:64], digits_split.y_test[:64]
    ctx = direct_fit_context(augmentation="none")
    x_adv = TRADES(TRADESParams(steps=10)).adversarial(erm_model, x, y, Batch(0, 0, torch.arange(64), ctx))
    with torch.no_grad():
        p = F.softmax(erm_model(x), 1)
        noise = (x + 0.1 * torch.sign(torch.randn_like(x))).clamp(0, 1)
        assert kl_sum(erm_model(x_adv), p) > 5 * kl_sum(erm_model(noise), p)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6

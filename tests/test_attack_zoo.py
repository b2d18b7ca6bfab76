"""The torchattacks zoo (evaluator ``attacks``): worst case = the per-example AND of the attacks,
every counted adversarial example inside the threat model, unsupported norms skipped, clear
errors; cross-checked against AutoAttack (pyautoattack) on the committed PGD-AT checkpoint:
the same attack in both agrees within the sampling interval."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchattacks")

from cfbench.attacks.base import ThreatModel
from cfbench.errors import UsageError
from cfbench.evaluators import sanity as S
from cfbench.evaluators.attacks import ATTACKS, AttackZoo, AttackZooParams, build_attack
from cfbench.params import build
from cfbench.testing.tiny import eval_context, fit_context, tiny_config, tiny_data
from cfbench.training.recipe import build_model_for

#: the committed digits leaderboard's PGD-AT run (its id changes when the leaderboard is rebuilt)
CHECKPOINT = next((Path(__file__).resolve().parents[1] / "leaderboards" / "runs").glob("digits-pgd-at-cnn8-s0-*"))
FAST = {"n_examples": 40, "steps": 10, "square_queries": 100, "spsa_iterations": 2, "spsa_samples": 16,
        "eot_samples": 2}


@pytest.fixture(scope="module")
def trained():
    from cfbench.registry import get

    cfg = tiny_config("pgd-at", sets={"train.epochs": 6, "model.width": 16, "data.pool_size": None,
                                      "data.test_size": None, "defense.steps": 3}, evaluators=("clean", "attacks"))
    data = tiny_data(cfg)
    model = build_model_for(cfg, data, 0)
    get("defense", "pgd-at")(cfg.defense_params).fit(model, data.x_train, data.y_train, fit_context(cfg, data))
    return cfg, data, model.eval()


def test_worst_case_is_the_per_example_and_of_every_attack(trained, tmp_path):
    cfg, data, model = trained
    ctx = eval_context(cfg, model, tmp_path, data)
    res = AttackZoo(build(AttackZooParams, FAST)).evaluate(ctx)
    sh = ctx.shared["robust.attacks"]
    n = FAST["n_examples"]
    assert res.metrics["robust.attacks.n"] == n and set(sh["robust"]) == set(AttackZooParams().attacks)
    # independent computation of the worst case from the per-attack outcomes and clean accuracy
    with torch.no_grad():
        clean = model(data.x_test[:n]).argmax(1) == data.y_test[:n]
    worst = clean.clone()
    for name, rob in sh["robust"].items():
        assert not (rob & ~clean).any(), name                       # a clean error is never robust
        assert res.metrics[f"robust.attacks.{name}.accuracy"]["value"] == pytest.approx(rob.float().mean().item())
        worst &= rob
    assert res.metrics["robust.attacks.worst_case.accuracy"]["value"] == pytest.approx(worst.float().mean().item())
    assert all(res.metrics["robust.attacks.worst_case.accuracy"]["value"] <= res.metrics[f"robust.attacks.{a}.accuracy"]
               ["value"] for a in sh["robust"])
    notes = res.notes["robust.attacks"]
    assert notes["attacks"]["cw-l2"]["class"] == "torchattacks.CW" and "found" in notes["attacks"]["deepfool"]
    assert "gradient_free_beats_whitebox" in notes["sanity"]
    assert all(k.startswith("robust.attacks.") for k in res.metrics)


def test_counted_adversarials_lie_in_the_threat_model(trained, tmp_path, monkeypatch):
    """DeepFool and CW-L2 are unbounded: the zoo projects their output onto the Linf ball before
    judging it."""
    cfg, data, model = trained
    seen = []

    from cfbench.evaluators import attacks as zoo

    orig_project = zoo.project

    def spy(delta, norm, eps):
        out = orig_project(delta, norm, eps)
        seen.append((delta.abs().max().item(), out.abs().max().item(), eps))
        return out

    monkeypatch.setattr(zoo, "project", spy)
    res = AttackZoo(build(AttackZooParams, {**FAST, "n_examples": 20, "attacks": ("deepfool", "cw-l2"), "steps": 50, "cw_c": 10.0})).evaluate(
        eval_context(cfg, model, tmp_path, data))
    assert seen and all(after <= eps + 1e-6 for _, after, eps in seen)
    assert max(before for before, _, _ in seen) > cfg.eps   # the attacks went outside the ball, and were projected
    assert res.notes["robust.attacks"]["attacks"]["deepfool"]["median_Linf_distance_found"] > 0


def test_l2_threat_skips_linf_only_attacks_and_bad_names_are_errors(trained, tmp_path):
    cfg, data, model = trained
    ctx = eval_context(cfg, model, tmp_path, data, threat=ThreatModel("L2", 0.5))
    res = AttackZoo(build(AttackZooParams, {**FAST, "attacks": ("spsa", "eot-pgd", "apgd-ce")})).evaluate(ctx)
    skipped = {k for k, v in res.notes["robust.attacks"]["attacks"].items() if "skipped" in v}
    assert skipped == {"spsa", "eot-pgd"} and "robust.attacks.apgd-ce.accuracy" in res.metrics
    with pytest.raises(UsageError, match=r"unknown attack 'cw'.*Valid choices: apgd-ce"):
        build(AttackZooParams, {"attacks": "apgd-ce,cw"})
    with pytest.raises(UsageError, match="twice"):
        build(AttackZooParams, {"attacks": "square,square"})
    for name in ATTACKS:   # every listed attack builds
        build_attack(name, model, "Linf", 0.1, AttackZooParams(), 10, 0)


def test_missing_torchattacks_is_a_clear_error(trained, tmp_path, monkeypatch):
    cfg, data, model = trained
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(UsageError, match=r"pip install --no-deps torchattacks==3\.5\.1"):
        AttackZoo(build(AttackZooParams, FAST)).evaluate(eval_context(cfg, model, tmp_path, data))


def _aa_robust(model, x, y, attack, **set_attrs):
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm="Linf", eps=0.1, version="custom", attacks=[attack], device="cpu", seed=0)
    for path, value in set_attrs.items():
        obj, attr = path.split(".")
        setattr(getattr(aa, obj), attr, value)
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=250)
    with torch.no_grad():
        return (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)


@pytest.mark.slow
def test_same_attacks_agree_with_autoattack_on_the_committed_checkpoint(digits_split, tmp_path):
    """APGD-CE and Square from torchattacks against pyautoattack's, on the stored PGD-AT model
    (leaderboards/runs): the paired 95% interval of the difference in robust accuracy holds 0."""
    import logging

    from cfbench.store.models import load_model

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    model = load_model(CHECKPOINT)
    n = 100
    x, y = digits_split.x_test[:n].contiguous(), digits_split.y_test[:n].contiguous()
    p = AttackZooParams(steps=100, square_queries=300)
    results = {}
    for name, aa_name, attrs in (("apgd-ce", "apgd-ce", {}), ("square", "square", {"square.n_queries": 300})):
        torch.manual_seed(0)
        atk = build_attack(name, model, "Linf", 0.1, p, 10, 0)
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        adv = atk(x, y)
        with torch.no_grad():
            ours = clean & (model(adv).argmax(1) == y)
        theirs = _aa_robust(model, x, y, aa_name, **attrs)
        d = S.paired_difference(ours, theirs)
        results[name] = (ours.float().mean().item(), theirs.float().mean().item(), d)
        print(name, results[name])
        assert d["ci_low"] <= 0 <= d["ci_high"], results
    # the attacks did something on this model (else agreeing would be trivial)
    assert results["apgd-ce"][0] < 0.95 and results["square"][0] < 0.98


def test_a_nan_output_is_no_adversarial_example(tmp_path):
    """DeepFool divides by the gradient difference: on a rounding model (zero gradient) it
    returns NaN, which a model may well 'misclassify'; the zoo keeps the clean image instead."""
    from cfbench import registry

    registry.reset()
    try:
        registry.load_plugin_file(Path(__file__).resolve().parent / "fixtures" / "masking_plugins.py")
        cfg = tiny_config("erm", model="cnn8-round", sets={"model.width": 8}, evaluators=("clean", "attacks"))
        data = tiny_data(cfg)
        model = build_model_for(cfg, data, 0).eval()
        ctx = eval_context(cfg, model, tmp_path, data)
        res = AttackZoo(build(AttackZooParams, {**FAST, "attacks": ("deepfool",), "sanity": False})).evaluate(ctx)
    finally:
        registry.reset()
    sh = ctx.shared["robust.attacks"]
    assert res.notes["robust.attacks"]["attacks"]["deepfool"]["non_finite_outputs"] > 0
    assert torch.equal(sh["robust"]["deepfool"], sh["clean"])

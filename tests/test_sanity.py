"""Robustness sanity flags (cfbench.evaluators.sanity): the statistics against scipy, each check
on the effect it claims, the masking fixtures flagged in record, summary, report and every
leaderboard format and kept off the Pareto front, real PGD-AT / TRADES not flagged, load_model
exactness (save-time refusal, contract), the device type in the identity, determinism, the
CUDA RNG in checkpoints and the per-dataset literature defaults."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import torch
from cfbench import registry
from cfbench.evaluators import sanity as S
from cfbench.evaluators.robust import PGDEvalParams, PGDRobustness, pgd_robust
from cfbench.testing.tiny import eval_context, fit_context, tiny_config, tiny_data
from cfbench.training.recipe import build_model_for
from scipy import stats
from torch import nn

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "masking_plugins.py"
#: a digits recipe that trains a usable model in seconds (width 16, 10 epochs, full split)
QUICK = {"train.epochs": 10, "model.width": 16, "data.pool_size": None, "data.test_size": None}


@pytest.fixture
def masks():
    """The masking fixtures registered for one test (and forgotten afterwards, so that the
    contract test over every registered component never sees them)."""
    registry.reset()
    registry.load_plugin_file(FIXTURES)
    yield
    registry.reset()


def _trained(defense="erm", model=None, sets=None, evaluators=("clean", "pgd")):
    from cfbench.registry import get

    cfg = tiny_config(defense, model=model, sets={**QUICK, **(sets or {})}, evaluators=evaluators)
    data = tiny_data(cfg)
    m = build_model_for(cfg, data, 0)
    get("defense", defense)(cfg.defense_params).fit(m, data.x_train, data.y_train, fit_context(cfg, data))
    return cfg, data, m.eval()


# ---------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("n10,n01,n11,n00", [(12, 0, 50, 38), (5, 3, 40, 52), (0, 7, 10, 83), (30, 30, 20, 20)])
def test_paired_difference_is_the_exact_conditional_interval(n10, n01, n11, n00):
    a = torch.tensor([1] * n10 + [0] * n01 + [1] * n11 + [0] * n00).bool()
    b = torch.tensor([0] * n10 + [1] * n01 + [1] * n11 + [0] * n00).bool()
    d = S.paired_difference(a, b)
    n, m = len(a), n10 + n01
    ci = stats.binomtest(n10, m).proportion_ci(0.95, method="exact")   # independent: scipy
    assert d["n"] == n and d["n10"] == n10 and d["n01"] == n01
    assert d["value"] == pytest.approx(float(a.float().mean() - b.float().mean()))
    assert d["ci_low"] == pytest.approx(m * (2 * ci.low - 1) / n) and d["ci_high"] == pytest.approx(m * (2 * ci.high - 1) / n)
    assert d["ci_low"] <= d["value"] <= d["ci_high"]


def test_paired_difference_edge_cases():
    same = torch.tensor([True, False, True])
    assert S.paired_difference(same, same) == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 3, "n10": 0, "n01": 0}
    with pytest.raises(ValueError, match="equal lengths"):
        S.paired_difference(same, same[:2])


def test_gap_flag_needs_the_whole_interval_above_the_tolerance():
    n = 200
    aa = torch.zeros(n, dtype=torch.bool)
    aa[:100] = True
    small = aa.clone()
    small[100:108] = True      # PGD 4 points above AutoAttack: what a sound defense shows
    big = aa.clone()
    big[100:160] = True        # PGD 30 points above
    ev, fl = S.check_gap(small, aa, 0.05)
    assert fl is None and not ev["flagged"] and ev["gap"]["value"] == pytest.approx(0.04)
    ev, fl = S.check_gap(big, aa, 0.05)
    assert fl["name"] == "pgd_autoattack_gap" and ev["gap"]["ci_low"] > 0.05 and "200 examples" in fl["message"]


def test_gradient_free_flag_uses_the_lower_bound():
    ev, fl = S.check_gradient_free(1, 120, 200, 0.01, attack="square", evaluator="autoattack", whitebox=["apgd-ce"])
    assert fl is None and ev["gain_ci_low"] < 0.01       # one example: sampling noise
    ev, fl = S.check_gradient_free(30, 120, 200, 0.01, attack="square", evaluator="autoattack", whitebox=["apgd-ce"])
    lo = stats.binomtest(30, 200).proportion_ci(0.95, method="exact").low
    assert fl["name"] == "gradient_free_beats_whitebox" and ev["gain_ci_low"] == pytest.approx(lo)


def test_sweep_flags_flat_and_rising_accuracy_but_not_a_falling_one():
    n = 100

    def r(k):
        t = torch.zeros(n, dtype=torch.bool)
        t[:k] = True
        return t

    falling = [(0.05, r(80)), (0.1, r(50)), (0.2, r(10)), (0.4, r(0))]
    assert S.check_sweep(falling, 0.1, "pgd")[1] is None
    flat = [(0.05, r(92)), (0.1, r(90)), (0.2, r(89)), (0.4, r(85))]
    ev, fl = S.check_sweep(flat, 0.1, "pgd")
    assert fl["name"] == "eps_sweep" and ev["kept_at_max"]["still_robust"] == 85
    rising = [(0.05, r(40)), (0.1, r(40)), (0.2, r(70)), (0.4, r(0))]
    ev, fl = S.check_sweep(rising, 0.1, "pgd")
    assert fl is not None and "rises" in ev["problems"][0]
    # a model answering one class everywhere is robust by construction: not a flag
    one = torch.zeros(n, dtype=torch.long)
    assert S.check_sweep(flat, 0.1, "pgd", labels=one)[1] is None
    assert S.check_sweep(flat, 0.1, "pgd", labels=torch.arange(n) % 10)[1] is not None
    assert S.sweep_radii(0.3, "Linf", 784) == [0.15, 0.3, 0.6, 1.0]     # capped at the image cube
    assert S.sweep_radii(0.5, "L2", 64) == [0.25, 0.5, 1.0, 2.0]


def test_gradient_norms_equal_a_per_example_float64_computation(digits_split):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x, y = digits_split.x_test[:20], digits_split.y_test[:20]
    got = S.input_gradient_norms(model, x, y, "cpu", batch_size=7)
    m64 = copy.deepcopy(model).double()
    for i in range(len(x)):
        xi = x[i:i + 1].double().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(m64(xi), y[i:i + 1]), xi)
        assert got[i].item() == pytest.approx(g.abs().sum().item(), rel=1e-4)
    ev, fl = S.check_gradients(torch.tensor([0.0] * 3 + [1.0] * 7, dtype=torch.float64), "pgd")
    assert fl["name"] == "vanishing_gradients" and ev["zero"] == 3
    assert S.check_gradients(torch.tensor([1e-3] * 10, dtype=torch.float64), "pgd")[1] is None


class _Noisy(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x + 0.05 * torch.randn_like(x))


def test_randomness_probe_and_merge_flags(digits_split):
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = digits_split.x_test[:16]
    assert not S.forward_randomness(base, x, "cpu")["randomized"]
    assert S.forward_randomness(_Noisy(base), x, "cpu")["randomized"]
    a = S.flag("vanishing_gradients", "pgd", "zero", {"k": 1})
    b = S.flag("vanishing_gradients", "autoattack", "zero as well", {"k": 2})
    c = S.flag("eps_sweep", "pgd", "flat")
    merged = S.merge_flags([], [a, b, c, a])
    assert [f["name"] for f in merged] == ["vanishing_gradients", "eps_sweep"]
    assert merged[0]["evaluators"] == ["pgd", "autoattack"] and merged[0]["also"][0]["message"] == "zero as well"
    with pytest.raises(ValueError, match="valid choices"):
        S.flag("nonsense", "pgd", "")


def test_autoattack_warnings_become_named_flags_and_old_records_are_upgraded():
    from cfbench.store.record import upgrade

    assert S.autoattack_flag("there are 3 points with zero gradient! ...")["name"] == "vanishing_gradients"
    assert S.autoattack_flag("it seems to be a randomized defense! Please use version=\"rand\".")["name"] == \
        "randomized_forward"
    assert S.autoattack_flag("it seems that the output is a probability distribution, ...")["name"] == \
        "autoattack.probability_output"
    assert S.autoattack_flag("Square Attack has decreased the robust accuracy of 1.00%.") is None
    old = {"schema_version": 2, "notes": {"robust.autoattack": {"flags": [
        "it seems to be a dynamic defense! The evaluation with AutoAttack might be insufficient.",
        "Square Attack has decreased the robust accuracy of 0.50%."]}}}
    rec = upgrade(old)
    assert rec["schema_version"] == 3 and [f["name"] for f in rec["flags"]] == ["autoattack.dynamic"]


# ----------------------------------------------------------------- the checks on models
def test_pgd_counts_no_clean_error_as_robust(digits_split):
    from cfbench.attacks.base import ThreatModel
    from cfbench.attacks.pgd import PGDAttack, PGDParams

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()   # untrained: many clean errors
    x, y = digits_split.x_test[:100], digits_split.y_test[:100]
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.sum() > 50
    xa = PGDAttack(PGDParams(steps=3)).perturb(model, x, y, ThreatModel("Linf", 0.1))
    assert torch.equal(xa[wrong], x[wrong])        # a clean error is its own adversarial example
    rob, _ = pgd_robust(model, x, y, ThreatModel("Linf", 0.1), PGDEvalParams(steps=3), "cpu", 0)
    assert not (rob & wrong).any()


def test_masking_fixtures_are_flagged_by_pgd_and_erm_is_not(masks, tmp_path):
    """Fast half of the done-criterion: the PGD evaluator's model-level checks."""
    out = {}
    cfg, data, erm = _trained("erm")
    x1000 = copy.deepcopy(erm)       # what mask-x1000's fit does after ERM (its run is tested end to end below)
    with torch.no_grad():
        x1000.classifier[-1].weight.mul_(1000.0)
        x1000.classifier[-1].bias.mul_(1000.0)
    models = {"erm": (cfg, erm), "x1000": (cfg, x1000)}
    rcfg, _, rounded = _trained("erm", "cnn8-round")
    models["round"] = (rcfg, rounded)
    for label, (c, m) in models.items():
        res = PGDRobustness(PGDEvalParams(n_examples=200)).evaluate(eval_context(c, m, tmp_path / label, data))
        out[label] = ({f["name"] for f in res.flags}, res.metrics["robust.pgd.accuracy"]["value"])
    assert out["erm"][0] == set(), out
    assert {"vanishing_gradients", "eps_sweep"} <= out["x1000"][0], out
    assert {"vanishing_gradients", "eps_sweep"} <= out["round"][0], out
    # the masks' PGD numbers are what a PGD-only table would have ranked first
    assert out["x1000"][1] > out["erm"][1] + 0.3 and out["round"][1] > out["erm"][1] + 0.3


def test_randomised_forward_is_flagged_and_pgd_uses_eot(digits_split, tmp_path):
    cfg, data, m = _trained("erm")
    noisy = _Noisy(m).eval()
    res = PGDRobustness(PGDEvalParams(n_examples=50, steps=3, eot_samples=4)).evaluate(
        eval_context(cfg, noisy, tmp_path, data))
    assert "randomized_forward" in {f["name"] for f in res.flags}
    assert res.notes["robust.pgd"]["eot"] == 4
    res = PGDRobustness(PGDEvalParams(n_examples=50, steps=3)).evaluate(eval_context(cfg, m, tmp_path, data))
    assert res.notes["robust.pgd"]["eot"] == 1 and not res.flags


# --------------------------------------------------------------------- load_model exactness
def test_a_prehook_is_refused_at_save_time_and_a_rounding_module_reloads_exactly(masks, tmp_path):
    from cfbench.config import make_config
    from cfbench.errors import CfbenchError
    from cfbench.runner import execute
    from cfbench.store import read_record
    from cfbench.store.models import load_model

    sets = {"epochs": 2, "model.width": 8}
    cfg = make_config(defense="mask-prehook-round", sets=sets, evaluators=("clean",))
    with pytest.raises(CfbenchError, match="does not reproduce the evaluated model"):
        execute(cfg, tmp_path, progress=False)
    rec = read_record(tmp_path / cfg.run_id())
    assert rec["status"] == "failed" and rec["reason"].startswith("ModelReloadError: ")
    assert "forward (pre-)hook" in rec["reason"] and not (tmp_path / cfg.run_id() / "model.safetensors").exists()

    cfg = make_config(defense="erm", model="cnn8-round", sets=sets, evaluators=("clean",))
    outcome = execute(cfg, tmp_path, progress=False)
    data = tiny_data(cfg)
    loaded = load_model(outcome.run_dir)
    with torch.no_grad():
        acc = (loaded(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc == pytest.approx(outcome.record["metrics"]["clean.accuracy"]["value"])


def test_contract_checks_the_reload(masks):
    from cfbench.registry import get
    from cfbench.testing.contract import ContractError, check_defense

    with pytest.raises(ContractError, match=r"\[reload\].*does not reproduce"):
        check_defense(get("defense", "mask-prehook-round"), check_resume=False)
    report = check_defense(get("defense", "mask-x1000"), check_resume=False)
    assert "reload" in report.passed


# --------------------------------------------------------------- leaderboards and summary
def _flagged_record(defense, clean, robust, flags=(), seed=0):
    from record_factory import make_record

    rec = make_record(defense=defense, family="adversarial", clean=clean, robust=robust, with_mia=False, seed=seed)
    rec["schema_version"] = 3
    rec["flags"] = [S.flag(f, "autoattack", f"{f} found") for f in flags]
    return rec


def test_flagged_rows_are_marked_in_every_format_and_kept_off_the_front(tmp_path):
    from cfbench.present.leaderboard import Leaderboard, build
    from cfbench.present.writers import to_csv, to_json_obj, to_markdown, write
    from record_factory import write_record

    runs = tmp_path / "runs"
    write_record(runs, _flagged_record("pgd-at", 0.90, 0.70))
    write_record(runs, _flagged_record("mask", 0.95, 0.93, ["pgd_autoattack_gap", "vanishing_gradients"]))
    write_record(runs, _flagged_record("erm", 0.96, 0.40))
    (lb,) = build(runs, "digits")
    ranks = dict(zip(lb.rows["defense"], lb.rows["pareto_rank"]))
    # unflagged, the mask would dominate pgd-at; flagged, it is off the ranking and pgd-at is on the front
    assert ranks["pgd-at"] == 1 and ranks["erm"] == 1 and math.isnan(ranks["mask"])
    assert list(lb.rows["defense"])[-1] == "mask"
    md = to_markdown(lb)
    line = next(ln for ln in md.splitlines() if "mask" in ln and ln.startswith("|"))
    assert line.startswith("| flagged | ⚑ mask") and "pgd_autoattack_gap, vanishing_gradients" in line
    assert "kept off the ranking" in md and "--include-flagged" in md
    rows = list(csv.DictReader(io.StringIO("\n".join(ln for ln in to_csv(lb).splitlines() if not ln.startswith("#")))))
    by = {r["defense"]: r for r in rows}
    assert by["mask"]["flags"] == "pgd_autoattack_gap, vanishing_gradients" and by["mask"]["pareto_rank"] == ""
    assert by["erm"]["flags"] == ""
    obj = to_json_obj(lb)
    jrow = next(r for r in obj["rows"] if r["defense"] == "mask")
    assert jrow["flags"] == ["pgd_autoattack_gap", "vanishing_gradients"] and jrow["pareto_rank"] is None
    assert next(r for r in obj["records"] if r["defense"] == "mask")["flags"] == jrow["flags"]
    back = Leaderboard.from_json(json.loads(json.dumps(obj)))
    assert to_markdown(back) == md
    html = write(lb, tmp_path / "out")["html"].read_text()
    assert "⚑ mask" in html and "flagged" in html

    (lb_all,) = build(runs, "digits", include_flagged=True)
    ranks = dict(zip(lb_all.rows["defense"], lb_all.rows["pareto_rank"]))
    assert ranks == {"mask": 1, "erm": 1, "pgd-at": 2}    # asked for: ranked, and still marked
    assert "⚑ mask" in to_markdown(lb_all) and "--include-flagged" in lb_all.command


def test_cli_leaderboard_include_flagged_and_summary_shows_flags(tmp_path, capsys):
    from cfbench.cli import main, print_summary
    from record_factory import write_record

    runs = tmp_path / "runs"
    d = write_record(runs, _flagged_record("mask", 0.95, 0.93, ["eps_sweep"]))
    write_record(runs, _flagged_record("pgd-at", 0.90, 0.70))
    assert main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "lb"), "--include-flagged",
                 "--quiet"]) == 0
    md = next((tmp_path / "lb").glob("*.md")).read_text()
    assert "--include-flagged" in md and "| 1 | ⚑ mask" in md
    rec = json.loads((d / "record.json").read_text())
    print_summary(rec, d, False)
    assert "FLAG eps_sweep (autoattack): eps_sweep found" in capsys.readouterr().out


# -------------------------------------------------------------------- identity and CUDA
def test_device_type_is_in_the_identity_and_determinism_is_not():
    cfg = tiny_config("erm")
    assert cfg.canonical()["device_type"] == "cpu"
    cuda0, cuda1 = dataclasses.replace(cfg, device="cuda:0"), dataclasses.replace(cfg, device="cuda:1")
    assert cuda0.canonical()["device_type"] == "cuda" and cuda0.config_hash() != cfg.config_hash()
    assert cuda0.config_hash() == cuda1.config_hash()
    det = dataclasses.replace(cfg, deterministic=True)
    assert det.config_hash() == cfg.config_hash() and det.to_dict()["deterministic"] is True


def test_apply_determinism(monkeypatch):
    from cfbench.config import apply_determinism

    before = torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        apply_determinism(False)
        assert torch.are_deterministic_algorithms_enabled() == before
        apply_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False


def test_checkpoints_save_and_restore_the_cuda_rng(tmp_path, monkeypatch):
    """No GPU here: torch.cuda's RNG functions are replaced by recorders, which is what the
    checkpoint code calls on a CUDA machine."""
    from cfbench.training.checkpoint import load_checkpoint, save_checkpoint

    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.extend(s))
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "c.safetensors", model, opt, 0, [])
    load_checkpoint(tmp_path / "c.safetensors", model, opt)
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, states))


def test_literature_defaults_per_dataset(capsys):
    from cfbench.cli import main
    from cfbench.config import make_config

    at = make_config(dataset="mnist", defense="pgd-at", evaluators=("clean",))
    assert (at.defense_params.steps, at.defense_params.step_size) == (40, 0.01)
    tr = make_config(dataset="mnist", defense="trades", evaluators=("clean",))
    assert (tr.defense_params.beta, tr.defense_params.steps) == (1.0, 40)
    mine = make_config(dataset="mnist", defense="pgd-at", sets={"defense.steps": 5}, evaluators=("clean",))
    assert mine.defense_params.steps == 5 and mine.defense_params.step_size == 0.01   # a --set wins
    c10 = make_config(dataset="cifar10", defense="pgd-at", evaluators=("clean",))
    assert c10.defense_params.steps == 7 and c10.defense_params.step_size == pytest.approx(2 / 255)
    assert make_config(dataset="digits", defense="pgd-at", evaluators=("clean",)).defense_params.steps == 10
    assert main(["list", "dataset"]) == 0
    out = capsys.readouterr().out
    assert "pgd-at defaults (literature): steps=40, step_size=0.01" in out
    assert "trades defaults (literature): steps=40, step_size=0.01, beta=1" in out


# --------------------------------------------------------- the done-criterion, end to end
@pytest.mark.slow
def test_masks_flagged_everywhere_real_defenses_not(masks, tmp_path, capsys):
    """Real runs through the runner on digits (short training): PGD-AT and TRADES carry no flag;
    the three masking fixtures are flagged in the record (PGD vs AutoAttack gap among them),
    the run summary, the run report and the leaderboard, and kept off its front."""
    from cfbench.cli import print_summary
    from cfbench.config import make_config
    from cfbench.present.leaderboard import build
    from cfbench.present.report import run_report
    from cfbench.present.writers import to_markdown
    from cfbench.runner import execute

    sets = {"epochs": 10, "model.width": 16, "autoattack.n_examples": 60, "pgd.n_examples": 200}
    runs = {}
    for label, defense, model, extra in (("pgd-at", "pgd-at", None, {"defense.steps": 5}),
                                         ("trades", "trades", None, {"defense.steps": 5}),
                                         ("x1000", "mask-x1000", None, {}),
                                         ("round", "erm", "cnn8-round", {}), ("hf", "erm", "cnn8-hf", {})):
        cfg = make_config(defense=defense, model=model, sets={**sets, **extra}, evaluators=("clean", "pgd", "autoattack"))
        runs[label] = execute(cfg, tmp_path, progress=False)
    names = {k: {f["name"] for f in o.record["flags"]} for k, o in runs.items()}
    assert names["pgd-at"] == set() and names["trades"] == set(), names
    for k in ("x1000", "round", "hf"):
        assert "pgd_autoattack_gap" in names[k], names
    assert "gradient_free_beats_whitebox" in names["round"] and "vanishing_gradients" in names["x1000"]
    print_summary(runs["x1000"].record, runs["x1000"].run_dir, False)
    assert "FLAG pgd_autoattack_gap" in capsys.readouterr().out
    html = run_report(runs["x1000"].run_dir, with_predictions=False)
    assert "⚑" in html and "pgd_autoattack_gap" in html and 'id="sanity"' in html
    (lb,) = [b for b in build(tmp_path, "digits") if "cnn8-Linf" in b.name and b.protocol["model"]["name"] == "cnn8"]
    ranks = dict(zip(lb.rows["defense"], lb.rows["pareto_rank"]))
    assert math.isnan(ranks["mask-x1000"]) and 1 in (ranks["pgd-at"], ranks["trades"])  # off the front
    assert "| flagged | ⚑ mask-x1000" in to_markdown(lb)
    (lb_all,) = [b for b in build(tmp_path, "digits", include_flagged=True) if b.protocol["model"]["name"] == "cnn8"]
    rank = dict(zip(lb_all.rows["defense"], lb_all.rows["pareto_rank"]))["mask-x1000"]
    assert not math.isnan(rank) and "⚑ mask-x1000" in to_markdown(lb_all)     # asked for: ranked, still marked

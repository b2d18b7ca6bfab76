"""AutoAttack evaluator: same flags as one direct pyautoattack call, resume after a kill from
cfbench's own per-attack state, stale state ignored."""

from __future__ import annotations

import re

from pathlib import Path

import pytest
import torch
from cfbench.attacks.base import ThreatModel
from cfbench.config import make_config
from cfbench.evaluators.base import EvalContext
from cfbench.evaluators.robust import STATE_FILE, AutoAttackParams, AutoAttackRobustness
from cfbench.models import build_model
from cfbench.testing.tiny import direct_fit_context
from cfbench_baselines.pgd_at import PGDAT, PGDATParams

EPS, N = 0.1, 40


@pytest.fixture(scope="module")
def robust_model(digits_split):
    """A digits model with a few PGD-AT epochs: some test points survive APGD-CE, so the later
    attacks have work to do."""
    d = digits_split
    torch.manual_seed(0)
    model = build_model("cnn8", (1, 8, 8), 10, d.dataset.mean, d.dataset.std, {})
    ctx = direct_fit_context(eps=EPS, epochs=4)
    PGDAT(PGDATParams(steps=3)).fit(model, d.x_train, d.y_train, ctx)
    return model.eval()


def _ctx(model, data, run_dir: Path, progress: bool = False) -> EvalContext:
    return EvalContext(model=model, config=make_config(), data=data, threat=ThreatModel("Linf", EPS),
                       device=torch.device("cpu"), run_dir=run_dir, cache_dir=run_dir, seed=0, progress=progress)


def _flags(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


@pytest.fixture(scope="module")
def ours(robust_model, digits_split, tmp_path_factory):
    ctx = _ctx(robust_model, digits_split, tmp_path_factory.mktemp("aa"))
    res = AutoAttackRobustness(AutoAttackParams(n_examples=N)).evaluate(ctx)
    return res, ctx


def test_same_flags_as_one_direct_pyautoattack_call(robust_model, digits_split, ours):
    from pyautoattack import AutoAttack

    res, ctx = ours
    x, y = digits_split.x_test[:N].contiguous(), digits_split.y_test[:N].contiguous()
    x_adv, _ = AutoAttack(robust_model, norm="Linf", eps=EPS, version="standard", device="cpu",
                          seed=0).run_standard_evaluation(x, y, batch_size=250)
    direct = int(_flags(robust_model, x_adv, y).sum())
    acc = res.metrics["robust.autoattack.accuracy"]
    assert acc["n"] == N and round(acc["value"] * N) == direct
    # the breakdown falls monotonically from clean accuracy to the final number
    bd = res.notes["robust.autoattack"]["breakdown"]
    seq = [bd[k] for k in ("clean", "apgd-ce", "apgd-t", "fab-t", "square")]
    assert seq == sorted(seq, reverse=True) and seq[-1] == pytest.approx(acc["value"])
    assert 0 < acc["value"] < bd["clean"]  # the test is only meaningful if both stages did something
    # the stored examples are real adversarial examples inside the threat model
    xs, xa, ys = ctx.examples["autoattack"]
    assert (xa - xs).abs().max() <= EPS + 1e-6 and xa.min() >= 0 and xa.max() <= 1


def test_a_finished_evaluation_is_taken_from_its_state_without_attacking(robust_model, digits_split, ours,
                                                                          monkeypatch):
    """The finished state stays in the run folder (until the run's record is written), so a run
    killed in a later evaluator does not attack again on resume -- and gets the same result."""
    from pyautoattack import AutoAttack

    full, ctx = ours
    assert (ctx.run_dir / STATE_FILE).exists()

    def no_attack(self, x, y, **kw):
        raise AssertionError(f"attacked again: {self.attacks_to_run}")

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", no_attack)
    c = _ctx(robust_model, digits_split, ctx.run_dir)
    again = AutoAttackRobustness(AutoAttackParams(n_examples=N)).evaluate(c)
    note = again.notes["robust.autoattack"]
    assert note["resumed"] and note["resumed_after"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert again.metrics["robust.autoattack.accuracy"] == full.metrics["robust.autoattack.accuracy"]
    assert note["breakdown"] == full.notes["robust.autoattack"]["breakdown"]
    assert torch.equal(c.examples["autoattack"][1], ctx.examples["autoattack"][1])


def test_the_state_of_another_model_is_not_inherited(robust_model, digits_split, ours, tmp_path):
    """Same examples, threat and seed, different weights (one parameter nudged): attacked anew."""
    import copy
    import shutil

    _, ctx = ours
    shutil.copy(ctx.run_dir / STATE_FILE, tmp_path / STATE_FILE)
    other = copy.deepcopy(robust_model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    res = AutoAttackRobustness(AutoAttackParams(n_examples=N)).evaluate(_ctx(other, digits_split, tmp_path))
    assert not res.notes["robust.autoattack"]["resumed"]


def test_resume_after_kill_skips_finished_attacks(robust_model, digits_split, ours, tmp_path, monkeypatch):
    from pyautoattack import AutoAttack

    calls: list[list[str]] = []
    real = AutoAttack.run_standard_evaluation

    def killed_at_second(self, x, y, **kw):
        calls.append(list(self.attacks_to_run))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, x, y, **kw)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", killed_at_second)
    ev = AutoAttackRobustness(AutoAttackParams(n_examples=N))
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(_ctx(robust_model, digits_split, tmp_path))
    assert (tmp_path / STATE_FILE).exists()

    calls.clear()
    monkeypatch.setattr(AutoAttack, "run_standard_evaluation",
                        lambda self, x, y, **kw: (calls.append(list(self.attacks_to_run)), real(self, x, y, **kw))[1])
    res = ev.evaluate(_ctx(robust_model, digits_split, tmp_path))
    assert [c[0] for c in calls] == ["apgd-t", "fab-t", "square"][:len(calls)] and ["apgd-ce"] not in calls
    note = res.notes["robust.autoattack"]
    assert note["resumed"] and note["resumed_after"] == ["apgd-ce"]
    full, _ = ours
    assert res.metrics["robust.autoattack.accuracy"] == full.metrics["robust.autoattack.accuracy"]
    assert note["breakdown"] == full.notes["robust.autoattack"]["breakdown"]


def test_state_of_another_evaluation_is_ignored(robust_model, digits_split, tmp_path):
    ev10 = AutoAttackRobustness(AutoAttackParams(n_examples=10))
    from cfbench.evaluators import robust as rb

    x, y = digits_split.x_test[:10], digits_split.y_test[:10]
    key = {"n": 10, "version": "standard", "norm": "Linf", "eps": EPS, "seed": 0,
           "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "x_sha256": rb._sha256(x), "y_sha256": rb._sha256(y),
           "model_sha256": rb._model_sha256(robust_model)}
    # a planted state claiming every attack is done and nothing is robust, for other examples
    fake = {"robust": torch.zeros(10, dtype=torch.bool), "x_adv": x.clone(),
            "done": ["apgd-ce", "apgd-t", "fab-t", "square"],
            "acc": {"clean": 0.0, "apgd-ce": 0.0, "apgd-t": 0.0, "fab-t": 0.0, "square": 0.0}, "seconds": {}}
    rb._save_state(tmp_path / STATE_FILE, {**key, "x_sha256": "0" * 64}, fake)
    res = ev10.evaluate(_ctx(robust_model, digits_split, tmp_path))
    assert not res.notes["robust.autoattack"]["resumed"]
    assert res.notes["robust.autoattack"]["breakdown"]["clean"] > 0
    # a truncated file is ignored too
    (tmp_path / STATE_FILE).write_bytes(b"\x00\x01garbage")
    res2 = ev10.evaluate(_ctx(robust_model, digits_split, tmp_path))
    assert res2.metrics["robust.autoattack.accuracy"] == res.metrics["robust.autoattack.accuracy"]
    # the matching key is honoured (proves the planted file above was rejected for its key only)
    rb._save_state(tmp_path / STATE_FILE, key, fake)
    res3 = ev10.evaluate(_ctx(robust_model, digits_split, tmp_path))
    assert res3.notes["robust.autoattack"]["resumed"] and res3.metrics["robust.autoattack.accuracy"]["value"] == 0


def test_pgd_is_compared_on_autoattacks_examples(robust_model, digits_split, tmp_path):
    """PGD may attack more examples; the gap check and the summary use AutoAttack's own."""
    from cfbench.evaluators.robust import PGDEvalParams, PGDRobustness

    ctx = _ctx(robust_model, digits_split, tmp_path)
    pgd = PGDRobustness(PGDEvalParams(n_examples=100, steps=5)).evaluate(ctx)
    res = AutoAttackRobustness(AutoAttackParams(n_examples=N)).evaluate(ctx)
    same = res.metrics["robust.autoattack.sanity.pgd_accuracy"]
    per_example = ctx.shared["robust.pgd"]["robust"]
    assert pgd.metrics["robust.pgd.n"] == 100 and same["n"] == N
    assert same["value"] == pytest.approx(per_example[:N].float().mean().item())
    gap = res.metrics["robust.autoattack.sanity.pgd_gap"]
    assert gap["value"] == pytest.approx(same["value"] - res.metrics["robust.autoattack.accuracy"]["value"])
    assert "the pgd evaluator" in res.notes["robust.autoattack"]["sanity"]["pgd_autoattack_gap"]["pgd"]
    assert not res.flags     # a PGD-AT model: no sanity flag


class _Noisy(torch.nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x + 0.02 * torch.randn_like(x))


def test_a_randomised_forward_switches_to_the_eot_version(robust_model, digits_split, tmp_path):
    ctx = _ctx(_Noisy(robust_model).eval(), digits_split, tmp_path)
    res = AutoAttackRobustness(AutoAttackParams(n_examples=6)).evaluate(ctx)
    note = res.notes["robust.autoattack"]
    assert note["version"] == "rand" and note["requested_version"] == "standard"
    assert note["attacks"] == ["apgd-ce", "apgd-dlr"] and "EOT over 20" in note["sanity"]["eot"]
    assert "randomized_forward" in {f["name"] for f in res.flags}


def test_progress_is_one_timestamped_line_per_attack_in_a_log(robust_model, digits_split, tmp_path, capsys):
    """Piped to a file, AutoAttack says which attack runs on how many examples and, after each,
    k/K attacks, the examples still robust and an ETA -- not minutes of silence."""
    import dataclasses
    import re

    ctx = dataclasses.replace(_ctx(robust_model, digits_split, tmp_path), progress=True)
    res = AutoAttackRobustness(AutoAttackParams(n_examples=10, sanity=False)).evaluate(ctx)
    err = capsys.readouterr().err.splitlines()
    starts = [ln for ln in err if re.match(r"\d\d:\d\d:\d\d autoattack: \S+ on the \d+ of 10 examples still robust", ln)]
    steps = [ln for ln in err if re.match(r"\d\d:\d\d:\d\d autoattack: attack \d/4 done \S+ robust \d+/10 "
                                          r"\(elapsed .*, ETA .*\)", ln)]
    assert len(starts) == 4 and len(steps) == 4, err
    k = round(res.metrics["robust.autoattack.accuracy"]["value"] * 10)
    assert steps[-1].split(" robust ")[1].startswith(f"{k}/10")


BS = 8   # 40 examples in batches of 8: several batches per attack


@pytest.fixture(scope="module")
def ours_small_batches(robust_model, digits_split, tmp_path_factory):
    ctx = _ctx(robust_model, digits_split, tmp_path_factory.mktemp("aa-bs"))
    return AutoAttackRobustness(AutoAttackParams(n_examples=N, batch_size=BS)).evaluate(ctx), ctx


def test_batch_by_batch_equals_one_direct_call_with_the_same_batches(robust_model, digits_split, ours_small_batches):
    """cfbench calls the package once per batch (to save its state after each); the flags are
    those of one direct call with the same batch size."""
    from pyautoattack import AutoAttack

    res, _ = ours_small_batches
    x, y = digits_split.x_test[:N].contiguous(), digits_split.y_test[:N].contiguous()
    x_adv, _ = AutoAttack(robust_model, norm="Linf", eps=EPS, version="standard", device="cpu",
                          seed=0).run_standard_evaluation(x, y, batch_size=BS)
    assert round(res.metrics["robust.autoattack.accuracy"]["value"] * N) == int(_flags(robust_model, x_adv, y).sum())


def test_a_kill_inside_an_attack_resumes_at_its_batch(robust_model, digits_split, ours_small_batches, tmp_path,
                                                      monkeypatch, capsys):
    from pyautoattack import AutoAttack

    calls: list[tuple[str, int]] = []
    real = AutoAttack.run_standard_evaluation

    def killed_in_apgd_t(self, x, y, **kw):
        calls.append((self.attacks_to_run[0], len(x)))
        if sum(a == "apgd-t" for a, _ in calls) == 2:      # the second batch of APGD-T
            raise KeyboardInterrupt("killed")
        return real(self, x, y, **kw)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", killed_in_apgd_t)
    ev = AutoAttackRobustness(AutoAttackParams(n_examples=N, batch_size=BS))
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(_ctx(robust_model, digits_split, tmp_path))
    before = list(calls)
    calls.clear()
    monkeypatch.setattr(AutoAttack, "run_standard_evaluation",
                        lambda self, x, y, **kw: (calls.append((self.attacks_to_run[0], len(x))),
                                                  real(self, x, y, **kw))[1])
    capsys.readouterr()
    ctx = _ctx(robust_model, digits_split, tmp_path, progress=True)   # stderr is not a terminal: lines
    res = ev.evaluate(ctx)
    log = capsys.readouterr().err
    # APGD-CE is not repeated; APGD-T resumes at the batch that was killed: its batches before
    # the kill plus its batches after it are exactly the batches of one uninterrupted APGD-T
    assert "apgd-ce" not in {a for a, _ in calls}
    done_before = [n for a, n in before if a == "apgd-t"][:-1]      # the killed batch did not finish
    after = [n for a, n in calls if a == "apgd-t"]
    full_res, full_ctx = ours_small_batches
    robust_after_ce = round(full_res.notes["robust.autoattack"]["breakdown"]["apgd-ce"] * N)
    assert sum(done_before) + sum(after) == robust_after_ce and len(done_before) == 1
    # the log says where it resumed, and has one line per saved batch of each attack
    assert f"apgd-t on the {robust_after_ce} of {N} examples still robust (resumed after {done_before[0]})" in log, log
    assert re.search(r"autoattack: fab-t \d+/\d+ attacked, \d+/\d+ still robust", log), log
    assert res.metrics["robust.autoattack.accuracy"] == full_res.metrics["robust.autoattack.accuracy"]
    assert res.notes["robust.autoattack"]["breakdown"] == full_res.notes["robust.autoattack"]["breakdown"]
    assert torch.equal(ctx.examples["autoattack"][1], full_ctx.examples["autoattack"][1])   # same x_adv

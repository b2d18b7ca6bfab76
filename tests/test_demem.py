"""DeMem (cfbench_baselines.demem, version 2) on tiny digits data.

* the high-risk set, frozen after warm-up from the running loss, holds planted memorised
  (mislabeled) samples, and the penalty then keeps *their* loss at their levels where PGD-AT
  drives it towards zero (the effect DeMem claims, on the samples it names);
* the running losses and the penalised loss match a direct computation (per-sample flooding
  at per-sample levels), and the set never changes after it is frozen;
* the controls: random = as many samples with the same levels and beta, all = every sample,
  the same level distribution and total weight beta |S|;
* beta = 0 gives the base defense's weights exactly (PGD-AT and TRADES);
* an interrupted fit resumes to the same state and weights, and would not without the state;
* the oracle's IN/OUT losses match a slow loop, and its reference models are the base recipe's;
* bad settings are UsageErrors naming the valid choices.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfbench.config import make_config
from cfbench.data.specs import Digits
from cfbench.data.splits import make_split
from cfbench.defenses import Batch
from cfbench.errors import UsageError
from cfbench.execution import reference as XR
from cfbench.execution.local import run_jobs
from cfbench.models import build_model
from cfbench.params import build
from cfbench.registry import get
from cfbench.testing.tiny import direct_fit_context
from cfbench.training.recipe import fit_recipe
from cfbench_baselines.demem import DeMem, in_out_losses, warmup_epochs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny batches: a second thread only adds contention
    yield
    torch.set_num_threads(threads)


def _defense(name, **settings):
    cls = get("defense", name)
    return cls(build(cls.Params, {"steps": 2, **settings}))


def _ctx(epochs, seed=0, ckpt=None, lr=0.05, batch_size=64):
    return direct_fit_context(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, checkpoint_dir=ckpt)


def _model(width=8):
    torch.manual_seed(0)
    return build_model("cnn8", (1, 8, 8), 10, [0.3], [0.35], {"width": width})


def _fit(defense, x, y, epochs, width=8, ckpt=None, **kw):
    model = _model(width)
    ctx = _ctx(epochs, ckpt=ckpt, **kw)
    defense.fit(model, x, y, ctx)
    return model, ctx


def _planted(x, y, k=8, seed=0):
    """Flip the labels of ``k`` random examples to another class: they can only be memorised."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:k]
    y = y.clone()
    y[idx] = (y[idx] + 1 + torch.randint(0, 9, (k,), generator=g)) % 10
    return y, idx


@torch.no_grad()
def _ce(model, x, y):
    return F.cross_entropy(model.eval()(x), y, reduction="none")


@pytest.mark.slow
def test_frozen_high_risk_set_holds_planted_samples_and_the_penalty_keeps_them_unfitted(digits_split):
    x = digits_split.x_train[:300]
    y, planted = _planted(x, digits_split.y_train[:300])
    common = dict(epochs=40, width=16, lr=0.1, batch_size=32)
    dm = _defense("demem", fraction=0.05, warmup=8)                # 15 of 300; chance would pick 0.4 of 8
    m_dm, ctx = _fit(dm, x, y, **common)
    m_at, _ = _fit(_defense("pgd-at"), x, y, **common)
    assert int(dm._top[planted].sum()) >= 6
    rows = ctx.notes["demem"]["epochs"]
    assert [r["penalty_set"] for r in rows] == [0] * 8 + [15] * 32  # frozen at the start of epoch 8, kept
    assert ctx.notes["demem"]["high_risk_train_index"] == torch.nonzero(dm._top).flatten().tolist()
    # the levels are the running losses at the end of warm-up; PGD-AT memorises the planted
    # samples (their clean CE falls well below 1), DeMem holds the selected ones near their levels
    sel = torch.nonzero(dm._top).flatten()
    assert torch.allclose(dm._level[sel], dm._ema[sel])
    caught = sel[torch.isin(sel, planted)]
    at_loss, dm_loss = _ce(m_at, x[caught], y[caught]), _ce(m_dm, x[caught], y[caught])
    assert at_loss.median() < 1.0 and dm_loss.median() > 3 * at_loss.median()
    assert ctx.metrics["demem.penalty_activity"] > 0.2              # version 1: 0.006-0.033
    act = [r["activity"] for r in rows[8:]]
    assert all(a is not None and 0 <= a <= 1 for a in act)


def test_running_losses_and_penalised_loss_match_direct_computation(digits_split):
    x, y = digits_split.x_train[:40], digits_split.y_train[:40]
    model = _model().train()
    dm = _defense("demem", beta=3.0, ema=0.75, fraction=0.25, warmup=1)
    ctx = _ctx(3)
    dm._n, dm._log, dm._warmup, dm._in, dm._out = 40, [], 1, None, None
    for k, v in dict(_ema=torch.zeros(40), _seen=torch.zeros(40, dtype=torch.bool), _top=torch.zeros(40, dtype=bool),
                     _mask=torch.zeros(40, dtype=bool), _level=torch.zeros(40), _weight=torch.zeros(40),
                     _frozen=torch.zeros((), dtype=torch.bool)).items():
        setattr(dm, k, v)
    idx = torch.arange(0, 40, 2)

    def base_loss(seed):
        torch.manual_seed(seed)
        per, _ = dm.base.per_sample_loss(model, x[idx], y[idx], Batch(0, 0, idx, ctx))
        return per.detach()

    dm.on_epoch_start(model, 0, ctx)                          # warm-up: nothing selected
    first = base_loss(1)
    torch.manual_seed(1)
    total, _ = dm.loss(model, x[idx], y[idx], Batch(0, 0, idx, ctx))
    assert torch.allclose(total, first.mean())                # the base loss, nothing else
    assert torch.allclose(dm._ema[idx], first) and dm._seen[idx].all() and not dm._seen[1::2].any()
    with torch.no_grad():                                     # move the model, visit again
        for p in model.parameters():
            p.mul_(0.9)
    second = base_loss(2)
    torch.manual_seed(2)
    dm.loss(model, x[idx], y[idx], Batch(0, 1, idx, ctx))
    running = 0.75 * first + 0.25 * second
    assert torch.allclose(dm._ema[idx], running, atol=1e-6)

    dm.on_epoch_start(model, 1, ctx)                          # freezes the top 10 of the 20 seen
    chosen = idx[torch.topk(running, 10).indices]
    assert set(torch.nonzero(dm._top).flatten().tolist()) == set(chosen.tolist())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    per = base_loss(3)
    torch.manual_seed(3)
    total, _ = dm.loss(model, x[idx], y[idx], Batch(1, 2, idx, ctx))
    sel = dm._top[idx]
    b = running                                                # level = own running loss at the freeze
    expected = (per + 3.0 * sel * (b - per).clamp(min=0)).mean()
    assert torch.allclose(total, expected, atol=1e-6)
    row = dm._log[-1]
    assert row[2] == 10 and row[3] == int((sel & (per < b)).sum())
    assert math.isclose(row[4], float((3.0 * sel * (b - per).clamp(min=0)).sum()), rel_tol=1e-5)
    assert torch.equal(dm._ema[idx], running)                  # no tracking after the freeze
    dm.on_epoch_start(model, 2, ctx)                           # the set stays frozen
    assert set(torch.nonzero(dm._top).flatten().tolist()) == set(chosen.tolist())


@pytest.mark.parametrize("select", ["random", "all"])
def test_controls_match_count_levels_and_total_weight(digits_split, select):
    x = digits_split.x_train[:200]
    y, _ = _planted(x, digits_split.y_train[:200])
    runs = {}
    for s in ("high-risk", select):
        dm = _defense("demem", select=s, fraction=0.1, warmup=1)
        _, ctx = _fit(dm, x, y, epochs=2)
        runs[s] = (dm, ctx)
    ref, ctl = runs["high-risk"][0], runs[select][0]
    assert torch.equal(ref._top, ctl._top) and torch.equal(ref._ema, ctl._ema)   # same warm-up, same S
    levels_s = torch.sort(ref._level[ref._top]).values
    assert math.isclose(float(ctl._weight.sum()), float(ref._weight.sum()), rel_tol=1e-5)  # beta |S|
    if select == "random":
        assert int(ctl._mask.sum()) == int(ref._top.sum()) == 20
        assert not torch.equal(ctl._mask, ref._top)
        assert torch.equal(torch.sort(ctl._level[ctl._mask]).values, levels_s)
        assert set(ctl._weight[ctl._mask].tolist()) == {2.0}
    else:
        assert bool(ctl._mask.all())
        assert torch.equal(torch.sort(ctl._level).values, torch.sort(levels_s.repeat(10)).values)
        assert torch.allclose(ctl._weight, torch.full((200,), 2.0 * 20 / 200))
    assert runs[select][1].metrics["demem.prescribed_weight"] == pytest.approx(2.0 * 20 / 200)


def _bn_model():
    """A small CNN *with* BatchNorm."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10))


@pytest.mark.parametrize("base, extra", [("pgd-at", {}), ("trades", {"beta": 6.0})])
def test_beta_zero_is_the_base_defense_exactly(digits_split, base, extra):
    x, y = digits_split.x_train[:160], digits_split.y_train[:160]
    runs = {}
    for key, defense in (("base", _defense(base, **extra)),
                         ("beta0", _defense("demem", base=base, beta=0.0, select="all", level=5.0, warmup=1)),
                         ("beta2", _defense("demem", base=base, beta=2.0, select="all", level=5.0, warmup=1))):
        model, ctx = _bn_model(), _ctx(3)
        defense.fit(model, x, y, ctx)
        runs[key] = (model.state_dict(), ctx)
    ref, (got, ctx) = runs["base"][0], runs["beta0"]
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert ctx.notes["demem"]["epochs"][2]["penalty_set"] == 160
    assert ctx.metrics["demem.penalty_activity"] == 1.0          # every loss is below 5: the path was live
    assert not torch.equal(ref["0.weight"], runs["beta2"][0]["0.weight"])   # and a weighted one moves the model


class _Stop(BaseException):
    pass


def test_resume_restores_the_state(digits_split, tmp_path):
    x = digits_split.x_train[:160]
    y, _ = _planted(x, digits_split.y_train[:160])
    settings = dict(warmup=1, select="random")

    def interrupted(ckpt):
        class Dies(DeMem):
            def on_epoch_start(self, model, epoch, ctx):
                if epoch == 2:
                    raise _Stop
                super().on_epoch_start(model, epoch, ctx)
        with pytest.raises(_Stop):
            _fit(Dies(_defense("demem", **settings).params), x, y, epochs=3, ckpt=ckpt)

    full = _defense("demem", **settings)
    m_full, _ = _fit(full, x, y, epochs=3, ckpt=tmp_path / "full")
    interrupted(tmp_path / "a")
    resumed = _defense("demem", **settings)
    m_res, ctx = _fit(resumed, x, y, epochs=3, ckpt=tmp_path / "a")
    assert ctx.notes["resumed_from_epoch"] == 2
    for k in ("_ema", "_seen", "_top", "_mask", "_level", "_weight"):
        assert torch.equal(getattr(full, k), getattr(resumed, k)), k
    assert all(torch.equal(a, b) for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values()))
    assert resumed._log == full._log

    class Forgets(DeMem):                                      # the same, without the state round trip
        def load_state_tensors(self, tensors):
            pass
    interrupted(tmp_path / "b")
    forgot = Forgets(_defense("demem", **settings).params)
    m_forgot, _ = _fit(forgot, x, y, epochs=3, ckpt=tmp_path / "b")
    assert not all(torch.equal(a, b) for a, b in zip(m_full.state_dict().values(), m_forgot.state_dict().values()))


def test_in_out_losses_match_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(4, 30, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 30, generator=g) < 0.5
    mask[0], mask[1] = True, False                              # every example has both sides
    inn, out = in_out_losses(losses, mask)
    for n in range(30):
        ins = [float(losses[i, n]) for i in range(4) if mask[i, n]]
        outs = [float(losses[i, n]) for i in range(4) if not mask[i, n]]
        assert math.isclose(float(inn[n]), sum(ins) / len(ins)) and math.isclose(float(out[n]), sum(outs) / len(outs))
    mask[:, 3] = True
    with pytest.raises(UsageError, match="oracle_models"):
        in_out_losses(losses, mask)


def test_oracle_uses_the_base_recipes_reference_models(tmp_path):
    ds = Digits().load()
    data = make_split(ds, 400, 0.5, 0)
    members = np.flatnonzero(data.member_mask)
    recipe = {"defense.steps": 2, "epochs": 2, "train.batch_size": 32, "lr": 0.1, "width": 8,
              "mia.reference_models": 2}
    cfg = make_config(dataset="digits", defense="demem", evaluators=["mia"],
                      sets={"risk": "oracle", "level": "out", "oracle_models": 2, "fraction": 0.05, "warmup": 1,
                            **recipe})
    base_cfg = make_config(dataset="digits", defense="pgd-at", evaluators=["mia"], sets=recipe)
    seen = {}
    real_fit = DeMem.fit

    def spy(self, model, x, y, ctx):
        seen["dm"] = self
        real_fit(self, model, x, y, ctx)
    DeMem.fit = spy
    try:
        _, ctx = fit_recipe(cfg, data, data.x_train, data.y_train, seed=0, checkpoint_dir=None,
                            cache_dir=tmp_path, progress=False, pool_positions=members, run_jobs=run_jobs)
    finally:
        DeMem.fit = real_fit
    dm, info = seen["dm"], ctx.notes["demem"]["oracle"]
    assert info["trained_now"] == 2 and info["recipe_hash"] == XR.reference_recipe_hash(base_cfg, data, 0)
    assert torch.allclose(dm.risk_scores(), dm._out - dm._in)
    sel = torch.nonzero(dm._top).flatten()
    assert torch.equal(sel, torch.sort(torch.topk(dm._out - dm._in, 10).indices).values)
    assert torch.allclose(dm._level[sel], dm._out[sel])          # level=out
    assert ctx.notes["demem"]["high_risk_pool_positions"] == members[sel.numpy()].tolist()


@pytest.mark.parametrize("settings, words", [
    ({"beta": "-1"}, ["beta", ">= 0"]),
    ({"fraction": "0"}, ["fraction", "> 0"]),
    ({"fraction": "1.5"}, ["fraction", "<= 1"]),
    ({"base": "madry"}, ["base", "pgd-at", "trades"]),
    ({"select": "everything"}, ["select", "high-risk", "all", "random"]),
    ({"risk": "lira"}, ["risk", "loss", "oracle"]),
    ({"level": "median"}, ["level", "warmup", "out"]),
    ({"level": "-1"}, ["level", ">= 0"]),
    ({"trades_beta": "3"}, ["trades_beta", "base=trades"]),
    ({"ema": "1"}, ["ema", "< 1"]),
    ({"warmup": "0"}, ["warmup", ">= 1"]),
])
def test_bad_settings_are_usage_errors(settings, words):
    with pytest.raises(UsageError) as e:
        make_config(dataset="digits", defense="demem", sets=settings, evaluators=["clean"])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_warmup_default_is_a_quarter_of_the_schedule():
    p = build(DeMem.Params, {})
    assert [warmup_epochs(p, e) for e in (1, 3, 4, 30, 50)] == [1, 1, 1, 8, 13]
    assert warmup_epochs(build(DeMem.Params, {"warmup": 5}), 50) == 5


def test_oracle_outside_a_run_is_a_clear_error(digits_split):
    with pytest.raises(UsageError, match="cfbench run.*risk=loss"):
        _fit(_defense("demem", risk="oracle"), digits_split.x_train[:32], digits_split.y_train[:32], epochs=1)

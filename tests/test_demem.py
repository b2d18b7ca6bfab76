"""DeMem (cfbench_baselines.demem) on tiny digits data.

* the high-risk selection picks planted memorized (mislabeled) samples over typical ones;
* the running losses and the penalised loss match direct computations (per-sample flooding);
* beta = 0 gives the base defense's weights exactly (PGD-AT and TRADES);
* an interrupted fit resumes to the same running losses and weights, and would not without
  the state round trip;
* the oracle's OUT losses match a direct computation from the cached reference models, and
  the oracle also finds the planted samples;
* bad settings are UsageErrors naming the valid choices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfbench.execution import reference as XR
from cfbench.execution.local import run_jobs
from cfbench.training.recipe import fit_recipe
from cfbench.config import make_config
from cfbench.data.specs import Digits
from cfbench.data.splits import make_split
from cfbench.defenses import Batch
from cfbench.errors import UsageError
from cfbench.mia import reference as R
from cfbench.models import build_model
from cfbench.params import build
from cfbench.registry import get
from cfbench.testing.tiny import direct_fit_context
from cfbench_baselines.demem import DeMem


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


def _fit(defense, x, y, epochs, width=8, ckpt=None, **kw):
    torch.manual_seed(0)
    model = build_model("cnn8", (1, 8, 8), 10, [0.3], [0.35], {"width": width})
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


def test_high_risk_selection_finds_planted_mislabeled_samples(digits_split):
    x = digits_split.x_train[:300]
    y, planted = _planted(x, digits_split.y_train[:300])
    dm = _defense("demem", fraction=0.05)                      # 15 of 300; chance would pick 0.4 of 8
    _, ctx = _fit(dm, x, y, epochs=8, width=16, lr=0.1, batch_size=32)
    assert int(dm._top[planted].sum()) >= 5
    risk = dm.risk_scores()
    typical = torch.ones(300, dtype=torch.bool)
    typical[planted] = False
    assert risk[planted].median() > torch.quantile(risk[typical], 0.95)
    assert ctx.metrics["demem.high_risk_fraction"] == pytest.approx(15 / 300)
    assert [r["high_risk"] for r in ctx.notes["demem"]["epochs"]] == [0] + [15] * 7   # warmup = 1 epoch


def test_running_losses_and_flooded_loss_match_direct_computation(digits_split):
    x, y = digits_split.x_train[:40], digits_split.y_train[:40]
    torch.manual_seed(0)
    model = build_model("cnn8", (1, 8, 8), 10, [0.3], [0.35], {"width": 8}).train()
    dm = _defense("demem", beta=2.0, ema=0.75, fraction=0.25, flood="none")   # b = mean loss of the low-risk
    dm._n, dm._log, dm._out = 40, [], None
    dm._ema, dm._seen = torch.zeros(2, 40), torch.zeros(40, dtype=torch.bool)
    ctx = _ctx(2)
    idx = torch.arange(0, 40, 2)

    def ce(inp):
        model.eval()
        with torch.no_grad():
            out = F.cross_entropy(model(inp), y[idx], reduction="none")
        model.train()
        return out

    batch = Batch(0, 0, idx, ctx)
    dm.on_epoch_start(model, 0, ctx)                          # warm-up: nothing selected
    torch.manual_seed(1)
    x_adv = dm.base.adversarial(model, x[idx], y[idx], batch)
    first = torch.stack([ce(x[idx]), ce(x_adv)])
    torch.manual_seed(1)
    dm.loss(model, x[idx], y[idx], batch)
    assert torch.allclose(dm._ema[:, idx], first) and dm._seen[idx].all() and not dm._seen[1::2].any()

    with torch.no_grad():                                     # move the model, visit again
        for p in model.parameters():
            p.mul_(0.9)
    torch.manual_seed(2)
    x_adv = dm.base.adversarial(model, x[idx], y[idx], batch)
    second = torch.stack([ce(x[idx]), ce(x_adv)])
    per, _ = dm.base.per_sample_loss(model, x[idx], y[idx], batch, x_adv=x_adv)
    dm.on_epoch_start(model, 1, ctx)                          # selects the top 10 of the 20 seen
    torch.manual_seed(2)
    total, _ = dm.loss(model, x[idx], y[idx], Batch(1, 1, idx, ctx))
    assert torch.allclose(dm._ema[:, idx], 0.75 * first + 0.25 * second, atol=1e-6)

    risk = 0.5 * (first[0] + first[1])                        # selection used the first visit's values
    chosen = idx[torch.topk(risk, 10).indices]
    assert set(torch.nonzero(dm._top).flatten().tolist()) == set(chosen.tolist())
    sel = dm._top[idx]
    b = per[~sel].mean()
    flooded = torch.where(sel, (per - b).abs() + b, per)      # beta = 2: iFlood on the selected samples
    assert torch.allclose(total, flooded.mean(), atol=1e-6)
    dm.params = build(type(dm.params), {"steps": 2, "beta": 3.0, "fraction": 0.25})   # default b = ln 2
    torch.manual_seed(2)
    total, _ = dm.loss(model, x[idx], y[idx], Batch(1, 1, idx, ctx))
    b = torch.log(torch.tensor(2.0))
    assert torch.allclose(total, (per + 3.0 * sel * (b - per).clamp(min=0)).mean(), atol=1e-6)


def _bn_model():
    """A small CNN *with* BatchNorm: the eval-mode tracking must not touch its running statistics."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10))


@pytest.mark.parametrize("base, extra", [("pgd-at", {}), ("trades", {"beta": 6.0})])
def test_beta_zero_is_the_base_defense_exactly(digits_split, base, extra):
    x, y = digits_split.x_train[:160], digits_split.y_train[:160]
    runs = {}
    for key, defense in (("base", _defense(base, **extra)),
                         ("beta0", _defense("demem", base=base, beta=0.0, select="all")),   # penalty path live
                         ("beta2", _defense("demem", base=base, beta=2.0, flood=5.0, select="all"))):
        model, ctx = _bn_model(), _ctx(3)
        defense.fit(model, x, y, ctx)
        runs[key] = (model.state_dict(), ctx)
    ref, (got, ctx) = runs["base"][0], runs["beta0"]
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert ctx.notes["demem"]["epochs"][2]["penalty_set"] == 160
    assert ctx.metrics["demem.penalised_fraction"] > 0              # the zero-weighted penalty was active
    assert not torch.equal(ref["0.weight"], runs["beta2"][0]["0.weight"])   # and a weighted one moves the model


class _Stop(BaseException):
    pass


def test_resume_restores_the_running_losses(digits_split, tmp_path):
    x = digits_split.x_train[:160]                             # flood=5 (> every loss): the selection matters
    y, _ = _planted(x, digits_split.y_train[:160])

    def interrupted(cls, ckpt):
        class Dies(cls):
            def on_epoch_start(self, model, epoch, ctx):
                if epoch == 2:
                    raise _Stop
                super().on_epoch_start(model, epoch, ctx)
        with pytest.raises(_Stop):
            _fit(Dies(_defense("demem", flood=5.0).params), x, y, epochs=3, ckpt=ckpt)

    full = _defense("demem", flood=5.0)
    m_full, _ = _fit(full, x, y, epochs=3, ckpt=tmp_path / "full")
    interrupted(DeMem, tmp_path / "a")
    resumed = _defense("demem", flood=5.0)
    m_res, ctx = _fit(resumed, x, y, epochs=3, ckpt=tmp_path / "a")
    assert ctx.notes["resumed_from_epoch"] == 2
    assert torch.equal(full._ema, resumed._ema) and torch.equal(full._seen, resumed._seen)
    assert all(torch.equal(a, b) for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values()))
    assert resumed._log == full._log

    class Forgets(DeMem):                                      # the same, without the state round trip
        def load_state_tensors(self, tensors):
            pass
    interrupted(DeMem, tmp_path / "b")
    forgot = Forgets(_defense("demem", flood=5.0).params)
    m_forgot, _ = _fit(forgot, x, y, epochs=3, ckpt=tmp_path / "b")
    assert not torch.equal(full._ema, forgot._ema)
    assert not all(torch.equal(a, b) for a, b in zip(m_full.state_dict().values(), m_forgot.state_dict().values()))


def _oracle_fit(tmp_path, epochs, width, planted=0, beta=2.0):
    """fit_recipe of a demem risk=oracle run on a 400-example pool (2 reference models), with the
    labels of the first ``planted`` members flipped; returns the fitted DeMem instance and more."""
    ds = Digits().load()
    data = make_split(ds, 400, 0.5, 0)
    members = np.flatnonzero(data.member_mask)
    if planted:
        flip = data.pool_idx[members[:planted]]
        ds.y_train = ds.y_train.copy()
        ds.y_train[flip] = (ds.y_train[flip] + 3) % 10
    recipe = {"defense.steps": 2, "epochs": epochs, "train.batch_size": 32, "lr": 0.1, "width": width, "mia.reference_models": 2}
    cfg = make_config(dataset="digits", defense="demem", evaluators=["mia"],
                      sets={"risk": "oracle", "oracle_models": 2, "fraction": 0.05, "beta": beta, **recipe})
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
    return seen["dm"], ctx, data, members, base_cfg


def test_oracle_out_loss_is_the_mean_loss_of_the_reference_models_without_the_example(tmp_path):
    dm, ctx, data, members, base_cfg = _oracle_fit(tmp_path, epochs=1, width=8)
    info = ctx.notes["demem"]["oracle"]
    assert info["trained_now"] == 2 and info["models"] == 2
    assert info["recipe_hash"] == XR.reference_recipe_hash(base_cfg, data, 0)   # shared with a pgd-at run's MIA
    in_mask = R.reference_in_mask(400, 200, 2, 0)
    losses = []
    for i in range(2):
        ref = XR.load_reference(base_cfg, data, XR.reference_path(tmp_path, info["recipe_hash"], i))
        with torch.no_grad():
            losses.append(F.cross_entropy(ref(data.x_pool), data.y_pool, reduction="none"))
    expected = torch.stack([torch.stack([losses[i][p] for i in range(2) if not in_mask[i, p]]).mean()
                            for p in members])
    assert torch.allclose(dm._out, expected, atol=1e-5)
    risk = dm.risk_scores()                                    # OUT loss - running clean loss
    assert torch.allclose(risk, dm._out - dm._ema[0])


@pytest.mark.slow
def test_oracle_finds_planted_mislabeled_samples(tmp_path):
    # beta = 0: the selection alone (with the penalty on, a de-memorized sample's gap shrinks, by design)
    dm, *_ = _oracle_fit(tmp_path, epochs=16, width=16, planted=8, beta=0.0)
    top = torch.nonzero(dm._top).flatten()
    assert len(top) == 10 and len(set(top.tolist()) & set(range(8))) >= 7   # planted = first 8; chance: 0.4


@pytest.mark.parametrize("settings, words", [
    ({"beta": "-1"}, ["beta", ">= 0"]),
    ({"fraction": "0"}, ["fraction", "> 0"]),
    ({"fraction": "1.5"}, ["fraction", "<= 1"]),
    ({"base": "madry"}, ["base", "pgd-at", "trades"]),
    ({"select": "everything"}, ["select", "high-risk", "all", "random"]),
    ({"risk": "lira"}, ["risk", "loss", "oracle"]),
    ({"trades_beta": "3"}, ["trades_beta", "base=trades"]),
    ({"ema": "1"}, ["ema", "< 1"]),
])
def test_bad_settings_are_usage_errors(settings, words):
    with pytest.raises(UsageError) as e:
        make_config(dataset="digits", defense="demem", sets=settings, evaluators=["clean"])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_oracle_outside_a_run_is_a_clear_error(digits_split):
    with pytest.raises(UsageError, match="cfbench run.*risk=loss"):
        _fit(_defense("demem", risk="oracle"), digits_split.x_train[:32], digits_split.y_train[:32], epochs=1)

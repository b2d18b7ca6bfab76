"""DP-SGD and DP adversarial training (Opacus): accounting, sampling, model preparation,
the attack/noise separation of DP-AT, and the privacy effect on digits."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfbench import dp
from cfbench.attacks.pgd import pgd
from cfbench.config import make_config
from cfbench.defenses import Batch
from cfbench.errors import UsageError
from cfbench.models import build_model
from cfbench.params import build
from cfbench.registry import get
from cfbench.testing.tiny import direct_fit_context
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ctx(epochs=1, batch_size=64, lr=0.05, weight_decay=5e-4, seed=0, checkpoint_dir=None, eps=0.1):
    return direct_fit_context(eps=eps, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                              seed=seed, checkpoint_dir=checkpoint_dir)


def _cnn8(width=16, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn8", (1, 8, 8), 10, (0.3,), (0.35,), {"width": width})


def _fit(params, x, y, *, defense="dp-sgd", model=None, **ctx_kw):
    cls = get("defense", defense)
    model = model if model is not None else _cnn8(seed=ctx_kw.get("seed", 0))
    ctx = _ctx(**ctx_kw)
    cls(build(cls.Params, params)).fit(model, x, y, ctx)
    return model, ctx


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _per_example_grads(model, loss_of):
    """Reference per-sample gradients: one autograd call per example."""
    rows = []
    for i in range(loss_of.n):
        model.zero_grad()
        loss_of(i).backward()
        rows.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(t) for t in zip(*rows)]


# -- registry and configuration ----------------------------------------------------------

def test_registered_through_entry_points_and_share_code():
    from cfbench_baselines.dp_at import DPAT
    from cfbench_baselines.dp_sgd import DPSGD
    from cfbench_baselines.pgd_at import PGDAT

    assert get("defense", "dp-sgd") is DPSGD and get("defense", "dp-at") is DPAT
    # dp-at is DP-SGD's loop around a composed pgd-at (one composition mechanism, no inheritance
    # between registered defenses), with pgd-at's attack settings
    assert issubclass(DPAT, DPSGD) and not issubclass(DPAT, PGDAT)
    dpat = DPAT(DPAT.Params(noise_multiplier=1.0, steps=3))
    assert isinstance(dpat.base, PGDAT) and dpat.base.params.steps == 3
    assert DPSGD.family == DPAT.family == "dp"


@pytest.mark.parametrize("defense", ["dp-sgd", "dp-at"])
@pytest.mark.parametrize("sets, match", [
    ({"target_epsilon": "0"}, r"target_epsilon: 0\.0 is out of range; it must be > 0"),
    ({"target_epsilon": "-2"}, r"target_epsilon: -2\.0 is out of range; it must be > 0"),
    ({"target_epsilon": "inf"}, r"target_epsilon=inf .* finite number > 0 .*noise_multiplier=0"),
    ({"noise_multiplier": "1", "delta": "0"}, r"delta: 0\.0 is out of range; it must be > 0"),
    ({"noise_multiplier": "1", "delta": "1"}, r"delta: 1\.0 is out of range; it must be < 1"),
    ({"noise_multiplier": "1", "delta": "1.5"}, r"delta: 1\.5 is out of range; it must be < 1"),
    ({"noise_multiplier": "1", "delta": "-1e-5"}, r"delta: -1e-05 is out of range; it must be > 0"),
    ({"target_epsilon": "8", "noise_multiplier": "1"},
     r"exactly one of target_epsilon or noise_multiplier; got both \(target_epsilon=8\.0, noise_multiplier=1\.0\)"
     r".*Valid choices: --set target_epsilon=E .* --set noise_multiplier=S"),
    ({}, r"exactly one of target_epsilon or noise_multiplier; got neither.*Valid choices"),
    ({"noise_multiplier": "-1"}, r"noise_multiplier: -1\.0 is out of range; it must be >= 0"),
    ({"noise_multiplier": "1", "max_grad_norm": "0"}, r"max_grad_norm: 0\.0 is out of range; it must be > 0"),
    ({"noise_multiplier": "1", "accountant": "gdp"}, r"accountant: 'gdp' is not allowed.*Valid choices: prv, rdp"),
    ({"noise_multiplier": "1", "grad_sample_mode": "fast"},
     r"grad_sample_mode: 'fast' is not allowed.*Valid choices: auto, ew, functorch, ghost, hooks"),
])
def test_invalid_settings_are_clear_errors(defense, sets, match):
    with pytest.raises(UsageError, match=match):
        make_config(dataset="digits", defense=defense, sets=sets, evaluators=("clean",))


def test_ghost_clipping_with_a_mixed_loss_is_a_clear_error():
    with pytest.raises(UsageError, match=r"grad_sample_mode='ghost' cannot be combined with mix=0\.5.*Valid choices"):
        make_config(dataset="digits", defense="dp-at", evaluators=("clean",),
                    sets={"noise_multiplier": "1", "grad_sample_mode": "ghost", "mix": "0.5"})


def test_valid_settings_resolve():
    cfg = make_config(dataset="digits", defense="dp-at", evaluators=("clean",),
                      sets={"target_epsilon": "8", "steps": "3", "mix": "0.5", "delta": "1e-5"})
    p = cfg.defense_params
    assert (p.target_epsilon, p.noise_multiplier, p.delta, p.steps, p.mix) == (8.0, None, 1e-5, 3, 0.5)


# -- accounting ----------------------------------------------------------------------------

def test_recorded_epsilon_equals_a_fresh_opacus_accountant(digits_split):
    from opacus.accountants import PRVAccountant, RDPAccountant

    x, y = digits_split.x_train[:200], digits_split.y_train[:200]
    _, ctx = _fit({"noise_multiplier": 1.1, "max_grad_norm": 0.7}, x, y, epochs=2, batch_size=32)
    m = ctx.metrics
    n = 200
    assert m["dp.sample_rate"] == 1 / math.ceil(n / 32)
    assert m["dp.steps"] == 2 * math.ceil(n / 32)
    assert m["dp.delta"] == 1 / (10 * n)
    assert (m["dp.noise_multiplier"], m["dp.max_grad_norm"], m["dp.accountant"]) == (1.1, 0.7, "prv")
    for acc, key in ((PRVAccountant(), "dp.epsilon"), (RDPAccountant(), "dp.epsilon_rdp")):
        for _ in range(m["dp.steps"]):      # one accountant step per noised optimizer step
            acc.step(noise_multiplier=m["dp.noise_multiplier"], sample_rate=m["dp.sample_rate"])
        assert m[key] == pytest.approx(acc.get_epsilon(delta=m["dp.delta"]), rel=1e-12)
    assert m["dp.epsilon"] < m["dp.epsilon_rdp"]          # PRV is the tighter accountant here


def test_clipping_only_control_is_epsilon_infinity():
    assert dp.epsilon(0.0, 0.1, 100, 1e-5) == math.inf
    assert dp.rdp_epsilon(0.0, 0.1, 100, 1e-5) == (math.inf, None)
    assert dp.epsilon(1.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.slow   # ~5 s on an idle machine (noise calibration + 66 steps), 25 s on a busy one
def test_epsilon_8_trains_well_above_chance(digits_split):
    from opacus.accountants import PRVAccountant

    d = digits_split
    model, ctx = _fit({"target_epsilon": 8}, d.x_train, d.y_train, epochs=6, batch_size=64, lr=0.2)
    m, n = ctx.metrics, len(d.x_train)
    assert m["dp.steps"] == 6 * math.ceil(n / 64) and m["dp.delta"] == 1 / (10 * n)
    acc = PRVAccountant()
    acc.history = [(m["dp.noise_multiplier"], m["dp.sample_rate"], m["dp.steps"])]
    assert m["dp.epsilon"] == acc.get_epsilon(delta=m["dp.delta"])
    assert 7.99 <= m["dp.epsilon"] <= 8.0            # Opacus' bisection stops within 0.01 below the target
    # measured 0.85 / 0.86 (seeds 0 / 1); chance is 0.1
    assert _accuracy(model, d.x_test, d.y_test) > 0.7


def _hanley_mcneil_se(auc: float, n1: int, n2: int) -> float:
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    return math.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2) + (n2 - 1) * (q2 - auc ** 2)) / (n1 * n2))


@pytest.mark.slow   # two 30-epoch fits: ~8 s on an idle machine, 25 s on a busy one
def test_stronger_noise_lowers_the_membership_auc_towards_one_half(digits):
    """Loss-threshold attack (Yeom et al. 2018) on a 150 / 150 member / non-member pool.

    The AUC is computed on a class-balanced subset (equal members and non-members per
    class): on the raw split a broken, noisy model's class bias alone separates the two
    groups (their class histograms differ), which is not what this test is about.
    """
    from cfbench.data.splits import make_split
    from sklearn.metrics import roc_auc_score

    d = make_split(digits, 300, 0.5, 0)
    xm, ym = d.x_train, d.y_train
    xn = torch.from_numpy(digits.x_train[d.nonmember_idx])
    yn = torch.from_numpy(digits.y_train[d.nonmember_idx])
    rng = np.random.default_rng(0)
    keep_m, keep_n = [], []
    for c in range(10):
        im, jn = np.flatnonzero(ym.numpy() == c), np.flatnonzero(yn.numpy() == c)
        k = min(len(im), len(jn))
        keep_m += list(rng.permutation(im)[:k])
        keep_n += list(rng.permutation(jn)[:k])
    aucs = {}
    for sigma in (0.0, 8.0):
        model, ctx = _fit({"noise_multiplier": sigma, "max_grad_norm": 10}, xm, ym, epochs=30, batch_size=32,
                          lr=0.1, weight_decay=0.0)
        with torch.no_grad():
            lm = F.cross_entropy(model(xm[keep_m]), ym[keep_m], reduction="none").numpy()
            ln = F.cross_entropy(model(xn[keep_n]), yn[keep_n], reduction="none").numpy()
        auc = roc_auc_score(np.r_[np.ones(len(lm)), np.zeros(len(ln))], -np.r_[lm, ln])
        aucs[sigma] = (auc, _hanley_mcneil_se(auc, len(lm), len(ln)), ctx.metrics["dp.epsilon"])
    (a0, se0, e0), (a8, se8, e8) = aucs[0.0], aucs[8.0]
    assert e0 == math.inf and e8 < 1
    assert a0 - 1.96 * se0 > 0.5                      # clipping alone leaves a measurable leak (0.65)
    assert abs(a8 - 0.5) <= 1.96 * se8                # strong noise: chance, within the interval (0.51)
    assert abs(a8 - 0.5) < abs(a0 - 0.5)


# -- Poisson sampling ----------------------------------------------------------------------

def test_poisson_batches_follow_opacus_sampler_and_are_reproducible():
    a = dp.poisson_batches(1000, 0.05, 40, dp.poisson_generator(3, 2))
    b = dp.poisson_batches(1000, 0.05, 40, dp.poisson_generator(3, 2))
    c = dp.poisson_batches(1000, 0.05, 40, dp.poisson_generator(3, 3))
    assert len(a) == 40 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    sizes = np.array([len(t) for t in a])
    assert abs(sizes.mean() - 50) < 4 * math.sqrt(50 * 0.95 / 40)   # Binomial(1000, 0.05) batch sizes
    counts = np.bincount(torch.cat(a).numpy(), minlength=1000)
    assert counts.max() <= 40 and (counts >= 0).all()


def test_an_empty_poisson_batch_is_a_noise_only_step(digits_split):
    x, y = digits_split.x_train[:16], digits_split.y_train[:16]
    draws = dp.poisson_batches(16, 1 / 16, 16, dp.poisson_generator(0, 0))
    assert any(len(t) == 0 for t in draws)            # this seed draws empty batches
    for mode in dp.GRAD_SAMPLE_MODES:
        _, ctx = _fit({"noise_multiplier": 1.0, "grad_sample_mode": mode}, x, y, model=_cnn8(width=4), epochs=1,
                      batch_size=1)
        assert ctx.metrics["dp.steps"] == 16          # every draw, empty or not, was a noised step

    # the update of an empty step is the Gaussian noise alone: std sigma * C / (q N)
    from cfbench_baselines.dp_sgd import DPSGD
    from opacus.optimizers import DPOptimizer

    model = _cnn8(width=32)
    private = dp.wrap(model, "hooks")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5,
                      expected_batch_size=4.0)
    defense = DPSGD(build(DPSGD.Params, {"noise_multiplier": 2.0}))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    loss = defense.loss(private, x[:0], y[:0], Batch(0, 0, torch.zeros(0, dtype=torch.long), _ctx()))
    opt.zero_grad(True)
    loss.backward()
    defense._step(opt)
    moved = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    assert moved.mean().abs() < 0.01 and moved.std().item() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.05)
    dp.release(private)


# -- DP adversarial training: the attack never reaches the private update ----------------

PER_SAMPLE_MODES = [m for m in dp.GRAD_SAMPLE_MODES if m != "ghost"]     # ghost keeps no per-sample gradients


@pytest.mark.parametrize("mode", PER_SAMPLE_MODES)
@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_dp_at_per_sample_gradients_are_those_of_the_adversarial_loss(digits_split, mode, mix):
    from cfbench_baselines.dp_at import DPAT
    from opacus.optimizers import DPOptimizer

    x, y = digits_split.x_train[:12], digits_split.y_train[:12]
    model = _cnn8(width=8)
    reference_model = copy.deepcopy(model)
    private = dp.wrap(model, mode)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=12.0)
    defense = DPAT(build(DPAT.Params, {"noise_multiplier": 1.0, "steps": 3, "mix": mix}))
    seen = {}
    original = defense.adversarial

    def spy(*args):
        seen["x_adv"] = original(*args)
        return seen["x_adv"]

    defense.adversarial = spy
    model.train()
    # what the shared loop does: loss hook (attack inside), zero_grad, backward
    loss, _ = defense.loss(private, x, y, Batch(0, 0, torch.arange(12), _ctx()))
    opt.zero_grad(True)
    loss.backward()
    after_attack = [p.grad_sample.detach().clone() for p in model.parameters()]
    x_adv = seen["x_adv"]
    assert not torch.equal(x_adv, x) and (x_adv - x).abs().max() <= 0.1 + 1e-6

    # the same DP step with no attack having run
    opt.zero_grad(True)
    logits = private(x_adv)
    clean = (1 - mix) * F.cross_entropy(logits, y) + (mix * F.cross_entropy(private(x), y) if mix else 0)
    clean.backward()
    no_attack = [p.grad_sample.detach().clone() for p in model.parameters()]
    for a, b in zip(after_attack, no_attack):
        assert torch.allclose(a, b, atol=1e-6)

    # and an independent reference: one autograd call per example of the per-example loss
    class PerExample:
        n = 12

        def __call__(self, i):
            lo = (1 - mix) * F.cross_entropy(reference_model(x_adv[i:i + 1]), y[i:i + 1])
            return lo + (mix * F.cross_entropy(reference_model(x[i:i + 1]), y[i:i + 1]) if mix else 0)

    for a, r in zip(after_attack, _per_example_grads(reference_model, PerExample())):
        assert torch.allclose(a, r, atol=1e-5)
    dp.release(private)


def test_an_attack_through_the_hooked_model_would_contaminate_the_step(digits_split):
    """The failure the DP-AT design avoids (REFERENCES.md pitfall) is real with Opacus 1.6."""
    x, y = digits_split.x_train[:12], digits_split.y_train[:12]
    model = _cnn8(width=8)
    private = dp.wrap(model, "hooks")
    model.train()
    x_adv = pgd(private, x, y, eps=0.1, step_size=0.05, steps=2)        # hooks on, train mode
    assert all(p.grad_sample is not None for p in model.parameters())   # the attack filled grad_sample
    F.cross_entropy(private(x_adv), y).backward()                        # no zero_grad in between
    contaminated = [p.grad_sample for p in model.parameters()]
    assert isinstance(contaminated[0], list) and len(contaminated[0]) > 1  # attack + step mixed together

    with dp.plain(private) as plain_model:                               # cfbench's way
        for p in model.parameters():
            p.grad_sample = None
        pgd(plain_model, x, y, eps=0.1, step_size=0.05, steps=2)
    assert all(p.grad_sample is None for p in model.parameters()) and private.hooks_enabled
    dp.release(private)


@pytest.mark.parametrize("mode", PER_SAMPLE_MODES)
def test_grad_sample_modes_give_the_same_per_sample_gradients(mode):
    for name, shape, mp in (("cnn8", (1, 8, 8), {"width": 8}), ("gap-cnn", (3, 8, 8), {"width": 8, "groups": 4})):
        torch.manual_seed(0)
        model = build_model(name, shape, 10, (0.5,) * shape[0], (0.3,) * shape[0], mp)
        x, y = torch.rand(6, *shape), torch.randint(0, 10, (6,))
        reference_model = copy.deepcopy(model)
        private = dp.wrap(model, mode)
        model.train()
        F.cross_entropy(private(x), y).backward()

        class PerExample:
            n = 6

            def __call__(self, i):
                return F.cross_entropy(reference_model(x[i:i + 1]), y[i:i + 1])

        for p, r in zip(model.parameters(), _per_example_grads(reference_model, PerExample())):
            assert torch.allclose(p.grad_sample, r, atol=1e-5), (name, mode)
        dp.release(private)


@pytest.mark.parametrize("defense", ["dp-sgd", "dp-at"])
def test_ghost_clipping_gives_the_clipped_sum_of_per_sample_gradients(digits_split, defense):
    """One noise-free DP step: ghost clipping's update equals the per-sample-gradient one,
    and (DP-SGD) the mean of the per-example gradients each clipped to norm C."""
    cls = get("defense", defense)
    x, y = digits_split.x_train[:12], digits_split.y_train[:12]
    clip = 0.5
    updates = {}
    for mode in ("hooks", "ghost"):
        model = _cnn8(width=8)
        reference_model = copy.deepcopy(model)
        private = dp.wrap(model, mode, clip)
        opt = dp.dp_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), mode, noise_multiplier=0.0,
                              max_grad_norm=clip, expected_batch_size=12.0)
        defense_ = cls(build(cls.Params, {"noise_multiplier": 0.0, "max_grad_norm": clip, "grad_sample_mode": mode,
                                          **({"steps": 2} if defense == "dp-at" else {})}))
        defense_._ghost = dp.GhostClipping(private) if mode == "ghost" else None
        before = [p.detach().clone() for p in model.parameters()]
        model.train()
        torch.manual_seed(5)                          # the same PGD random start in both modes
        out = defense_.loss(private, x, y, Batch(0, 0, torch.arange(12), _ctx()))
        opt.zero_grad(True)
        out[0].backward()
        defense_._step(opt)
        updates[mode] = [b - p.detach() for b, p in zip(before, model.parameters())]
        if defense_._ghost is not None:
            assert private.hooks_enabled               # re-enabled for the next step
            defense_._ghost.remove()
        dp.release(private)
    for a, b in zip(updates["hooks"], updates["ghost"]):
        assert torch.allclose(a, b, atol=1e-6)
    if defense == "dp-sgd":
        class PerExample:
            n = 12

            def __call__(self, i):
                return F.cross_entropy(reference_model(x[i:i + 1]), y[i:i + 1])

        per = _per_example_grads(reference_model, PerExample())
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in per], 1).norm(dim=1)
        assert (norms > clip).sum() >= 6                # clipping is active
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        for u, g in zip(updates["ghost"], per):
            assert torch.allclose(u, torch.einsum("i,i...->...", factor, g) / 12, atol=1e-6)


def test_auto_mode_picks_the_measured_fastest():
    from cfbench_baselines.dp_at import DPAT
    from cfbench_baselines.dp_sgd import DPSGD

    def model(name, shape, mp=None):
        return build_model(name, shape, 10, (0.5,) * shape[0], (0.3,) * shape[0], mp or {})

    resnet = model("preact-resnet18", (3, 32, 32), {"width": 4})
    dp.make_compatible(resnet)
    sgd = DPSGD(build(DPSGD.Params, {"noise_multiplier": 1}))
    assert sgd.params.grad_sample_mode == "auto"
    assert sgd.resolve_mode(model("cnn8", (1, 8, 8))) == "ghost"          # Linear layers dominate
    assert sgd.resolve_mode(model("cnn28", (1, 28, 28))) == "ghost"
    assert sgd.resolve_mode(model("gap-cnn", (1, 28, 28))) == "ew"        # convolutions dominate
    assert sgd.resolve_mode(resnet) == "ew"
    mixed = DPAT(build(DPAT.Params, {"noise_multiplier": 1, "mix": 0.5}))
    assert mixed.resolve_mode(model("cnn8", (1, 8, 8))) == "ew"           # ghost needs one forward
    model_with_unknown_layer = _cnn8(width=4)
    model_with_unknown_layer.convs[1] = nn.PReLU()
    assert sgd.resolve_mode(model_with_unknown_layer) in ("ghost", "hooks")
    model_with_unknown_layer.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128, 2))   # convs dominate
    assert sgd.resolve_mode(model_with_unknown_layer) == "hooks"


@pytest.mark.parametrize("defense", ["dp-sgd", "dp-at"])
@pytest.mark.parametrize("mode", dp.GRAD_SAMPLE_MODES)
def test_every_grad_sample_mode_trains_over_several_steps(digits_split, defense, mode):
    x, y = digits_split.x_train[:64], digits_split.y_train[:64]
    before = _cnn8(width=8)
    params = {"noise_multiplier": 0.5, "grad_sample_mode": mode, **({"steps": 1} if defense == "dp-at" else {})}
    model, ctx = _fit(params, x, y, defense=defense, model=copy.deepcopy(before), batch_size=16)
    assert ctx.metrics["dp.steps"] == 4 and ctx.notes["dp"]["grad_sample_mode"] == mode
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    # the runner gets a plain module back: no Opacus hook or attribute left
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(hasattr(p, a) for p in model.parameters() for a in ("grad_sample", "_norm_sample", "summed_grad"))


def test_dp_at_trains_and_accounts_like_dp_sgd(digits_split):
    x, y = digits_split.x_train[:128], digits_split.y_train[:128]
    _, sgd_ctx = _fit({"noise_multiplier": 1.0}, x, y, epochs=1, batch_size=32)
    model, at_ctx = _fit({"noise_multiplier": 1.0, "steps": 2, "mix": 0.5}, x, y, defense="dp-at", epochs=1,
                         batch_size=32)
    keys = ("dp.epsilon", "dp.epsilon_rdp", "dp.delta", "dp.noise_multiplier", "dp.max_grad_norm",
            "dp.sample_rate", "dp.steps", "dp.accountant")
    assert {k: at_ctx.metrics[k] for k in keys} == {k: sgd_ctx.metrics[k] for k in keys}
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


# -- model preparation -------------------------------------------------------------------

class _ScaleWithRunningMean(nn.Module):
    """A layer Opacus cannot train: a parameter next to a running statistic."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))
        self.register_buffer("running_mean", torch.zeros(c))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1) - self.running_mean.view(1, -1, 1, 1)


def test_a_layer_opacus_cannot_handle_is_an_error_naming_it(digits_split):
    torch.manual_seed(0)
    resnet = build_model("preact-resnet18", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, {"width": 2})
    with pytest.raises(UsageError, match=r"layer1\.0\.bn1 \(BatchNorm2d\).*fix_model=true"):
        _fit({"noise_multiplier": 1.0, "fix_model": False}, torch.rand(4, 3, 32, 32), torch.arange(4),
             model=resnet, batch_size=2)

    model = _cnn8(width=8)
    model.convs[1] = _ScaleWithRunningMean(8)
    with pytest.raises(UsageError, match=r"convs\.1 \(_ScaleWithRunningMean\): a trainable layer with buffers"):
        _fit({"noise_multiplier": 1.0}, digits_split.x_train[:8], digits_split.y_train[:8], model=model)


def test_model_is_fixed_in_place_and_the_saved_model_loads_back(tmp_path):
    from cfbench.store.models import load_model, save_model

    torch.manual_seed(0)
    model = build_model("preact-resnet18", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, {"width": 4})
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    held = model
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = copy.deepcopy(model.state_dict())
    model, ctx = _fit({"noise_multiplier": 1.0}, x, y, model=model, batch_size=8)
    assert model is held
    fixed = ctx.notes["opacus_fixed_modules"]
    assert len(fixed) == n_bn > 0 and all("BatchNorm2d" in f and "-> GroupNorm" in f for f in fixed)
    assert any(f.startswith("layer1.0.bn1: ") for f in fixed)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in held.modules())
    sd = held.state_dict()
    assert not any(k.startswith("_module.") for k in sd)
    assert any(not torch.equal(sd[k], before[k]) for k in sd if k in before and "conv" in k)   # trained
    assert not any(m._forward_hooks or m._backward_hooks for m in held.modules())
    assert not any(hasattr(p, "grad_sample") for p in held.parameters())

    save_model(held, tmp_path / "model.safetensors", {
        "model": "preact-resnet18", "model_params": {"width": 4}, "shape": [3, 32, 32], "num_classes": 10,
        "mean": [0.5] * 3, "std": [0.25] * 3, "opacus_fixed": bool(fixed)})
    loaded = load_model(tmp_path)
    held.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), held(x), atol=1e-6)


def test_resumed_run_reports_the_same_epsilon_and_weights(tmp_path, digits_split, monkeypatch):
    from cfbench_baselines.dp_sgd import DPSGD

    x, y = digits_split.x_train[:96], digits_split.y_train[:96]
    params = {"noise_multiplier": 1.3}
    whole, whole_ctx = _fit(params, x, y, epochs=2, batch_size=32, checkpoint_dir=tmp_path / "a")

    def stop_at_second_epoch(self, model, epoch, ctx):
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(DPSGD, "on_epoch_start", stop_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        _fit(params, x, y, epochs=2, batch_size=32, checkpoint_dir=tmp_path / "b")
    monkeypatch.undo()
    resumed, resumed_ctx = _fit(params, x, y, epochs=2, batch_size=32, checkpoint_dir=tmp_path / "b")
    assert resumed_ctx.notes["resumed_from_epoch"] == 1
    assert resumed_ctx.metrics == whole_ctx.metrics and whole_ctx.metrics["dp.steps"] == 6
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_runner_records_dp_metrics_and_infinite_epsilon(tmp_path):
    import json

    from cfbench.runner import execute
    from cfbench.store.models import load_model

    cfg = make_config(dataset="digits", defense="dp-sgd", evaluators=("clean",),
                      sets={"noise_multiplier": "0", "epochs": "1", "pool_size": "200", "width": "8"})
    out = execute(cfg, tmp_path, progress=False)
    rec = json.loads((out.run_dir / "record.json").read_text())
    m = rec["metrics"]
    assert m["dp.epsilon"] == "inf" and m["dp.epsilon_rdp"] == "inf" and m["dp.steps"] == 2
    assert m["dp.noise_multiplier"] == 0 and m["dp.accountant"] == "prv" and m["dp.delta"] == 1 / 1000
    assert rec["notes"]["defense"]["opacus_fixed_modules"] == []
    assert load_model(out.run_dir) is not None

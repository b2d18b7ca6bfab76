"""Speed of DP training (Opacus) in cfbench.

Run with ``.venv/bin/pytest benchmarks/bench_dp.py --benchmark-only -s`` (``-s`` prints the
tables).  Every comparison is measured *side by side in one run*: the variants are run
in interleaved rounds (A, B, C, A, B, C, ...) so that the load of a shared machine hits all
of them alike, and the ratio of the medians is reported (``benchmark.extra_info`` keeps
the numbers).  One intra-op thread (small models: a second thread only adds contention on
a shared 2-core machine; the ratios are what matter).

* ``test_dp_epoch_vs_non_private_epoch``: one DP-SGD epoch (cfbench ``dp-sgd``, default
  per-sample-gradient mode) against one non-private epoch (cfbench ``erm``) of the same
  model, data and batch size, for cnn8 on digits and cnn28 / gap-cnn on 28x28 inputs (the
  epoch alone, ``history[0]["seconds"]``: set-up and accounting are per run, not per epoch);
* ``test_cfbench_dp_sgd_vs_bare_opacus``: cfbench's ``dp-sgd`` (the whole ``fit``: model
  check, wrapping, Poisson sampling, the shared loop, accounting with PRV and RDP) against a
  bare, hand-written Opacus loop doing the same work (``PrivacyEngine.make_private`` with a
  ``DataLoader``, the same optimizer, epochs, noise and per-sample-gradient mode, and at the
  end the same two numbers: ``get_epsilon`` (PRV) and RDP epsilon from the same history); the
  requirement is a ratio of at most 1.10;
* ``test_grad_sample_modes``: cfbench ``dp-sgd`` epochs in each of Opacus' modes that apply
  to cfbench's models (``hooks``, ``ew``, ``functorch``, ``ghost``), after checking that they give the
  same per-sample gradients (ghost clipping keeps none; tests/test_dp.py checks its clipped
  sum); the epoch alone is timed (``history[0]["seconds"]``).
"""

from __future__ import annotations

import statistics
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from cfbench.attacks.base import ThreatModel
from cfbench.config import TrainParams
from cfbench.defenses import FitContext
from cfbench.models import build_model
from cfbench.params import build
from cfbench.registry import get

ROUNDS = 5
SIGMA, CLIP, LR, BATCH = 1.0, 1.0, 0.05, 64

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits():
    from cfbench.data.specs import Digits
    from cfbench.data.splits import make_split

    d = make_split(Digits().load(), None, 0.5, 0)
    return d.x_train, d.y_train          # 648 members


def _synthetic(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)


SETTINGS = {
    "cnn8-digits": ("cnn8", (1, 8, 8), {}, _digits),
    "cnn28-28x28": ("cnn28", (1, 28, 28), {}, lambda: _synthetic((1, 28, 28), 512)),
    "gap-cnn-28x28": ("gap-cnn", (1, 28, 28), {}, lambda: _synthetic((1, 28, 28), 512)),
}


def _model(name, shape, mp, seed=0):
    torch.manual_seed(seed)
    return build_model(name, shape, 10, (0.3,) * shape[0], (0.3,) * shape[0], mp)


def _ctx(epochs):
    return FitContext(threat=ThreatModel("Linf", 0.1), train=TrainParams(epochs=epochs, batch_size=BATCH, lr=LR),
                      device=torch.device("cpu"), seed=0, num_classes=10, augmentation="none", progress=False)


def cfbench_fit(defense, params, name, shape, mp, x, y, epochs=1):
    from cfbench import dp

    for cached in (dp.epsilon, dp.rdp_epsilon, dp.noise_for_epsilon):   # no free accounting in later rounds
        cached.cache_clear()
    cls = get("defense", defense)
    model = _model(name, shape, mp)
    ctx = _ctx(epochs)
    cls(build(cls.Params, params)).fit(model, x, y, ctx)
    return ctx


def epoch_seconds(*args, **kwargs) -> float:
    """Seconds of the (first) training epoch itself, as the shared loop records them."""
    return cfbench_fit(*args, **kwargs).history[0]["seconds"]


def bare_opacus(name, shape, mp, x, y, epochs=1, mode="hooks"):
    """A hand-written Opacus loop: the same model, optimizer, batch size, noise and epochs."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = _model(name, shape, mp)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    engine = PrivacyEngine(accountant="prv")
    criterion = torch.nn.CrossEntropyLoss()
    out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=SIGMA,
                              max_grad_norm=CLIP, grad_sample_mode=mode, criterion=criterion)
    if mode == "ghost":
        model, optimizer, criterion, loader = out
    else:
        model, optimizer, loader = out
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            loss.item()
    # the same outputs as cfbench: PRV epsilon, and RDP epsilon from the same history
    from opacus.accountants import RDPAccountant

    delta = 1 / (10 * len(x))
    rdp = RDPAccountant()
    rdp.history = list(engine.accountant.history)
    return engine.get_epsilon(delta=delta), rdp.get_privacy_spent(delta=delta)


def interleaved(variants: dict, rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds of each variant, measured in interleaved rounds after one warm-up (a
    variant that returns a float reports its own seconds, e.g. the epoch alone)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + 1):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            out = fn()
            if r:
                times[k].append(out if isinstance(out, float) else time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _report(title, medians, base):
    print(f"\n{title}")
    for k, v in medians.items():
        print(f"  {k:28s} {v:8.3f} s   x{v / medians[base]:.2f}")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dp_epoch_vs_non_private_epoch(benchmark, setting):
    name, shape, mp, data = SETTINGS[setting]
    x, y = data()
    variants = {
        "erm (non-private)": lambda: epoch_seconds("erm", {}, name, shape, mp, x, y),
        "dp-sgd": lambda: epoch_seconds("dp-sgd", {"noise_multiplier": SIGMA}, name, shape, mp, x, y),
    }
    med = benchmark.pedantic(interleaved, args=(variants,), rounds=1, iterations=1)
    ratio = med["dp-sgd"] / med["erm (non-private)"]
    benchmark.extra_info.update({"seconds": med, "dp_over_non_private": ratio})
    _report(f"one epoch, {setting} (N={len(x)}, batch {BATCH})", med, "erm (non-private)")
    assert ratio > 1


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_cfbench_dp_sgd_vs_bare_opacus(benchmark, mode):
    """``ghost`` is cfbench's default (``auto``) for cnn8; ``hooks`` is Opacus' default."""
    name, shape, mp, data = SETTINGS["cnn8-digits"]
    x, y = data()
    variants = {
        "bare opacus loop": lambda: bare_opacus(name, shape, mp, x, y, epochs=3, mode=mode),
        "cfbench dp-sgd": lambda: cfbench_fit("dp-sgd", {"noise_multiplier": SIGMA, "grad_sample_mode": mode},
                                              name, shape, mp, x, y, epochs=3),
    }
    med = benchmark.pedantic(interleaved, args=(variants,), rounds=1, iterations=1)
    ratio = med["cfbench dp-sgd"] / med["bare opacus loop"]
    benchmark.extra_info.update({"seconds": med, "cfbench_over_bare": ratio})
    _report(f"3 epochs, cnn8 on digits, grad_sample_mode={mode}", med, "bare opacus loop")
    assert ratio <= 1.10


def _same_per_sample_gradients(name, shape, mp, modes):
    from cfbench import dp

    x, y = _synthetic(shape, 8, seed=1)
    grads = {}
    for mode in modes:
        model = _model(name, shape, mp)
        private = dp.wrap(model, mode)
        model.train()
        F.cross_entropy(private(x), y).backward()
        grads[mode] = [p.grad_sample.detach().clone() for p in model.parameters()]
        dp.release(private)
    ref = grads[modes[0]]
    return all(torch.allclose(g, r, atol=1e-5) for m in modes for g, r in zip(grads[m], ref))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_grad_sample_modes(benchmark, setting):
    from cfbench import dp

    name, shape, mp, data = SETTINGS[setting]
    x, y = data()
    assert _same_per_sample_gradients(name, shape, mp, [m for m in dp.GRAD_SAMPLE_MODES if m != "ghost"])
    variants = {f"dp-sgd {mode}": (lambda mode=mode: epoch_seconds(
        "dp-sgd", {"noise_multiplier": SIGMA, "grad_sample_mode": mode}, name, shape, mp, x, y))
        for mode in dp.GRAD_SAMPLE_MODES}
    chosen = get("defense", "dp-sgd")(build(get("defense", "dp-sgd").Params, {"noise_multiplier": SIGMA}))
    benchmark.extra_info["auto"] = chosen.resolve_mode(_model(name, shape, mp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        med = benchmark.pedantic(interleaved, args=(variants, 3), rounds=1, iterations=1)
    benchmark.extra_info.update({"seconds": med})
    _report(f"one DP epoch per mode, {setting} (auto = {benchmark.extra_info['auto']})", med, "dp-sgd hooks")
    fastest = min(med, key=med.get).removeprefix("dp-sgd ")
    benchmark.extra_info["fastest"] = fastest

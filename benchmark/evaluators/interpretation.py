"""Interpretation robustness (Boopathy et al., ICML 2020): do a model's interpretation maps
survive perturbations that leave its prediction unchanged? -- and its robust accuracy over a
grid of radii, since the paper's claim is about attacks larger than the training eps.

Maps (:func:`cfbench.explain.cam.maps`): class activation maps for GAP networks (``gap-cnn``,
``int-mnist``), Grad-CAM at the last convolutional layer through captum otherwise (or
saliency, ``method=saliency``), always of the **true** class, as in the reference code
(AkhilanB/Proper-Interpretability, ``eval.py`` ``aai_topk``).

Attacks on the first ``n_examples`` test images (paper: 200):

(a) ``aai`` -- the top-k attack against interpretability: with ``T`` the clean map's top-k
    cells (k = ``topk_fraction`` of the cells, rounded, >= 1: 8 of 49 for 7x7 maps as the
    paper, 10 of 64 for gap-cnn on digits), PGD *minimises* ``sum_{(h, w) in T} M_y(x')[h, w]``:
    ``aai_steps`` = 200 signed steps of ``aai_step_size`` = 0.01, no random start (the
    reference code starts uniformly in the ball; ``aai_rand_init=true`` does that), in the
    run's norm with radius ``aai_eps`` (default: the run's eps), model in eval mode.  The
    gradient goes through the map (CAM: directly; Grad-CAM / saliency: double backprop).
(b) ``evasion`` -- the run's prediction-evasion attack: PGD on the cross-entropy in the run's
    threat model (random start, ``evasion_steps``, default step 2.5 eps / steps), and the
    maps of the images it produces.

Scores between the clean map and the attacked map, over the images whose **prediction did
not change** (argmax of f(x') == argmax of f(x), as the reference code; their fraction is
``<attack>.unchanged``): Kendall's tau-b over map cells (``kendall_tau``; images whose map is
constant have no tau and are dropped and counted) and the top-k overlap
``|top-k(M(x)) & top-k(M(x'))| / k`` (``topk_overlap``; top-k by ``torch.topk``, per image --
the reference ``intr_topk``'s ``np.partition(a, -k)[-k]`` takes a *row* of the partitioned
matrix, not each row's k-th value, and divides by the number of cells; neither is copied).
The same two scores over *every* image (``kendall_tau_all``, ``topk_overlap_all``) are
reported too: the paper's filter keeps a different, model-dependent subset for each model
(an undefended model keeps only the images it is most confident on), so comparisons
*between* models are fairer on all images.  All are means over images with a two-sided
Student-t interval at ``confidence``
(``mean +- t_{n-1} s / sqrt(n)``; the values are bounded, n is 100s, and a t-interval is
deterministic, unlike a bootstrap).

Robust accuracy over ``eps_grid`` (``robust_grid``): PGD-200 as the paper's ``pgd_attack``
(200 signed steps of 0.01 on the cross-entropy, no random start, last iterate) at each radius
in the run's norm; an example misclassified before the attack counts as not robust and is not
attacked.  Default grid: the paper's MNIST grid 0.05, 0.1, 0.2, 0.3, 0.35, 0.4 for Linf runs on
single-channel data; otherwise the run's eps times the same multiples of the paper's training
eps 0.3 (1/6, 1/3, 2/3, 1, 7/6, 4/3).  AutoAttack at the training eps is the ``autoattack``
evaluator.

Metrics: ``interpretation.{aai,evasion}.{kendall_tau,topk_overlap}`` (value, ci_low,
ci_high, n), ``interpretation.{aai,evasion}.unchanged`` (Clopper-Pearson),
``interpretation.robust_accuracy.<eps>`` (Clopper-Pearson), ``interpretation.k``,
``interpretation.map_cells``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..attacks.pgd import STEP_SIZE_HELP, default_step_size, pgd
from ..explain.cam import maps as interpretation_maps
from ..explain.cam import resolve_method
from ..mia.metrics import mean_interval
from ..params import param
from .base import EvalContext, EvalResult, Evaluator, predict, proportion

#: the paper's MNIST robust-accuracy grid and its training eps
PAPER_GRID = (0.05, 0.1, 0.2, 0.3, 0.35, 0.4)
PAPER_TRAIN_EPS = 0.3


# -- pure metrics --------------------------------------------------------------------------

def kendall_tau_b(a: np.ndarray, b: np.ndarray, *, chunk_elems: int = 4_000_000) -> np.ndarray:
    """Kendall's tau-b between the rows of ``a`` and ``b`` (N, n): (N,), NaN where a row is constant.

    ``tau_b = sum_{i<j} sgn(a_i - a_j) sgn(b_i - b_j) / sqrt((n0 - n1)(n0 - n2))`` with n1, n2
    the tied pairs of each row -- scipy.stats.kendalltau's default, vectorised over rows.
    """
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"kendall_tau_b: shapes differ, {a.shape} and {b.shape}")
    n_rows, n = a.shape
    out = np.full(n_rows, np.nan)
    step = max(1, chunk_elems // max(1, n * n))
    for s in range(0, n_rows, step):
        sa = np.sign(a[s:s + step, :, None] - a[s:s + step, None, :])
        sb = np.sign(b[s:s + step, :, None] - b[s:s + step, None, :])
        num = (sa * sb).sum((1, 2))
        den = np.sqrt(np.abs(sa).sum((1, 2)) * np.abs(sb).sum((1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + step] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """``|top-k(a_i) & top-k(b_i)| / k`` per row of (N, ...) maps: (N,) in [0, 1]."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"topk_overlap: k = {k} must be in 1..{a.shape[1]}")
    ia = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    ib = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (ia & ib).sum(1).double() / k


def t_interval(values, confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ``values`` with a two-sided Student-t interval: {value, ci_low, ci_high, n};
    non-finite values dropped (:func:`cfbench.mia.metrics.mean_interval`)."""
    return mean_interval(values, confidence, drop_nonfinite=True)


def top_k(cells: int, fraction: float) -> int:
    """k = ``fraction`` of the map cells, rounded, at least 1 (8 of 49 for 0.16)."""
    return max(1, min(cells, round(fraction * cells)))


def default_grid(norm: str, eps: float, channels: int) -> tuple[float, ...]:
    if norm == "Linf" and channels == 1:
        return PAPER_GRID
    return tuple(float(eps) * e / PAPER_TRAIN_EPS for e in PAPER_GRID)


def eps_key(eps: float) -> str:
    return f"{eps:.6g}"


# -- the evaluator ---------------------------------------------------------------------------

@dataclass(frozen=True)
class InterpretationParams:
    n_examples: int = param(200, "test examples (the first n of the test split; paper: 200)", ge=1)
    method: Literal["auto", "cam", "gradcam", "saliency"] = param(
        "auto", "interpretation map: auto = CAM for GAP models, else Grad-CAM (captum)")
    layer: str | None = param(None, "Grad-CAM layer (submodule path; default: the last conv's rectified output)")
    topk_fraction: float = param(0.16, "k of the top-k attack and overlap, as a fraction of map cells "
                                       "(paper: 8 of 49)", gt=0, le=1)
    aai: bool = param(True, "run the top-k interpretation attack (AAI)")
    aai_eps: float | None = param(None, "radius of the interpretation attack (default: the run's eps)", ge=0)
    aai_steps: int = param(200, "steps of the interpretation attack (paper: 200)", ge=1)
    aai_step_size: float = param(0.01, "step of the interpretation attack (paper: 0.01)", gt=0)
    aai_rand_init: bool = param(False, "random start of the interpretation attack (the reference code has one)")
    evasion: bool = param(True, "compare maps under the prediction-evasion PGD of the run's threat model")
    evasion_steps: int = param(20, "PGD steps of the prediction-evasion attack", ge=1)
    evasion_step_size: float | None = param(None, STEP_SIZE_HELP, gt=0)
    robust_grid: bool = param(True, "robust accuracy over eps_grid (PGD, paper's pgd_attack)")
    eps_grid: tuple[float, ...] | None = param(
        None, "radii of the robust-accuracy sweep (default: 0.05,0.1,0.2,0.3,0.35,0.4 for Linf grey-scale "
              "data, else the run's eps times those / 0.3)")
    grid_steps: int = param(200, "PGD steps of the sweep (paper: 200)", ge=1)
    grid_step_size: float = param(0.01, "PGD step of the sweep (paper: 0.01)", gt=0)
    confidence: float = param(0.95, "confidence level of the intervals", gt=0, lt=1)
    batch_size: int = param(100, "attack batch size", ge=1)


class InterpretationRobustness(Evaluator):
    """Kendall tau / top-k overlap of interpretation maps under the top-k AAI attack and PGD,
    plus robust accuracy over a grid of radii (Boopathy et al. 2020)."""

    name = "interpretation"
    description = ("interpretation robustness (Boopathy et al. 2020): Kendall tau / top-k overlap of CAM or "
                   "Grad-CAM maps under top-k AAI and PGD; robust accuracy over an eps grid")
    version = 1
    Params = InterpretationParams
    contract_params = {"n_examples": 8, "aai_steps": 2, "evasion_steps": 2, "grid_steps": 2,
                       "eps_grid": (0.1, 0.3)}

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        p = self.params
        d = ctx.data
        n = min(p.n_examples, len(d.x_test))
        x, y = d.x_test[:n], d.y_test[:n]
        model = ctx.model
        model.eval()
        return self._evaluate(ctx, model, x, y, n)

    def _maps(self, model, x, y, *, differentiable=False):
        out = []
        for i in range(0, len(x), self.params.batch_size):
            out.append(interpretation_maps(model, x[i:i + self.params.batch_size],
                                           y[i:i + self.params.batch_size], self.params.method,
                                           layer=self.params.layer, differentiable=differentiable))
        return torch.cat(out)

    def _evaluate(self, ctx, model, x, y, n) -> EvalResult:
        p = self.params
        res = EvalResult()
        ns = "interpretation"
        dev = ctx.device
        threat = ctx.threat
        method = resolve_method(model, p.method)
        xs, ys = x.to(dev), y.to(dev)
        m_clean = self._maps(model, xs, ys)
        cells = int(m_clean[0].numel())
        k = top_k(cells, p.topk_fraction)
        pred_clean = predict(model, xs, dev).argmax(1).to(dev)
        res.metrics[f"{ns}.k"] = k
        res.metrics[f"{ns}.map_cells"] = cells
        notes: dict[str, Any] = {"method": method, "map_shape": list(m_clean.shape[1:]), "k": k, "n_examples": n,
                                 "tau": "Kendall tau-b over map cells (scipy.stats.kendalltau's default)",
                                 "interval": f"two-sided Student-t, confidence {p.confidence}",
                                 "map_class": "true label", "seconds": {}}
        if method == "gradcam":
            from ..explain.cam import default_gradcam_layer
            notes["layer"] = p.layer or default_gradcam_layer(model)

        def score(attack: str, x_adv: torch.Tensor) -> None:
            m_adv = self._maps(model, x_adv, ys)
            same = (predict(model, x_adv, dev).argmax(1).to(dev) == pred_clean).cpu()
            keep = same.nonzero().flatten()
            taus_all = kendall_tau_b(m_clean.cpu().numpy(), m_adv.cpu().numpy())
            over_all = topk_overlap(m_clean.cpu(), m_adv.cpu(), k).numpy() if n else np.zeros(0)
            taus, over = taus_all[keep.numpy()], over_all[keep.numpy()]
            res.metrics[f"{ns}.{attack}.kendall_tau"] = t_interval(taus, p.confidence)
            res.metrics[f"{ns}.{attack}.topk_overlap"] = t_interval(over, p.confidence)
            res.metrics[f"{ns}.{attack}.unchanged"] = proportion(int(same.sum()), n)
            res.metrics[f"{ns}.{attack}.kendall_tau_all"] = t_interval(taus_all, p.confidence)
            res.metrics[f"{ns}.{attack}.topk_overlap_all"] = t_interval(over_all, p.confidence)
            notes[f"{attack}_tau_undefined"] = int(np.isnan(taus).sum())
            if len(keep) == 0:
                res.warnings.append(f"interpretation: every prediction changed under the {attack} attack; "
                                    "no map comparison")
            ctx.examples[f"interpretation-{attack}"] = {
                "clean": x[:16], "adv": x_adv[:16].cpu(), "y": y[:16],
                "map_clean": m_clean[:16].cpu(), "map_adv": m_adv[:16].cpu()}

        if p.aai:
            t0 = time.perf_counter()
            eps = threat.eps if p.aai_eps is None else p.aai_eps
            x_adv = torch.cat([self._aai(model, xs[i:i + p.batch_size], ys[i:i + p.batch_size],
                                         m_clean[i:i + p.batch_size], k, eps, threat.norm)
                               for i in range(0, n, p.batch_size)])
            score("aai", x_adv)
            moved = float((self._maps(model, x_adv, ys) - m_clean).abs().max()) if n else 0.0
            if method == "saliency" and moved == 0.0:
                res.warnings.append("interpretation: the AAI attack did not change any saliency map (the input "
                                    "gradient of a piecewise-linear network's saliency is zero); its scores "
                                    "say nothing about robustness")
            notes["aai"] = {"eps": eps, "norm": threat.norm, "steps": p.aai_steps, "step_size": p.aai_step_size,
                            "rand_init": p.aai_rand_init,
                            "objective": "minimise the true-class map summed over the clean top-k cells"}
            notes["seconds"]["aai"] = time.perf_counter() - t0
        if p.evasion:
            t0 = time.perf_counter()
            alpha = default_step_size(threat.eps, p.evasion_steps, p.evasion_step_size)
            torch.manual_seed(ctx.seed)
            x_adv = torch.cat([pgd(model, xs[i:i + p.batch_size], ys[i:i + p.batch_size], eps=threat.eps,
                                   step_size=alpha, steps=p.evasion_steps, norm=threat.norm, rand_init=True)
                               for i in range(0, n, p.batch_size)])
            score("evasion", x_adv)
            notes["evasion"] = {"eps": threat.eps, "norm": threat.norm, "steps": p.evasion_steps, "step_size": alpha,
                                "rand_init": True, "objective": "cross-entropy (untargeted PGD)"}
            notes["seconds"]["evasion"] = time.perf_counter() - t0
        if p.robust_grid:
            t0 = time.perf_counter()
            grid = p.eps_grid if p.eps_grid is not None else default_grid(threat.norm, threat.eps, x.shape[1])
            correct = (pred_clean == ys)
            idx = correct.nonzero().flatten()
            for e in grid:
                robust = 0
                for i in range(0, len(idx), p.batch_size):
                    j = idx[i:i + p.batch_size]
                    xa = pgd(model, xs[j], ys[j], eps=float(e), step_size=p.grid_step_size, steps=p.grid_steps,
                             norm=threat.norm, rand_init=False)
                    robust += int((predict(model, xa, dev).argmax(1).to(dev) == ys[j]).sum())
                res.metrics[f"{ns}.robust_accuracy.{eps_key(e)}"] = proportion(robust, n)
            notes["robust_grid"] = {"eps": [float(e) for e in grid], "norm": threat.norm, "steps": p.grid_steps,
                                    "step_size": p.grid_step_size, "rand_init": False,
                                    "clean_misclassified_count_as_not_robust": True}
            notes["seconds"]["robust_grid"] = time.perf_counter() - t0
        res.notes[ns] = notes
        return res

    def _aai(self, model, x, y, m_clean, k, eps, norm) -> torch.Tensor:
        """Top-k AAI: PGD minimising the true-class map at the clean map's top-k cells."""
        p = self.params
        top = m_clean.reshape(len(x), -1).topk(k, dim=1).indices

        def objective(net, xa):
            m = interpretation_maps(net, xa, y, p.method, layer=p.layer, differentiable=True)
            return -m.reshape(len(xa), -1).gather(1, top).sum(1)

        with torch.enable_grad():
            return pgd(model, x, y, eps=eps, step_size=p.aai_step_size, steps=p.aai_steps, norm=norm,
                       rand_init=p.aai_rand_init, objective=objective)


__all__ = [
    "InterpretationParams",
    "InterpretationRobustness",
    "default_grid",
    "kendall_tau_b",
    "t_interval",
    "top_k",
    "topk_overlap",
]

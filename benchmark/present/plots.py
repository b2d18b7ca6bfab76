"""Figures for reports: matplotlib (Agg) figures returned as base64 PNG ``data:`` URIs.

Every function builds a :class:`matplotlib.figure.Figure` directly and renders it with the
Agg canvas (no ``pyplot`` global state: safe in threads, never opens a window) and returns the PNG as a
``data:image/png;base64,...`` string that an ``<img src>`` embeds, keeping reports
self-contained.  Text that comes from records (defense names, attack names) goes through
:func:`plain` so that a ``$`` never switches matplotlib into mathtext.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .format import isfinite

#: colour of each defense family (``components.defense.family``); anything else is "other"
FAMILY_COLORS = {
    "erm": "#6b6b6b",
    "adversarial": "#1f77b4",
    "dp": "#2ca02c",
    "privacy": "#9467bd",
    "other": "#ff7f0e",
}
FAMILY_LABELS = {"erm": "ERM (undefended)", "adversarial": "adversarial training", "dp": "differential privacy",
                 "privacy": "privacy defense", "other": "other"}
DPI = 110


def family_color(family: str | None) -> str:
    return FAMILY_COLORS.get(family or "other", FAMILY_COLORS["other"])


def plain(text: Any) -> str:
    """Record text safe for matplotlib: ``$`` escaped so it is never parsed as mathtext."""
    return str(text).replace("$", r"\$")


def data_uri(fig: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig)  # render with Agg whatever pyplot's backend is
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------- ROC
#: the FPRs marked with a grey vertical line on ROC plots (only those inside the x axis)
FPR_GUIDES = (1e-2, 1e-3, 1e-4)


def fpr_guides(lo: float) -> list[float]:
    """The guide FPRs that lie inside an x axis starting at ``lo``: the ones a caption may name."""
    return [x for x in FPR_GUIDES if x >= lo]


def merge_identical(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> dict[str, list[str]]:
    """Curves that are point-for-point identical (e.g. attacks whose scores are monotone
    transforms of each other): first name -> every name with that curve, in input order."""
    groups: dict[tuple, list[str]] = {}
    for name, (fpr, tpr) in curves.items():
        key = (tuple(np.round(np.asarray(fpr, dtype=float), 12)), tuple(np.round(np.asarray(tpr, dtype=float), 12)))
        groups.setdefault(key, []).append(name)
    return {names[0]: names for names in groups.values()}


def roc_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
             n_nonmembers: int | None = None, title: str = "membership inference ROC",
             primary: str | None = None) -> dict[str, Any]:
    """ROC curves on log-log axes, with the chance line TPR = FPR; returns ``{img, lo, guides,
    groups, primary}``.

    Identical curves are drawn once, with one legend entry naming all of them (``groups``:
    first name -> names).  ``primary`` (an attack name, or a key of ``curves``) is drawn thick
    and black on top of the others, first in the legend; the rest are thinner.  Points with FPR
    = 0 or TPR = 0 cannot be drawn on log axes and are dropped.  The x axis starts at ``1 /
    n_nonmembers`` when that is known (below it the data say nothing); grey verticals mark the
    guide FPRs inside the axis (``guides``: the caption names only these).
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    groups = merge_identical(curves)
    main = next((k for k, names in groups.items() if primary is not None and primary in names), None)
    many = len(groups) > 6
    fig = Figure(figsize=(8.6 if many else 6.4, 4.8))
    ax = fig.add_subplot()
    lo = 1.0 / n_nonmembers if n_nonmembers else None
    smallest = []
    others = [k for k in groups if k != main]
    cmap = colormaps["tab20" if len(others) > 10 else "tab10"]
    handles = []
    for i, key in enumerate(others + ([main] if main else [])):
        fpr, tpr = curves[key]
        f = np.asarray(fpr, dtype=float)
        t = np.asarray(tpr, dtype=float)
        keep = (f > 0) & (t > 0)
        if not keep.any():
            continue
        smallest.append(f[keep].min())
        label = " = ".join(plain(n) for n in groups[key])
        if key == main:
            (line,) = ax.plot(f[keep], t[keep], "-", lw=2.8, color="black", zorder=5, drawstyle="steps-post",
                              label=f"primary: {label}")
            handles.insert(0, line)
        else:
            (line,) = ax.plot(f[keep], t[keep], ("-", "--", "-.")[(i // cmap.N) % 3], lw=1.1, alpha=0.85,
                              color=cmap(i % cmap.N), drawstyle="steps-post", label=label)
            handles.append(line)
    lo = lo or (min(smallest) if smallest else 1e-3)
    ax.plot([lo, 1], [lo, 1], ":", color="black", lw=1)
    handles.append(Line2D([], [], ls=":", color="black", lw=1, label="chance"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1.05)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(plain(title))
    ax.grid(True, which="major", alpha=0.3)
    guides = fpr_guides(lo)
    for x in guides:
        ax.axvline(x, color="#bbbbbb", lw=0.8, zorder=0)
    if many:  # beside the axes: inside, a long legend hides the low-FPR region
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    return {"img": data_uri(fig), "lo": lo, "guides": guides, "groups": groups, "primary": main}


def roc_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
               n_nonmembers: int | None = None, title: str = "membership inference ROC",
               primary: str | None = None) -> str:
    """:func:`roc_plot`'s image only."""
    return roc_plot(curves, n_nonmembers=n_nonmembers, title=title, primary=primary)["img"]


def guides_text(guides: Sequence[float]) -> str:
    """'Grey verticals: 1% and 0.1% FPR.' for the guides actually drawn ('' if none)."""
    if not guides:
        return ""
    names = [f"{100 * g:g}%" for g in guides]
    return "Grey vertical" + ("s" if len(names) > 1 else "") + ": " + " and ".join(
        [", ".join(names[:-1]), names[-1]] if len(names) > 1 else names) + " FPR."


# ------------------------------------------------------------------------------- scores
def score_histogram(member: np.ndarray, nonmember: np.ndarray, *, attack: str, bins: int = 50) -> str | None:
    """Member vs non-member score histograms of one attack (densities on shared bins; the
    range is the 0.5-99.5 percentile of all finite scores, outliers counted in the end bins)."""
    m = np.asarray(member, dtype=float)
    n = np.asarray(nonmember, dtype=float)
    m, n = m[np.isfinite(m)], n[np.isfinite(n)]
    if len(m) == 0 or len(n) == 0:
        return None
    both = np.concatenate([m, n])
    lo, hi = np.percentile(both, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(both.min()) - 0.5, float(both.max()) + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    fig = Figure(figsize=(6.2, 3.4))
    ax = fig.add_subplot()
    for vals, color, label in ((n, "#1f77b4", f"non-members (n = {len(n)})"), (m, "#d62728", f"members (n = {len(m)})")):
        ax.hist(np.clip(vals, lo, hi), bins=edges, density=True, histtype="stepfilled", alpha=0.35, color=color,
                label=label)
        ax.hist(np.clip(vals, lo, hi), bins=edges, density=True, histtype="step", lw=1.2, color=color)
    ax.set_xlabel(f"{plain(attack)} score (higher = more likely a member)")
    ax.set_ylabel("density")
    ax.set_title(f"membership scores: {plain(attack)}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return data_uri(fig)


# ---------------------------------------------------------------------------- trade-off
def pareto_front_2d(xs: Sequence[float], ys: Sequence[float], maximize_x: bool, maximize_y: bool) -> list[int]:
    """Indices of the points not dominated in the plane, ordered by x (for a staircase)."""
    pts = [(i, x if maximize_x else -x, y if maximize_y else -y)
           for i, (x, y) in enumerate(zip(xs, ys)) if isfinite(x) and isfinite(y)]
    front = [i for i, x, y in pts
             if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for _, x2, y2 in pts)]
    return sorted(front, key=lambda i: xs[i])


def tradeoff_figure(points: Sequence[Mapping[str, Any]], *, x: str, y: str, xlabel: str, ylabel: str,
                    maximize_x: bool = True, maximize_y: bool = True, title: str = "",
                    percent_x: bool = True, percent_y: bool = True) -> str:
    """One trade-off scatter with the 2-D Pareto front of the plotted points.

    ``points`` are dicts with ``label``, ``family``, the values under keys ``x`` and ``y``,
    optional error half-widths or intervals under ``x + "_err"`` / ``y + "_err"`` (a pair
    ``(low, high)`` of absolute bounds), ``epsilon`` (DP epsilon, annotated as "ε=..."),
    ``rank`` (3-D Pareto rank: rank 1 is drawn as a filled marker with a black edge) and
    ``highlight`` (drawn larger, with a ring: the run a report is about), ``flagged`` (robustness
    sanity flags: drawn as a cross, labelled "⚑") and ``off_front`` (left out of the plane's
    Pareto front: flagged rows unless the table includes them).  Points without both values
    are left out and listed under the plot by the caller.
    """
    import textwrap

    fig = Figure(figsize=(8.2, 4.6))
    ax = fig.add_axes((0.09, 0.12, 0.56, 0.78))
    sx = 100.0 if percent_x else 1.0
    sy = 100.0 if percent_y else 1.0
    shown = [p for p in points if isfinite(p.get(x)) and isfinite(p.get(y))]
    seen_families: set[str] = set()
    key_lines = []
    # numbers beside the points (short: they do not collide like long labels), alternating offsets
    offsets = [(5, 4), (5, -11), (-11, 4), (-11, -11)]
    for num_i, p in enumerate(shown, start=1):
        fam = p.get("family") or "other"
        if fam not in FAMILY_COLORS:
            fam = "other"
        px, py = p[x] * sx, p[y] * sy
        xerr = yerr = None
        if p.get(x + "_err") and all(isfinite(v) for v in p[x + "_err"]):
            lo, hi = p[x + "_err"]
            xerr = [[max(px - lo * sx, 0)], [max(hi * sx - px, 0)]]
        if p.get(y + "_err") and all(isfinite(v) for v in p[y + "_err"]):
            lo, hi = p[y + "_err"]
            yerr = [[max(py - lo * sy, 0)], [max(hi * sy - py, 0)]]
        color = family_color(fam)
        if xerr is not None or yerr is not None:
            ax.errorbar(px, py, xerr=xerr, yerr=yerr, fmt="none", ecolor=color, alpha=0.45, lw=1, zorder=1)
        front = p.get("rank") == 1
        ax.scatter([px], [py], s=110 if p.get("highlight") else 55, color=color, zorder=3,
                   edgecolors="black" if front else color, linewidths=1.3 if front else 0.5,
                   marker="X" if p.get("flagged") else ("o" if front else "s"),
                   label=FAMILY_LABELS.get(fam, fam) if fam not in seen_families else None)
        seen_families.add(fam)
        if p.get("highlight"):
            ax.scatter([px], [py], s=320, facecolors="none", edgecolors="crimson", linewidths=1.6, zorder=4)
        text = ("⚑ " if p.get("flagged") else "") + plain(p.get("label", ""))
        eps = p.get("epsilon")
        if eps is not None:
            text += f"  ε={'∞' if eps == math.inf else format(eps, '.3g')}"
        off = offsets[(num_i - 1) % 4]
        if p.get("highlight"):  # outside the ring drawn around the report's own run
            off = (off[0] * 2, off[1] * 2 if off[1] > 0 else off[1] * 1.6)
        ax.annotate(str(num_i), (px, py), textcoords="offset points", xytext=off,
                    fontsize=8, fontweight="bold", color="crimson" if p.get("highlight") else "black")
        key_lines.append(textwrap.fill(f"{num_i}  {text}", 38, subsequent_indent="     "))
    ranked = [p for p in shown if not p.get("off_front")]
    idx = pareto_front_2d([p[x] for p in ranked], [p[y] for p in ranked], maximize_x, maximize_y)
    if len(idx) >= 1:
        fx = [ranked[i][x] * sx for i in idx]
        fy = [ranked[i][y] * sy for i in idx]
        # staircase through the front: the region it bounds is what the front dominates
        ax.step(fx, fy, where="post" if maximize_x != maximize_y else "pre", ls="--", color="black",
                lw=0.9, alpha=0.7, zorder=2, label="Pareto front (this plane)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(plain(title))
    ax.grid(True, alpha=0.3)
    ax.margins(0.12)
    if shown:
        ax.legend(fontsize=7, loc="best")
        fig.text(0.67, 0.90, "\n".join(key_lines), va="top", ha="left", fontsize=7.5, family="monospace")
    return data_uri(fig)


# ------------------------------------------------------------------------ training curves
def training_figure(history: Sequence[Mapping[str, Any]]) -> str | None:
    """Per-epoch training loss, training accuracy (when recorded) and learning rate."""
    rows = [h for h in history if isfinite(h.get("epoch")) and isfinite(h.get("loss"))]
    if not rows:
        return None
    ep = [h["epoch"] for h in rows]
    has_acc = any(isfinite(h.get("train_accuracy")) for h in rows)
    has_lr = any(isfinite(h.get("lr")) for h in rows)
    n = 1 + has_acc + has_lr
    fig = Figure(figsize=(3.3 * n, 2.9))
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].plot(ep, [h["loss"] for h in rows], "-o", ms=3, color="#1f77b4")
    axes[0].set_title("training loss")
    k = 1
    if has_acc:
        pts = [(h["epoch"], 100 * h["train_accuracy"]) for h in rows if isfinite(h.get("train_accuracy"))]
        axes[k].plot(*zip(*pts), "-o", ms=3, color="#2ca02c")
        axes[k].set_title("training accuracy (%)")
        k += 1
    if has_lr:
        pts = [(h["epoch"], h["lr"]) for h in rows if isfinite(h.get("lr"))]
        axes[k].plot(*zip(*pts), "-", color="#7f7f7f")
        axes[k].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return data_uri(fig)


# ------------------------------------------------------------------------------ AutoAttack
def autoattack_figure(breakdown: Mapping[str, float]) -> str | None:
    """Robust accuracy after each AutoAttack stage, starting from clean accuracy."""
    items = [(k, v) for k, v in breakdown.items() if isfinite(v)]
    if not items:
        return None
    fig = Figure(figsize=(5.4, 2.8))
    ax = fig.add_subplot()
    names = [plain(k) for k, _ in items]
    vals = [100 * v for _, v in items]
    ax.bar(names, vals, color=["#6b6b6b"] + ["#1f77b4"] * (len(vals) - 1))
    for i, v in enumerate(vals):
        ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("accuracy after stage (%)")
    ax.set_title("AutoAttack: robust accuracy after each attack")
    ax.grid(True, axis="y", alpha=0.3)
    return data_uri(fig)


# ------------------------------------------------------------------------------- examples
def _as_images(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) or (N, H, W) in [0, 1] -> (N, H, W) grey or (N, H, W, 3) RGB."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        return np.clip(x, 0, 1)
    if x.ndim != 4:
        raise ValueError(f"example images must be (N, C, H, W), got shape {x.shape}")
    if x.shape[1] == 1:
        return np.clip(x[:, 0], 0, 1)
    if x.shape[1] == 3:
        return np.clip(np.transpose(x, (0, 2, 3, 1)), 0, 1)
    return np.clip(x[:, 0], 0, 1)


def examples_figure(rows: Sequence[tuple[str, np.ndarray, Sequence[str] | None]], *, max_cols: int = 8,
                    diverging: Iterable[int] = ()) -> str | None:
    """A grid of example images: one row per (label, images, per-image captions).

    A caption is a string or a ``(string, colour)`` pair.

    Rows whose index is in ``diverging`` are perturbations (values in [-1, 1] after the
    caller's scaling; RGB perturbations are averaged over channels) drawn with a diverging
    colour map centred on zero.  The grid is composed as one mosaic array and drawn with a
    single ``imshow`` (one axes per image is ~20x slower).
    """
    from matplotlib import colormaps

    rows = [(label, imgs, caps) for label, imgs, caps in rows if imgs is not None and len(imgs)]
    if not rows:
        return None
    diverging = set(diverging)
    rgb_rows = []
    for r, (label, imgs, caps) in enumerate(rows):
        arr = np.asarray(imgs, dtype=np.float32)
        if r in diverging:
            if arr.ndim == 4:
                arr = arr.mean(1)
            rgb = colormaps["RdBu_r"]((np.clip(arr, -1, 1) + 1) / 2)[..., :3]
        else:
            arr = _as_images(arr)
            rgb = np.repeat(arr[..., None], 3, -1) if arr.ndim == 3 else arr
        rgb_rows.append((label, rgb, caps))
    h, w = rgb_rows[0][1].shape[1:3]
    ncols = min(max_cols, max(len(r[1]) for r in rgb_rows))
    has_caps = any(caps for _, _, caps in rgb_rows)
    gap = max(1, round(0.08 * w))
    top = max(2, round(0.34 * h)) if has_caps else gap
    cell_h, cell_w = h + top, w + gap
    mosaic = np.ones((len(rgb_rows) * cell_h, ncols * cell_w - gap, 3), dtype=np.float32)
    for r, (_, rgb, _) in enumerate(rgb_rows):
        if rgb.shape[1:3] != (h, w):
            raise ValueError(f"example rows must share one image size, got {rgb.shape[1:3]} and {(h, w)}")
        for c in range(min(ncols, len(rgb))):
            y0, x0 = r * cell_h + top, c * cell_w
            mosaic[y0:y0 + h, x0:x0 + w] = rgb[c]
    inch = 0.95 / h   # one image is about 0.95 inch tall
    label_w = 1.2
    fig_w = mosaic.shape[1] * inch + label_w
    fig = Figure(figsize=(fig_w, mosaic.shape[0] * inch))
    ax = fig.add_axes((label_w / fig_w, 0, 1 - label_w / fig_w, 1))
    ax.imshow(mosaic, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for r, (label, _, caps) in enumerate(rgb_rows):
        y0 = r * cell_h + top
        ax.text(-gap * 2, y0 + h / 2, plain(label), ha="right", va="center", fontsize=9)
        for c in range(min(ncols, len(caps or []))):
            text, color = caps[c] if isinstance(caps[c], tuple) else (caps[c], "black")
            ax.text(c * cell_w + w / 2, y0 - 0.4, plain(text), ha="center", va="bottom", fontsize=7, color=color)
    return data_uri(fig)

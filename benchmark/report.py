"""Self-contained HTML reports of one run or one leaderboard.

``cfbench report <run-dir | run-id>`` and ``cfbench report --leaderboard <name>`` each write a
single HTML file (by default under ``reports/``) that works when mailed or opened offline:
the figures are PNG ``data:`` URIs (matplotlib, Agg), the styles are inline, there is no
script, and a Content-Security-Policy forbids the page any network request.  Templates are
Jinja2 with autoescaping on, so text from records (a defense's name or description, a
warning) is always rendered as text, never as markup.

A run report holds: summary cards; provenance (versions, git commit, config, splits);
membership inference (log-log ROC per attack, TPR-at-FPR table with intervals); trade-off
plots (robust vs clean accuracy, leakage vs robust accuracy) of the run among the finished
runs of the same protocol found next to it (``--runs`` to look elsewhere), with each
plane's Pareto front, defense families coloured and DP epsilon marked; training curves;
the AutoAttack per-attack breakdown and its warnings; example images (clean, adversarial,
perturbation, and counterfactual where the defense made them) from
``<run-dir>/examples.safetensors``.  ``cfbench run`` writes ``<run-dir>/report.html``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError

EXAMPLES = "examples.safetensors"
EXAMPLE_SUFFIX = "_examples"
EXAMPLE_SLOTS = ("clean", "adv", "y")
FPRS = ("0.01", "0.001", "0.0001")
TEMPLATES = Path(__file__).resolve().parent / "templates"


# ------------------------------------------------------------------------------ examples
def save_examples(shared: dict[str, Any], path: str | Path) -> list[str]:
    """Save the example tensors evaluators left in ``ctx.shared`` to one safetensors file.

    Every entry whose key ends in ``_examples`` is saved: a tuple ``(x_clean, x_changed, y)``
    becomes tensors ``<prefix>.clean``, ``<prefix>.adv``, ``<prefix>.y`` (``pgd_examples`` ->
    ``pgd.*``, ``counterfactual_examples`` -> ``counterfactual.*``); a dict of named tensors
    becomes ``<prefix>.<name>``.  Never raises: problems come back as warning strings (the
    examples only feed the report; they must never fail a run).  Nothing is written when
    there is nothing to save.
    """
    import torch

    tensors: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in shared.items():
        if not key.endswith(EXAMPLE_SUFFIX):
            continue
        prefix = key[: -len(EXAMPLE_SUFFIX)]
        items = value.items() if isinstance(value, dict) else zip(EXAMPLE_SLOTS, value or ())
        for name, t in items:
            if isinstance(t, torch.Tensor):
                tensors[f"{prefix}.{name}"] = t.detach().cpu().clone().contiguous()  # own storage: views share it
            else:
                problems.append(f"report: example {key}[{name!r}] is a {type(t).__name__}, not a tensor; not saved")
    if not tensors:
        return problems
    try:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - examples must never fail a run
        problems.append(f"report: could not save example images to {path}: {type(e).__name__}: {e}")
    return problems


def load_examples(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{prefix: {slot: array}}`` from ``<run_dir>/examples.safetensors`` ({} if absent)."""
    path = Path(run_dir) / EXAMPLES
    if not path.exists():
        return {}
    from safetensors.numpy import load_file

    out: dict[str, dict[str, Any]] = {}
    for key, arr in load_file(str(path)).items():
        prefix, _, slot = key.rpartition(".")
        out.setdefault(prefix or key, {})[slot] = arr
    return out


# ----------------------------------------------------------------------------- rendering
def render_template(name: str, **context: Any) -> str:
    """Render ``benchmark/templates/<name>`` with autoescaping on."""
    from jinja2 import Environment, FileSystemLoader

    from . import __version__

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, trim_blocks=False,
                      lstrip_blocks=False, keep_trailing_newline=True)
    return env.get_template(name).render(cfbench_version=__version__, **context)


def _num(v: Any) -> float:
    from .leaderboard import _num as num

    return num(v)


def _isnum(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_rate(m: Any, *, percent: bool = True, digits: int | None = None) -> tuple[str, str]:
    """(text, tooltip) of a metric entry: value with its interval, or n/a with the reason."""
    if m is None:
        return "n/a", "not evaluated"
    v = _num(m)
    if math.isnan(v):
        reason = m.get("reason") if isinstance(m, Mapping) else None
        return "n/a", str(reason or "not available")
    s = 100.0 if percent else 1.0
    d = digits if digits is not None else (1 if percent else 3)
    text = f"{v * s:.{d}f}"
    tip = ""
    if isinstance(m, Mapping):
        lo, hi = _num(m.get("ci_low")), _num(m.get("ci_high"))
        if _isnum(lo) and _isnum(hi):
            text += f" [{lo * s:.{d}f}, {hi * s:.{d}f}]"
        if m.get("n") is not None:
            tip = f"n = {m['n']}"
        if m.get("k") is not None:
            tip += f", k = {m['k']}"
        if m.get("fpr") is not None and m.get("fpr_target") is not None:
            tip += f", achieved FPR = {m['fpr']:.3g}"
    return text, tip


def fmt_plain(v: Any) -> str:
    if isinstance(v, Mapping):
        if "value" in v:
            return fmt_rate(v, percent=False, digits=4)[0]
        return json.dumps(v, default=str)
    if isinstance(v, float):
        return f"{v:.6g}"
    return "n/a" if v is None else str(v)


# ------------------------------------------------------------------------ run report parts
def _cards(rec: Mapping[str, Any]) -> list[dict[str, str]]:
    from .leaderboard import LEAKAGE_FPR, fmt_epsilon, fmt_seconds, strongest

    m = rec.get("metrics") or {}
    cards = []

    def card(label, metric, *, percent=True, digits=None, sub=""):
        text, _ = fmt_rate(metric, percent=percent, digits=digits)
        value, _, interval = text.partition(" ")
        cards.append({"label": label, "value": value + ("%" if percent and value != "n/a" else ""),
                      "sub": " ".join(x for x in (interval and f"95% CI {interval}", sub) if x)})

    card("clean accuracy", m.get("clean.accuracy"))
    if "robust.autoattack.accuracy" in m:
        n = m.get("robust.autoattack.n")
        card("AutoAttack accuracy", m.get("robust.autoattack.accuracy"), sub=f"n = {n}" if n else "")
    if "robust.pgd.accuracy" in m:
        card("PGD accuracy", m.get("robust.pgd.accuracy"))
    auc = strongest(m, "auc")
    tpr = strongest(m, f"tpr_at_fpr.{LEAKAGE_FPR}")
    if any(k.startswith("mia.") for k in m):
        card("strongest MIA AUC", {"value": None if math.isnan(auc["value"]) else auc["value"],
                                   "ci_low": auc["ci_low"], "ci_high": auc["ci_high"]},
             percent=False, sub=str(auc["attack"] or ""))
        raw = m.get(f"mia.best.tpr_at_fpr.{LEAKAGE_FPR}")
        reason = raw.get("reason") if isinstance(raw, Mapping) and math.isnan(tpr["value"]) else None
        card("strongest TPR @ 0.1% FPR", {"value": None if math.isnan(tpr["value"]) else tpr["value"],
                                          "ci_low": tpr["ci_low"], "ci_high": tpr["ci_high"]},
             digits=2, sub=str(tpr["attack"] or reason or ""))
    else:
        cards.append({"label": "membership inference", "value": "n/a", "sub": "not evaluated in this run"})
    if "dp.epsilon" in m:
        delta = m.get("dp.delta")
        cards.append({"label": "DP ε", "value": fmt_epsilon(_num(m["dp.epsilon"])),
                      "sub": f"δ = {fmt_plain(delta)}" if delta is not None else ""})
    t = rec.get("timings") or {}
    from .leaderboard import eval_seconds
    cards.append({"label": "training time", "value": fmt_seconds(_num(t.get("train"))),
                  "sub": f"evaluation {fmt_seconds(eval_seconds(t))}"})
    cards.append({"label": "total time", "value": fmt_seconds(_num(t.get("total"))), "sub": ""})
    return cards


def _provenance(rec: Mapping[str, Any]) -> dict[str, Any]:
    cfg = rec.get("config") or {}
    v = rec.get("versions") or {}
    comp = rec.get("components") or {}
    general = [
        ("run id", rec.get("run_id")), ("name", rec.get("name")), ("created", rec.get("created")),
        ("status", rec.get("status")), ("config hash", rec.get("config_hash")),
        ("schema version", rec.get("schema_version")), ("seed", cfg.get("seed")),
        ("device", cfg.get("device")), ("cfbench", v.get("cfbench")), ("git commit", v.get("git_commit") or "unknown"),
        ("python", v.get("python")), ("platform", v.get("platform")),
    ]
    packages = sorted((v.get("packages") or {}).items())
    splits = list((rec.get("splits") or {}).items())
    components = []
    for kind in ("dataset", "model", "defense"):
        c = comp.get(kind) or {}
        components.append((kind, c.get("name"), c.get("version"), c.get("source"), c.get("class"),
                           c.get("description")))
    for name, c in (comp.get("evaluators") or {}).items():
        components.append(("evaluator", name, c.get("version"), c.get("source"), c.get("class"),
                           c.get("description")))
    return {"general": [(k, "n/a" if x is None else x) for k, x in general], "packages": packages,
            "splits": [(k, "n/a" if x is None else x) for k, x in splits], "components": components,
            "config": json.dumps(cfg, indent=2, sort_keys=False, default=str)}


def _fpr_keys(metrics: Mapping[str, Any], attacks: Sequence[str]) -> list[str]:
    """The FPR keys ('0.01', '0.001', ...) present in ``mia.<A>.tpr_at_fpr.<f>``, largest first."""
    keys = set()
    for a in attacks:
        prefix = f"mia.{a}.tpr_at_fpr."
        keys.update(k[len(prefix):] for k in metrics if k.startswith(prefix))
    return sorted(keys, key=lambda k: -_num(k) if _isnum(_num(k)) else 0.0)


def _flat(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.extend(_flat(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", json.dumps(v, default=str) if isinstance(v, (list, dict)) else v))
    return out


def _mia(rec: Mapping[str, Any]) -> dict[str, Any] | None:
    from . import plots
    from .leaderboard import mia_attacks

    m = rec.get("metrics") or {}
    attacks = mia_attacks(m)
    notes = (rec.get("notes") or {}).get("mia") or {}
    if not attacks and not notes:
        return None
    fprs = _fpr_keys(m, attacks) or list(FPRS)
    info = notes.get("attacks") or {}
    rows = []
    for a in attacks:
        cells = [fmt_rate(m.get(f"mia.{a}.auc"), percent=False),
                 fmt_rate(m.get(f"mia.{a}.balanced_accuracy"), percent=True)]
        cells += [fmt_rate(m.get(f"mia.{a}.tpr_at_fpr.{f}"), percent=True, digits=2) for f in fprs]
        formula = (info.get(a) or {}).get("formula", "") if isinstance(info.get(a), Mapping) else ""
        rows.append({"attack": a, "cells": cells, "formula": formula})
    best = []
    for key, label in [("auc", "AUC"), ("balanced_accuracy", "balanced accuracy")] + \
                      [(f"tpr_at_fpr.{f}", f"TPR @ {_num(f) * 100:g}% FPR") for f in fprs]:
        b = m.get(f"mia.best.{key}")
        if isinstance(b, Mapping):
            text, tip = fmt_rate(b, percent=key != "auc", digits=2 if key.startswith("tpr") else None)
            best.append((label, b.get("attack") or "n/a", text, tip))
    roc = notes.get("roc") or {}
    curves = {a: (c.get("fpr") or [], c.get("tpr") or []) for a, c in roc.items() if isinstance(c, Mapping)}
    proto = notes.get("protocol") or {}
    n_out = proto.get("n_nonmembers") or proto.get("nonmembers")
    img = plots.roc_figure(curves, n_nonmembers=n_out if isinstance(n_out, int) and n_out > 0 else None) \
        if curves else None
    return {"rows": rows, "best": best, "roc": img, "protocol": _flat(proto),
            "fpr_labels": [f"TPR @ {_num(f) * 100:g}% FPR %" for f in fprs],
            "has_formulas": any(r["formula"] for r in rows)}


def _autoattack(rec: Mapping[str, Any]) -> dict[str, Any] | None:
    from . import plots

    notes = (rec.get("notes") or {}).get("robust.autoattack")
    if not notes:
        return None
    breakdown = notes.get("breakdown") or {}
    flags = list(notes.get("flags") or [])
    return {
        "img": plots.autoattack_figure(breakdown) if breakdown else None,
        "breakdown": [(k, f"{100 * v:.1f}%" if _isnum(v) else "n/a") for k, v in breakdown.items()],
        "n": notes.get("n_examples"),
        "flags": flags,
        "settings": [(k, notes.get(k)) for k in ("package", "version", "norm", "eps", "n_examples", "attacks",
                                                 "seed", "resumed") if k in notes],
        "resumed": bool(notes.get("resumed")),
    }


def _predict(run_dir: Path, arrays: Sequence[Any]) -> list[list[int]] | None:
    """Predicted labels of the run's saved model on each array, or None if unavailable."""
    if not (run_dir / "model.safetensors").exists():
        return None
    try:
        import torch

        from .results import load_model

        model = load_model(run_dir)
        with torch.no_grad():
            return [model(torch.from_numpy(a).float()).argmax(1).tolist() for a in arrays]
    except Exception:  # noqa: BLE001 - predictions are a nicety of the report
        return None


def _examples(rec: Mapping[str, Any], run_dir: Path, *, with_predictions: bool = True) -> list[dict[str, Any]]:
    import numpy as np

    from . import plots

    ex = load_examples(run_dir)
    if not ex:
        return []
    threat = (rec.get("config") or {}).get("threat") or {}
    eps = _num(threat.get("eps"))
    norm = threat.get("norm")
    out = []
    order = sorted(ex, key=lambda p: (p == "counterfactual", p))
    for prefix in order:
        slots = ex[prefix]
        clean, changed = slots.get("clean"), slots.get("adv", slots.get("counterfactual"))
        y = slots.get("y")
        if clean is None or changed is None or len(clean) == 0:
            continue
        n = min(8, len(clean), len(changed))
        clean, changed = clean[:n].astype(np.float32), changed[:n].astype(np.float32)
        y = y[:n].tolist() if y is not None else None
        preds = _predict(run_dir, [clean, changed]) if with_predictions else None
        counterfactual = prefix.startswith("counterfactual")
        name = "counterfactual" if counterfactual else "adversarial"

        def caps(labels_pred):
            """'y=3 →5' per image; red where the prediction is wrong."""
            if y is None and labels_pred is None:
                return None
            out = []
            for i in range(n):
                text = " ".join(x for x in ((f"y={y[i]}" if y is not None else ""),
                                           (f"→{labels_pred[i]}" if labels_pred is not None else "")) if x)
                wrong = y is not None and labels_pred is not None and labels_pred[i] != y[i]
                out.append((text, "#c0392b" if wrong else "black"))
            return out

        delta = changed - clean
        if norm == "Linf" and _isnum(eps) and eps > 0 and not counterfactual:
            scaled = delta / eps
            how = f"perturbation / eps (eps = {eps:.4g}; red = brighter, blue = darker)"
        else:
            per = np.abs(delta).reshape(n, -1).max(1).reshape((n,) + (1,) * (delta.ndim - 1))
            scaled = delta / np.maximum(per, 1e-12)
            how = "difference, scaled per image to its largest absolute value (red = brighter, blue = darker)"
        img = plots.examples_figure([("clean", clean, caps(preds[0] if preds else None)),
                                     (name, changed, caps(preds[1] if preds else None)),
                                     ("difference", np.clip(scaled, -1, 1), None)], diverging=[2])
        linf = float(np.abs(delta).reshape(n, -1).max()) if n else math.nan
        caption = (f"{prefix}: the first {n} test images, the {name} images the {prefix} evaluation produced, "
                   f"and their difference ({how}). Captions: true label y and the saved model's prediction (→, "
                   "red when wrong)" + ("" if preds else " (model not available: labels only)")
                   + (". AutoAttack returns the clean image where it finds no adversarial example (or the "
                      "clean image is already misclassified)" if prefix == "autoattack" else "")
                   + f". Largest |change| over pixels: {linf:.4g}.")
        out.append({"title": f"{prefix} ({name})", "img": img, "caption": caption})
    return out


def _context(rec: Mapping[str, Any], runs: Path | None):
    """The leaderboard of the run's protocol among the finished runs in ``runs`` (with
    this run included even if it is not stored there), or None."""
    from .leaderboard import aggregate, load_records, protocol_id, protocol_of

    if rec.get("status") != "ok":
        return None
    pid = protocol_id(protocol_of(rec))
    others = []
    if runs is not None and runs.is_dir():
        for r in load_records(runs)[0]:
            if r.get("config_hash") != rec.get("config_hash") and protocol_id(protocol_of(r)) == pid:
                others.append(r)
    return aggregate([rec] + others, runs=str(runs) if runs else ".")


def tradeoff_plots(lb, *, highlight_run: str | None = None) -> dict[str, Any]:
    """The two trade-off figures of a leaderboard (robust vs clean; leakage vs robust)."""
    from . import plots

    pts = []
    for _, r in lb.rows.iterrows():
        def err(c):
            if r[f"{c}_std"] == r[f"{c}_std"] and r["seeds"] > 1:   # not NaN: seeds' spread
                return (r[f"{c}_mean"] - r[f"{c}_std"], r[f"{c}_mean"] + r[f"{c}_std"])
            if _isnum(r[f"{c}_ci_low"]) and _isnum(r[f"{c}_ci_high"]):
                return (r[f"{c}_ci_low"], r[f"{c}_ci_high"])
            return None

        eps = r["epsilon_mean"]
        pts.append({
            "label": r["label"], "family": r["family"], "clean": r["clean_mean"], "robust": r["robust_mean"],
            "leakage": r["leakage_mean"], "clean_err": err("clean"), "robust_err": err("robust"),
            "leakage_err": err(lb.leakage) if lb.leakage else None,
            "epsilon": eps if (isinstance(eps, float) and (math.isinf(eps) or eps == eps)) else None,
            "rank": None if r["pareto_rank"] != r["pareto_rank"] else int(r["pareto_rank"]),
            "highlight": bool(highlight_run and highlight_run in str(r["run_ids"]).split()),
        })
    robust = lb.robust_label.replace(" (no AutoAttack)", "")
    out = {"figures": [], "missing": []}

    def plotted(x: str, y: str) -> bool:
        return any(_isnum(p[x]) and _isnum(p[y]) for p in pts)

    if not plotted("clean", "robust"):
        out["missing"].append("No robust accuracy in this protocol: the robustness plots are omitted.")
        if lb.leakage and plotted("clean", "leakage"):
            leak_label = {"tpr": "strongest MIA TPR @ 0.1% FPR (%)", "auc": "strongest MIA AUC"}[lb.leakage]
            out["figures"].append({
                "img": plots.tradeoff_figure(pts, x="clean", y="leakage", xlabel="clean accuracy (%)",
                                             ylabel=leak_label, maximize_y=False, percent_y=lb.leakage == "tpr",
                                             title="membership leakage vs accuracy"),
                "caption": f"{leak_label} against clean accuracy; lower leakage and higher accuracy are better."})
        out["errors_caption"] = ("Error bars: ± one standard deviation over seeds where a row has several seeds, "
                                 "otherwise the run's 95% interval.")
        return out
    out["figures"].append({
        "img": plots.tradeoff_figure(pts, x="clean", y="robust", xlabel="clean accuracy (%)",
                                     ylabel=f"{robust} (%)", title="robustness vs accuracy"),
        "caption": f"{robust} against clean accuracy; both higher is better. Dashed: the Pareto front of this "
                   "plane. Circles with a black edge: rank 1 of the three-way Pareto ranking."})
    if lb.leakage and plotted("robust", "leakage"):
        leak_label = {"tpr": "strongest MIA TPR @ 0.1% FPR (%)", "auc": "strongest MIA AUC"}[lb.leakage]
        out["figures"].append({
            "img": plots.tradeoff_figure(pts, x="robust", y="leakage", xlabel=f"{robust} (%)", ylabel=leak_label,
                                         maximize_y=False, percent_y=lb.leakage == "tpr",
                                         title="membership leakage vs robustness"),
            "caption": f"{leak_label} against {robust}; lower leakage and higher robustness are better. "
                       "DP runs are marked with their ε."})
    elif not lb.leakage:
        out["missing"].append("No membership-inference results in this protocol: the leakage plot is omitted.")
    for p in pts:
        if not (_isnum(p["clean"]) and _isnum(p["robust"])):
            out["missing"].append(f"{p['label']}: not plotted (clean or robust accuracy n/a).")
    out["errors_caption"] = ("Error bars: ± one standard deviation over seeds where a row has several seeds, "
                             "otherwise the run's 95% interval.")
    return out


def _table(lb, highlight_run: str | None = None) -> dict[str, Any]:
    from .leaderboard import display_rows, notes

    header, body = display_rows(lb)
    me = [bool(highlight_run and highlight_run in str(r).split()) for r in lb.rows["run_ids"]]
    return {"header": header, "rows": list(zip(body, me)), "notes": notes(lb)}


def run_report(run_dir: str | Path, *, runs: str | Path | None = None, command: str | None = None,
               with_predictions: bool = True) -> str:
    """The HTML text of one run's report."""
    from . import plots
    from .leaderboard import describe_protocol, protocol_of
    from .results import read_record

    run_dir = Path(run_dir)
    try:
        rec = read_record(run_dir)
    except FileNotFoundError:
        raise UsageError(f"{str(run_dir)!r} has no record.json: is it a cfbench run directory?") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{run_dir / 'record.json'} is not valid JSON: {e}") from None
    cfg = rec.get("config") or {}
    comp = (rec.get("components") or {}).get("defense") or {}
    lb = _context(rec, Path(runs) if runs is not None else run_dir.parent)
    warnings = list(rec.get("warnings") or [])
    ctx = {
        "rec": rec,
        "title": rec.get("name") or rec.get("run_id") or str(run_dir),
        "command": command or f"cfbench report {shlex.quote(str(run_dir))}",
        "defense": {"name": (cfg.get("defense") or {}).get("name"), "family": comp.get("family") or "other",
                    "description": comp.get("description") or "",
                    "params": (cfg.get("defense") or {}).get("params") or {},
                    "color": plots.family_color(comp.get("family"))},
        "cards": _cards(rec),
        "protocol": describe_protocol(protocol_of(rec)),
        "train": cfg.get("train") or {},
        "provenance": _provenance(rec),
        "mia": _mia(rec),
        "autoattack": _autoattack(rec),
        "training": plots.training_figure(rec.get("history") or []),
        "history_len": len(rec.get("history") or []),
        "examples": _examples(rec, run_dir, with_predictions=with_predictions),
        "warnings": warnings,
        "timings": [(k, f"{v:.2f} s" if _isnum(v) else fmt_plain(v)) for k, v in (rec.get("timings") or {}).items()],
        "metrics": [(k, fmt_plain(v)) for k, v in sorted((rec.get("metrics") or {}).items())],
        "defense_notes": [(k, fmt_plain(v)) for k, v in ((rec.get("notes") or {}).get("defense") or {}).items()],
        "tradeoff": tradeoff_plots(lb, highlight_run=rec.get("run_id")) if lb is not None else None,
        "table": _table(lb, rec.get("run_id")) if lb is not None else None,
        "context_runs": len(lb.records) if lb is not None else 0,
    }
    return render_template("run_report.html", **ctx)


def _roc_overlay(lb, runs_dir: Path) -> str | None:
    """ROC of each row's strongest attack (its first run), when the records are at hand."""
    from . import plots
    from .leaderboard import LEAKAGE_FPR, strongest
    from .results import read_record

    curves: dict[str, tuple[list, list]] = {}
    n_out = None
    for _, r in lb.rows.iterrows():
        for run in lb.records[lb.records["run_id"].isin(str(r["run_ids"]).split())].itertuples():
            path = runs_dir / str(run.path) if run.path else None
            if path is None or not (path / "record.json").exists():
                continue
            rec = read_record(path)
            metric = f"tpr_at_fpr.{LEAKAGE_FPR}" if lb.leakage == "tpr" else "auc"
            attack = strongest(rec.get("metrics") or {}, metric)["attack"]
            mia = (rec.get("notes") or {}).get("mia") or {}
            c = (mia.get("roc") or {}).get(attack) if attack else None
            if c:
                curves[f"{r['label']} ({attack}, seed {rec['config'].get('seed')})"] = (c["fpr"], c["tpr"])
                n_out = n_out or (mia.get("protocol") or {}).get("nonmembers")
            break
    if not curves:
        return None
    return plots.roc_figure(curves, n_nonmembers=n_out if isinstance(n_out, int) else None,
                            title="ROC of each defense's strongest attack")


def leaderboard_report(name: str, *, leaderboards: str | Path = "leaderboards", command: str | None = None) -> str:
    """The HTML text of a leaderboard's report, from ``<leaderboards>/<name>.json``."""
    from .leaderboard import Leaderboard, describe_protocol

    path = Path(name)
    if path.suffix != ".json" or not path.exists():
        path = Path(leaderboards) / f"{name}.json"
    if not path.exists():
        avail = sorted(p.stem for p in Path(leaderboards).glob("*.json")) if Path(leaderboards).is_dir() else []
        from .errors import suggest
        raise UsageError(f"no leaderboard {name!r} in {str(leaderboards)!r} (build it with `cfbench leaderboard`)."
                         + suggest(name, avail))
    obj = json.loads(path.read_text(encoding="utf-8"))
    lb = Leaderboard.from_json(obj)
    defaults = "" if Path(leaderboards) == Path("leaderboards") else f" --leaderboards {shlex.quote(str(leaderboards))}"
    ctx = {
        "lb": lb,
        "command": command or f"cfbench report --leaderboard {shlex.quote(lb.name)}{defaults}",
        "protocol": describe_protocol(lb.protocol),
        "table": _table(lb),
        "tradeoff": tradeoff_plots(lb),
        "roc": _roc_overlay(lb, Path(lb.runs)),
        "descriptions": list(zip(lb.rows["label"], lb.rows["family"], lb.rows["description"])),
        "per_run": obj.get("records") or [],
        "cards": [
            {"label": "defenses", "value": str(len(lb.rows)), "sub": f"{len(lb.records)} runs"},
            {"label": "best clean accuracy", **_best(lb, "clean", True)},
            {"label": f"best {lb.robust_label.replace(' (no AutoAttack)', '')}", **_best(lb, "robust", True)},
            {"label": f"lowest {lb.leakage_label}", **_best(lb, lb.leakage, False)} if lb.leakage else
            {"label": "membership leakage", "value": "n/a", "sub": "not evaluated"},
        ],
    }
    return render_template("leaderboard_report.html", **ctx)


def _best(lb, col: str, maximize: bool) -> dict[str, str]:
    s = lb.rows[f"{col}_mean"].astype(float)
    if s.isna().all():
        return {"value": "n/a", "sub": ""}
    i = s.idxmax() if maximize else s.idxmin()
    v = s[i]
    text = f"{v:.3f}" if col == "auc" else f"{100 * v:.{2 if col == 'tpr' else 1}f}%"
    return {"value": text, "sub": str(lb.rows.loc[i, "label"])}


# ----------------------------------------------------------------------------- writing
def readable(path: Path) -> None:
    """Give a written file the usual permissions (``atomic_write_text`` creates it 0600 via
    mkstemp): a report or a table is meant to be shared."""
    os.chmod(path, 0o644)


def write_report(html: str, out: str | Path) -> Path:
    from .results import atomic_write_text

    out = Path(out)
    atomic_write_text(out, html)
    readable(out)
    return out


def report_after_run(run_dir: str | Path) -> Path | None:
    """For ``cfbench run``: write ``<run_dir>/report.html`` and print its path; a failure
    only warns (a report must never fail a run)."""
    run_dir = Path(run_dir)
    try:
        path = write_report(run_report(run_dir), run_dir / "report.html")
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not write the run's report: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    print(f"report   {path}")
    return path


def _resolve_run(arg: str, runs: str | None) -> Path:
    p = Path(arg)
    if (p / "record.json").exists():
        return p
    if runs is not None and (Path(runs) / arg / "record.json").exists():
        return Path(runs) / arg
    if (Path("runs") / arg / "record.json").exists():
        return Path("runs") / arg
    raise UsageError(f"{arg!r} is neither a run directory (with record.json) nor a run id under "
                     f"{runs or 'runs'!r}; pass the run's directory, e.g. runs/<run-id>.")


def cmd_report(args) -> int:
    if bool(args.run) == bool(args.leaderboard):
        raise UsageError("give either a run (directory or id) or --leaderboard NAME, not "
                         + ("both." if args.run else "neither."))
    if args.leaderboard:
        parts = ["cfbench", "report", "--leaderboard", args.leaderboard]
        if args.leaderboards != "leaderboards":
            parts += ["--leaderboards", args.leaderboards]
        if args.out:
            parts += ["--out", args.out]
        html = leaderboard_report(args.leaderboard, leaderboards=args.leaderboards,
                                  command=" ".join(shlex.quote(p) for p in parts))
        # Only a real ``.json`` path loses its suffix: names such as digits-cnn8-Linf-0.1 contain dots.
        lb_name = Path(args.leaderboard)
        stem = lb_name.stem if lb_name.suffix == ".json" else lb_name.name
        out = Path(args.out) if args.out else Path("reports") / f"leaderboard-{stem}.html"
    else:
        run_dir = _resolve_run(args.run, args.runs)
        parts = ["cfbench", "report", str(run_dir)]
        if args.runs:
            parts += ["--runs", args.runs]
        if args.out:
            parts += ["--out", args.out]
        html = run_report(run_dir, runs=args.runs, command=" ".join(shlex.quote(p) for p in parts))
        out = Path(args.out) if args.out else Path("reports") / f"{run_dir.resolve().name}.html"
    path = write_report(html, out)
    print(f"report   {path}")
    return 0


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a run or a leaderboard",
        description="Write one self-contained HTML file (figures embedded, no network access needed) for a run "
                    "or for a leaderboard built by `cfbench leaderboard`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", nargs="?", default=None, help="run directory (with record.json) or run id")
    p.add_argument("--leaderboard", default=None, metavar="NAME",
                   help="report on leaderboard NAME (a file stem in --leaderboards, or a path to its .json)")
    p.add_argument("--leaderboards", default="leaderboards", help="directory of leaderboards")
    p.add_argument("--runs", default=None,
                   help="directory of run folders: where a run id is looked up and where the runs compared with "
                        "this one are found (default: the run directory's parent)")
    p.add_argument("--out", default=None,
                   help="output file (default: reports/<run-id>.html or reports/leaderboard-<name>.html)")
    p.set_defaults(func=cmd_report)

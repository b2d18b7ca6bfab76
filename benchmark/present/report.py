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
``<run-dir>/examples.safetensors``.  ``cfbench run`` writes ``<run-dir>/report.html``
(:func:`report_after_run`).  The sub-commands live in :mod:`.cli`.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError, suggest
from ..store import MODEL, RECORD, read_record
from ..store.examples import load_examples
from . import plots
from .format import fmt_epsilon, fmt_plain, fmt_rate, fmt_seconds, isfinite, num
from .html import render_template, write_html
from .leaderboard import (
    LEAKAGE_FPR,
    Leaderboard,
    aggregate,
    describe_protocol,
    eval_seconds,
    load_records,
    mia_attacks,
    protocol_id,
    protocol_of,
    strongest,
)
from .writers import display_rows, excluded_lines, notes

FPRS = ("0.01", "0.001", "0.0001")
#: the report ``cfbench run`` writes into the run's folder
REPORT = "report.html"


# ------------------------------------------------------------------------ run report parts
def _cards(rec: Mapping[str, Any]) -> list[dict[str, str]]:
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
             digits=2, sub=" ".join(x for x in (str(tpr["attack"] or reason or ""), "(selection-biased)") if x))
        # the protocol's primary attack, pooled over the target and its reference models (mia v2)
        for f, label in (("0.01", "1%"), (LEAKAGE_FPR, "0.1%")):
            e = m.get(f"mia.primary.tpr_at_fpr.{f}")
            if isinstance(e, Mapping):
                card(f"primary TPR @ {label} FPR (pooled)", e, digits=2,
                     sub=str(e.get("attack") or "") + ("" if e.get("value") is not None else
                                                       f" n/a: {e.get('reason') or 'not supported'}"))
    else:
        cards.append({"label": "membership inference", "value": "n/a", "sub": "not evaluated in this run"})
    lb = m.get("mia.audit.epsilon_lb")
    lb_text = (f"{num(lb):.3g}" if isinstance(lb, Mapping) and isfinite(num(lb)) else None)
    if "dp.epsilon" in m:
        delta = m.get("dp.delta")
        cards.append({"label": "DP ε", "value": fmt_epsilon(num(m["dp.epsilon"])),
                      "sub": " ".join(x for x in (f"δ = {fmt_plain(delta)}" if delta is not None else "",
                                                  f"audit ε ≥ {lb_text}" if lb_text else "") if x)})
    elif lb_text:
        cards.append({"label": "audit ε lower bound", "value": lb_text,
                      "sub": f"δ = {fmt_plain(lb.get('delta'))} ({lb.get('attack')}, pooled)"})
    t = rec.get("timings") or {}
    cards.append({"label": "training time", "value": fmt_seconds(num(t.get("train"))),
                  "sub": f"evaluation {fmt_seconds(eval_seconds(t))}"})
    cards.append({"label": "total time", "value": fmt_seconds(num(t.get("total"))), "sub": ""})
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
    return sorted(keys, key=lambda k: -num(k) if isfinite(num(k)) else 0.0)


def _flat(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.extend(_flat(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", json.dumps(v, default=str) if isinstance(v, (list, dict)) else v))
    return out


def _mia(rec: Mapping[str, Any]) -> dict[str, Any] | None:
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
                      [(f"tpr_at_fpr.{f}", f"TPR @ {num(f) * 100:g}% FPR") for f in fprs]:
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
            "fpr_labels": [f"TPR @ {num(f) * 100:g}% FPR %" for f in fprs],
            "has_formulas": any(r["formula"] for r in rows)}


def _autoattack(rec: Mapping[str, Any]) -> dict[str, Any] | None:
    notes = (rec.get("notes") or {}).get("robust.autoattack")
    if not notes:
        return None
    breakdown = notes.get("breakdown") or {}
    flags = list(notes.get("flags") or [])
    return {
        "img": plots.autoattack_figure(breakdown) if breakdown else None,
        "breakdown": [(k, f"{100 * v:.1f}%" if isfinite(v) else "n/a") for k, v in breakdown.items()],
        "n": notes.get("n_examples"),
        "flags": flags,
        "settings": [(k, notes.get(k)) for k in ("package", "version", "norm", "eps", "n_examples", "attacks",
                                                 "seed", "resumed") if k in notes],
        "resumed": bool(notes.get("resumed")),
    }


def _sanity(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The run's sanity flags, the checks each robustness evaluator ran, PGD vs AutoAttack on
    the same examples and the torchattacks zoo's per-attack accuracies."""
    m = rec.get("metrics") or {}
    notes = rec.get("notes") or {}
    flags = [{"name": f.get("name"), "evaluators": ", ".join(f.get("evaluators") or []),
              "message": f.get("message") or ""} for f in (rec.get("flags") or []) if isinstance(f, Mapping)]
    ran = []
    for ev in ("robust.pgd", "robust.autoattack", "robust.attacks"):
        s = (notes.get(ev) or {}).get("sanity") if isinstance(notes.get(ev), Mapping) else None
        if not isinstance(s, Mapping):
            continue
        model = s.get("model") if "model" in s else (s if ev == "robust.pgd" else None)
        names = []
        if isinstance(model, Mapping):
            names += ["randomized_forward"] * ("randomness" in model) + ["vanishing_gradients"] * (
                "gradients" in model) + ["eps_sweep"] * ("eps_sweep" in model)
        names += [k for k in ("pgd_autoattack_gap", "gradient_free_beats_whitebox") if k in s]
        if names:
            ran.append((ev, ", ".join(names)))
    zoo = [(k[len("robust.attacks."):-len(".accuracy")], fmt_rate(v, percent=True)[0])
           for k, v in m.items() if k.startswith("robust.attacks.") and k.endswith(".accuracy")]
    same = [(label, fmt_rate(m.get(key), percent=True)[0]) for key, label in (
        ("robust.pgd.accuracy", f"PGD, all {m.get('robust.pgd.n', '')} examples"),
        ("robust.autoattack.sanity.pgd_accuracy", "PGD on AutoAttack's examples"),
        ("robust.autoattack.accuracy", "AutoAttack"),
        ("robust.autoattack.sanity.pgd_gap", "gap PGD - AutoAttack (paired)")) if key in m]
    return {"flags": flags, "ran": ran, "zoo": zoo, "same": same}


def _predict(run_dir: Path, arrays: Sequence[Any]) -> list[list[int]] | None:
    """Predicted labels of the run's saved model on each array, or None if unavailable."""
    if not (run_dir / MODEL).exists():
        return None
    try:
        import torch

        from ..store.models import load_model

        model = load_model(run_dir)
        with torch.no_grad():
            return [model(torch.from_numpy(a).float()).argmax(1).tolist() for a in arrays]
    except Exception:  # noqa: BLE001 - predictions are a nicety of the report
        return None


def _examples(rec: Mapping[str, Any], run_dir: Path, *, with_predictions: bool = True) -> list[dict[str, Any]]:
    import numpy as np

    ex = load_examples(run_dir)
    if not ex:
        return []
    threat = (rec.get("config") or {}).get("threat") or {}
    eps = num(threat.get("eps"))
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
        if norm == "Linf" and isfinite(eps) and eps > 0 and not counterfactual:
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
    pts = []
    for _, r in lb.rows.iterrows():
        def err(c):
            if r[f"{c}_std"] == r[f"{c}_std"] and r["seeds"] > 1:   # not NaN: seeds' spread
                return (r[f"{c}_mean"] - r[f"{c}_std"], r[f"{c}_mean"] + r[f"{c}_std"])
            if isfinite(r[f"{c}_ci_low"]) and isfinite(r[f"{c}_ci_high"]):
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
            # a row with sanity flags is drawn marked and kept off the plane's front (unless --include-flagged)
            "flagged": bool(str(r.get("flags") or "")), "off_front": bool(str(r.get("flags") or ""))
            and not getattr(lb, "include_flagged", False),
        })
    robust = lb.robust_label.replace(" (no AutoAttack)", "")
    out = {"figures": [], "missing": []}

    def plotted(x: str, y: str) -> bool:
        return any(isfinite(p[x]) and isfinite(p[y]) for p in pts)

    if not plotted("clean", "robust"):
        out["missing"].append("No robust accuracy in this protocol: the robustness plots are omitted.")
        if lb.leakage and plotted("clean", "leakage"):
            leak_label = {"ptpr01": "primary MIA TPR @ 0.1% FPR, pooled (%)", "ptpr1": "primary MIA TPR @ 1% FPR, pooled (%)",
                          "tpr": "strongest MIA TPR @ 0.1% FPR (%)", "auc": "strongest MIA AUC"}[lb.leakage]
            out["figures"].append({
                "img": plots.tradeoff_figure(pts, x="clean", y="leakage", xlabel="clean accuracy (%)",
                                             ylabel=leak_label, maximize_y=False, percent_y=lb.leakage != "auc",
                                             title="membership leakage vs accuracy"),
                "caption": f"{leak_label} against clean accuracy; lower leakage and higher accuracy are better."})
        out["errors_caption"] = ("Error bars: ± one standard deviation over seeds where a row has several seeds, "
                                 "otherwise the run's 95% interval.")
        return out
    out["figures"].append({
        "img": plots.tradeoff_figure(pts, x="clean", y="robust", xlabel="clean accuracy (%)",
                                     ylabel=f"{robust} (%)", title="robustness vs accuracy"),
        "caption": f"{robust} against clean accuracy; both higher is better. Dashed: the Pareto front of this "
                   "plane. Circles with a black edge: rank 1 of the three-way Pareto ranking. Crosses (⚑): rows with "
                   "robustness sanity flags, left out of the fronts unless the table includes them."})
    if lb.leakage and plotted("robust", "leakage"):
        leak_label = {"ptpr01": "primary MIA TPR @ 0.1% FPR, pooled (%)", "ptpr1": "primary MIA TPR @ 1% FPR, pooled (%)",
                          "tpr": "strongest MIA TPR @ 0.1% FPR (%)", "auc": "strongest MIA AUC"}[lb.leakage]
        out["figures"].append({
            "img": plots.tradeoff_figure(pts, x="robust", y="leakage", xlabel=f"{robust} (%)", ylabel=leak_label,
                                         maximize_y=False, percent_y=lb.leakage != "auc",
                                         title="membership leakage vs robustness"),
            "caption": f"{leak_label} against {robust}; lower leakage and higher robustness are better. "
                       "DP runs are marked with their ε."})
    elif not lb.leakage:
        out["missing"].append("No membership-inference results in this protocol: the leakage plot is omitted.")
    for p in pts:
        if not (isfinite(p["clean"]) and isfinite(p["robust"])):
            out["missing"].append(f"{p['label']}: not plotted (clean or robust accuracy n/a).")
    out["errors_caption"] = ("Error bars: ± one standard deviation over seeds where a row has several seeds, "
                             "otherwise the run's 95% interval.")
    return out


def _table(lb, highlight_run: str | None = None) -> dict[str, Any]:
    header, body = display_rows(lb)
    me = [bool(highlight_run and highlight_run in str(r).split()) for r in lb.rows["run_ids"]]
    return {"header": header, "rows": list(zip(body, me)), "notes": notes(lb), "excluded": excluded_lines(lb)}


def run_report(run_dir: str | Path, *, runs: str | Path | None = None, command: str | None = None,
               with_predictions: bool = True) -> str:
    """The HTML text of one run's report."""
    run_dir = Path(run_dir)
    try:
        rec = read_record(run_dir)
    except FileNotFoundError:
        raise UsageError(f"{str(run_dir)!r} has no record.json: is it a cfbench run directory?") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{run_dir / RECORD} is not valid JSON: {e}") from None
    if not isinstance(rec, Mapping):
        raise UsageError(f"{run_dir / RECORD} is not a cfbench record (a JSON {type(rec).__name__}, "
                         "not an object)")
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
        "sanity": _sanity(rec),
        "timings": [(k, f"{v:.2f} s" if isfinite(v) else fmt_plain(v)) for k, v in (rec.get("timings") or {}).items()],
        "metrics": [(k, fmt_plain(v)) for k, v in sorted((rec.get("metrics") or {}).items())],
        "defense_notes": [(k, fmt_plain(v)) for k, v in ((rec.get("notes") or {}).get("defense") or {}).items()],
        "tradeoff": tradeoff_plots(lb, highlight_run=rec.get("run_id")) if lb is not None else None,
        "table": _table(lb, rec.get("run_id")) if lb is not None else None,
        "context_runs": len(lb.records) if lb is not None else 0,
    }
    return render_template("run_report.html", **ctx)


def _roc_overlay(lb, runs_dir: Path) -> str | None:
    """ROC of each row's strongest attack (its first run), when the records are at hand."""
    curves: dict[str, tuple[list, list]] = {}
    n_out = None
    for _, r in lb.rows.iterrows():
        for run in lb.records[lb.records["run_id"].isin(str(r["run_ids"]).split())].itertuples():
            path = runs_dir / str(run.path) if run.path else None
            if path is None or not (path / RECORD).exists():
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
    path = Path(name)
    if path.suffix != ".json" or not path.exists():
        path = Path(leaderboards) / f"{name}.json"
    if not path.exists():
        avail = sorted(p.stem for p in Path(leaderboards).glob("*.json")) if Path(leaderboards).is_dir() else []
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
def report_after_run(run_dir: str | Path) -> Path | None:
    """For ``cfbench run``: write ``<run_dir>/report.html`` and print its path; a failure
    only warns (a report must never fail a run)."""
    run_dir = Path(run_dir)
    try:
        path = write_html(run_report(run_dir), run_dir / REPORT)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not write the run's report: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    print(f"report   {path}")
    return path

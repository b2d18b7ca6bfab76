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
    INTERVAL_TEXT,
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
    flags = _flags_by_evaluator(rec)
    aa_notes = (rec.get("notes") or {}).get("robust.autoattack") or {}
    if "robust.autoattack.accuracy" in m:
        n = m.get("robust.autoattack.n")
        marks = flags.get("autoattack", []) + [f for f in flags.get("*", [])]
        card("AutoAttack accuracy", m.get("robust.autoattack.accuracy"),
             sub=" ".join(x for x in (f"n = {n}" if n else "",
                                      ("⚑ " + ", ".join(marks)) if marks else "",
                                      (f"⚑ {len(aa_notes.get('flags'))} AutoAttack warning"
                                       f"{'s' if len(aa_notes.get('flags')) != 1 else ''}")
                                      if aa_notes.get("flags") and not marks else "") if x))
        cards[-1]["flagged"] = bool(marks or aa_notes.get("flags"))
    if "robust.pgd.accuracy" in m:
        marks = flags.get("pgd", []) + flags.get("*", [])
        card("PGD accuracy", m.get("robust.pgd.accuracy"), sub=("⚑ " + ", ".join(marks)) if marks else "")
        cards[-1]["flagged"] = bool(marks)
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


def _flags_by_evaluator(rec: Mapping[str, Any]) -> dict[str, list[str]]:
    """Sanity-flag names per evaluator that raised them (``"*"``: flags of other robustness
    evaluators, e.g. the attack zoo, which question every robust number)."""
    out: dict[str, list[str]] = {}
    for f in rec.get("flags") or []:
        if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
            continue
        evs = [str(e).removeprefix("robust.") for e in (f.get("evaluators") or [])]
        hit = [e for e in evs if e in ("autoattack", "pgd")] or ["*"]
        for e in hit:
            if f["name"] not in out.setdefault(e, []):
                out[e].append(f["name"])
    return out


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
    primary, why = primary_attack(rec)
    plot = plots.roc_plot(curves, n_nonmembers=n_out if isinstance(n_out, int) and n_out > 0 else None,
                          primary=primary) if curves else None
    merged = [names for names in plot["groups"].values() if len(names) > 1] if plot else []
    roc_caption = None
    if plot:
        roc_caption = ("ROC of each membership attack on log-log axes; the dotted line is chance. "
                       + (f"Thick black: the primary attack, {primary} ({why}). " if plot["primary"] else "")
                       + (f"Identical curves are drawn once, their names joined by '=' ({len(merged)} such "
                          "group" + ("s" if len(merged) != 1 else "") + "). " if merged else "")
                       + plots.guides_text(plot["guides"])
                       + f" The x axis starts at {plot['lo']:.2g}"
                       + (" = 1 / (number of non-members): below it the data say nothing." if n_out else "."))
    for r in rows:
        r["primary"] = r["attack"] == primary
    return {"rows": rows, "best": best, "roc": plot["img"] if plot else None, "roc_caption": roc_caption,
            "protocol": _flat(proto), "primary": primary, "primary_why": why,
            "fpr_labels": [f"TPR @ {num(f) * 100:g}% FPR %" for f in fprs],
            "has_formulas": any(r["formula"] for r in rows)}


def primary_attack(rec: Mapping[str, Any]) -> tuple[str | None, str]:
    """The attack a report puts first, and why: the protocol's primary attack (mia evaluator
    version 2: ``notes.mia.protocol.primary`` or ``mia.primary.*.attack``), else -- older
    records -- the strongest by AUC (said so: a selection-biased choice)."""
    notes = (rec.get("notes") or {}).get("mia") or {}
    m = rec.get("metrics") or {}
    p = (notes.get("protocol") or {}).get("primary")
    if not isinstance(p, str):
        p = next((v.get("attack") for k, v in m.items() if k.startswith("mia.primary.") and isinstance(v, Mapping)
                  and isinstance(v.get("attack"), str)), None)
    if isinstance(p, str):
        return p, "the protocol's primary attack, fixed in advance"
    best = strongest(m, "auc")["attack"]
    if best:
        return best, "no primary attack in this record: the strongest by AUC, a selection-biased choice"
    return None, "no membership attack"


def _scores(run_dir: Path) -> dict[str, Any] | None:
    import numpy as np

    path = run_dir / "mia_scores.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - a damaged scores file only loses these figures
        return None


_DATA_CACHE: dict[tuple[str, str | None], Any] = {}


def _train_images(rec: Mapping[str, Any]):
    """The dataset's training images (N, C, H, W) in [0, 1], or None when it cannot be loaded
    here (not downloaded, unknown plugin dataset); loaded once per process."""
    cfg = rec.get("config") or {}
    name = (cfg.get("dataset") or {}).get("name")
    key = (str(name), cfg.get("data_dir"))
    if key not in _DATA_CACHE:
        try:
            from ..registry import get

            _DATA_CACHE[key] = get("dataset", name)().load(cfg.get("data_dir"), download=False).x_train
        except Exception:  # noqa: BLE001 - images are a nicety of the report
            _DATA_CACHE[key] = None
    return _DATA_CACHE[key]


def _membership_scores(rec: Mapping[str, Any], run_dir: Path, attack: str | None, why: str,
                       k: int = 8) -> dict[str, Any] | None:
    """Member vs non-member histograms of ``attack``'s scores, and the ``k`` members it scores
    highest (the most vulnerable examples, as ML Privacy Meter shows them), from
    ``<run>/mia_scores.npz``."""
    import numpy as np

    z = _scores(run_dir)
    if z is None or attack is None or f"score.{attack}" not in z or "member" not in z:
        return None
    score = np.asarray(z[f"score.{attack}"], dtype=float)
    member = np.asarray(z["member"], dtype=bool)
    if score.shape != member.shape:
        return None
    for key in ("pool_idx", "label"):   # per-example fields that do not line up are not used
        if key in z and np.shape(z[key]) != member.shape:
            z.pop(key)
    hist = plots.score_histogram(score[member], score[~member], attack=attack)
    neg = np.sort(score[~member & np.isfinite(score)])
    order = [i for i in np.argsort(-np.where(np.isfinite(score), score, -np.inf)) if member[i]
             and np.isfinite(score[i])][:k]
    top = []
    for rank, i in enumerate(order, start=1):
        above = int(len(neg) - np.searchsorted(neg, score[i], side="left"))   # non-members scoring >= it
        fpr = above / len(neg) if len(neg) else math.nan
        top.append({"rank": rank, "pool": int(i), "index": int(z["pool_idx"][i]) if "pool_idx" in z else None,
                    "label": int(z["label"][i]) if "label" in z else None, "score": f"{score[i]:.4g}",
                    "fpr": f"{fpr:.3g}" if fpr == fpr else "n/a", "fpr_count": f"{above}/{len(neg)}"})
    img, missing = None, None
    x = _train_images(rec) if "pool_idx" in z else None
    if x is not None and top:
        try:
            if max(t["index"] for t in top) >= len(x):
                raise IndexError(f"pool index {max(t['index'] for t in top)} beyond the {len(x)} training images")
            imgs = np.stack([x[t["index"]] for t in top]).astype(np.float32)
            img = plots.examples_figure([("most vulnerable members", imgs,
                                          [f"#{t['rank']} y={t['label']}" for t in top])])
        except Exception as e:  # noqa: BLE001
            missing = f"images not shown ({type(e).__name__}: {e})"
    elif top:
        missing = "images not shown: the dataset could not be loaded on this machine (the table lists them)"
    n_m, n_n = int(member.sum()), int((~member).sum())
    return {"attack": attack, "why": why, "hist": hist, "top": top, "img": img, "missing": missing,
            "caption": (f"Scores of {attack} ({why}) on the {n_m} members and {n_n} non-members of the pool "
                        "(densities on shared bins; the range is the 0.5-99.5 percentile of all scores, the rest "
                        "counted in the end bins)."),
            "top_caption": (f"The {len(top)} members {attack} scores highest: the training examples whose "
                            "membership leaks most. FPR: the fraction of non-members scoring at least as high "
                            "(the false-positive rate of a threshold at that score); y: the label; index: the "
                            "example's index in the dataset's training split.")}


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
        inversion = prefix.startswith("inversion-")
        name = "counterfactual" if counterfactual else "reconstruction" if inversion else "adversarial"

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
        if norm == "Linf" and isfinite(eps) and eps > 0 and not counterfactual and not inversion:
            scaled = delta / eps
            how = f"perturbation / eps (eps = {eps:.4g}; red = brighter, blue = darker)"
        else:
            per = np.abs(delta).reshape(n, -1).max(1).reshape((n,) + (1,) * (delta.ndim - 1))
            scaled = delta / np.maximum(per, 1e-12)
            how = "difference, scaled per image to its largest absolute value (red = brighter, blue = darker)"
        img = plots.examples_figure([("member" if inversion else "clean", clean, caps(preds[0] if preds else None)),
                                     (name, changed, caps(preds[1] if preds else None)),
                                     ("difference", np.clip(scaled, -1, 1), None)], diverging=[2])
        linf = float(np.abs(delta).reshape(n, -1).max()) if n else math.nan
        if inversion:
            caption = (f"{prefix}: the first {n} members (the target's own training images), what the "
                       f"{prefix[len('inversion-'):]} inversion network rebuilt from the target's outputs for them "
                       f"(prediction, and explanation where the network takes one), and their difference ({how}). "
                       "Captions: true label y and the saved model's prediction (→, red when wrong)"
                       + ("" if preds else " (model not available: labels only)")
                       + f". Largest |change| over pixels: {linf:.4g}.")
            out.append({"title": f"{prefix} (members and their reconstructions)", "img": img, "caption": caption})
            continue
        caption = (f"{prefix}: the first {n} test images, the {name} images the {prefix} evaluation produced, "
                   f"and their difference ({how}). "
                   + ("Captions: the counterfactual's target class t and the saved model's prediction (→, red "
                      "when it is not t: the originals are red by construction, a counterfactual is red when it "
                      "failed)" if counterfactual else
                      "Captions: true label y and the saved model's prediction (→, red when wrong)")
                   + ("" if preds else " (model not available: labels only)")
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
        def err(c):   # the table's 95% interval (INTERVAL_TEXT): the run's, or t over seeds
            if f"{c}_ci_low" in r and isfinite(r[f"{c}_ci_low"]) and isfinite(r[f"{c}_ci_high"]):
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
        out["errors_caption"] = "Points are numbered; the key beside each plot names them. " + INTERVAL_TEXT
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
    out["errors_caption"] = "Points are numbered; the key beside each plot names them. " + INTERVAL_TEXT
    return out


def _table(lb, highlight_run: str | None = None, links: list | None = None) -> dict[str, Any]:
    header, body = display_rows(lb)
    me = [bool(highlight_run and highlight_run in str(r).split()) for r in lb.rows["run_ids"]]
    links = links if links is not None else [[] for _ in body]
    return {"header": header, "rows": list(zip(body, me, links)), "notes": notes(lb), "excluded": excluded_lines(lb),
            "links": any(links)}


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
    mia = _mia(rec)
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
        "mia": mia,
        "scores": _membership_scores(rec, run_dir, mia["primary"], mia["primary_why"]) if mia else None,
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


def _run_path(lb, path: Any) -> Path | None:
    """A record's folder from the path a leaderboard stored (relative to its runs folder)."""
    if not isinstance(path, str) or not path:
        return None
    p = Path(path)
    for cand in ((p,) if p.is_absolute() else (Path(lb.runs) / p, p)):
        if (cand / RECORD).exists():
            return cand
    return None


def _roc_overlay(lb) -> dict[str, Any] | None:
    """ROC of each row's primary attack (its first run; older records: the strongest by AUC),
    when the records are at hand."""
    curves: dict[str, tuple[list, list]] = {}
    n_out = None
    whys = set()
    for _, r in lb.rows.iterrows():
        for run in lb.records[lb.records["run_id"].isin(str(r["run_ids"]).split())].itertuples():
            path = _run_path(lb, run.path)
            if path is None:
                continue
            rec = read_record(path)
            attack, why = primary_attack(rec)
            mia = (rec.get("notes") or {}).get("mia") or {}
            c = (mia.get("roc") or {}).get(attack) if attack else None
            if c:
                whys.add("primary" if "primary" in why and "no primary" not in why else "strongest by AUC")
                curves[f"{r['label']} ({attack}, seed {rec['config'].get('seed')})"] = (c["fpr"], c["tpr"])
                proto = mia.get("protocol") or {}
                n_out = n_out or proto.get("n_nonmembers") or proto.get("nonmembers")
            break
    if not curves:
        return None
    plot = plots.roc_plot(curves, n_nonmembers=n_out if isinstance(n_out, int) else None,
                          title="ROC of each defense's primary attack" if whys == {"primary"}
                          else "ROC of each defense's membership attack")
    merged = [names for names in plot["groups"].values() if len(names) > 1]
    which = ("the protocol's primary attack" if whys == {"primary"} else
             "the primary attack where the record names one, otherwise the strongest by AUC (selection-biased)")
    plot["caption"] = (f"For each defense, the ROC (log-log) of {which} in its first run. Dotted: chance. "
                       + ("Identical curves are drawn once, their names joined by '='. " if merged else "")
                       + plots.guides_text(plot["guides"]))
    return plot


def resolve_leaderboard(name: str, leaderboards: str | Path = "leaderboards") -> Path:
    """The ``.json`` of leaderboard ``name``: a path to it, a file stem in ``leaderboards``, or
    a name without its protocol hash (``digits-cnn8-Linf-0.1``) when exactly one table there
    has it (several: a :class:`UsageError` listing them)."""
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return path
    d = Path(leaderboards)
    cand = d / f"{name}.json"
    if cand.exists():
        return cand
    avail = sorted(p.name[: -len(".json")] for p in d.glob("*.json")) if d.is_dir() else []
    import re

    pat = re.compile(re.escape(name) + r"-[0-9a-f]{8}(-only-.+)?$")
    hits = [a for a in avail if pat.match(a)]
    plain_hits = [a for a in hits if "-only-" not in a[len(name):]]
    if len(plain_hits) == 1:
        return d / f"{plain_hits[0]}.json"
    if len(hits) == 1:
        return d / f"{hits[0]}.json"
    if hits:
        raise UsageError(f"leaderboard name {name!r} is ambiguous in {str(leaderboards)!r}: "
                         + ", ".join(hits) + " (one per protocol); give the full name.")
    raise UsageError(f"no leaderboard {name!r} in {str(leaderboards)!r} (build it with `cfbench leaderboard`)."
                     + suggest(name, avail))


def staleness(obj: Mapping[str, Any]) -> tuple[str, str]:
    """Whether a leaderboard's JSON still matches the runs it was built from: ``("current" |
    "stale" | "unknown", why)``.  The table is rebuilt in memory from its runs folder with its
    filters and compared by :func:`.leaderboard.source_digest`."""
    from .leaderboard import build

    src = obj.get("source") or {}
    runs = src.get("runs") or obj.get("runs")
    digest = src.get("digest")
    cmd = obj.get("command") or "cfbench leaderboard"
    if not digest:
        return "unknown", (f"it was written by an older cfbench and records no digest of its runs: it may be "
                           f"stale; rebuild it with `{cmd}`")
    if not runs or not Path(runs).is_dir():
        return "unknown", (f"its runs folder {runs!r} is not here (relative to {Path.cwd()}), so it cannot be "
                           "checked against its runs")
    filt = obj.get("filters") or {}
    try:
        boards = build(runs, (obj.get("protocol") or {}).get("dataset", {}).get("name"),
                       runs_label=runs, include_flagged=bool(obj.get("include_flagged")),
                       defenses=filt.get("defenses") or None)
    except UsageError as e:
        return "stale", f"its runs no longer give a table ({e}); rebuild with `{cmd}`"
    mine = [b for b in boards if b.protocol_id == obj.get("protocol_id")]
    if not mine:
        return "stale", (f"no finished run of its protocol is left in {runs}; rebuild with `{cmd}` "
                         "(which removes it)")
    if mine[0].source_digest != digest:
        n_now, n_then = len(mine[0].records), len(obj.get("records") or [])
        return "stale", (f"the runs in {runs} changed since it was built ({n_then} runs then, {n_now} of its "
                         f"protocol now); rebuild with `{cmd}`")
    return "current", f"matches the {len(mine[0].records)} runs of its protocol in {runs}"


def leaderboard_report(name: str, *, leaderboards: str | Path = "leaderboards", command: str | None = None,
                       strict: bool = False, warn=None, out_dir: str | Path | None = None) -> str:
    """The HTML text of a leaderboard's report, from its ``.json`` (:func:`resolve_leaderboard`).

    A table whose runs changed since it was built (:func:`staleness`) is rendered with a banner
    saying so (and ``warn(message)`` is called), or refused with ``strict``.  ``out_dir``: where
    the page will be, for the relative links to the run reports (default ``reports/``)."""
    path = resolve_leaderboard(name, leaderboards)
    obj = json.loads(path.read_text(encoding="utf-8"))
    lb = Leaderboard.from_json(obj)
    state, why = staleness(obj)
    if state == "stale" and strict:
        raise UsageError(f"leaderboard {lb.name} is stale: {why}.")
    if state != "current" and warn is not None:
        warn(f"leaderboard {lb.name} {'is stale' if state == 'stale' else 'could not be checked'}: {why}")
    defaults = "" if Path(leaderboards) == Path("leaderboards") else f" --leaderboards {shlex.quote(str(leaderboards))}"
    from .writers import run_hrefs, run_links

    links = run_links(lb, out_dir if out_dir is not None else "reports")
    hrefs = run_hrefs(lb, out_dir if out_dir is not None else "reports")
    ctx = {
        "lb": lb,
        "stale": {"state": state, "why": why},
        "command": command or f"cfbench report --leaderboard {shlex.quote(lb.name)}{defaults}",
        "protocol": describe_protocol(lb.protocol),
        "table": _table(lb, links=links),
        "tradeoff": tradeoff_plots(lb),
        "roc": _roc_overlay(lb),
        "descriptions": list(zip(lb.rows["label"], lb.rows["family"], lb.rows["description"])),
        "per_run": [dict(r, href=hrefs.get(str(r.get("run_id")))) for r in obj.get("records") or []],
        "cards": [
            {"label": "defenses", "value": str(len(lb.rows)), "sub": f"{len(lb.records)} runs"},
            {"label": "best clean accuracy", **_best(lb, "clean", True)},
            {"label": f"best {lb.robust_label.replace(' (no AutoAttack)', '')}", **_best(lb, "robust", True)},
            {"label": f"lowest {lb.leakage_label}", **_best(lb, lb.leakage, False)} if lb.leakage else
            {"label": "membership leakage", "value": "n/a", "sub": "not evaluated"},
        ],
    }
    return render_template("leaderboard_report.html", **ctx)


def write_run_reports(boards: Sequence[Leaderboard], log=print) -> list[Path]:
    """(Re)write ``<run-dir>/report.html`` of every run in ``boards`` (the tables link to
    them; each report's trade-off context is then the same runs folder as the table's).  A
    report that cannot be written only warns."""
    done: list[Path] = []
    seen = set()
    for lb in boards:
        for _, r in lb.records.iterrows():
            d = _run_path(lb, r["path"]) or (Path(r["path"]) if isinstance(r["path"], str) else None)
            if d is None or str(d) in seen or not (d / RECORD).exists():
                continue
            seen.add(str(d))
            try:
                done.append(write_html(run_report(d), d / REPORT))
            except Exception as e:  # noqa: BLE001
                print(f"warning: could not write {d / REPORT}: {type(e).__name__}: {e}", file=sys.stderr)
    if done:
        log(f"wrote {len(done)} run report{'s' if len(done) != 1 else ''} (<run-dir>/{REPORT})")
    return done


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

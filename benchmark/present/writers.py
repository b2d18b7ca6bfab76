"""A leaderboard's files: ``<out>/<name>.{md,csv,json,html}``, each headed by the protocol
and the command that rebuilds it, and the human-readable table rows they share.

CSV holds fractions (not percent) and ``#`` comment lines (read it with
``pandas.read_csv(path, comment="#")``); JSON holds every number with its interval and is
what :meth:`.leaderboard.Leaderboard.from_json` and ``cfbench report --leaderboard`` read.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..hashing import canonical_json
from ..store.io import clean
from ..store import atomic_write_text
from .format import fmt_epsilon, fmt_metric, fmt_seconds
from .html import render_template, write_html
from .leaderboard import CSV_NAMES, LEAKAGE_FPR, Leaderboard, describe_protocol

FORMATS = ("md", "csv", "json", "html")
CSV_COLUMNS = [
    "pareto_rank", "label", "defense", "defense_version", "family", "params", "train", "seeds", "seed_list",
    "n_records", "flags",
    "clean_mean", "clean_std", "clean_ci_low", "clean_ci_high",
    "robust_mean", "robust_std", "robust_ci_low", "robust_ci_high",
    "auc_mean", "auc_std", "auc_ci_low", "auc_ci_high", "auc_attack",
    "tpr_mean", "tpr_std", "tpr_ci_low", "tpr_ci_high", "tpr_attack",
    "ptpr1_mean", "ptpr1_std", "ptpr1_ci_low", "ptpr1_ci_high", "ptpr1_attack",
    "ptpr01_mean", "ptpr01_std", "ptpr01_ci_low", "ptpr01_ci_high", "ptpr01_attack",
    "epsilon_mean", "epsilon_std", "eps_lb_mean", "eps_lb_std", "train_s_mean", "train_s_std", "eval_s_mean", "eval_s_std", "run_ids",
]


# ----------------------------------------------------------------------- shared table text
def display_rows(lb: Leaderboard) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the human-readable table (strings, not escaped)."""
    import pandas as pd

    tpr_digits = 2
    header = ["rank", "defense", "family", "clean acc. %", f"{lb.robust_label.replace('acc.', 'acc. %')}",
              "MIA AUC (strongest)", "MIA TPR @ 0.1% FPR % (strongest)",
              "primary MIA TPR @ 1% FPR % (pooled)", "primary MIA TPR @ 0.1% FPR % (pooled)", "DP ε",
              "audit ε lower bound", "train", "eval", "seeds", "sanity flags"]
    body = []
    for _, r in lb.rows.iterrows():
        rank = r["pareto_rank"]
        auc = fmt_metric(r["auc_mean"], r["auc_std"], r["auc_ci_low"], r["auc_ci_high"], percent=False)
        if r["auc_attack"]:
            auc += f" ({r['auc_attack']})"
        tpr = fmt_metric(r["tpr_mean"], r["tpr_std"], r["tpr_ci_low"], r["tpr_ci_high"], percent=True,
                         digits=tpr_digits)
        if r["tpr_attack"]:
            tpr += f" ({r['tpr_attack']})"
        primary = [fmt_metric(r[f"{c}_mean"], r[f"{c}_std"], r[f"{c}_ci_low"], r[f"{c}_ci_high"], percent=True,
                              digits=tpr_digits) for c in ("ptpr1", "ptpr01")]
        flags = str(r.get("flags") or "")
        body.append([
            ("flagged" if flags else "n/a") if pd.isna(rank) else str(int(rank)),
            ("⚑ " if flags else "") + str(r["label"]), r["family"],
            fmt_metric(r["clean_mean"], r["clean_std"], r["clean_ci_low"], r["clean_ci_high"], percent=True),
            fmt_metric(r["robust_mean"], r["robust_std"], r["robust_ci_low"], r["robust_ci_high"], percent=True),
            auc, tpr, *primary,
            fmt_epsilon(r["epsilon_mean"], r["epsilon_std"]),
            "n/a" if pd.isna(r["eps_lb_mean"]) else fmt_epsilon(r["eps_lb_mean"], r["eps_lb_std"]),
            fmt_seconds(r["train_s_mean"]), fmt_seconds(r["eval_s_mean"]),
            str(r["seeds"]),
            ("⚑ " + flags) if flags else "none",
        ])
    return header, body


def notes(lb: Leaderboard) -> list[str]:
    n_rec = len(lb.records)
    unusable = lb.unusable
    failed = len(lb.excluded) - len(unusable)
    out = [
        lb.pareto_text(),
        "Numbers are means over training seeds, ± the sample standard deviation (no ± with one seed); "
        "brackets are 95% intervals (Clopper-Pearson for rates, the record's own interval for AUC): a single "
        "run's interval, or with several seeds the smallest lower and largest upper bound over the seeds.",
        "MIA: the strongest of the evaluated membership attacks per run (named in parentheses; the maximum over "
        "attacks is selection-biased, an optimistic estimate), and the protocol's primary attack (fixed in "
        "advance) pooled over the target and its reference models. n/a: not evaluated, or the sample cannot "
        "support the rate (a TPR at FPR f needs at least 10 / f non-member trials). Audit ε: the epsilon lower "
        "bound the primary attack proves (Clopper-Pearson, the run's δ), beside the accountant's DP ε.",
        "Cost: training and evaluation wall-clock seconds per run (mean over seeds).",
        f"Built from {n_rec} finished run{'s' if n_rec != 1 else ''}."
        + (f" Excluded (failed or unfinished, never tabulated): {failed}." if failed else "")
        + (f" Record files left out (unreadable or not a valid record; listed below): {len(unusable)}."
           if unusable else ""),
    ]
    return out


def excluded_lines(lb: Leaderboard) -> list[str]:
    """One line per excluded run or unusable file (plain text, not escaped)."""
    return [f"excluded {e.get('run_id') or e.get('path')}: {e.get('status')}"
            + (f" ({e['reason']})" if e.get("reason") else "") for e in lb.excluded]


# ---------------------------------------------------------------------------- Markdown
def _md_cell(text: Any) -> str:
    s = str(text)
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            .replace("\n", " "))


def to_markdown(lb: Leaderboard) -> str:
    header, body = display_rows(lb)
    lines = [f"# Leaderboard: {_md_cell(lb.name)}", "",
             f"Rebuild with: `{lb.command}`", "",
             f"Protocol `{lb.protocol_id[:12]}`:", ""]
    lines += [f"- **{_md_cell(k)}**: {_md_cell(v)}" for k, v in describe_protocol(lb.protocol)]
    lines += ["", "| " + " | ".join(_md_cell(h) for h in header) + " |",
              "|" + "|".join("---:" if i not in (1, 2) else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    lines += [""] + [f"- {_md_cell(n)}" for n in notes(lb)]
    lines += [f"  - {_md_cell(line)}" for line in excluded_lines(lb)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- CSV
def _csv_name(col: str) -> str:
    for short, long in CSV_NAMES.items():
        if col.startswith(short + "_") and col[len(short) + 1:] in (
                "mean", "std", "ci_low", "ci_high", "attack"):
            return f"{long}_{col[len(short) + 1:]}"
    return col


def to_csv(lb: Leaderboard) -> str:
    """CSV (fractions, not percent), headed by ``#`` comment lines: read with
    ``pandas.read_csv(path, comment="#")``."""
    head = [f"# leaderboard {lb.name}", f"# rebuild: {lb.command}",
            f"# protocol {lb.protocol_id}: {canonical_json(lb.protocol)}", f"# {lb.pareto_text()}",
            f"# robust accuracy: {lb.robust_source or 'not evaluated'}; "
            f"leakage for the Pareto rank: {lb.leakage_label}"]
    df = lb.rows[CSV_COLUMNS].rename(columns=_csv_name)
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return "\n".join(head) + "\n" + buf.getvalue()


# -------------------------------------------------------------------------------- JSON
def _json_num(v: Any) -> Any:
    """A table cell as JSON: pandas' NA is None, the rest as the store writes numbers."""
    try:
        import pandas as pd
        if v is pd.NA:
            return None
    except ImportError:  # pragma: no cover
        pass
    return clean(v)


def _json_rank(v: Any) -> int | None:
    """A Pareto rank as a JSON integer (None: unranked -- no axis, or a flagged row)."""
    v = _json_num(v)
    return None if v is None else int(v)


def _rel(path: Any, runs: str) -> str | None:
    if not isinstance(path, str):
        return None
    try:
        return str(Path(path).resolve().relative_to(Path(runs).resolve()))
    except ValueError:
        return path


def to_json_obj(lb: Leaderboard) -> dict[str, Any]:
    from .. import __version__

    rows = []
    for _, r in lb.rows.iterrows():
        row = {
            "pareto_rank": _json_rank(r["pareto_rank"]), "label": r["label"], "defense": r["defense"],
            "flags": [f for f in str(r.get("flags") or "").split(", ") if f],
            "defense_version": _json_num(r["defense_version"]), "family": r["family"],
            "description": r["description"],
            "params": json.loads(r["params"]), "train": json.loads(r["train"]),
            "seeds": int(r["seeds"]), "n_records": int(r["n_records"]),
            "seed_list": [int(s) for s in str(r["seed_list"]).split()],
            "run_ids": str(r["run_ids"]).split(),
        }
        for c in ("clean", "robust", "auc", "tpr", "epsilon", "train_s", "eval_s", "ptpr1", "ptpr01", "eps_lb"):
            entry = {"mean": _json_num(r[f"{c}_mean"]), "std": _json_num(r[f"{c}_std"]), "n": int(r[f"{c}_n"])}
            if f"{c}_ci_low" in r:
                entry["ci_low"] = _json_num(r[f"{c}_ci_low"])
                entry["ci_high"] = _json_num(r[f"{c}_ci_high"])
            if f"{c}_attack" in r:
                entry["attacks"] = [a for a in str(r[f"{c}_attack"]).split(", ") if a]
            row[CSV_NAMES[c]] = entry
        rows.append(row)
    per_run = []
    for _, r in lb.records.iterrows():
        per_run.append({k: _json_num(r[k]) for k in ("run_id", "seed", "defense", "clean", "robust", "auc",
                                                      "auc_attack", "tpr", "tpr_attack", "epsilon",
                                                      "train_s", "eval_s", "ptpr1", "ptpr01", "eps_lb")
                                                      if k in r}
                       | {"flags": [f for f in str(r.get("flags") or "").split(", ") if f]}
                       | {"path": _rel(r["path"], lb.runs)})
    return {
        "name": lb.name, "command": lb.command, "protocol_id": lb.protocol_id, "protocol": lb.protocol,
        "include_flagged": lb.include_flagged,
        "protocol_description": [{"label": k, "value": v} for k, v in describe_protocol(lb.protocol)],
        "robust_source": lb.robust_source, "leakage": lb.leakage, "leakage_label": lb.leakage_label,
        "leakage_fpr": float(LEAKAGE_FPR), "pareto_axes": lb.pareto_axes, "pareto": lb.pareto_text(),
        "notes": notes(lb), "runs": lb.runs, "cfbench": __version__,
        "rows": rows, "records": per_run, "excluded": lb.excluded,
    }


def to_json(lb: Leaderboard) -> str:
    return json.dumps(to_json_obj(lb), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# -------------------------------------------------------------------------------- HTML
def to_html(lb: Leaderboard) -> str:
    header, body = display_rows(lb)
    return render_template("leaderboard.html", lb=lb, header=header, body=body, notes=notes(lb),
                           excluded=excluded_lines(lb), protocol=describe_protocol(lb.protocol),
                           descriptions=list(zip(lb.rows["label"], lb.rows["description"])))


# ----------------------------------------------------------------------------- writing
def write(lb: Leaderboard, out_dir: str | Path = "leaderboards") -> dict[str, Path]:
    """Write ``<out_dir>/<name>.{md,csv,json,html}`` atomically; returns the paths."""
    out_dir = Path(out_dir)
    texts = {"md": to_markdown(lb), "csv": to_csv(lb), "json": to_json(lb), "html": to_html(lb)}
    paths = {}
    for ext, text in texts.items():
        p = out_dir / f"{lb.name}.{ext}"
        if ext == "html":
            write_html(text, p)
        else:
            atomic_write_text(p, text)
        paths[ext] = p
    return paths

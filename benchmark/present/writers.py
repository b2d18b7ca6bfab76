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
from .leaderboard import CSV_NAMES, INTERVAL_TEXT, LEAKAGE_FPR, Leaderboard, describe_protocol

FORMATS = ("md", "csv", "json", "html", "tex")
CSV_COLUMNS = [
    "pareto_rank", "label", "defense", "defense_version", "family", "params", "train", "seeds", "seed_list",
    "n_records", "flags",
    "clean_mean", "clean_std", "clean_ci_low", "clean_ci_high",
    "robust_mean", "robust_std", "robust_ci_low", "robust_ci_high",
    "auc_mean", "auc_std", "auc_ci_low", "auc_ci_high", "auc_attack",
    "tpr_mean", "tpr_std", "tpr_ci_low", "tpr_ci_high", "tpr_attack",
    "ptpr1_mean", "ptpr1_std", "ptpr1_ci_low", "ptpr1_ci_high", "ptpr1_attack",
    "ptpr01_mean", "ptpr01_std", "ptpr01_ci_low", "ptpr01_ci_high", "ptpr01_attack",
    "plow_mean", "plow_std", "plow_ci_low", "plow_ci_high", "plow_attack", "plow_fpr_mean",
    "epsilon_mean", "epsilon_std", "eps_lb_mean", "eps_lb_std", "train_s_mean", "train_s_std", "eval_s_mean",
    "eval_s_std", "interval", "run_ids",
]


# ----------------------------------------------------------------------- shared table text
def display_rows(lb: Leaderboard) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the human-readable table (strings, not escaped)."""
    import pandas as pd

    tpr_digits = 2
    header = ["rank", "defense", "family", "clean acc. %", f"{lb.robust_label.replace('acc.', 'acc. %')}",
              "MIA AUC (strongest)", "MIA TPR @ 0.1% FPR % (strongest)",
              "primary MIA TPR @ 1% FPR % (pooled)", "primary MIA TPR @ 0.1% FPR % (pooled)",
              lb.lowest_fpr_label.replace(" FPR (", " FPR % ("), "DP ε",
              "audit ε lower bound", "train", "eval", "seeds", "sanity flags"]
    body = []
    nan = float("nan")
    for _, r in lb.rows.iterrows():
        rank = r["pareto_rank"]
        # one kind of spread: the 95% interval in brackets (INTERVAL_TEXT); the std is in CSV / JSON
        auc = fmt_metric(r["auc_mean"], nan, r["auc_ci_low"], r["auc_ci_high"], percent=False)
        if r["auc_attack"]:
            auc += f" ({r['auc_attack']})"
        tpr = fmt_metric(r["tpr_mean"], nan, r["tpr_ci_low"], r["tpr_ci_high"], percent=True,
                         digits=tpr_digits)
        if r["tpr_attack"]:
            tpr += f" ({r['tpr_attack']})"
        primary = [fmt_metric(r[f"{c}_mean"], nan, r[f"{c}_ci_low"], r[f"{c}_ci_high"], percent=True,
                              digits=tpr_digits) for c in ("ptpr1", "ptpr01", "plow")]
        if primary[-1] != "n/a" and "lowest supported FPR" in header[9] and not pd.isna(r["plow_fpr_mean"]):
            primary[-1] += f" (@ {100 * r['plow_fpr_mean']:.2g}%)"
        flags = str(r.get("flags") or "")
        robust = fmt_metric(r["robust_mean"], nan, r["robust_ci_low"], r["robust_ci_high"], percent=True)
        body.append([
            ("flagged" if flags else "n/a") if pd.isna(rank) else str(int(rank)),
            ("⚑ " if flags else "") + str(r["label"]), r["family"],
            fmt_metric(r["clean_mean"], nan, r["clean_ci_low"], r["clean_ci_high"], percent=True),
            robust + (" ⚑" if flags and robust != "n/a" else ""),
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
        "Numbers are means over training seeds (the seeds column says how many). " + INTERVAL_TEXT
        + " The CSV and JSON files also hold the sample standard deviation over seeds.",
        "MIA: the strongest of the evaluated membership attacks per run (named in parentheses; the maximum over "
        "attacks is selection-biased, an optimistic estimate), and the protocol's primary attack (fixed in "
        "advance) pooled over the target and its reference models. n/a: not evaluated, or the sample cannot "
        "support the rate (a TPR at FPR f needs at least 10 / f non-member trials); the primary attack's TPR is "
        "also given at the lowest FPR its pooled sample supports (10 / N_out), where 0.1% is out of reach. "
        "Audit ε: the epsilon lower "
        "bound the primary attack proves (Clopper-Pearson, the run's δ), beside the accountant's DP ε.",
        "Cost: training and evaluation wall-clock seconds per run (mean over seeds). A resumed run's "
        "training counts its epochs over every attempt; its evaluation counts the attempt that finished it "
        "(reference models already in the cache cost nothing there).",
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


def _progress_md(lb: Leaderboard, i: int) -> str:
    text = lb.produced_by_text()[i]
    return f" {text[len(lb.produced_by[i]) + 1:]}" if len(text) > len(lb.produced_by[i]) else ""


def to_markdown(lb: Leaderboard, out_dir: str | Path | None = None) -> str:
    """The table as Markdown; with ``out_dir`` (where the file goes), a list of links to each
    row's run reports below it (relative to ``out_dir``, as the HTML table links them)."""
    header, body = display_rows(lb)
    lines = [f"# Leaderboard: {_md_cell(lb.name)}", "",
             f"Rebuild with: `{lb.command}`", ""]
    lines += [f"Runs produced by: `{c}`" + _progress_md(lb, i) for i, c in enumerate(lb.produced_by)]
    lines += [""] if lb.produced_by else []
    lines += [f"Protocol `{lb.protocol_id[:12]}`:", ""]
    lines += [f"- **{_md_cell(k)}**: {_md_cell(v)}" for k, v in describe_protocol(lb.protocol)]
    lines += ["", "| " + " | ".join(_md_cell(h) for h in header) + " |",
              "|" + "|".join("---:" if i not in (1, 2) else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    if out_dir is not None and len(lb.rows):
        links = run_links(lb, out_dir)
        if any(links):
            lines += ["", "Run reports:", ""]
            lines += [f"- {_md_cell(label)}: " + ", ".join(f"[{t}]({h})" for t, h in row_links)
                      for label, row_links in zip(lb.rows["label"], links) if row_links]
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
    head = [f"# leaderboard {lb.name}", f"# rebuild: {lb.command}", *(f"# runs produced by: {c}" for c in lb.produced_by_text()),
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
            "interval": r.get("interval") or "run",
        }
        for c in ("clean", "robust", "auc", "tpr", "epsilon", "train_s", "eval_s", "ptpr1", "ptpr01", "plow",
                  "plow_fpr", "eps_lb"):
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
                                                      "train_s", "eval_s", "ptpr1", "ptpr01", "plow",
                                                      "plow_fpr", "eps_lb")
                                                      if k in r}
                       | {"flags": [f for f in str(r.get("flags") or "").split(", ") if f]}
                       | {"path": _rel(r["path"], lb.runs)}
                       | {"report": (None if _rel(r["path"], lb.runs) is None
                                     else str(Path(_rel(r["path"], lb.runs)) / RUN_REPORT))})
    return {
        "name": lb.name, "command": lb.command, "produced_by": list(lb.produced_by),
        "sweep_progress": [dict(p) for p in lb.sweep_progress],
        "protocol_id": lb.protocol_id, "protocol": lb.protocol,
        "filters": {"dataset": lb.dataset, "defenses": lb.defenses},
        "source": {"runs": lb.runs, "digest": lb.source_digest},
        "interval": INTERVAL_TEXT,
        "include_flagged": lb.include_flagged,
        "protocol_description": [{"label": k, "value": v} for k, v in describe_protocol(lb.protocol)],
        "robust_source": lb.robust_source, "leakage": lb.leakage, "leakage_label": lb.leakage_label,
        "leakage_fpr": float(LEAKAGE_FPR), "pareto_axes": lb.pareto_axes, "pareto": lb.pareto_text(),
        "notes": notes(lb), "runs": lb.runs, "cfbench": __version__,
        "rows": rows, "records": per_run, "excluded": lb.excluded,
    }


def to_json(lb: Leaderboard) -> str:
    return json.dumps(to_json_obj(lb), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# -------------------------------------------------------------------------------- LaTeX
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "ε": r"$\varepsilon$", "∞": r"$\infty$", "—": "---", "±": r"$\pm$", "↑": r"$\uparrow$",
        "↓": r"$\downarrow$", "⚑": r"$^\dagger$", "–": "--", "≥": r"$\geq$", "≤": r"$\leq$",
        "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def tex_escape(text: Any) -> str:
    """Text as LaTeX: special characters escaped, the few symbols tables use as math."""
    return "".join(_TEX.get(c, c) for c in str(text))


#: the table's columns in the LaTeX export (the cost and family columns stay in the other files)
TEX_COLUMNS = ("rank", "defense", "clean acc. %", None, "MIA AUC (strongest)", "MIA TPR @ 0.1% FPR % (strongest)",
               "primary MIA TPR @ 1% FPR % (pooled)", "primary MIA TPR @ 0.1% FPR % (pooled)", 9, "DP ε", "seeds")


def to_latex(lb: Leaderboard) -> str:
    """A booktabs table (``\\usepackage{booktabs}``) of the leaderboard, its caption stating the
    protocol, what the intervals are (once) and the ranking; built with pandas' Styler."""
    import pandas as pd

    header, body = display_rows(lb)
    # None: the robust column, 9: the lowest-FPR column (their headers depend on the protocol)
    cols = [header[4] if c is None else header[c] if isinstance(c, int) else c for c in TEX_COLUMNS]
    idx = [header.index(c) for c in cols]
    rows = [[row[i] for i in idx] for row in body]
    # columns no row has a value in are left out (said in the caption)
    keep = [j for j, c in enumerate(cols) if c in ("rank", "defense") or any(r[j] not in ("n/a", "—") for r in rows)]
    dropped = [cols[j] for j in range(len(cols)) if j not in keep]
    cols = [cols[j] for j in keep]
    rows = [[r[j] for j in keep] for r in rows]
    df = pd.DataFrame([[tex_escape(c) for c in r] for r in rows], columns=[tex_escape(c) for c in cols])
    flagged = any(str(f) for f in lb.rows.get("flags", []))
    th = lb.protocol.get("threat") or {}
    caption = (f"Leaderboard {lb.name}: {lb.dataset}, {(lb.protocol.get('model') or {}).get('name')}, "
               f"{th.get('norm')} eps = {th.get('eps')}, protocol {lb.protocol_id[:12]}. "
               f"Means over training seeds. {INTERVAL_TEXT} {lb.pareto_text()}"
               + (" ⚑: robustness sanity flags (robust accuracy not to be trusted)." if flagged else "")
               + (f" Omitted (no value in any row): {'; '.join(dropped)}." if dropped else ""))
    cap = tex_escape(caption)
    styler = df.style.hide(axis="index")
    fmt = "".join("l" if c in ("defense",) else "r" for c in cols)
    body_tex = styler.to_latex(hrules=True, column_format=fmt, caption=cap,
                               label=f"tab:{''.join(c if c.isalnum() else '-' for c in lb.name)}",
                               position="t", position_float="centering", environment="table")
    head = [f"% leaderboard {lb.name} (needs \\usepackage{{booktabs}})", f"% rebuild: {lb.command}",
            *(f"% runs produced by: {c}" for c in lb.produced_by_text()),
            f"% protocol {lb.protocol_id}"]
    return "\n".join(head) + "\n" + body_tex


# -------------------------------------------------------------------------------- HTML
#: the leaderboard page's only script: sorting by a column, filtering by text and family.  The
#: page's Content-Security-Policy allows exactly this script (its sha256), nothing else
SORT_SCRIPT = """
(function () {
  var table = document.getElementById("lb");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var heads = table.tHead.rows[0].cells;
  var state = {col: -1, dir: 1};
  function key(row, col) {
    var cell = row.cells[col];
    var v = cell.getAttribute("data-v");
    if (v === null || v === "") { return null; }
    var x = Number(v);
    return isNaN(x) ? v.toLowerCase() : x;
  }
  function sortBy(col) {
    state.dir = state.col === col ? -state.dir : (heads[col].getAttribute("data-dir") === "desc" ? -1 : 1);
    state.col = col;
    rows.sort(function (a, b) {
      var x = key(a, col), y = key(b, col);
      if (x === null && y === null) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      return (x < y ? -1 : x > y ? 1 : 0) * state.dir;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) {
      heads[i].setAttribute("aria-sort", i === col ? (state.dir > 0 ? "ascending" : "descending") : "none");
    }
  }
  for (var i = 0; i < heads.length; i++) {
    (function (col) {
      heads[col].addEventListener("click", function () { sortBy(col); });
      heads[col].addEventListener("keydown", function (e) { if (e.key === "Enter") { sortBy(col); } });
    })(i);
  }
  var text = document.getElementById("lb-filter");
  var family = document.getElementById("lb-family");
  var count = document.getElementById("lb-count");
  function filter() {
    var q = (text.value || "").toLowerCase();
    var f = family.value;
    var shown = 0;
    rows.forEach(function (r) {
      var ok = (!q || r.textContent.toLowerCase().indexOf(q) >= 0) && (!f || r.getAttribute("data-family") === f);
      r.hidden = !ok;
      if (ok) { shown++; }
    });
    count.textContent = shown + " of " + rows.length + " rows";
  }
  text.addEventListener("input", filter);
  family.addEventListener("change", filter);
  filter();
})();
"""


def script_hash(script: str) -> str:
    """The CSP source expression that allows exactly ``script`` (``'sha256-...'``)."""
    import base64
    import hashlib

    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii") + "'"


def sort_values(lb: Leaderboard) -> list[list[str]]:
    """Per cell of :func:`display_rows`, the value the HTML table sorts by (numbers as numbers,
    n/a as empty: sorted last)."""
    import math

    def n(v):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return ""
        return "" if math.isnan(v) else ("1e308" if math.isinf(v) else repr(v))

    out = []
    for _, r in lb.rows.iterrows():
        out.append([n(r["pareto_rank"]), str(r["label"]), str(r["family"]), n(r["clean_mean"]), n(r["robust_mean"]),
                    n(r["auc_mean"]), n(r["tpr_mean"]), n(r["ptpr1_mean"]), n(r["ptpr01_mean"]), n(r["plow_mean"]),
                    n(r["epsilon_mean"]), n(r["eps_lb_mean"]), n(r["train_s_mean"]), n(r["eval_s_mean"]),
                    n(r["seeds"]), str(r.get("flags") or "")])
    return out


#: higher is better in these columns: the first click sorts them descending
_DESC = {3, 4}


def run_hrefs(lb: Leaderboard, from_dir: str | Path) -> dict[str, str]:
    """Run id -> the relative link from ``from_dir`` (where a page is) to that run's report
    (``<run-dir>/report.html``)."""
    import os

    out = {}
    for _, r in lb.records.iterrows() if len(lb.records) else []:
        p = r["path"]
        if not isinstance(p, str):
            continue
        run_dir = Path(p) if Path(p).is_absolute() or Path(p).exists() else Path(lb.runs) / p
        out[str(r["run_id"])] = Path(os.path.relpath(run_dir / RUN_REPORT, Path(from_dir))).as_posix()
    return out


def run_links(lb: Leaderboard, from_dir: str | Path) -> list[list[tuple[str, str]]]:
    """Per row, ``(text, href)`` of each of its runs' reports (``<run-dir>/report.html``),
    relative to ``from_dir`` (where the page is)."""
    hrefs = run_hrefs(lb, from_dir)
    seeds = {str(r["run_id"]): r["seed"] for _, r in lb.records.iterrows()} if len(lb.records) else {}
    return [[(f"seed {seeds.get(rid)}", hrefs[rid]) for rid in str(r["run_ids"]).split() if rid in hrefs]
            for _, r in lb.rows.iterrows()]


def to_html(lb: Leaderboard, out_dir: str | Path | None = None) -> str:
    header, body = display_rows(lb)
    links = run_links(lb, out_dir) if out_dir is not None else [[] for _ in body]
    families = sorted({str(f) for f in lb.rows["family"]}) if len(lb.rows) else []
    return render_template("leaderboard.html", lb=lb, header=header, body=body, notes=notes(lb),
                           excluded=excluded_lines(lb), protocol=describe_protocol(lb.protocol),
                           descriptions=list(zip(lb.rows["label"], lb.rows["description"])),
                           rows=list(zip(body, sort_values(lb), links, list(lb.rows["family"]))),
                           desc_cols=_DESC, families=families, script=SORT_SCRIPT,
                           csp_script=script_hash(SORT_SCRIPT), interval=INTERVAL_TEXT)


# ----------------------------------------------------------------------------- writing
RUN_REPORT = "report.html"


def write(lb: Leaderboard, out_dir: str | Path = "leaderboards") -> dict[str, Path]:
    """Write ``<out_dir>/<name>.{md,csv,json,html,tex}`` atomically; returns the paths.  (No
    checks: :func:`write_tables` refuses to overwrite another protocol's files and removes stale
    ones.)"""
    out_dir = Path(out_dir)
    texts = {"md": to_markdown(lb, out_dir), "csv": to_csv(lb), "json": to_json(lb), "html": to_html(lb, out_dir),
             "tex": to_latex(lb)}
    paths = {}
    for ext, text in texts.items():
        p = out_dir / f"{lb.name}.{ext}"
        if ext == "html":
            write_html(text, p)
        else:
            atomic_write_text(p, text)
        paths[ext] = p
    return paths


def _norm(path: Any) -> str:
    import os

    return os.path.normpath(str(path)) if path is not None else ""


def existing_tables(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The leaderboards already in ``out_dir``: file stem -> its JSON (unreadable ones: ``{}``)."""
    out = {}
    for p in sorted(Path(out_dir).glob("*.json")) if Path(out_dir).is_dir() else []:
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            obj = {}
        if isinstance(obj, dict) and "protocol_id" in obj and "rows" in obj:
            out[p.name[: -len(".json")]] = obj
    return out


def _protocol_text(obj: dict[str, Any]) -> str:
    from .leaderboard import base_name

    return f"{base_name(obj.get('protocol') or {})} (protocol {str(obj.get('protocol_id'))[:12]})"


def conflicts(boards: list[Leaderboard], out_dir: str | Path) -> list[str]:
    """Why writing ``boards`` into ``out_dir`` would overwrite files it must not: a file of the
    same name that holds another protocol, was built from another runs folder, or was not
    written by ``cfbench leaderboard``."""
    out_dir = Path(out_dir)
    have = existing_tables(out_dir)
    problems = []
    for lb in boards:
        obj = have.get(lb.name)
        mine = f"{lb.name} (protocol {lb.protocol_id[:12]}, from {lb.runs})"
        if obj is not None:
            if obj.get("protocol_id") != lb.protocol_id:
                problems.append(f"{out_dir / (lb.name + '.json')} holds another protocol, {_protocol_text(obj)}, "
                                f"not {mine}")
            elif _norm((obj.get("source") or {}).get("runs", obj.get("runs"))) != _norm(lb.runs):
                theirs = (obj.get("source") or {}).get("runs", obj.get("runs"))
                problems.append(f"{out_dir / (lb.name + '.json')} was built from another runs folder "
                                f"({theirs}), not from {lb.runs}: rebuilding it from {lb.runs} would drop its rows "
                                f"(same protocol: to add your runs to that table, copy their folders into {theirs} "
                                f"and run `{obj.get('command') or 'cfbench leaderboard --runs ' + str(theirs)}`)")
        else:
            others = [out_dir / f"{lb.name}.{ext}" for ext in FORMATS if (out_dir / f"{lb.name}.{ext}").exists()]
            if others:
                problems.append(f"{others[0]} exists but {out_dir / (lb.name + '.json')} does not: not a table "
                                f"cfbench wrote, or of an unknown protocol (this one: {mine})")
    return problems


def stale_tables(boards: list[Leaderboard], out_dir: str | Path, *, runs: str, dataset: str | None,
                 defenses: list[str] | None) -> list[str]:
    """The tables in ``out_dir`` this build replaces: built from the same runs folder with the
    same filters (same dataset, or any when ``dataset`` is None; same ``--defense``), under a
    name this build no longer writes (a protocol with no runs left, or an older name)."""
    names = {lb.name for lb in boards}
    out = []
    for stem, obj in existing_tables(out_dir).items():
        if stem in names:
            continue
        src = (obj.get("source") or {}).get("runs", obj.get("runs"))
        filt = obj.get("filters") or {}
        ds = (obj.get("protocol") or {}).get("dataset", {}).get("name")
        if (_norm(src) == _norm(runs) and (filt.get("defenses") or None) == (sorted(defenses) if defenses else None)
                and (dataset is None or ds == dataset)):
            out.append(stem)
    return out


def write_tables(boards: list[Leaderboard], out_dir: str | Path, *, runs: str, dataset: str | None = None,
                 defenses: list[str] | None = None, force: bool = False,
                 log=print) -> tuple[list[dict[str, Path]], list[str]]:
    """Write every table of one build (see :func:`write`), after checking that none of them
    overwrites another protocol's file (a :class:`UsageError` naming both, unless ``force``),
    then remove the stale tables of the same build (:func:`stale_tables`).  Returns the paths
    written and the names removed."""
    from ..errors import UsageError

    out_dir = Path(out_dir)
    problems = conflicts(boards, out_dir)
    if problems and not force:
        raise UsageError("refusing to overwrite leaderboard files:\n  " + "\n  ".join(problems)
                         + "\nWrite into another folder (--out DIR), or pass --force to overwrite them.")
    stale = stale_tables(boards, out_dir, runs=runs, dataset=dataset, defenses=defenses)
    paths = [write(lb, out_dir) for lb in boards]
    for stem in stale:
        obj = existing_tables(out_dir).get(stem) or {}
        for ext in FORMATS:
            (out_dir / f"{stem}.{ext}").unlink(missing_ok=True)
        log(f"removed stale {out_dir / stem}.* ({_protocol_text(obj)}: no longer built from {runs})")
    return paths, stale

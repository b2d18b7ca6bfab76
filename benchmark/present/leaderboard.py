"""Leaderboards: stored records that share a protocol, aggregated into tables.

``cfbench leaderboard [--dataset D] [--defense A,B] [--runs DIR] [--out DIR]`` reads every
record under ``DIR`` (default ``runs/``), groups the finished ones (``status == "ok"``) by
**protocol**, and writes one table per protocol as ``<out>/<name>.{md,csv,json,html,tex}``,
each headed by the protocol and the command that rebuilds it.  This module builds the tables
(:class:`Leaderboard`); :mod:`.writers` writes them.

Protocol
    What must be equal for two numbers to be comparable (:func:`protocol_of`): the harness
    protocol version; the dataset (name, version); the model (name, version, parameters);
    the threat model (norm, eps); the data split (``pool_size``, ``member_fraction``,
    ``split_seed``, ``test_size``); and the evaluators whose numbers fill the table, with
    their versions and parameters: ``clean``, ``autoattack`` and the membership-inference
    evaluator ``mia`` (its parameters fix the membership protocol: attacks, reference
    models, members / non-members).  ``batch_size`` is left out: it changes the speed of an
    evaluation, not what it measures.  When a protocol has no AutoAttack, robust accuracy
    falls back to PGD (then the ``pgd`` evaluator's parameters are part of the protocol and
    the table says "PGD").  Records that disagree on any of this are never mixed in one
    table; failed or unfinished runs never enter a table (they are counted in its notes).
    Record files the store cannot use (not valid JSON, not a JSON object, fields of the wrong
    type) are skipped, never fatal, and listed with their path and reason in the notes of
    every table of the build (they cannot be attributed to a protocol).

Rows
    One row per *recipe*: defense (name, version, hyper-parameters) and training budget
    (``config.train``), aggregated over training seeds.  Records with the same config hash
    are duplicates (a copied run); only the newest is kept.  Each number is the mean over
    seeds; ``_std`` (CSV / JSON) the sample standard deviation (``ddof = 1``).  One kind of
    interval throughout (:data:`INTERVAL_TEXT`): 95%, the record's own interval with one seed
    (Clopper-Pearson for rates), a Student-t interval of the mean over seeds with several
    (:func:`seed_interval`); the row's ``interval`` says which.

Columns
    clean accuracy; robust accuracy (AutoAttack); the strongest membership attack's AUC and
    TPR at 0.1% FPR (``mia.best.*`` of each record: the attack can differ between seeds,
    all are named; a selection-biased maximum); the protocol's **primary** attack's TPR at 1%
    and 0.1% FPR pooled over the target and its reference models (``mia.primary.*``, mia
    evaluator version 2; n/a when the pooled trials cannot support the rate); DP epsilon where
    the record has ``dp.epsilon``, beside the membership audit's epsilon lower bound
    (``mia.audit.epsilon_lb``); training and evaluation
    cost in seconds (``timings.train`` and the sum of ``timings.eval.<evaluator>``); seeds;
    Pareto rank.

Pareto rank
    Non-dominated sorting (Deb et al. 2002) of the rows' means over (clean accuracy up,
    robust accuracy up, leakage down), where leakage is the strongest attack's TPR at 0.1%
    FPR, or its AUC when TPR at 0.1% FPR is n/a for some row of the table -- and, in
    front of both, the primary attack's pooled TPR at 0.1% FPR, then at 1% FPR, when every row
    has it (the table header says which).  An axis that some row lacks entirely is left out of the ranking and the
    header lists the axes used.  Rank 1 is the front; equal points share a rank.

Sanity flags
    A record's ``flags`` (the named checks of ``cfbench.evaluators.sanity`` that failed:
    PGD vs AutoAttack gap, eps sweep, gradient-free beating white-box, vanishing gradients,
    randomised forward, AutoAttack's own checks; docs/robustness.md) mark its row -- a row is
    flagged when any of its seeds is -- in every format (a "sanity flags" column; CSV
    ``flags``; JSON ``flags``).  A flagged row's robust accuracy is not to be trusted, so it is
    **kept off the Pareto ranking** (rank "flagged", listed after the ranked rows) unless the
    table is built with ``include_flagged`` (``cfbench leaderboard --include-flagged``), which
    ranks it with the others, still marked.

File names
    ``<dataset>-<model>-<norm>-<eps>-<first 8 hex digits of the protocol id>`` always
    (:func:`table_name`), plus ``-only-<d1>+<d2>`` for a ``--defense`` table: unique per protocol
    and stable.  :func:`.writers.write_tables` refuses to overwrite a file of another protocol
    or runs folder and removes the stale tables of the same build; :func:`source_digest` lets a
    report tell a stale table from a current one.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError, suggest
from ..hashing import canonical_hash, canonical_json
from ..store import RECORD, StoreIssues, iter_records
from .format import ci, fmt_eps, num

LEAKAGE_FPR = "0.001"
TABLE_EVALUATORS = ("clean", "autoattack", "mia")
#: evaluator parameters that change how fast a number is computed, not what it measures
IGNORED_PARAMS = ("batch_size",)
#: ``status`` of an excluded entry for a record file the store could not use
UNUSABLE = "unusable"
#: the long (CSV / JSON) name of each aggregated value
CSV_NAMES = {
    "clean": "clean_accuracy", "robust": "robust_accuracy", "auc": "mia_best_auc",
    "tpr": f"mia_best_tpr_at_fpr_{LEAKAGE_FPR}", "epsilon": "dp_epsilon", "train_s": "train_seconds",
    "eval_s": "eval_seconds",
    # the protocol's primary attack, pooled over the target and its reference models (mia v2);
    # "eps_lb": the DP audit's epsilon lower bound from it
    "ptpr1": "mia_primary_tpr_at_fpr_0.01", "ptpr01": f"mia_primary_tpr_at_fpr_{LEAKAGE_FPR}",
    # ... and at the lowest FPR its sample supports (10 / N_out non-members: 0.22% for 4,500),
    # where 0.1% is n/a; "plow_fpr" is that FPR
    "plow": "mia_primary_tpr_at_lowest_fpr", "plow_fpr": "mia_primary_lowest_fpr",
    "eps_lb": "mia_audit_epsilon_lb",
}
#: columns with an interval / with attack names (besides clean, robust, auc, tpr)
PRIMARY_COLS = ("ptpr1", "ptpr01", "plow")
#: the columns that carry a 95% interval
INTERVAL_COLS = ("clean", "robust", "auc", "tpr", *PRIMARY_COLS)
CONFIDENCE = 0.95
#: the one sentence that says what every bracket / error bar is (tables, captions, figures)
INTERVAL_TEXT = ("Brackets and error bars are 95% intervals: for a row with one run, that run's own "
                 "interval (Clopper-Pearson for rates, the record's interval for AUC); for a row with several "
                 "training seeds, a Student-t interval of the mean over the seeds (n - 1 degrees of freedom; "
                 "it reflects seed-to-seed variation, not test-set sampling), clipped to [0, 1].")


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of per-seed values (``len >= 2``), clipped to [0, 1]."""
    from ..mia.metrics import mean_interval

    ci = mean_interval(values, confidence, drop_nonfinite=False)
    if ci["ci_low"] is None:
        return math.nan, math.nan
    return max(0.0, ci["ci_low"]), min(1.0, ci["ci_high"])


# ------------------------------------------------------------------------------ protocol
def protocol_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The protocol a record was produced under (see the module docstring)."""
    cfg = record.get("config") or {}
    ev = cfg.get("evaluators") or {}
    names = [n for n in TABLE_EVALUATORS if n in ev]
    if "autoattack" not in ev and "pgd" in ev:
        names.append("pgd")
    evaluators = {}
    for name in names:
        spec = dict(ev[name]) if isinstance(ev[name], Mapping) else {"version": None, "params": {}}
        spec["params"] = {k: v for k, v in (spec.get("params") or {}).items() if k not in IGNORED_PARAMS}
        evaluators[name] = spec
    return {
        "harness": cfg.get("protocol"),
        "dataset": cfg.get("dataset"),
        "model": cfg.get("model"),
        "threat": cfg.get("threat"),
        "data": cfg.get("data"),
        "evaluators": evaluators,
    }


def protocol_id(protocol: Mapping[str, Any]) -> str:
    """sha256 of the protocol's canonical JSON (names committed leaderboards: never change it)."""
    return canonical_hash(protocol)


def base_name(protocol: Mapping[str, Any]) -> str:
    ds = (protocol.get("dataset") or {}).get("name", "unknown")
    model = (protocol.get("model") or {}).get("name", "unknown")
    th = protocol.get("threat") or {}
    raw = f"{ds}-{model}-{th.get('norm', 'unknown')}-{fmt_eps(th.get('eps'))}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)


#: hex digits of the protocol id in a leaderboard's name
NAME_HASH = 8


def table_name(protocol: Mapping[str, Any], defenses: Sequence[str] | None = None) -> str:
    """A table's file stem: ``<dataset>-<model>-<norm>-<eps>-<8 hex digits of the protocol id>``,
    plus ``-only-<d1>+<d2>`` for a table restricted to some defenses (``--defense``).

    The hash is always there, so a name identifies one protocol whatever else a folder holds,
    and rebuilding gives the same name (names of committed leaderboards: never change it)."""
    name = f"{base_name(protocol)}-{protocol_id(protocol)[:NAME_HASH]}"
    if defenses:
        name += "-only-" + "+".join("".join(c if c.isalnum() or c in "-_." else "_" for c in d)
                                     for d in sorted(set(defenses)))
    return name


def describe_protocol(protocol: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Human-readable (label, value) lines of a protocol, for table headers."""
    def params(d: Mapping[str, Any] | None) -> str:
        if not d:
            return "defaults"
        return ", ".join(f"{k}={'default' if v is None else v}" for k, v in d.items())

    ds = protocol.get("dataset") or {}
    model = protocol.get("model") or {}
    th = protocol.get("threat") or {}
    data = protocol.get("data") or {}
    out = [
        ("dataset", f"{ds.get('name')} (version {ds.get('version')})"),
        ("model", f"{model.get('name')} (version {model.get('version')}; {params(model.get('params'))})"),
        ("threat model", f"{th.get('norm')}, eps = {fmt_eps(th.get('eps'))}"),
        ("data split", ", ".join(f"{k}={'all' if v is None else v}" for k, v in data.items())),
    ]
    ev = protocol.get("evaluators") or {}
    names = {"clean": "clean accuracy", "autoattack": "AutoAttack", "pgd": "PGD (robust accuracy; no AutoAttack)",
             "mia": "membership inference"}
    for name, spec in ev.items():
        out.append((names.get(name, name), f"evaluator {name} version {spec.get('version')}; "
                                            f"{params(spec.get('params'))}"))
    if "mia" not in ev:
        out.append(("membership inference", "not evaluated (columns n/a)"))
    out.append(("harness protocol", str(protocol.get("harness"))))
    return out


# --------------------------------------------------------------------------- per record
def mia_attacks(metrics: Mapping[str, Any]) -> list[str]:
    """Names of the membership attacks present in a record's metrics (``mia.<A>.auc``)."""
    out = []
    for k in metrics:
        parts = k.split(".")
        if len(parts) == 3 and parts[0] == "mia" and parts[2] == "auc" and parts[1] not in ("best", "primary"):
            out.append(parts[1])
    return out


def strongest(metrics: Mapping[str, Any], metric: str) -> dict[str, Any]:
    """The strongest membership attack on ``metric`` (``"auc"`` or ``"tpr_at_fpr.0.001"``...).

    Uses the record's ``mia.best.<metric>`` when present (``{value, attack, ci_low?,
    ci_high?}``; a missing interval is read from ``mia.<attack>.<metric>``), else the maximum
    over ``mia.<A>.<metric>``.  Returns ``{value, ci_low, ci_high, attack}`` with NaN for n/a.
    """
    best = metrics.get(f"mia.best.{metric}")
    attack = None
    if isinstance(best, Mapping) and not math.isnan(num(best)):
        attack = best.get("attack")
        lo, hi = ci(best)
        if (math.isnan(lo) or math.isnan(hi)) and attack is not None:
            lo, hi = ci(metrics.get(f"mia.{attack}.{metric}"))
        return {"value": num(best), "ci_low": lo, "ci_high": hi, "attack": attack}
    if best is not None and not isinstance(best, Mapping) and not math.isnan(num(best)):
        return {"value": num(best), "ci_low": math.nan, "ci_high": math.nan, "attack": None}
    value, lo, hi = math.nan, math.nan, math.nan
    for a in mia_attacks(metrics):
        m = metrics.get(f"mia.{a}.{metric}")
        v = num(m)
        if not math.isnan(v) and (math.isnan(value) or v > value):
            value, attack = v, a
            lo, hi = ci(m)
    return {"value": value, "ci_low": lo, "ci_high": hi, "attack": attack}


def eval_seconds(timings: Mapping[str, Any]) -> float:
    """Evaluation cost: the sum of the evaluators' totals ``timings['eval.<name>']``."""
    vals = [num(v) for k, v in timings.items() if k.startswith("eval.") and k.count(".") == 1]
    vals = [v for v in vals if not math.isnan(v)]
    return float(sum(vals)) if vals else math.nan


def train_seconds(record: Mapping[str, Any]) -> float:
    """Training cost of a run: ``timings['train']`` of the attempt that finished it, or, when the
    run was resumed (a killed run continues from its checkpoint, and its last attempt may only
    have reloaded the finished model), the sum of the per-epoch seconds of its history, which
    spans every attempt -- whichever is larger."""
    t = num((record.get("timings") or {}).get("train"))
    epochs = [num(h.get("seconds")) for h in (record.get("history") or []) if isinstance(h, Mapping)]
    epochs = [e for e in epochs if not math.isnan(e)]
    if not epochs:
        return t
    return max(float(sum(epochs)), 0.0 if math.isnan(t) else t)


def record_flags(record: Mapping[str, Any]) -> list[str]:
    """The sorted names of a record's sanity flags (``record["flags"]``, schema 3; the store
    upgrades older records, turning their AutoAttack check warnings into flags)."""
    return sorted({str(f["name"]) for f in (record.get("flags") or [])
                   if isinstance(f, Mapping) and isinstance(f.get("name"), str)})


def record_row(record: Mapping[str, Any], robust_source: str | None = "autoattack") -> dict[str, Any]:
    """One record flattened to the numbers a leaderboard aggregates (NaN = n/a)."""
    cfg = record.get("config") or {}
    metrics = record.get("metrics") or {}
    comp = (record.get("components") or {}).get("defense") or {}
    d = cfg.get("defense") or {}
    clean = metrics.get("clean.accuracy")
    robust = metrics.get(f"robust.{robust_source}.accuracy") if robust_source else None
    auc = strongest(metrics, "auc")
    tpr = strongest(metrics, f"tpr_at_fpr.{LEAKAGE_FPR}")
    p1, p01 = metrics.get("mia.primary.tpr_at_fpr.0.01"), metrics.get(f"mia.primary.tpr_at_fpr.{LEAKAGE_FPR}")
    plow, plow_fpr = metrics.get("mia.primary.tpr_at_lowest_fpr"), metrics.get("mia.primary.lowest_fpr")
    p_attack = next((m.get("attack") for m in (p1, p01, plow) if isinstance(m, Mapping) and m.get("attack")), None)
    timings = record.get("timings") or {}
    return {
        "run_id": record.get("run_id"),
        "path": record.get("_path"),
        "created": record.get("created") or "",
        "config_hash": record.get("config_hash"),
        "seed": cfg.get("seed"),
        "defense": d.get("name"),
        "defense_version": d.get("version"),
        "params": canonical_json(d.get("params") or {}),
        "train": canonical_json(cfg.get("train") or {}),
        "family": comp.get("family") or "other",
        "description": comp.get("description") or "",
        "clean": num(clean), "clean_lo": ci(clean)[0], "clean_hi": ci(clean)[1],
        "robust": num(robust), "robust_lo": ci(robust)[0], "robust_hi": ci(robust)[1],
        "auc": auc["value"], "auc_lo": auc["ci_low"], "auc_hi": auc["ci_high"], "auc_attack": auc["attack"],
        "tpr": tpr["value"], "tpr_lo": tpr["ci_low"], "tpr_hi": tpr["ci_high"], "tpr_attack": tpr["attack"],
        "epsilon": num(metrics.get("dp.epsilon")),
        "ptpr1": num(p1), "ptpr1_lo": ci(p1)[0], "ptpr1_hi": ci(p1)[1], "ptpr1_attack": p_attack,
        "ptpr01": num(p01), "ptpr01_lo": ci(p01)[0], "ptpr01_hi": ci(p01)[1], "ptpr01_attack": p_attack,
        "plow": num(plow), "plow_lo": ci(plow)[0], "plow_hi": ci(plow)[1], "plow_attack": p_attack,
        "plow_fpr": num(plow_fpr),
        "eps_lb": num(metrics.get("mia.audit.epsilon_lb")),
        "train_s": train_seconds(record),
        "eval_s": eval_seconds(timings),
        "flags": ", ".join(record_flags(record)),
    }


# ---------------------------------------------------------------------------- Pareto rank
def pareto_ranks(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Non-dominated sorting: rank 1 for the Pareto front, 2 for the front of the rest, ...

    ``points[i][j]`` is row i's value on axis j; ``maximize[j]`` says whether more is better.
    A point dominates another if it is at least as good on every axis and better on one.
    Equal points do not dominate each other and share a rank.  Values must be finite.
    """
    pts = [[v if up else -v for v, up in zip(p, maximize)] for p in points]
    for p in pts:
        if len(p) != len(maximize) or not all(math.isfinite(v) for v in p):
            raise ValueError(f"pareto_ranks needs finite points of dimension {len(maximize)}, got {p}")

    def dominates(a, b) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    ranks = [0] * len(pts)
    remaining = set(range(len(pts)))
    rank = 1
    while remaining:
        front = {i for i in remaining if not any(dominates(pts[j], pts[i]) for j in remaining if j != i)}
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


# ------------------------------------------------------------------------------ tables
@dataclass
class Leaderboard:
    """One protocol's table."""

    name: str
    protocol: dict[str, Any]
    protocol_id: str
    command: str
    rows: Any                           # pandas.DataFrame, one row per recipe, sorted
    records: Any                        # pandas.DataFrame, one row per record used
    robust_source: str | None           # "autoattack", "pgd", or None (not evaluated)
    leakage: str | None                 # "tpr" (TPR at 0.1% FPR), "auc", or None (no MIA)
    pareto_axes: list[str] = field(default_factory=list)
    #: runs left out: ``{run_id, status, reason}`` for failed or unfinished runs of this
    #: protocol; ``{run_id: None, path, status: "unusable", reason}`` for unusable record files
    excluded: list[dict[str, Any]] = field(default_factory=list)
    runs: str = "runs"
    #: flagged rows ranked with the others (``--include-flagged``); default: kept off the front
    include_flagged: bool = False
    #: the defenses the table is restricted to (``--defense``), None for all
    defenses: list[str] | None = None
    #: sha256 over the records the table was built from (id, config hash, created, status): a
    #: rebuild from the same runs that gives another digest means this table is stale
    source_digest: str | None = None
    #: the ``cfbench sweep`` commands that produced this table's runs (from the runs folder's
    #: :data:`SWEEPS_FILE`); empty when the runs came from ``cfbench run``
    produced_by: list[str] = field(default_factory=list)
    #: for each command of :attr:`produced_by` (same order): how many of its grid's runs have a
    #: finished (ok) record in the runs folder, and how many the grid has -- a table built while
    #: its sweep is still going says so ("9 of the sweep's 10 runs finished")
    sweep_progress: list[dict[str, Any]] = field(default_factory=list)

    def produced_by_text(self) -> list[str]:
        """Each producing sweep command, followed by its progress when the sweep is unfinished."""
        out = []
        for i, c in enumerate(self.produced_by):
            prog = self.sweep_progress[i] if i < len(self.sweep_progress) else None
            if prog and prog["finished"] < prog["runs"]:
                c += (f" ({prog['finished']} of the sweep's {prog['runs']} runs finished; "
                      "the table grows as the sweep resumes)")
            out.append(c)
        return out

    @property
    def dataset(self) -> str:
        return (self.protocol.get("dataset") or {}).get("name", "")

    @property
    def robust_label(self) -> str:
        return {"autoattack": "AutoAttack acc.", "pgd": "PGD acc. (no AutoAttack)"}.get(
            self.robust_source or "", "robust acc. (not evaluated)")

    @property
    def leakage_label(self) -> str:
        return {"ptpr01": "primary MIA TPR @ 0.1% FPR (pooled)", "ptpr1": "primary MIA TPR @ 1% FPR (pooled)",
                "tpr": "strongest MIA TPR @ 0.1% FPR", "auc": "strongest MIA AUC"}.get(self.leakage or "", "n/a")

    @property
    def lowest_fpr_label(self) -> str:
        """The header of the primary attack's TPR at the lowest supported FPR: that FPR when every
        row has the same one (one protocol: one pool and one K, so the same number of pooled
        non-members), else "lowest supported FPR" (each cell then names its own)."""
        fprs = {round(float(v), 12) for v in self.rows.get("plow_fpr_mean", []) if not math.isnan(float(v))}
        if len(fprs) == 1:
            return f"primary MIA TPR @ {100 * fprs.pop():.2g}% FPR (pooled; lowest supported)"
        return "primary MIA TPR @ lowest supported FPR (pooled)"

    @property
    def unusable(self) -> list[dict[str, Any]]:
        """The excluded entries that are unusable record files (not failed or unfinished runs)."""
        return [e for e in self.excluded if e.get("status") == UNUSABLE]

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Leaderboard:
        """A leaderboard back from its ``.json`` file (as :func:`.writers.to_json_obj` wrote it)."""
        import pandas as pd

        rows = []
        for r in obj.get("rows") or []:
            row: dict[str, Any] = {
                "pareto_rank": math.nan if r.get("pareto_rank") is None else r["pareto_rank"],
                "label": r.get("label"), "defense": r.get("defense"), "defense_version": r.get("defense_version"),
                "family": r.get("family") or "other", "description": r.get("description") or "",
                "params": canonical_json(r.get("params") or {}), "train": canonical_json(r.get("train") or {}),
                "seeds": int(r.get("seeds") or 0), "seed_list": " ".join(str(s) for s in r.get("seed_list") or []),
                "n_records": int(r.get("n_records") or len(r.get("run_ids") or [])),
                "run_ids": " ".join(r.get("run_ids") or []),
                "flags": ", ".join(r.get("flags") or []),
            }
            for c, long in CSV_NAMES.items():
                e = r.get(long) or {}
                row[f"{c}_mean"] = num(e.get("mean"))
                row[f"{c}_std"] = num(e.get("std"))
                row[f"{c}_n"] = int(e.get("n") or 0)
                if c in ("clean", "robust", "auc", "tpr", *PRIMARY_COLS):
                    row[f"{c}_ci_low"] = num(e.get("ci_low"))
                    row[f"{c}_ci_high"] = num(e.get("ci_high"))
                if c in ("auc", "tpr", *PRIMARY_COLS):
                    row[f"{c}_attack"] = ", ".join(e.get("attacks") or [])
            row["interval"] = r.get("interval") or ("run" if row["seeds"] <= 1 else f"t over {row['seeds']} seeds")
            rows.append(row)
        df = pd.DataFrame(rows)
        leakage = obj.get("leakage")
        df["leakage_mean"] = df[f"{leakage}_mean"] if leakage and len(df) else math.nan
        records = pd.DataFrame(obj.get("records") or [],
                               columns=["run_id", "seed", "defense", "clean", "robust", "auc", "auc_attack", "tpr",
                                        "tpr_attack", "epsilon", "train_s", "eval_s", "path", "ptpr1", "ptpr01",
                                        "plow", "plow_fpr", "eps_lb"])
        return cls(name=obj["name"], protocol=obj["protocol"], protocol_id=obj["protocol_id"],
                   command=obj["command"], rows=df, records=records, robust_source=obj.get("robust_source"),
                   leakage=leakage, pareto_axes=list(obj.get("pareto_axes") or []),
                   excluded=list(obj.get("excluded") or []), runs=obj.get("runs") or "runs",
                   include_flagged=bool(obj.get("include_flagged")),
                   defenses=((obj.get("filters") or {}).get("defenses") or None),
                   source_digest=(obj.get("source") or {}).get("digest"),
                   produced_by=[str(c) for c in obj.get("produced_by") or []],
                   sweep_progress=[{"finished": int(p["finished"]), "runs": int(p["runs"])}
                                   for p in obj.get("sweep_progress") or []])

    def pareto_text(self) -> str:
        if not self.pareto_axes:
            return "Pareto rank: n/a (no axis has a value for every row)."
        names = {"clean": "clean accuracy ↑", "robust": f"{self.robust_label.split(' (')[0]} ↑",
                 "leakage": f"leakage = {self.leakage_label} ↓"}
        flagged = int((self.rows["flags"].astype(str) != "").sum()) if "flags" in self.rows else 0
        return ("Pareto rank over (" + ", ".join(names[a] for a in self.pareto_axes)
                + "); rank 1 is the front (non-dominated sorting of the rows' means)."
                + ("" if not flagged else
                   f" {flagged} row{'s carry' if flagged != 1 else ' carries'} sanity flags (⚑): "
                   + ("ranked with the others (--include-flagged)." if self.include_flagged else
                      "kept off the ranking (rank 'flagged'); rebuild with --include-flagged to rank "
                      + ("them." if flagged != 1 else "it."))))


def _labels(groups: list[dict[str, Any]]) -> list[str]:
    """Row labels: the defense name, plus the hyper-parameters / training settings that
    tell rows of the same table apart (only those that differ)."""
    def diff_keys(dicts: list[dict[str, Any]]) -> list[str]:
        keys = sorted({k for d in dicts for k in d})
        return [k for k in keys if len({canonical_json(d.get(k)) for d in dicts}) > 1]

    trains = [json.loads(g["train"]) for g in groups]
    train_keys = diff_keys(trains)
    labels = []
    for g, tr in zip(groups, trains):
        same = [json.loads(h["params"]) for h in groups if h["defense"] == g["defense"]]
        versions = {h["defense_version"] for h in groups if h["defense"] == g["defense"]}
        p = json.loads(g["params"])
        label = str(g["defense"])
        if len(versions) > 1:
            label += f" v{g['defense_version']}"
        keys = diff_keys(same)
        if keys:
            label += " (" + ", ".join(f"{k}={p.get(k)}" for k in keys) + ")"
        if train_keys:
            label += " [" + ", ".join(f"{k}={tr.get(k)}" for k in train_keys) + "]"
        labels.append(label)
    return labels


def source_digest(records: Iterable[Mapping[str, Any]], excluded: Iterable[Mapping[str, Any]] = ()) -> str:
    """What a table was built from, as one hash: every record's run id, config hash, creation
    time and status (and the excluded runs').  Another digest from the same runs: stale."""
    items = sorted([str(r.get("run_id")), str(r.get("config_hash")), str(r.get("created")), str(r.get("status"))]
                   for r in records)
    items += sorted([str(e.get("run_id") or e.get("path")), "", "", str(e.get("status"))] for e in excluded)
    return canonical_hash(items)


def aggregate(records: Sequence[Mapping[str, Any]], *, runs: str = "runs", command: str | None = None,
              name: str | None = None, excluded: Sequence[Mapping[str, Any]] = (),
              include_flagged: bool = False, defenses: Sequence[str] | None = None) -> Leaderboard:
    """One leaderboard from records that share one protocol (a :class:`UsageError` if not)."""
    import numpy as np
    import pandas as pd

    if not records:
        raise UsageError("no records to aggregate")
    protocols = {protocol_id(protocol_of(r)) for r in records}
    if len(protocols) > 1:
        raise UsageError(f"records disagree on protocol ({len(protocols)} protocols); "
                         "group them with group_by_protocol() first")
    protocol = protocol_of(records[0])
    ev = protocol["evaluators"]
    robust_source = "autoattack" if "autoattack" in ev else ("pgd" if "pgd" in ev else None)
    flat = [record_row(r, robust_source) for r in records]
    df = pd.DataFrame(flat)
    # duplicates of one config (copied run folders): keep the newest
    df = df.sort_values(["created", "run_id"]).drop_duplicates("config_hash", keep="last")
    # one recipe and seed measured twice under this protocol (the runs differ only in an evaluator
    # outside the table, e.g. the torchattacks list): one model, not two seeds -- keep the newest
    df = df.drop_duplicates(["defense", "defense_version", "params", "train", "seed"], keep="last")
    df = df.sort_values(["defense", "params", "train", "seed"], kind="stable").reset_index(drop=True)

    value_cols = ["clean", "robust", "auc", "tpr", "epsilon", "train_s", "eval_s", *PRIMARY_COLS, "plow_fpr", "eps_lb"]
    rows = []
    for key, g in df.groupby(["defense", "defense_version", "params", "train"], sort=True, dropna=False):
        row: dict[str, Any] = dict(zip(["defense", "defense_version", "params", "train"], key))
        row["family"] = g["family"].iloc[0]
        row["description"] = g["description"].iloc[0]
        row["seeds"] = int(g["seed"].nunique())
        row["seed_list"] = " ".join(str(s) for s in sorted(g["seed"].unique()))
        row["n_records"] = len(g)
        row["run_ids"] = " ".join(g["run_id"].astype(str))
        row["flags"] = ", ".join(sorted({f for fl in g["flags"] for f in str(fl).split(", ") if f}))
        for c in value_cols:
            vals = g[c].astype(float)
            finite = vals[~vals.isna()]
            row[f"{c}_mean"] = float(finite.mean()) if len(finite) else math.nan
            row[f"{c}_std"] = float(finite.std(ddof=1)) if len(finite) > 1 else math.nan
            row[f"{c}_n"] = int(len(finite))
        for c in INTERVAL_COLS:
            vals = g[c].astype(float)
            finite = vals[~vals.isna()]
            if len(finite) >= 2:   # several seeds: Student-t interval of the mean over seeds
                row[f"{c}_ci_low"], row[f"{c}_ci_high"] = seed_interval(finite.to_numpy())
            elif len(finite) == 1:  # one run: the run's own interval
                one = g.loc[finite.index]
                row[f"{c}_ci_low"] = float(one[f"{c}_lo"].iloc[0])
                row[f"{c}_ci_high"] = float(one[f"{c}_hi"].iloc[0])
            else:
                row[f"{c}_ci_low"] = row[f"{c}_ci_high"] = math.nan
        row["interval"] = "run" if row["seeds"] <= 1 else f"t over {row['seeds']} seeds"
        for c in ("auc", "tpr", *PRIMARY_COLS):
            attacks = [a for a in g[f"{c}_attack"] if isinstance(a, str)]
            row[f"{c}_attack"] = ", ".join(sorted(set(attacks), key=attacks.index))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["label"] = _labels(rows)

    # leakage: the primary attack's pooled TPR at 0.1% (then 1%) FPR if every row has it, else the
    # strongest attack's TPR at 0.1% FPR, else its AUC (the first that every row has)
    leakage = None
    if out["ptpr01_mean"].notna().all():
        leakage = "ptpr01"
    elif out["ptpr1_mean"].notna().all():
        leakage = "ptpr1"
    elif out["tpr_mean"].notna().all():
        leakage = "tpr"
    elif out["auc_mean"].notna().all():
        leakage = "auc"
    elif out["tpr_mean"].notna().any() or out["auc_mean"].notna().any():
        leakage = "tpr" if out["tpr_mean"].notna().any() else "auc"
    out["leakage_mean"] = out[f"{leakage}_mean"] if leakage else math.nan
    # flagged rows (sanity flags) are kept off the ranking unless asked for
    ranked = (out["flags"] == "") | include_flagged
    axes = [(a, col, up) for a, col, up in (("clean", "clean_mean", True), ("robust", "robust_mean", True),
                                            ("leakage", "leakage_mean", False))
            if ranked.any() and np.isfinite(out.loc[ranked, col].astype(float)).all()]
    if axes and ranked.all():
        out["pareto_rank"] = pareto_ranks(out[[c for _, c, _ in axes]].astype(float).values.tolist(),
                                          [up for _, _, up in axes])
    elif axes:
        out["pareto_rank"] = math.nan
        out.loc[ranked, "pareto_rank"] = pareto_ranks(
            out.loc[ranked, [c for _, c, _ in axes]].astype(float).values.tolist(), [up for _, _, up in axes])
    else:
        out["pareto_rank"] = math.nan   # unranked (no axis, or every row flagged): NaN, as in from_json
    sort_cols = ["pareto_rank", "robust_mean", "clean_mean", "label"] if axes else ["robust_mean", "label"]
    asc = [True, False, False, True] if axes else [False, True]
    out = out.sort_values(sort_cols, ascending=asc, na_position="last", kind="stable").reset_index(drop=True)

    ds = (protocol.get("dataset") or {}).get("name", "")
    defenses = sorted(set(defenses)) if defenses else None
    cmd = command or command_for(str(ds), str(runs), include_flagged=include_flagged, defenses=defenses)
    return Leaderboard(name=name or table_name(protocol, defenses), protocol=protocol,
                       protocol_id=protocol_id(protocol),
                       command=cmd, rows=out, records=df, robust_source=robust_source, leakage=leakage,
                       pareto_axes=[a for a, _, _ in axes], excluded=list(excluded), runs=str(runs),
                       include_flagged=include_flagged, defenses=defenses,
                       source_digest=source_digest(records, [e for e in excluded if e.get("status") != UNUSABLE]))


# ------------------------------------------------------------------------------ loading
#: the types a record's fields must have for the table's sorting and grouping (None: n/a)
_ROW_TYPES = {"defense": (str,), "defense_version": (int,), "seed": (int,), "created": (str,)}
#: the record sections a table reads, which must be JSON objects when present
_SECTIONS = [("config", k) for k in ("model", "threat", "data", "defense", "train", "evaluators")] + [
    ("components", "defense")]


def _unusable(rec: Mapping[str, Any]) -> str | None:
    """Why a record the store accepted still cannot enter a table (a nested field of the
    wrong type, e.g. ``config.threat`` a list or ``config.seed`` a string), or None if it can."""
    for top, key in _SECTIONS:
        v = (rec.get(top) or {}).get(key)
        if v is not None and not isinstance(v, Mapping):
            return f"{top}.{key} is a {type(v).__name__}, expected an object"
    try:
        base_name(protocol_of(rec))
        protocol_id(protocol_of(rec))
        row = record_row(rec)
    except (TypeError, AttributeError, ValueError, KeyError) as e:
        return f"a field has the wrong type ({type(e).__name__}: {e})"
    for key, types in _ROW_TYPES.items():
        v = row[key]
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            return f"{key} {v!r} is a {type(v).__name__}, expected {' or '.join(t.__name__ for t in types)}"
    return None


def unusable_entry(path: str | Path, reason: str) -> dict[str, Any]:
    """The excluded entry of a record file that could not be used."""
    return {"run_id": None, "path": str(path), "status": UNUSABLE, "reason": reason}


def load_records(runs: str | Path, dataset: str | None = None) -> tuple[list[dict], list[dict]]:
    """(finished records, excluded records) under ``runs``, optionally of one dataset.

    Excluded are failed and unfinished runs (``status`` other than ``"ok"``), kept with their
    protocol so that each table can say how many of its runs were left out and why, then the
    record files that cannot be used (unreadable, not a JSON object, fields of the wrong
    type) as :func:`unusable_entry` dicts (``status == "unusable"``, with path and reason),
    sorted by path: they never stop the build.  A file the store could not read at all
    cannot be attributed to a dataset and is listed whatever ``dataset`` is.  The store's
    shared cache folder holds no runs and is skipped.
    """
    runs = Path(runs)
    if not runs.is_dir():
        raise UsageError(f"runs directory {str(runs)!r} does not exist; pass --runs DIR with the directory "
                         "that `cfbench run --out DIR` wrote to.")
    ok, excluded, unusable = [], [], []
    seen_datasets = set()
    issues = StoreIssues()
    for rec in iter_records(runs, status=None, issues=issues):
        ds = rec["config"]["dataset"]["name"]  # the store checked that it is a string
        seen_datasets.add(ds)
        if dataset is not None and ds != dataset:
            continue
        reason = _unusable(rec)
        if reason is not None:
            unusable.append(unusable_entry(Path(rec["_path"]) / RECORD, reason))
            continue
        (ok if rec.get("status") == "ok" else excluded).append(rec)
    if dataset is not None and not ok and not excluded and not unusable:
        raise UsageError(f"no records of dataset {dataset!r} under {str(runs)!r}. Datasets with records there: "
                         f"{', '.join(sorted(str(d) for d in seen_datasets)) or '(none)'}."
                         + _unusable_text([unusable_entry(p, r) for p, r in issues.bad]))
    unusable += [unusable_entry(p, r) for p, r in issues.bad]
    return ok, excluded + sorted(unusable, key=lambda e: e["path"])


def _unusable_text(unusable: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    if not unusable:
        return ""
    lines = [f"\n  {e['path']}: {e['reason']}" for e in unusable[:limit]]
    more = f"\n  ... and {len(unusable) - limit} more" if len(unusable) > limit else ""
    return (f" {len(unusable)} record file{'s' if len(unusable) != 1 else ''} could not be used:"
            + "".join(lines) + more)


def group_by_protocol(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(protocol_id(protocol_of(r)), []).append(r)
    return groups


def _defense_name(rec: Mapping[str, Any]) -> str:
    return str(((rec.get("config") or {}).get("defense") or {}).get("name"))


def build(runs: str | Path = "runs", dataset: str | None = None, *, runs_label: str | None = None,
          include_flagged: bool = False, defenses: Sequence[str] | None = None) -> list[Leaderboard]:
    """Every leaderboard of the records under ``runs`` (one per protocol), each named by
    :func:`table_name` (unique per protocol and stable).  ``defenses`` restricts the tables to
    these defenses (a name no record of the build has is a :class:`UsageError` naming the ones
    there); such a table's name ends in ``-only-<defenses>``.

    Unusable record files are listed in the excluded entries of every table built."""
    ok, excluded = load_records(runs, dataset)
    unusable = [e for e in excluded if e.get("status") == UNUSABLE]
    excluded = [e for e in excluded if e.get("status") != UNUSABLE]
    if defenses:
        defenses = sorted({d.strip() for d in defenses})
        present = sorted({_defense_name(r) for r in ok + excluded})
        missing = [d for d in defenses if d not in present]
        if missing or not all(defenses):
            bad = missing[0] if missing else ""
            raise UsageError(f"--defense {bad!r}: no record of that defense under {str(runs)!r}"
                             + (f" for dataset {dataset!r}" if dataset else "") + "."
                             + suggest(bad, present))
        keep = set(defenses)
        ok = [r for r in ok if _defense_name(r) in keep]
        excluded = [r for r in excluded if _defense_name(r) in keep]
    groups = group_by_protocol(ok)
    if not groups:
        raise UsageError(f"no finished runs under {str(runs)!r}"
                         + (f" for dataset {dataset!r}" if dataset else "")
                         + (f" of defense {', '.join(defenses)}" if defenses else "")
                         + f" ({len(excluded)} failed or unfinished); nothing to tabulate."
                         + _unusable_text(unusable))
    bad = group_by_protocol(excluded)
    boards = []
    for pid in sorted(groups, key=lambda p: (table_name(protocol_of(groups[p][0]), defenses), p)):
        exc = [{"run_id": r.get("run_id"), "status": r.get("status"), "reason": r.get("reason")}
               for r in bad.get(pid, [])] + [dict(e) for e in unusable]
        boards.append(aggregate(groups[pid], runs=runs_label or str(runs), excluded=exc,
                                include_flagged=include_flagged, defenses=defenses))
    sweeps = read_sweeps(runs)
    finished_ids = {r.get("run_id") for r in load_records(runs, None)[0]} if sweeps else set()
    for lb in boards:
        ids = set(lb.records["run_id"]) if len(lb.records) else set()
        mine = [s for s in sweeps if ids & set(s["run_ids"])]
        lb.produced_by = [s["command"] for s in mine]
        lb.sweep_progress = [{"finished": len(finished_ids & set(s["run_ids"])), "runs": len(set(s["run_ids"]))}
                             for s in mine]
    return boards


#: in a runs folder: the ``cfbench sweep`` commands that wrote into it and the run ids of their
#: grids, so a table built from the folder names the sweep that reproduces its rows
SWEEPS_FILE = "sweeps.json"


def record_sweep(runs: str | Path, grid: str, command: str, run_ids: Sequence[str]) -> None:
    """Add (or replace) the entry of sweep file ``grid`` in ``runs``/:data:`SWEEPS_FILE`
    (atomically, under a lock: two sweeps into one folder keep both entries).  ``grid`` is
    normalised (``os.path.normpath``), so one sweep file typed two ways is one entry."""
    import os

    from ..store.io import file_lock, lock_path, write_json

    grid = os.path.normpath(str(grid))
    path = Path(runs) / SWEEPS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(path)):
        entries = {s["grid"]: s for s in read_sweeps(runs, warn=False)}
        entries[grid] = {"grid": grid, "command": command, "run_ids": sorted(set(run_ids))}
        write_json(path, {"version": 1, "sweeps": [entries[k] for k in sorted(entries)]})


def read_sweeps(runs: str | Path, *, warn: bool = True) -> list[dict[str, Any]]:
    """The entries of ``runs``/:data:`SWEEPS_FILE` ([] if there is none); a damaged file is
    reported (a warning) and treated as empty, never fatal."""
    import warnings

    path = Path(runs) / SWEEPS_FILE
    if not path.is_file():
        return []
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        entries = [{"grid": str(e["grid"]), "command": str(e["command"]), "run_ids": [str(i) for i in e["run_ids"]]}
                   for e in obj["sweeps"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if warn:
            warnings.warn(f"{path}: unreadable ({type(exc).__name__}: {exc}); the tables do not name their sweep",
                          stacklevel=2)
        return []
    return entries


def command_for(dataset: str, runs: str, out: str = "leaderboards", include_flagged: bool = False,
                defenses: Sequence[str] | None = None) -> str:
    """The exact command that rebuilds the tables of one dataset."""
    parts = ["cfbench", "leaderboard", "--dataset", dataset, "--runs", runs]
    if defenses:
        parts += ["--defense", ",".join(sorted(set(defenses)))]
    if out != "leaderboards":
        parts += ["--out", out]
    if include_flagged:
        parts += ["--include-flagged"]
    return " ".join(shlex.quote(str(p)) for p in parts)

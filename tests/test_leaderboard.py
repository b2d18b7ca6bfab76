"""Leaderboards: aggregation equals a direct pandas aggregation, Pareto ranks, protocol
separation, failed runs, headers, escaping, CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cfbench.cli import main
from cfbench.present.leaderboard import (
    Leaderboard,
    aggregate,
    build,
    pareto_ranks,
    protocol_id,
    protocol_of,
    strongest,
)
from cfbench.present.writers import display_rows, to_json_obj, to_markdown, write
from record_factory import make_record, write_record

# ------------------------------------------------------------------------------ Pareto


def test_pareto_ranks_hand_made_points():
    # (clean up, robust up, leakage down)
    pts = {
        "A": (0.90, 0.50, 0.10),
        "B": (0.80, 0.60, 0.05),   # trades clean for robust and privacy: front
        "C": (0.85, 0.45, 0.20),   # dominated by A only -> rank 2
        "D": (0.70, 0.40, 0.30),   # dominated by C (rank 2) -> rank 3
        "E": (0.90, 0.50, 0.10),   # equal to A: equal points share a rank
        "F": (0.95, 0.10, 0.50),   # best clean accuracy: front
        "G": (0.80, 0.60, 0.06),   # B is as good everywhere and better on leakage -> 2
    }
    ranks = pareto_ranks(list(pts.values()), [True, True, False])
    assert dict(zip(pts, ranks)) == {"A": 1, "B": 1, "C": 2, "D": 3, "E": 1, "F": 1, "G": 2}


def test_pareto_ranks_directions_and_errors():
    # one axis to minimise only: the rank is the dense order of the values
    assert pareto_ranks([[3.0], [1.0], [2.0], [1.0]], [False]) == [3, 1, 2, 1]
    assert pareto_ranks([[3.0], [1.0], [2.0]], [True]) == [1, 3, 2]
    assert pareto_ranks([], [True, False]) == []
    with pytest.raises(ValueError):
        pareto_ranks([[1.0, math.nan]], [True, True])


def _dominates(a, b, up):
    a = [x if u else -x for x, u in zip(a, up)]
    b = [x if u else -x for x, u in zip(b, up)]
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


@pytest.mark.parametrize("seed", range(5))
def test_pareto_ranks_match_the_definition(seed):
    rng = np.random.default_rng(seed)
    pts = np.round(rng.random((25, 3)), 1).tolist()  # rounding makes ties
    up = [True, True, False]
    ranks = pareto_ranks(pts, up)
    for i, p in enumerate(pts):
        # rank 1 iff nobody dominates it; rank k > 1: dominated by some rank k-1 point,
        # and by no point of rank >= k
        dominators = [ranks[j] for j, q in enumerate(pts) if _dominates(q, p, up)]
        if ranks[i] == 1:
            assert dominators == []
        else:
            assert ranks[i] - 1 in dominators
            assert max(dominators) == ranks[i] - 1


# ------------------------------------------------------------------------------ records
SPEC = [  # defense, family, seed, clean, robust, auc(lira), tpr(lira @ 0.1%), epsilon
    ("erm", "erm", 0, 0.98, 0.02, 0.70, 0.060, None),
    ("erm", "erm", 1, 0.97, 0.04, 0.68, 0.050, None),
    ("erm", "erm", 2, 0.96, 0.00, 0.72, 0.070, None),
    ("pgd-at", "adversarial", 0, 0.92, 0.70, 0.64, 0.030, None),
    ("pgd-at", "adversarial", 1, 0.90, 0.74, 0.66, 0.040, None),
    ("dp-sgd", "dp", 0, 0.80, 0.10, 0.52, 0.002, 3.0),
]


def _mia(auc, tpr):
    # two attacks; loss is weaker on both metrics
    return {"loss": {"auc": auc - 0.05, "tpr.0.01": tpr, "tpr.0.001": tpr / 2, "tpr.0.0001": None},
            "lira_online": {"auc": auc, "tpr.0.01": 3 * tpr, "tpr.0.001": tpr, "tpr.0.0001": None}}


@pytest.fixture
def store(tmp_path):
    runs = tmp_path / "runs"
    for d, fam, s, c, r, a, t, e in SPEC:
        write_record(runs, make_record(defense=d, family=fam, seed=s, clean=c, robust=r, mia=_mia(a, t),
                                       epsilon=e, train_s=10 + s, eval_s={"clean": 1, "pgd": 2, "autoattack": 3,
                                                                          "mia": 4 + s}))
    # a failed run of the same protocol: never tabulated
    write_record(runs, make_record(defense="erm", seed=7, clean=0.1, robust=0.1, mia=_mia(0.9, 0.5),
                                   status="failed", reason="TrainingDiverged: loss is nan"))
    # an unfinished one
    write_record(runs, make_record(defense="erm", seed=8, status="running"))
    # other protocols: another eps; another membership protocol; another dataset
    write_record(runs, make_record(defense="erm", seed=0, eps=0.2, mia=_mia(0.6, 0.01)))
    write_record(runs, make_record(defense="erm", seed=0, mia=_mia(0.6, 0.01), mia_params={"reference_models": 16}))
    write_record(runs, make_record(defense="erm", seed=0, dataset="fashion-mnist", model="cnn28"))
    return runs


def _main_table(boards):
    [lb] = [b for b in boards if b.name.startswith("digits-cnn8-Linf-0.1") and "pgd-at" in set(b.rows["defense"])]
    return lb


def test_leaderboard_numbers_equal_pandas_aggregation(store, tmp_path):
    boards = build(store, "digits")
    lb = _main_table(boards)
    paths = write(lb, tmp_path / "lb")
    csv = pd.read_csv(paths["csv"], comment="#").set_index("defense")
    js = json.loads(paths["json"].read_text())

    # the independent computation: straight from the inputs above
    df = pd.DataFrame(SPEC, columns=["defense", "family", "seed", "clean", "robust", "auc", "tpr", "epsilon"])
    df["train_s"] = 10.0 + df["seed"]
    df["eval_s"] = 1 + 2 + 3 + 4.0 + df["seed"]
    agg = df.groupby("defense")[["clean", "robust"]].agg(["mean", "std", "count"])

    assert set(csv.index) == set(agg.index)
    for d in agg.index:
        k = 500  # n_test: the factory rounds rates to k/n
        for col, csv_col, n in [("clean", "clean_accuracy", k), ("robust", "robust_accuracy", k),
                                ("auc", "mia_best_auc", None), ("tpr", "mia_best_tpr_at_fpr_0.001", 600),
                                ("train_s", "train_seconds", None), ("eval_s", "eval_seconds", None)]:
            vals = df.loc[df.defense == d, col]
            if n:
                vals = (vals * n).round() / n
            assert csv.loc[d, f"{csv_col}_mean"] == pytest.approx(vals.mean(), abs=1e-12), (d, col)
            if len(vals) > 1:
                assert csv.loc[d, f"{csv_col}_std"] == pytest.approx(vals.std(ddof=1), abs=1e-12), (d, col)
            else:
                assert math.isnan(csv.loc[d, f"{csv_col}_std"])
        assert csv.loc[d, "seeds"] == agg.loc[d, ("clean", "count")]
        assert csv.loc[d, "family"] == df.loc[df.defense == d, "family"].iloc[0]
    assert csv.loc["dp-sgd", "dp_epsilon_mean"] == 3.0
    assert math.isnan(csv.loc["erm", "dp_epsilon_mean"])
    # the strongest attack is named
    assert csv.loc["erm", "mia_best_auc_attack"] == "lira_online"
    # JSON carries the same numbers
    row = {r["defense"]: r for r in js["rows"]}
    assert row["pgd-at"]["clean_accuracy"]["mean"] == pytest.approx(csv.loc["pgd-at", "clean_accuracy_mean"])
    assert row["erm"]["seed_list"] == [0, 1, 2]
    assert row["dp-sgd"]["dp_epsilon"]["mean"] == 3.0


def test_pareto_rank_in_table(store):
    lb = _main_table(build(store, "digits"))
    ranks = dict(zip(lb.rows["defense"], lb.rows["pareto_rank"]))
    # erm: best clean; pgd-at: best robust; dp-sgd: least leakage -> all on the front
    assert ranks == {"erm": 1, "pgd-at": 1, "dp-sgd": 1}
    assert lb.leakage == "tpr" and lb.pareto_axes == ["clean", "robust", "leakage"]
    assert "TPR @ 0.1% FPR" in lb.pareto_text()


def test_dominated_row_gets_rank_two(tmp_path):
    runs = tmp_path / "runs"
    write_record(runs, make_record(defense="a", clean=0.9, robust=0.5, mia=_mia(0.6, 0.01)))
    write_record(runs, make_record(defense="b", clean=0.8, robust=0.4, mia=_mia(0.7, 0.02)))
    [lb] = build(runs)
    assert dict(zip(lb.rows["defense"], lb.rows["pareto_rank"])) == {"a": 1, "b": 2}
    assert list(lb.rows["defense"]) == ["a", "b"]  # sorted by rank


def test_failed_runs_and_other_protocols_never_mixed(store):
    boards = build(store, None)
    names = sorted(b.name for b in boards)
    # every name is <dataset>-<model>-<norm>-<eps>-<first 8 hex digits of the protocol id>: two
    # digits protocols that differ only in the membership protocol get different names
    assert len(boards) == 4
    assert names == sorted(f"{base}-{b.protocol_id[:8]}" for b in boards for base in [
        "-".join(b.name.split("-")[:-1])])
    assert {n.rsplit("-", 1)[0] for n in names} == {"digits-cnn8-Linf-0.1", "digits-cnn8-Linf-0.2",
                                                     "fashion-mnist-cnn28-Linf-0.1"}
    hashed = [n for n in names if n.startswith("digits-cnn8-Linf-0.1-")]
    assert len(hashed) == 2 and all(len(n.rsplit("-", 1)[1]) == 8 for n in hashed)
    for b in boards:
        assert b.name.endswith("-" + protocol_id(b.protocol)[:8])
    for lb in boards:
        pids = set()
        for rid in " ".join(lb.rows["run_ids"]).split():
            rec = json.loads((store / rid / "record.json").read_text())
            assert rec["status"] == "ok"
            pids.add(protocol_id(protocol_of(rec)))
        assert pids == {lb.protocol_id}
    main_lb = _main_table(boards)
    assert int(main_lb.rows.set_index("defense").loc["erm", "seeds"]) == 3
    assert {e["status"] for e in main_lb.excluded} == {"failed", "running"}
    assert "TrainingDiverged" in to_markdown(main_lb)


def test_aggregate_refuses_mixed_protocols():
    from cfbench.errors import UsageError

    with pytest.raises(UsageError, match="protocol"):
        aggregate([make_record(eps=0.1), make_record(eps=0.2)])


def test_duplicate_config_hash_counted_once(tmp_path):
    runs = tmp_path / "runs"
    rec = make_record(seed=0)
    write_record(runs, rec, "copy-a")
    write_record(runs, dict(rec, created="2026-02-01T00:00:00+00:00"), "copy-b")
    [lb] = build(runs)
    assert int(lb.rows["seeds"].iloc[0]) == 1 and len(lb.records) == 1


def test_one_seed_measured_twice_is_one_seed_not_two(tmp_path):
    """Two runs of one recipe and seed that differ only in an evaluator outside the table (the
    zoo's attack list) share the table's protocol; they are one model, so the row keeps the
    newest, with that run's own interval -- not a zero-width t-interval over two 'seeds'."""
    runs = tmp_path / "runs"
    old = make_record(seed=0, clean=0.9, evaluators=("clean", "pgd", "autoattack"))
    new = make_record(seed=0, clean=0.9, evaluators=("clean", "pgd", "autoattack"),
                      created="2026-02-01T00:00:00+00:00")
    new["config"]["evaluators"]["attacks"] = {"version": 1, "params": {"attacks": ["square"]}}
    new["config_hash"] = "f" * 64
    new["run_id"] = "digits-erm-cnn8-s0-ffffffffff"
    write_record(runs, old, "a")
    write_record(runs, new, "b")
    [lb] = build(runs)
    row = lb.rows.iloc[0]
    assert int(row["seeds"]) == 1 and int(row["n_records"]) == 1 and row["run_ids"] == new["run_id"]
    lo, hi = new["metrics"]["clean.accuracy"]["ci_low"], new["metrics"]["clean.accuracy"]["ci_high"]
    assert (row["clean_ci_low"], row["clean_ci_high"]) == pytest.approx((lo, hi)) and lo < hi


def test_rows_split_by_hyperparameters_and_training(tmp_path):
    runs = tmp_path / "runs"
    train30 = dict(make_record()["config"]["train"], epochs=30)
    write_record(runs, make_record(defense="trades", params={"beta": 1.0, "steps": 10}, seed=0))
    write_record(runs, make_record(defense="trades", params={"beta": 6.0, "steps": 10}, seed=0))
    write_record(runs, make_record(defense="trades", params={"beta": 6.0, "steps": 10}, seed=1))
    write_record(runs, make_record(defense="erm", seed=0, train=train30))
    write_record(runs, make_record(defense="erm", seed=1))
    [lb] = build(runs)
    # only what tells rows apart is in the label: beta (not steps), and the epochs
    assert dict(zip(lb.rows["label"], lb.rows["seeds"])) == {
        "trades (beta=1.0) [epochs=5]": 1, "trades (beta=6.0) [epochs=5]": 2,
        "erm [epochs=30]": 1, "erm [epochs=5]": 1}


def test_without_mia_columns_are_na_and_pareto_uses_two_axes(tmp_path):
    runs = tmp_path / "runs"
    write_record(runs, make_record(defense="erm", clean=0.99, robust=0.0, with_mia=False))
    write_record(runs, make_record(defense="pgd-at", family="adversarial", clean=0.95, robust=0.8, with_mia=False))
    [lb] = build(runs)
    assert lb.leakage is None and lb.pareto_axes == ["clean", "robust"]
    header, body = display_rows(lb)
    for row in body:
        assert row[header.index("MIA AUC (strongest)")] == "n/a"
        assert row[0] == "1"
    assert "not evaluated" in to_markdown(lb)


def test_leakage_falls_back_to_auc_when_tpr_is_na(tmp_path):
    runs = tmp_path / "runs"
    na = {"loss": {"auc": 0.55, "tpr.0.01": None, "tpr.0.001": None, "tpr.0.0001": None}}
    write_record(runs, make_record(defense="a", clean=0.9, robust=0.5, mia=na, n_nonmembers=50))
    write_record(runs, make_record(defense="b", clean=0.9, robust=0.5, mia={"loss": {"auc": 0.60, "tpr.0.001": 0.1}},
                                   n_nonmembers=50))
    [lb] = build(runs)
    assert lb.leakage == "auc"
    assert "AUC" in lb.pareto_text()
    assert dict(zip(lb.rows["defense"], lb.rows["pareto_rank"])) == {"a": 1, "b": 2}
    header, body = display_rows(lb)
    row_a = [r for r in body if r[1] == "a"][0]
    assert row_a[header.index("MIA TPR @ 0.1% FPR % (strongest)")] == "n/a"


def test_pgd_fallback_when_no_autoattack(tmp_path):
    runs = tmp_path / "runs"
    write_record(runs, make_record(evaluators=("clean", "pgd"), robust=0.5))
    [lb] = build(runs)
    assert lb.robust_source == "pgd" and "PGD" in display_rows(lb)[0][4]
    assert lb.rows["robust_mean"].iloc[0] == pytest.approx(0.52)


def test_strongest_attack():
    m = make_record(mia={"loss": {"auc": 0.7, "tpr.0.001": 0.01}, "lira_online": {"auc": 0.6, "tpr.0.001": 0.05}})
    metrics = m["metrics"]
    assert strongest(metrics, "auc")["attack"] == "loss"
    assert strongest(metrics, "tpr_at_fpr.0.001")["attack"] == "lira_online"
    # without mia.best.*: maximum over attacks, interval from the attack's own entry
    bare = {k: v for k, v in metrics.items() if not k.startswith("mia.best.")}
    s = strongest(bare, "tpr_at_fpr.0.001")
    assert s["attack"] == "lira_online" and s["value"] == metrics["mia.lira_online.tpr_at_fpr.0.001"]["value"]
    assert s["ci_low"] == metrics["mia.lira_online.tpr_at_fpr.0.001"]["ci_low"]
    # best without an interval (as cfbench.mia.metrics.best_of writes it): interval looked up
    metrics2 = dict(metrics, **{"mia.best.auc": {"attack": "loss", "value": 0.7}})
    assert strongest(metrics2, "auc")["ci_low"] == metrics["mia.loss.auc"]["ci_low"]
    assert math.isnan(strongest({}, "auc")["value"])


def test_files_are_headed_by_protocol_and_command(store, tmp_path):
    code = main(["leaderboard", "--dataset", "digits", "--runs", str(store), "--out", str(tmp_path / "lb"),
                 "--quiet", "--no-reports"])
    assert code == 0
    cmd = f"cfbench leaderboard --dataset digits --runs {store} --out {tmp_path / 'lb'}"
    files = sorted((tmp_path / "lb").iterdir())
    assert {p.suffix for p in files} == {".md", ".csv", ".json", ".html", ".tex"}
    assert len(files) == 5 * 3  # three digits protocols
    for p in files:
        text = p.read_text(encoding="utf-8")
        assert cmd in text, p
        head = text[:3000]
        if p.suffix == ".md":
            assert head.startswith("# Leaderboard: digits-cnn8-Linf-")
            assert "**threat model**: Linf, eps = " in head and "**membership inference**" in head
        if p.suffix == ".csv":
            lines = text.splitlines()
            assert lines[0].startswith("# leaderboard ") and lines[1] == f"# rebuild: {cmd}"
            assert lines[2].startswith("# protocol ")
        if p.suffix == ".json":
            obj = json.loads(text)
            assert obj["command"] == cmd and obj["protocol"]["dataset"]["name"] == "digits"
        if p.suffix == ".html":
            assert "<html" in head and text.index(cmd) < text.index("Protocol") < text.index("<h3>Table")


def test_json_round_trip(store):
    lb = _main_table(build(store, "digits"))
    back = Leaderboard.from_json(json.loads(json.dumps(to_json_obj(lb))))
    assert display_rows(back) == display_rows(lb)
    assert back.pareto_text() == lb.pareto_text()


def test_script_in_defense_name_is_text(tmp_path):
    runs = tmp_path / "runs"
    evil = "<script>alert(1)</script>"
    write_record(runs, make_record(defense=f"x{evil}", description=f"desc {evil} | pipe"), "evil")
    [lb] = build(runs)
    paths = write(lb, tmp_path / "lb")
    html = paths["html"].read_text()
    assert only_our_script(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    md = paths["md"].read_text()
    assert "<script" not in md and "&lt;script&gt;" in md


def only_our_script(html: str) -> bool:
    """The page's one script is the sorting script the CSP allows by hash; nothing else runs."""
    import re

    from cfbench.present.writers import SORT_SCRIPT, script_hash

    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, flags=re.S | re.I)
    return (scripts == [SORT_SCRIPT] and html.lower().count("<script") == 1
            and f"script-src {script_hash(SORT_SCRIPT)}" in html)


def test_cli_errors(store, tmp_path, capsys):
    assert main(["leaderboard", "--runs", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["leaderboard", "--runs", str(store), "--dataset", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "cifar10" in err and "digits" in err and "fashion-mnist" in err
    empty = tmp_path / "only-failed"
    write_record(empty, make_record(status="failed", reason="boom"))
    assert main(["leaderboard", "--runs", str(empty)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_epsilon_inf_and_formatting(tmp_path):
    runs = tmp_path / "runs"
    write_record(runs, make_record(defense="dp", family="dp", epsilon="inf"))
    [lb] = build(runs)
    header, body = display_rows(lb)
    assert body[0][header.index("DP ε")] == "∞"
    assert to_json_obj(lb)["rows"][0]["dp_epsilon"]["mean"] == "inf"


@pytest.mark.parametrize("n", [2, 3])
def test_std_across_seeds_is_sample_std(tmp_path, n):
    runs = tmp_path / "runs"
    vals = [0.5, 0.7, 0.9][:n]
    for s, v in enumerate(vals):
        write_record(runs, make_record(seed=s, clean=v, robust=v / 2))
    [lb] = build(runs)
    assert lb.rows["clean_std"].iloc[0] == pytest.approx(np.std(vals, ddof=1))
    assert list(itertools.chain(lb.rows["seed_list"])) == [" ".join(map(str, range(n)))]


def test_bad_record_files_are_listed_not_fatal(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_record(runs, make_record(defense="erm", seed=0))
    write_record(runs, make_record(defense="pgd-at", family="adversarial", seed=0, robust=0.7))
    good = json.dumps(make_record(defense="erm", seed=9))
    bad = {"truncated": good[: len(good) // 2], "empty-list": "[]", "null": "null",
           "config-list": json.dumps(dict(make_record(defense="erm", seed=3), config=["not", "a", "dict"]))}
    for name, text in bad.items():
        (runs / name).mkdir()
        (runs / name / "record.json").write_text(text, encoding="utf-8")
    # the store's shared cache holds no runs: never tabulated, never reported
    write_record(runs / "_cache", make_record(defense="cached", seed=0), "ref-model")

    [lb] = build(runs)
    assert sorted(lb.rows["defense"]) == ["erm", "pgd-at"] and len(lb.records) == 2
    listed = {Path(e["path"]).parent.name: e for e in lb.excluded}
    assert set(listed) == set(bad)
    assert all(e["status"] == "unusable" and e["reason"] and e["run_id"] is None for e in lb.excluded)
    assert "JSONDecodeError" in listed["truncated"]["reason"]
    assert "list" in listed["empty-list"]["reason"] and "config" in listed["config-list"]["reason"]
    assert "not an object" in listed["null"]["reason"]
    md = to_markdown(lb)
    assert "Record files left out (unreadable or not a valid record; listed below): 4." in md
    for name in bad:
        assert str(runs / name / "record.json") in md
    assert to_json_obj(lb)["excluded"] == lb.excluded

    # the command lists them too, and never fails on them
    assert main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "lb"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "4 record files" in out.err and str(runs / "null" / "record.json") in out.err
    assert "4 unusable record files left out" in out.out


def test_schema_1_records_still_load_and_rebuild_their_table(tmp_path):
    """The digits records committed before the demo protocol (schema version 1, kept in
    tests/fixtures/schema1_digits with the table built from them): read through the store they
    are upgraded to the current schema and rebuild that table's numbers exactly."""
    from cfbench.store import SCHEMA_VERSION, iter_records

    fixture = Path(__file__).resolve().parent / "fixtures" / "schema1_digits"
    raw = [json.loads(p.read_text()) for p in sorted((fixture / "runs").rglob("record.json"))]
    assert raw and all(r["schema_version"] == 1 for r in raw)
    recs = list(iter_records(fixture / "runs"))
    assert len(recs) == len(raw) and all(r["schema_version"] == SCHEMA_VERSION == 3 for r in recs)
    # no AutoAttack check warned on these runs: no sanity flags after the upgrade
    assert all(r["jobs"] == [] and r["examples"] == [] and r["flags"] == [] for r in recs)
    boards = build(fixture / "runs", "digits", runs_label="leaderboards/runs")
    assert len(boards) == 1
    rows = boards[0].rows
    stored = json.loads((fixture / "table.json").read_text())
    assert boards[0].protocol_id == stored["protocol_id"]  # protocol ids never change
    got = {r["label"]: round(r["clean_mean"], 6) for _, r in rows.iterrows()}
    want = {r["label"]: round(r["clean_accuracy"]["mean"], 6) for r in stored["rows"]}
    assert got == want


def _committed_digits_table() -> dict:
    """The committed digits table built from leaderboards/runs (other committed digits tables,
    e.g. the reference leaderboard's, come from other runs folders)."""
    committed = Path(__file__).resolve().parents[1] / "leaderboards"
    tables = [json.loads(p.read_text()) for p in sorted(committed.glob("digits-*.json"))]
    mine = [t for t in tables if (t.get("source") or {}).get("runs") == "leaderboards/runs"]
    assert len(mine) == 1, [t["name"] for t in tables]
    return mine[0]


def test_the_committed_table_is_what_its_runs_give():
    """leaderboards/<digits table>.* is exactly what `cfbench leaderboard` builds from
    leaderboards/runs today (same numbers, same source digest: not stale)."""
    from cfbench.present.report import staleness

    committed = Path(__file__).resolve().parents[1] / "leaderboards"
    stored = _committed_digits_table()
    path = committed / f"{stored['name']}.json"
    boards = build(committed / "runs", "digits", runs_label="leaderboards/runs")
    [lb] = [b for b in boards if b.protocol_id == stored["protocol_id"]]
    assert lb.name == stored["name"] == path.name[:-5]
    assert lb.source_digest == stored["source"]["digest"]
    fresh = json.loads(json.dumps(to_json_obj(lb)))
    for a, b in zip(fresh["rows"], stored["rows"]):
        assert a == b
    import os

    cwd = os.getcwd()
    try:
        os.chdir(committed.parent)
        assert staleness(stored)[0] == "current"
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------- names, overwrites, stale files
def _lb_cli(runs, out, *extra):
    return main(["leaderboard", "--runs", str(runs), "--out", str(out), "--quiet", "--no-reports", *extra])


def test_names_identify_the_protocol_and_are_stable(store):
    from cfbench.present.leaderboard import table_name

    first = {b.name: b.protocol_id for b in build(store)}
    again = {b.name: b.protocol_id for b in build(store)}
    assert first == again  # stable: the same records give the same names
    assert len(set(first.values())) == len(first)  # one name per protocol
    for name, pid in first.items():
        assert name.endswith("-" + pid[:8])
    # the name does not depend on what else the folder holds: one protocol alone keeps its name
    lb = _main_table(build(store, "digits"))
    alone = aggregate([json.loads((store / rid / "record.json").read_text()) for rid in lb.rows["run_ids"].iloc[0].split()])
    assert alone.name == lb.name == table_name(lb.protocol)


def _forge(lb_dir: Path, name: str, other_store: Path, tmp_path: Path) -> str:
    """Write a table of another protocol under ``name`` (what a hash-prefix clash, or an older
    cfbench's plain name, leaves behind); returns its protocol id."""
    [other] = build(other_store)
    other.name = name
    write(other, lb_dir)
    return other.protocol_id


def test_refuses_to_overwrite_another_protocol(store, tmp_path, capsys):
    out = tmp_path / "lb"
    lb = _main_table(build(store, "digits"))
    other_runs = tmp_path / "other"
    write_record(other_runs, make_record(defense="erm", eps=0.3))
    other_pid = _forge(out, lb.name, other_runs, tmp_path)
    before = (out / f"{lb.name}.json").read_text()
    assert _lb_cli(store, out, "--dataset", "digits") == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and lb.protocol_id[:12] in err and other_pid[:12] in err
    assert "--force" in err and "Linf-0.3" in err
    assert (out / f"{lb.name}.json").read_text() == before  # nothing written
    assert not list(out.glob("digits-cnn8-Linf-0.2-*"))    # not even the tables without a clash
    assert _lb_cli(store, out, "--dataset", "digits", "--force") == 0
    assert json.loads((out / f"{lb.name}.json").read_text())["protocol_id"] == lb.protocol_id


def test_refuses_to_overwrite_a_table_of_another_runs_folder(store, tmp_path, capsys):
    import shutil

    out = tmp_path / "lb"
    assert _lb_cli(store, out, "--dataset", "digits") == 0
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    assert _lb_cli(copy, out, "--dataset", "digits") == 2
    err = capsys.readouterr().err
    assert "another runs folder" in err and str(store) in err and str(copy) in err


def test_stale_tables_of_the_same_build_are_removed(store, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs-copy"
    shutil.copytree(store, runs)
    out = tmp_path / "lb"
    assert _lb_cli(runs, out, "--dataset", "digits") == 0
    names = {p.name[:-5] for p in out.glob("*.json")}
    [eps02] = [n for n in names if n.startswith("digits-cnn8-Linf-0.2-")]
    # a table of another runs folder in the same place, and an older cfbench's plain-named file of this one
    elsewhere = tmp_path / "elsewhere"
    write_record(elsewhere, make_record(defense="erm", eps=0.25))
    assert _lb_cli(elsewhere, out) == 0
    legacy = json.loads((out / f"{eps02}.json").read_text())
    legacy.pop("source"), legacy.pop("filters")
    (out / "digits-cnn8-Linf-0.2.json").write_text(json.dumps(dict(legacy, name="digits-cnn8-Linf-0.2")))
    (out / "digits-cnn8-Linf-0.2.md").write_text("# old\n")
    capsys.readouterr()
    # the eps = 0.2 protocol loses its only run: its table is stale
    for d in runs.iterdir():
        rec = json.loads((d / "record.json").read_text())
        if rec["config"]["threat"]["eps"] == 0.2:
            shutil.rmtree(d)
    assert _lb_cli(runs, out, "--dataset", "digits") == 0
    printed = capsys.readouterr().out
    assert f"removed stale {out / eps02}.*" in printed and "no longer built from" in printed
    left = {p.name for p in out.iterdir()}
    assert not any(n.startswith(eps02) or n.startswith("digits-cnn8-Linf-0.2.") for n in left)
    assert len([n for n in left if n.startswith("digits-cnn8-Linf-0.25-")]) == 5  # the other folder's: kept
    assert len([n for n in left if n.startswith("digits-cnn8-Linf-0.1-")]) == 10   # two protocols x 5 formats


def test_every_file_states_its_protocol_and_filters(store, tmp_path):
    out = tmp_path / "lb"
    assert _lb_cli(store, out, "--dataset", "digits", "--defense", "pgd-at,erm") == 0
    lb = _main_table(build(store, "digits"))
    name = f"{lb.name}-only-erm+pgd-at"
    obj = json.loads((out / f"{name}.json").read_text())
    assert obj["protocol_id"] == lb.protocol_id and obj["filters"] == {"dataset": "digits", "defenses": ["erm", "pgd-at"]}
    assert obj["source"]["runs"] == str(store) and len(obj["source"]["digest"]) == 64
    for ext in ("md", "csv", "html", "tex"):
        text = (out / f"{name}.{ext}").read_text()
        assert lb.protocol_id[:12] in text and "--defense erm,pgd-at" in text, ext


def test_defense_filter(store, tmp_path, capsys):
    full = _main_table(build(store, "digits"))
    [part] = [b for b in build(store, "digits", defenses=["erm", "pgd-at"]) if b.protocol_id == full.protocol_id]
    assert sorted(part.rows["defense"]) == ["erm", "pgd-at"]
    assert part.name == f"{full.name}-only-erm+pgd-at" and part.defenses == ["erm", "pgd-at"]
    a = full.rows.set_index("defense")
    b = part.rows.set_index("defense")
    for d in ("erm", "pgd-at"):
        assert b.loc[d, "clean_mean"] == a.loc[d, "clean_mean"] and b.loc[d, "seeds"] == a.loc[d, "seeds"]
    # excluded (failed) runs of other defenses are not counted either
    assert {e["run_id"].split("-s")[0] for e in part.excluded} <= {"digits-erm-cnn8", "digits-pgd-at-cnn8"}
    # the CLI: a filtered build leaves the full table alone
    out = tmp_path / "lb"
    assert _lb_cli(store, out, "--dataset", "digits") == 0
    assert _lb_cli(store, out, "--dataset", "digits", "--defense", "dp-sgd") == 0
    assert (out / f"{full.name}.json").exists() and (out / f"{full.name}-only-dp-sgd.json").exists()
    md = (out / f"{full.name}-only-dp-sgd.md").read_text()
    assert "| dp-sgd" in md and "| erm" not in md and "| pgd-at" not in md
    capsys.readouterr()
    assert _lb_cli(store, out, "--defense", "trades") == 2
    err = capsys.readouterr().err
    assert "'trades'" in err and "dp-sgd, erm, pgd-at" in err
    assert _lb_cli(store, out, "--defense", "erm,,x") == 2


# ------------------------------------------------------------------------ one kind of interval
def test_multi_seed_interval_is_a_t_interval_over_seeds(tmp_path):
    from scipy import stats

    runs = tmp_path / "runs"
    vals = [0.5, 0.7, 0.9]
    for s, v in enumerate(vals):
        write_record(runs, make_record(seed=s, clean=v, robust=v / 2))
    write_record(runs, make_record(defense="solo", clean=0.8, robust=0.4))
    [lb] = build(runs)
    r = lb.rows.set_index("defense")
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=stats.sem(vals))
    assert r.loc["erm", "clean_ci_low"] == pytest.approx(lo) and r.loc["erm", "clean_ci_high"] == pytest.approx(min(hi, 1))
    assert r.loc["erm", "interval"] == "t over 3 seeds" and r.loc["solo", "interval"] == "run"
    # one run: the run's own (Clopper-Pearson) interval
    rec = make_record(defense="solo", clean=0.8, robust=0.4)
    assert r.loc["solo", "clean_ci_low"] == rec["metrics"]["clean.accuracy"]["ci_low"]
    # the table shows the interval only (no ± std), and says once what it is
    header, body = display_rows(lb)
    assert all("±" not in c for row in body for c in row)
    md = to_markdown(lb)
    assert md.count("Student-t interval of the mean over the seeds") == 1
    assert "envelope" not in md


# ---------------------------------------------------------------------------------- LaTeX
def test_latex_export_is_booktabs_and_escaped(tmp_path):
    import re

    from cfbench.present.writers import to_latex

    runs = tmp_path / "runs"
    write_record(runs, make_record(defense="my_def%1&2", clean=0.9, robust=0.5))
    write_record(runs, make_record(defense="dp-sgd", family="dp", clean=0.8, robust=0.3, epsilon=2.5))
    write_record(runs, make_record(defense="dp-sgd", family="dp", seed=1, clean=0.82, robust=0.31, epsilon=2.5))
    [lb] = build(runs)
    tex = to_latex(lb)
    lines = tex.splitlines()
    body = [ln for ln in lines if not ln.startswith("%")]
    text = "\n".join(body)
    assert text.count("\\begin{table}") == 1 and text.count("\\end{table}") == 1
    assert text.count("\\begin{tabular}") == 1 and text.count("\\end{tabular}") == 1
    top, mid, bot = (body.index(r) for r in ("\\toprule", "\\midrule", "\\bottomrule"))
    assert top < mid < bot
    colspec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", text).group(1)
    rows = body[mid + 1:bot]
    header = body[top + 1:mid]
    assert len(header) == 1 and len(rows) == len(lb.rows)
    for row in header + rows:
        assert row.endswith("\\\\")
        # cells separated by unescaped &: as many as the column spec says
        assert len(re.split(r"(?<!\\)&", row)) == len(colspec), row
    # special characters escaped: nothing unescaped but the table's own & separators
    assert "my\\_def\\%1\\&2" in text
    for ch in ("%", "_", "#", "$"):
        for m in re.finditer(re.escape(ch), text):
            i = m.start()
            assert text[i - 1] == "\\" or (ch == "$" and _in_math(text, i)), (ch, text[max(0, i - 20):i + 20])
    assert "\\caption{" in text and "Student-t" in text and "\\label{tab:" in text
    assert "$\\varepsilon$" in text  # the DP column header
    assert lines[0].startswith("% leaderboard ") and "booktabs" in lines[0] and lines[1].startswith("% rebuild: ")


def _in_math(text: str, i: int) -> bool:
    """A ``$`` that opens or closes one of the math snippets the escaper writes."""
    return text[i - 1] != "\\"


# ------------------------------------------------------------------- the demo joins the table
ROOT = Path(__file__).resolve().parents[1]


def _demo_config():
    """The config `make demo` runs: its `cfbench run` arguments, parsed by the real CLI parser."""
    import shlex

    from cfbench.cli import build_parser
    from cfbench.config import make_config, parse_sets

    text = (ROOT / "Makefile").read_text()
    recipe = text.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    [line] = [ln for ln in recipe.splitlines() if "cfbench run" in ln]
    argv = shlex.split(line.split("cfbench", 1)[1])
    args = build_parser().parse_args(argv)
    evaluators = [e.strip() for e in args.evaluators.split(",")] if args.evaluators else None
    return make_config(dataset=args.dataset, defense=args.defense, model=args.model, seed=args.seed,
                       sets=parse_sets(args.set), evaluators=evaluators, device=args.device, data_dir=args.data_dir,
                       download=args.download, deterministic=args.deterministic)


def test_the_demo_protocol_is_the_committed_digits_leaderboards():
    """`make demo`'s run has exactly the protocol of the committed digits leaderboard (so a
    newcomer's demo run joins that table), and so has every run of its sweep file."""
    from cfbench.sweep import expand, load_grid

    table = _committed_digits_table()
    cfg = _demo_config()
    demo = protocol_id(protocol_of({"config": cfg.to_dict()}))
    assert demo == table["protocol_id"], "make demo no longer runs the committed leaderboard's protocol"
    assert table["name"].endswith(demo[:8])
    points = expand(load_grid(ROOT / "leaderboards" / "digits.toml"))
    assert {protocol_id(protocol_of({"config": p.cfg.to_dict()})) for p in points} == {demo}
    assert any(p.cfg.config_hash() == cfg.config_hash() for p in points)  # the demo run itself is in the sweep
    # and the committed records are the table's runs, each of this protocol
    recs = [json.loads(p.read_text()) for p in sorted((ROOT / "leaderboards" / "runs").glob("*/record.json"))]
    assert {r["run_id"] for r in recs} == {r["run_id"] for r in table["records"]}
    assert {protocol_id(protocol_of(r)) for r in recs} == {demo}


def test_run_summary_shows_the_primary_attack_pooled(capsys):
    """The run summary prints the protocol's primary attack pooled over the pool models (the
    headline leakage), with its interval, next to the single-target strongest-attack rows."""
    import glob

    from cfbench.cli import print_summary

    [d] = glob.glob(str(Path(__file__).resolve().parents[1] / "leaderboards" / "runs" / "digits-pgd-at-*"))
    rec = json.loads((Path(d) / "record.json").read_text())
    print_summary(rec, Path(d), True)
    out = capsys.readouterr().out
    m = rec["metrics"]["mia.pooled.rmia_online.tpr_at_fpr.0.01"]
    line = next(ln for ln in out.splitlines() if ln.startswith("membership: TPR @ 1% FPR"))
    assert f"{100 * m['value']:.2f}%" in line and f"n={m['n']}" in line and "(rmia_online, pooled)" in line


def test_one_sweep_file_typed_two_ways_is_one_entry_of_sweeps_json(tmp_path):
    """record_sweep normalises the grid path itself (not only its callers)."""
    from cfbench.present.leaderboard import read_sweeps, record_sweep

    record_sweep(tmp_path, "./grids//a.toml", "cfbench sweep grids/a.toml --out x", ["r1"])
    record_sweep(tmp_path, "grids/a.toml", "cfbench sweep grids/a.toml --out x", ["r2"])
    record_sweep(tmp_path, "grids/b.toml", "cfbench sweep grids/b.toml --out x", ["r3"])
    entries = read_sweeps(tmp_path)
    assert [e["grid"] for e in entries] == ["grids/a.toml", "grids/b.toml"]
    assert entries[0]["run_ids"] == ["r2"]


def _with_lowest(rec, tpr, fpr, n_out=4500):
    """The primary attack's TPR at the lowest supported FPR, as the MIA evaluator writes it."""
    from scipy.stats import beta

    k = round(tpr * n_out)
    lo, hi = beta.ppf(0.025, k, n_out - k + 1), beta.ppf(0.975, k + 1, n_out - k)
    rec["metrics"]["mia.primary.tpr_at_lowest_fpr"] = {"value": k / n_out, "ci_low": lo, "ci_high": hi,
                                                       "n": n_out, "k": k, "fpr": fpr, "attack": "rmia_online"}
    rec["metrics"]["mia.primary.lowest_fpr"] = {"value": fpr, "n_nonmembers": n_out, "attack": "rmia_online"}
    return rec


def test_the_primary_tpr_at_the_lowest_supported_fpr_is_a_column(tmp_path):
    """Where 0.1% FPR is out of the sample's reach, the table gives the primary attack's TPR at
    the lowest FPR it supports: the seed mean with a Student-t interval (scipy), the run's own
    Clopper-Pearson interval for one seed, and the FPR in the header when every row shares it."""
    from scipy import stats

    runs = tmp_path / "runs"
    for seed, t in ((0, 0.05), (1, 0.07)):
        write_record(runs, _with_lowest(make_record(defense="erm", seed=seed), t, 10 / 4500))
    one = _with_lowest(make_record(defense="pgd-at", family="adversarial"), 0.094, 10 / 4500)
    write_record(runs, one)
    [lb] = build(runs)
    header, body = display_rows(lb)
    col = header.index("primary MIA TPR @ 0.22% FPR % (pooled; lowest supported)")
    erm = lb.rows[lb.rows["defense"] == "erm"].iloc[0]
    vals = np.array([round(0.05 * 4500) / 4500, round(0.07 * 4500) / 4500])
    half = stats.t.ppf(0.975, 1) * vals.std(ddof=1) / np.sqrt(2)
    assert erm["plow_mean"] == pytest.approx(vals.mean())
    assert (erm["plow_ci_low"], erm["plow_ci_high"]) == pytest.approx((max(0, vals.mean() - half), vals.mean() + half))
    pgd = lb.rows[lb.rows["defense"] == "pgd-at"].iloc[0]
    m = one["metrics"]["mia.primary.tpr_at_lowest_fpr"]
    assert (pgd["plow_mean"], pgd["plow_ci_low"], pgd["plow_ci_high"]) == pytest.approx(
        (m["value"], m["ci_low"], m["ci_high"]))
    row = [r for r in body if r[1] == "pgd-at"][0]
    assert row[col] == f"{100 * m['value']:.2f} [{100 * m['ci_low']:.2f}, {100 * m['ci_high']:.2f}]"
    # the JSON round trip keeps the column
    back = Leaderboard.from_json(json.loads(json.dumps(to_json_obj(lb))))
    assert display_rows(back) == display_rows(lb)

    # rows at different lowest FPRs (a table of several pool sizes cannot happen within one
    # protocol, but a hand-edited store can): the header says so and each cell names its FPR
    write_record(runs, _with_lowest(make_record(defense="trades", family="adversarial"), 0.08, 0.005, n_out=2000))
    [lb] = build(runs)
    header, body = display_rows(lb)
    col = header.index("primary MIA TPR @ lowest supported FPR % (pooled)")
    assert [r for r in body if r[1] == "trades"][0][col].endswith("(@ 0.5%)")


def test_a_resumed_runs_training_cost_counts_every_attempts_epochs(tmp_path):
    """The last attempt of a resumed run may only reload the finished model (timings.train of a
    second); the train column then sums the history's per-epoch seconds instead."""
    runs = tmp_path / "runs"
    resumed = make_record(defense="erm", train_s=1.5)
    resumed["history"] = [{"epoch": i + 1, "seconds": 4.0} for i in range(10)]
    fresh = make_record(defense="pgd-at", family="adversarial", train_s=50.0)
    fresh["history"] = [{"epoch": i + 1, "seconds": 4.5} for i in range(10)]   # 45 s of epochs < 50 s total
    write_record(runs, resumed)
    write_record(runs, fresh)
    [lb] = build(runs)
    got = dict(zip(lb.rows["defense"], lb.rows["train_s_mean"]))
    assert got == {"erm": pytest.approx(40.0), "pgd-at": pytest.approx(50.0)}

"""HTML reports: self-contained, every section present, text from records escaped, example
images saved and read back, CLI behaviour.  (The real-browser check is in
test_report_browser.py.)"""

from __future__ import annotations

import base64
import json
import re
import struct
from html.parser import HTMLParser

import numpy as np
import pytest
from cfbench.cli import main
from cfbench.present.leaderboard import build
from cfbench.present.report import leaderboard_report, report_after_run, run_report
from cfbench.present.writers import write
from cfbench.store.examples import load_examples, save_examples
from record_factory import make_record, write_examples, write_record
from test_leaderboard import only_our_script


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.attrs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag == "img":
            self.imgs.append(dict(attrs))


def png_size(uri: str) -> tuple[int, int]:
    assert uri.startswith("data:image/png;base64,")
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def assert_self_contained(html: str) -> _Collect:
    p = _Collect()
    p.feed(html)
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    for name, value in p.attrs:
        # data: URIs, in-page anchors, and relative links to the runs' report files (opened by the reader,
        # never loaded by the page); nothing with a scheme or a host
        if name == "src" and value and not value.startswith("data:"):
            raise AssertionError(f"external reference {name}={value!r}")
        if name == "href" and value and not (value.startswith("#") or (
                value.endswith("/report.html") and ":" not in value and not value.startswith("//"))):
            raise AssertionError(f"external reference {name}={value!r}")
    assert not re.search(r"url\(\s*['\"]?(?!data:)", html), "CSS must not load anything"
    for img in p.imgs:
        w, h = png_size(img["src"])
        assert w > 0 and h > 0
    return p


@pytest.fixture(scope="module")
def run_store(tmp_path_factory):
    runs = tmp_path_factory.mktemp("store") / "runs"
    me = write_record(runs, make_record(defense="pgd-at", family="adversarial", clean=0.95, robust=0.7,
                                        flags=["Square found adversarial points that APGD missed"],
                                        warnings=["data: only 40 non-members"]))
    write_examples(me, counterfactual=True)
    write_record(runs, make_record(defense="erm", clean=0.99, robust=0.0))
    write_record(runs, make_record(defense="dp-sgd", family="dp", clean=0.8, robust=0.05, epsilon=2.5))
    write_record(runs, make_record(defense="erm", eps=0.3))                    # other protocol
    write_record(runs, make_record(defense="erm", seed=5, status="failed", reason="boom"))
    return runs, me


@pytest.fixture(scope="module")
def full_report(run_store):
    return run_report(run_store[1], with_predictions=False)


@pytest.fixture
def light_run(tmp_path):
    """A run with few figures (no MIA, no AutoAttack, no examples): for CLI plumbing tests."""
    return write_record(tmp_path / "light", make_record(evaluators=("clean", "pgd")))


def test_run_report_has_every_section(run_store, full_report):
    runs, me = run_store
    html = full_report
    p = assert_self_contained(html)
    # figures: 2 trade-off, ROC, AutoAttack, training, 3 example grids (autoattack, pgd, counterfactual)
    assert len(p.imgs) == 8
    for text in ["Rebuild this report with", f"cfbench report {me}", "clean accuracy", "AutoAttack accuracy",
                 "strongest MIA AUC", "Provenance", "abc123", "split_seed", "Membership inference",
                 "lira_online", "AutoAttack breakdown", "apgd-ce",
                 "Square found adversarial points that APGD missed", "data: only 40 non-members",
                 "Training", "counterfactual", "adversarial", "ε", "Pareto"]:
        assert text in html, text
    # context: the 3 finished runs of this protocol, not the other eps nor the failed run
    assert "among the 3 finished runs" in html
    # n/a TPR at 0.01% with its reason as a tooltip
    assert re.search(r'title="[^"]*not supported by the data[^"]*">n/a<', html)
    # the DP run's epsilon in the table
    assert "2.5" in html


def test_run_report_of_failed_run(tmp_path):
    d = write_record(tmp_path / "runs", make_record(status="failed", reason="TrainingDiverged: nan loss"))
    html = run_report(d)
    assert_self_contained(html)
    assert "did not finish" in html and "TrainingDiverged: nan loss" in html


def test_record_without_mia_or_autoattack(tmp_path):
    d = write_record(tmp_path / "runs", make_record(evaluators=("clean", "pgd")))
    html = run_report(d)
    assert_self_contained(html)
    assert "Membership inference was not evaluated" in html and "AutoAttack was not evaluated" in html


def test_script_in_defense_renders_as_text(tmp_path):
    evil = "<script>alert('x')</script>"
    runs = tmp_path / "runs"
    d = write_record(runs, make_record(defense=f"bad{evil}", description=f"about {evil}", evaluators=("clean", "mia"),
                                       warnings=[f"warn {evil}"], params={"note": evil},
                                       mia={f"a{evil}": {"auc": 0.6, "tpr.0.001": 0.01}}), "evil-run")
    html = run_report(d)
    assert "<script" not in html.lower()
    assert html.count("&lt;script&gt;") >= 4
    [lb] = build(runs)
    paths = write(lb, tmp_path / "lb")
    lhtml = leaderboard_report(lb.name, leaderboards=tmp_path / "lb")
    assert "<script" not in lhtml.lower() and "&lt;script&gt;" in lhtml
    table = paths["html"].read_text()
    assert only_our_script(table) and "&lt;script&gt;" in table


def test_leaderboard_report(run_store, tmp_path):
    runs, _ = run_store
    boards = build(runs, "digits")
    lbdir = tmp_path / "lb"
    for lb in boards:
        write(lb, lbdir)
    name = next(b.name for b in boards if len(b.rows) == 3)
    html = leaderboard_report(name, leaderboards=lbdir)
    p = assert_self_contained(html)
    assert len(p.imgs) == 3  # two trade-off plots + the ROC overlay (records found under runs)
    assert f"cfbench report --leaderboard {name} --leaderboards {lbdir}" in html
    assert "cfbench leaderboard --dataset digits" in html
    for d in ("pgd-at", "erm", "dp-sgd"):
        assert d in html


def test_save_and_load_examples(tmp_path):
    import torch

    x = torch.rand(4, 1, 8, 8)
    examples = {"pgd": (x, x + 0.1, torch.tensor([1, 2, 3, 4])),
                "counterfactual": {"clean": x, "counterfactual": 1 - x, "y": torch.zeros(4)},
                "broken": (x, "not a tensor", None)}
    saved, warnings = save_examples(examples, tmp_path / "examples.safetensors")
    assert saved == ["pgd", "counterfactual", "broken"]
    assert len(warnings) == 2 and all("not a tensor" in w or "NoneType" in w for w in warnings)
    ex = load_examples(tmp_path)
    assert set(ex) == {"pgd", "counterfactual", "broken"}
    np.testing.assert_allclose(ex["pgd"]["adv"], (x + 0.1).numpy())
    np.testing.assert_array_equal(ex["pgd"]["y"], [1, 2, 3, 4])
    np.testing.assert_allclose(ex["counterfactual"]["counterfactual"], (1 - x).numpy())
    # nothing to save: no file
    assert save_examples({}, tmp_path / "none.safetensors") == ([], [])
    assert not (tmp_path / "none.safetensors").exists()
    assert load_examples(tmp_path / "nowhere") == {}


def test_report_cli(light_run, tmp_path, capsys):
    runs, me = light_run.parent, light_run
    out = tmp_path / "r.html"
    assert main(["report", str(me), "--out", str(out)]) == 0
    assert f"report   {out}" in capsys.readouterr().out
    assert out.read_text().startswith("<!DOCTYPE html>")
    # by run id with --runs
    assert main(["report", me.name, "--runs", str(runs), "--out", str(tmp_path / "r2.html")]) == 0
    capsys.readouterr()
    assert main(["report"]) == 2
    assert "either a run" in capsys.readouterr().err
    assert main(["report", "no-such-run", "--runs", str(runs)]) == 2
    assert "no-such-run" in capsys.readouterr().err
    assert main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "lb"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", "--leaderboard", "digits-cnn8-Linf-0.1x", "--leaderboards", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err
    assert "digits-cnn8-Linf-0.1" in err and "Did you mean" in err
    lout = tmp_path / "l.html"
    assert main(["report", "--leaderboard", "digits-cnn8-Linf-0.1", "--leaderboards", str(tmp_path / "lb"),
                 "--out", str(lout)]) == 0
    assert lout.exists()


def test_report_default_location(light_run, tmp_path, monkeypatch):
    me = light_run
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(me)]) == 0
    assert (tmp_path / "reports" / f"{me.name}.html").exists()


def test_report_after_run_never_fails(light_run, tmp_path, capsys):
    me = light_run
    path = report_after_run(me)
    assert path == me / "report.html" and path.exists()
    assert f"report   {path}" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "record.json").write_text("{not json")
    assert report_after_run(bad) is None
    assert "could not write the run's report" in capsys.readouterr().err


@pytest.mark.slow
def test_cfbench_run_writes_report_and_examples(tmp_path, capsys):
    """End to end through the CLI: a (tiny) real digits run saves its example images and
    writes <run-dir>/report.html, printing the path."""
    code = main(["run", "--defense", "erm", "--dataset", "digits", "--evaluators", "clean,pgd", "--out",
                 str(tmp_path), "--quiet", "--set", "epochs=1", "--set", "pgd.n_examples=32",
                 "--set", "pgd.steps=2"])
    assert code == 0
    out = capsys.readouterr().out
    [run_dir] = [p for p in tmp_path.iterdir() if p.name.startswith("digits-erm")]
    report = run_dir / "report.html"
    assert f"report   {report}" in out and report.exists()
    ex = load_examples(run_dir)
    assert set(ex["pgd"]) == {"clean", "adv", "y"} and ex["pgd"]["adv"].shape == (16, 1, 8, 8)
    # PGD stays in the eps-ball around the clean images
    assert np.abs(ex["pgd"]["adv"] - ex["pgd"]["clean"]).max() <= 0.1 + 1e-6
    html = report.read_text()
    assert_self_contained(html)
    assert "pgd (adversarial)" in html and "saved model&#39;s prediction" in html
    assert "model not available" not in html


def test_pareto_front_2d_of_the_plots():
    from cfbench.present.plots import pareto_front_2d

    xs = [0.9, 0.8, 0.95, 0.7, 0.85, float("nan")]
    ys = [0.5, 0.6, 0.1, 0.7, 0.4, 0.9]
    # both up: (0.85, 0.4) is dominated by (0.9, 0.5); the NaN point is not plotted
    assert pareto_front_2d(xs, ys, True, True) == [3, 1, 0, 2]
    # y down (leakage): (0.95, 0.1) dominates everything with smaller x and larger y
    assert pareto_front_2d(xs, ys, True, False) == [2]


def test_leaderboard_report_default_name_keeps_dotted_eps(run_store, tmp_path, monkeypatch, capsys):
    """Leaderboard names carry eps (``digits-cnn8-Linf-0.1``): the default output keeps the whole
    name; only a path ending in .json loses its suffix."""
    runs, _ = run_store
    lbdir = tmp_path / "lb"
    boards = build(runs, "digits")
    for lb in boards:
        write(lb, lbdir)
    name = next(b.name for b in boards if len(b.rows) == 3)
    assert "." in name
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--leaderboard", name, "--leaderboards", str(lbdir)]) == 0
    assert (tmp_path / "reports" / f"leaderboard-{name}.html").exists()
    assert main(["report", "--leaderboard", str(lbdir / f"{name}.json"), "--out", "x.html"]) == 0
    assert main(["report", "--leaderboard", str(lbdir / f"{name}.json")]) == 0
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [f"leaderboard-{name}.html"]
    capsys.readouterr()


# ------------------------------------------------------------- membership figures of a run
def _scored_run(tmp_path, n=200, k_top=8, primary="lira_online"):
    """A run with per-example scores (mia_scores.npz as the mia evaluator writes it) whose
    members' scores are shifted up, and identical ROC curves for two attacks."""
    rec = make_record(defense="erm", n_members=n // 2, n_nonmembers=n // 2)
    rec["notes"]["mia"]["protocol"]["primary"] = primary
    rec["notes"]["mia"]["protocol"]["n_nonmembers"] = n // 2
    rec["notes"]["mia"]["roc"]["loss_copy"] = dict(rec["notes"]["mia"]["roc"]["loss"])
    rec["flags"] = [{"name": "eps_sweep", "evaluators": ["robust.pgd"], "message": "accuracy does not fall with eps"},
                    {"name": "autoattack_check", "evaluators": ["robust.autoattack"], "message": "Square beat APGD"}]
    d = write_record(tmp_path / "runs", rec)
    rng = np.random.default_rng(0)
    member = np.zeros(n, bool)
    member[rng.permutation(n)[: n // 2]] = True
    score = rng.normal(size=n) + member * 1.5
    pool_idx = rng.permutation(1000)[:n]
    np.savez(d / "mia_scores.npz", member=member, attacks=np.array(["loss", primary]), pool_idx=pool_idx,
             label=rng.integers(0, 10, n), **{f"score.{primary}": score, "score.loss": -score})
    return d, rec, member, score, pool_idx


def test_score_histograms_and_most_vulnerable_examples(tmp_path):
    from cfbench.present.report import _membership_scores

    d, rec, member, score, pool_idx = _scored_run(tmp_path)
    ms = _membership_scores(rec, d, "lira_online", "the protocol's primary attack")
    # independent: the 8 members with the highest scores, highest first
    want = [int(i) for i in np.argsort(-score) if member[i]][:8]
    assert [t["pool"] for t in ms["top"]] == want
    assert [t["index"] for t in ms["top"]] == [int(pool_idx[i]) for i in want]
    # FPR at the score: the fraction of non-members scoring at least as high
    neg = score[~member]
    assert [float(t["fpr"]) for t in ms["top"]] == pytest.approx(
        [float(f"{np.mean(neg >= score[i]):.3g}") for i in want])
    assert [t["fpr_count"] for t in ms["top"]] == [f"{int((neg >= score[i]).sum())}/{len(neg)}" for i in want]
    assert png_size(ms["hist"])[0] > 300
    # the digits training images are at hand (bundled): the examples are shown as images
    assert ms["img"] is not None and ms["missing"] is None and png_size(ms["img"])[0] > 300
    html = run_report(d, with_predictions=False)
    p = assert_self_contained(html)
    assert "Most vulnerable examples" in html and "members vs non-members" in html
    assert any(i.get("alt") == "most vulnerable training examples" for i in p.imgs)
    assert any(i.get("alt") == "member and non-member score histograms" for i in p.imgs)
    assert "lira_online <b>(primary)</b>" in html


def test_roc_highlights_the_primary_and_merges_identical_curves(tmp_path):
    from cfbench.present import plots

    d, rec, *_ = _scored_run(tmp_path)
    roc = {a: (c["fpr"], c["tpr"]) for a, c in rec["notes"]["mia"]["roc"].items()}
    plot = plots.roc_plot(roc, n_nonmembers=100, primary="lira_online")
    assert plot["primary"] == "lira_online"
    assert plot["groups"] == {"loss": ["loss", "loss_copy"], "lira_online": ["lira_online"]}
    html = run_report(d, with_predictions=False)
    assert "Thick black: the primary attack, lira_online (the protocol&#39;s primary attack" in html
    assert "Identical curves are drawn once" in html
    # 100 non-members: the axis starts at 1%, so no 0.1% guide is drawn or promised
    assert plot["guides"] == [0.01] and "Grey vertical: 1% FPR." in html and "0.1% FPR." not in html
    assert plots.roc_plot(roc, n_nonmembers=20000)["guides"] == [0.01, 0.001, 0.0001]
    assert plots.guides_text([0.01, 0.001]) == "Grey verticals: 1% and 0.1% FPR."


def test_flags_are_shown_at_the_robust_numbers(tmp_path):
    from cfbench.present.report import _cards

    d, rec, *_ = _scored_run(tmp_path)
    cards = {c["label"]: c for c in _cards(rec)}
    assert cards["AutoAttack accuracy"]["flagged"] and "autoattack_check" in cards["AutoAttack accuracy"]["sub"]
    assert cards["PGD accuracy"]["flagged"] and "eps_sweep" in cards["PGD accuracy"]["sub"]
    assert not cards["clean accuracy"].get("flagged")
    html = run_report(d, with_predictions=False)
    assert html.count('title="sanity flags: see Robustness">⚑</a>') == 2
    assert "this robust accuracy may be an overestimate" in html
    # in the tables, the flag sits next to the robust accuracy too
    from cfbench.present.writers import display_rows

    lb = build(d.parent)[0]
    header, body = display_rows(lb)
    assert body[0][4].endswith(" ⚑")


# ------------------------------------------------------------------ leaderboard reports
def test_stale_leaderboard_is_flagged_or_refused(tmp_path, capsys):
    from cfbench.errors import UsageError

    runs = tmp_path / "runs"
    write_record(runs, make_record(defense="erm"))
    write_record(runs, make_record(defense="pgd-at", family="adversarial", robust=0.7))
    lbdir = tmp_path / "lb"
    assert main(["leaderboard", "--runs", str(runs), "--out", str(lbdir), "--quiet", "--no-reports"]) == 0
    [name] = [p.name[:-5] for p in lbdir.glob("*.json")]
    from cfbench.present.report import staleness

    def state():
        return staleness(json.loads((lbdir / f"{name}.json").read_text()))

    assert state()[0] == "current"
    # a new run of the same protocol: the table no longer matches its runs
    write_record(runs, make_record(defense="trades", family="adversarial", robust=0.6))
    assert state()[0] == "stale" and "changed since it was built" in state()[1]
    warned = []
    html = leaderboard_report(name, leaderboards=lbdir, warn=warned.append)
    assert "Stale:" in html and len(warned) == 1 and "changed since it was built" in warned[0]
    with pytest.raises(UsageError, match="stale"):
        leaderboard_report(name, leaderboards=lbdir, strict=True)
    capsys.readouterr()
    assert main(["report", "--leaderboard", name, "--leaderboards", str(lbdir), "--strict",
                 "--out", str(tmp_path / "x.html")]) == 2
    assert "stale" in capsys.readouterr().err
    # rebuilt: current again
    assert main(["leaderboard", "--runs", str(runs), "--out", str(lbdir), "--quiet", "--no-reports"]) == 0
    assert state()[0] == "current"
    # its protocol's runs removed: stale (the rebuild removes the table); runs folder gone: not checkable
    import shutil

    for d in runs.iterdir():
        shutil.rmtree(d)
    write_record(runs, make_record(defense="erm", eps=0.3))
    assert state()[0] == "stale" and "no finished run of its protocol" in state()[1]
    shutil.rmtree(runs)
    assert state()[0] == "unknown" and "not here" in state()[1]
    # a table an older cfbench wrote (no digest): cannot be checked, and says so
    old = json.loads((lbdir / f"{name}.json").read_text())
    old.pop("source")
    assert staleness(old)[0] == "unknown" and "older cfbench" in staleness(old)[1]


def test_leaderboard_name_without_hash_resolves_when_unambiguous(run_store, tmp_path, capsys):
    from cfbench.errors import UsageError
    from cfbench.present.report import resolve_leaderboard

    runs, _ = run_store
    lbdir = tmp_path / "lb"
    boards = build(runs, "digits")
    for lb in boards:
        write(lb, lbdir)
    main_name = next(b.name for b in boards if len(b.rows) == 3)
    assert resolve_leaderboard("digits-cnn8-Linf-0.1", lbdir) == lbdir / f"{main_name}.json"
    assert resolve_leaderboard(main_name, lbdir) == lbdir / f"{main_name}.json"
    # a second protocol with the same base name: the short name is ambiguous
    other = tmp_path / "other"
    write_record(other, make_record(defense="erm", mia_params={"reference_models": 16}))
    [o] = build(other)
    write(o, lbdir)
    with pytest.raises(UsageError, match="ambiguous") as e:
        resolve_leaderboard("digits-cnn8-Linf-0.1", lbdir)
    assert main_name in str(e.value) and o.name in str(e.value)


def test_leaderboard_rows_link_to_run_reports(tmp_path):
    from html.parser import HTMLParser

    runs = tmp_path / "runs"
    for d in ("erm", "pgd-at", "dp-sgd"):   # light records: few figures per run report
        write_record(runs, make_record(defense=d, evaluators=("clean", "pgd")))
    out = tmp_path / "boards"
    assert main(["leaderboard", "--dataset", "digits", "--runs", str(runs), "--out", str(out), "--quiet"]) == 0
    [page] = [p for p in out.glob("*.html") if "pgd-at" in p.read_text() and "dp-sgd" in p.read_text()]

    class Links(HTMLParser):
        hrefs: list = []

        def handle_starttag(self, tag, attrs):
            if tag == "a":
                self.hrefs.append(dict(attrs)["href"])

    p = Links()
    p.hrefs = []
    p.feed(page.read_text())
    reports = [h for h in p.hrefs if h.endswith("report.html")]
    assert len(reports) == 3
    for h in reports:
        assert not h.startswith("/") and ":" not in h
        target = (page.parent / h).resolve()
        assert target.exists() and target.parent.parent == runs.resolve()
        assert "<!DOCTYPE html>" in target.read_text()[:40]
    # the Markdown table links the same reports (relative to where it is written)
    import re

    md = page.with_suffix(".md").read_text()
    md_links = re.findall(r"\[seed \d+\]\(([^)]+)\)", md.split("Run reports:", 1)[1])
    assert sorted((page.parent / h).resolve() for h in md_links) == sorted((page.parent / h).resolve() for h in reports)
    # the leaderboard's report links each row and each run to the same reports, from where it is written
    rep = tmp_path / "elsewhere" / "lb.html"
    assert main(["report", "--leaderboard", page.name[:-5], "--leaderboards", str(out), "--out", str(rep)]) == 0
    q = Links()
    q.hrefs = []
    q.feed(rep.read_text())
    got = [h for h in q.hrefs if h.endswith("report.html")]
    assert len(got) == 6 and {(rep.parent / h).resolve() for h in got} == {(page.parent / h).resolve() for h in reports}


def test_inversion_grids_are_captioned_as_members_and_reconstructions(tmp_path):
    import torch

    d = write_record(tmp_path / "runs", make_record(evaluators=("clean", "pgd")))
    x = torch.rand(3, 1, 8, 8)
    save_examples({"inversion-saliency-expmi": (x, (x + 0.05).clamp(0, 1), torch.tensor([1, 2, 3])),
                   "pgd": (x, (x + 0.1).clamp(0, 1), torch.tensor([1, 2, 3]))}, d / "examples.safetensors")
    html = run_report(d)
    assert_self_contained(html)
    section = html.split("inversion-saliency-expmi (members and their reconstructions)", 1)[1].split("<h3", 1)[0]
    assert "the first 3 members" in section and "saliency-expmi inversion network" in section
    assert "test images" not in section and "adversarial" not in section
    assert "pgd (adversarial)" in html  # the attack grids keep their captions

"""Plugins: entry points (fabricated and really installed), --plugin files, failure isolation,
name collisions, the plugin API version, and the provenance a plugin leaves in its records."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cfbench import PLUGIN_API_VERSION, registry
from cfbench.cli import main
from cfbench.errors import PluginError, UsageError
from cfbench.registry import PluginWarning, get, list_components, load_plugin_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin-defense"
#: a digits run that takes a few seconds: 100 members, 100 test images, one epoch, 2 PGD steps
TINY_RUN = ["--dataset", "digits", "--evaluators", "clean", "--quiet", "--set", "epochs=1",
            "--set", "pool_size=200", "--set", "test_size=100"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The runs here are tiny: one torch thread is much faster than contending ones on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.delenv("CFBENCH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    registry.reset()
    yield
    registry.reset()


def fake_dist(root: Path, name: str, version: str, entry_points: dict[str, dict[str, str]],
              modules: dict[str, str] | None = None) -> Path:
    """An 'installed' distribution: modules plus a ``*.dist-info`` with METADATA and entry_points.txt."""
    root.mkdir(parents=True, exist_ok=True)
    for fname, src in (modules or {}).items():
        (root / fname).write_text(textwrap.dedent(src), encoding="utf-8")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


DEFENSE_SRC = '''
from dataclasses import dataclass
import torch.nn.functional as F
from cfbench.defenses import Defense
from cfbench.params import param


@dataclass(frozen=True)
class Params:
    smoothing: float = param(0.1, "label smoothing", ge=0, lt=1)


class {cls}(Defense):
    name = "{name}"
    description = "cross-entropy with label smoothing (a test plugin)"
    api_version = {api}
    plugin_version = "0.3"
    Params = Params

    def loss(self, model, x, y, batch):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.params.smoothing), logits
'''


def defense_src(name="smooth", cls="Smooth", api=PLUGIN_API_VERSION) -> str:
    return DEFENSE_SRC.format(name=name, cls=cls, api=api)


# -- entry points through installed metadata ------------------------------------------------

def test_entry_point_plugin_is_discovered_lazily_with_its_distribution(tmp_path, monkeypatch):
    shutil.copy(EXAMPLE / "cfbench_mart.py", tmp_path / "cfbench_mart.py")
    fake_dist(tmp_path, "cfbench-mart", "0.1.0", {"cfbench.defenses": {"mart": "cfbench_mart:MART"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cfbench_mart", None)
    reg = registry.registry("defense")
    assert {"erm", "pgd-at", "trades", "mart"} <= set(reg.names())
    entry = reg.entry("mart")
    assert (entry.distribution, entry.dist_version, entry.source) == ("cfbench-mart", "0.1.0", "cfbench-mart 0.1.0")
    assert "cfbench_mart" not in sys.modules  # listed without importing
    cls = get("defense", "mart")
    assert cls.name == "mart" and "cfbench_mart" in sys.modules
    row = next(r for r in list_components("defense") if r["name"] == "mart")
    assert [p["name"] for p in row["params"]] == ["beta", "steps", "step_size"]
    assert row["params"][0]["default"] == 6.0 and "error" not in row
    sys.modules.pop("cfbench_mart", None)


def test_entry_point_plugin_runs_end_to_end_and_its_record_names_the_distribution(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE / "cfbench_mart.py", site / "cfbench_mart.py")
    fake_dist(site, "cfbench-mart", "0.1.0", {"cfbench.defenses": {"mart": "cfbench_mart:MART"}})
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("cfbench_mart", None)
    out = tmp_path / "runs"
    assert main(["run", "--defense", "mart", "--set", "defense.steps=2", "--out", str(out), *TINY_RUN]) == 0
    (rec_path,) = out.glob("digits-mart-*/record.json")
    rec = json.loads(rec_path.read_text())
    d = rec["components"]["defense"]
    assert (d["name"], d["distribution"], d["distribution_version"]) == ("mart", "cfbench-mart", "0.1.0")
    assert d["entry_point"] == "cfbench_mart:MART" and d["file"] is None and d["sha256"] is None
    assert rec["status"] == "ok" and rec["config"]["defense"]["params"]["steps"] == 2
    sys.modules.pop("cfbench_mart", None)


def test_broken_entry_point_is_a_warning_and_everything_else_works(tmp_path, monkeypatch, capsys):
    fake_dist(tmp_path, "broken-plugin", "2.0", {"cfbench.defenses": {"broken": "broken_mod:Broken"}},
              {"broken_mod.py": "import math\nx = 1\nraise RuntimeError('boom at import')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginWarning, match="broken-plugin 2.0") as rec:
        rows = {r["name"]: r for r in list_components("defense")}
    msg = str(rec[0].message)
    assert "'broken'" in msg and "RuntimeError: boom at import" in msg
    assert f"{tmp_path / 'broken_mod.py'}:3" in msg  # the file and line that raised
    assert rows["broken"]["error"] == msg
    assert all("error" not in rows[n] for n in ("erm", "pgd-at", "trades"))
    with pytest.raises(PluginError, match="boom at import"):
        get("defense", "broken")
    from cfbench.config import make_config

    assert make_config(defense="trades").defense == "trades"  # unrelated runs are unaffected
    registry.reset()
    assert main(["list"]) == 0  # `cfbench list` still works and exits 0
    out, err = capsys.readouterr()
    assert "erm" in out and "trades" in out and "broken" in out and "ERROR: " in out
    assert "boom at import" in err


def test_entry_points_with_one_name_are_an_error_naming_both(tmp_path, monkeypatch):
    fake_dist(tmp_path, "evil-dist", "1.0", {"cfbench.defenses": {"erm": "evil_mod:ERM"}},
              {"evil_mod.py": "ERM = None\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as e:
        get("defense", "erm")
    text = str(e.value)
    assert "'erm'" in text and "cfbench 0.1.0 (cfbench_baselines.erm:ERM)" in text
    assert "evil-dist 1.0 (evil_mod:ERM)" in text
    assert get("defense", "pgd-at").name == "pgd-at"  # other names still resolve
    with pytest.warns(PluginWarning, match="evil-dist"):
        row = next(r for r in list_components("defense") if r["name"] == "erm")
    assert "evil-dist 1.0" in row["error"]


def test_entry_point_for_another_plugin_api_is_refused(tmp_path, monkeypatch):
    src = defense_src(name="old", cls="Old", api=PLUGIN_API_VERSION + 1)
    fake_dist(tmp_path, "old-plugin", "0.9", {"cfbench.defenses": {"old": "old_mod:Old"}}, {"old_mod.py": src})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as e:
        get("defense", "old")
    text = str(e.value)
    assert f"plugin API version {PLUGIN_API_VERSION + 1}" in text
    assert f"provides plugin API version {PLUGIN_API_VERSION}" in text and "old-plugin 0.9" in text


def test_entry_point_of_the_wrong_type_or_without_params_is_refused(tmp_path, monkeypatch):
    src = "from cfbench.defenses import Defense\ndef fn():\n    pass\nclass NoParams(Defense):\n    name = 'noparams'\n"
    fake_dist(tmp_path, "odd", "1", {"cfbench.defenses": {"fn": "odd_mod:fn", "noparams": "odd_mod:NoParams"}},
              {"odd_mod.py": src})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="not a subclass of cfbench.defenses.base.Defense"):
        get("defense", "fn")
    with pytest.raises(PluginError, match="no `Params` dataclass"):
        get("defense", "noparams")


def test_autoload_can_be_switched_off(tmp_path, monkeypatch):
    shutil.copy(EXAMPLE / "cfbench_mart.py", tmp_path / "cfbench_mart.py")
    fake_dist(tmp_path, "cfbench-mart", "0.1.0", {"cfbench.defenses": {"mart": "cfbench_mart:MART"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CFBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    f = tmp_path / "mine.py"
    f.write_text(defense_src(), encoding="utf-8")
    load_plugin_file(f)  # files the user names are still loaded
    names = registry.registry("defense").names()
    assert "mart" not in names and {"erm", "pgd-at", "trades", "smooth"} <= set(names)
    assert all(registry.registry("defense").entries[n].distribution in ("cfbench", None) for n in names)
    assert "digits" in registry.registry("dataset").names()


# -- --plugin files ---------------------------------------------------------------------------

def test_plugin_file_run_records_the_file_and_its_sha256(tmp_path, capsys):
    f = tmp_path / "smooth.py"
    f.write_text(defense_src(), encoding="utf-8")
    out = tmp_path / "runs"
    assert main(["--plugin", str(f), "run", "--defense", "smooth", "--out", str(out), *TINY_RUN]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.name.startswith("digits-smooth")]
    rec = json.loads((run_dir / "record.json").read_text())
    d = rec["components"]["defense"]
    assert d["name"] == "smooth" and d["source"] == str(f.resolve()) and d["file"] == str(f.resolve())
    assert d["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert d["distribution"] is None and d["distribution_version"] == "0.3"
    assert rec["config"]["defense"]["params"] == {"smoothing": 0.1} and rec["status"] == "ok"
    # the option also works after the sub-command, and a finished run is reused
    registry.reset()
    assert main(["run", "--plugin", str(f), "--defense", "smooth", "--out", str(out), *TINY_RUN]) == 0
    assert "reused" in capsys.readouterr().out
    registry.reset()
    assert main(["list", "defense", "--plugin", str(f)]) == 0
    assert f"smooth           cross-entropy with label smoothing (a test plugin)  [{f.resolve()}]" \
        in capsys.readouterr().out
    assert rec["config"]["defense"]["file_sha256"] == d["sha256"]
    # editing the file (same name, same plugin version) is a new config: not silently reused
    f.write_text(defense_src() + "\n# edited\n", encoding="utf-8")
    registry.reset()
    assert main(["run", "--plugin", str(f), "--defense", "smooth", "--out", str(out), *TINY_RUN]) == 0
    assert "reused" not in capsys.readouterr().out
    assert len([p for p in out.iterdir() if p.name.startswith("digits-smooth")]) == 2


def test_broken_plugin_file_is_an_error_naming_file_line_and_cause(tmp_path, capsys):
    f = tmp_path / "bad.py"
    f.write_text("from cfbench.defenses import Defense\n\nratio = 1 / 0\n", encoding="utf-8")
    assert main(["--plugin", str(f), "list"]) == 2
    err = capsys.readouterr().err
    assert f"plugin file {f.resolve()} failed to import: ZeroDivisionError: division by zero" in err
    assert f"{f.resolve()}:3" in err
    assert main(["--plugin", str(tmp_path / "missing.py"), "list"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["list"]) == 0  # nothing of the broken file was kept


def test_plugin_file_name_collision_names_both_and_registers_nothing(tmp_path):
    f = tmp_path / "clash.py"
    f.write_text(defense_src(name="fresh", cls="Fresh") + defense_src(name="trades", cls="Mine"), encoding="utf-8")
    with pytest.raises(PluginError) as e:
        load_plugin_file(f)
    text = str(e.value)
    assert "'trades'" in text and "cfbench 0.1.0 (cfbench_baselines.trades:TRADES)" in text
    assert f"{f.resolve()} (Mine)" in text
    assert "fresh" not in registry.registry("defense").names()  # all or nothing
    g = tmp_path / "dup.py"
    g.write_text(defense_src(name="twice", cls="A") + defense_src(name="twice", cls="B"), encoding="utf-8")
    with pytest.raises(PluginError, match=r"named 'twice'.*\(A\).*\(B\)"):
        load_plugin_file(g)


def test_plugin_file_for_another_api_version_is_refused(tmp_path):
    f = tmp_path / "future.py"
    f.write_text(defense_src(name="future", cls="Future", api=PLUGIN_API_VERSION + 1), encoding="utf-8")
    with pytest.raises(PluginError, match=f"API version {PLUGIN_API_VERSION + 1}.*provides plugin API version "
                                          f"{PLUGIN_API_VERSION}"):
        load_plugin_file(f)


def test_plugin_file_registers_only_named_classes_it_defines(tmp_path):
    f = tmp_path / "sub.py"
    f.write_text(textwrap.dedent('''
        from cfbench_baselines.trades import TRADES      # imported: not re-registered
        from cfbench.defenses import Defense

        class Helper(Defense):                            # no name of its own: a helper base
            pass

        class Tweaked(TRADES):                            # inherits name = "trades": ignored
            pass

        class Named(TRADES):
            name = "trades-tweaked"
    '''), encoding="utf-8")
    (entry,) = load_plugin_file(f)
    assert entry.name == "trades-tweaked" and get("defense", "trades-tweaked").__name__ == "Named"
    assert load_plugin_file(f) == [entry]  # loading the same file again is a no-op


def test_two_plugin_files_with_the_same_file_name(tmp_path):
    for sub, name in (("a", "alpha"), ("b", "beta-def")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "defense.py").write_text(defense_src(name=name, cls="D"), encoding="utf-8")
        load_plugin_file(tmp_path / sub / "defense.py")
    assert get("defense", "alpha") is not get("defense", "beta-def")


def test_plugin_file_must_be_python_and_define_a_component(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x = 1\n")
    with pytest.raises(UsageError, match="not a .py file"):
        load_plugin_file(f)
    g = tmp_path / "empty.py"
    g.write_text("from cfbench.defenses import Defense\n\nclass Forgot(Defense):\n    pass\n")
    with pytest.raises(PluginError, match="defines no cfbench component"):
        load_plugin_file(g)


# -- the example package, really installed -----------------------------------------------------

def _cfbench_cmd() -> list[str]:
    script = Path(sys.executable).parent / "cfbench"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cfbench.cli"]


@pytest.mark.slow
def test_example_package_installs_and_runs_end_to_end(tmp_path):
    """pip-installs examples/plugin-defense (offline) and drives it through the real `cfbench`
    executable in fresh processes (~25 s on a busy 2-core machine, hence slow)."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CFBENCH_DISABLE_PLUGIN_AUTOLOAD", None)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert pip.returncode == 0, pip.stderr
    env["PYTHONPATH"] = str(target)
    listed = subprocess.run([*_cfbench_cmd(), "list", "defense"], capture_output=True, text=True, env=env,
                            timeout=300, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "mart" in listed.stdout and "[cfbench-mart 0.1.0]" in listed.stdout
    out = tmp_path / "runs"
    run = subprocess.run([*_cfbench_cmd(), "run", "--defense", "mart", "--set", "defense.steps=2", "--set", "beta=3",
                          "--out", str(out), *TINY_RUN], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    (rec_path,) = out.glob("digits-mart-*/record.json")
    rec = json.loads(rec_path.read_text())
    d = rec["components"]["defense"]
    assert (d["name"], d["distribution"], d["distribution_version"]) == ("mart", "cfbench-mart", "0.1.0")
    assert d["entry_point"] == "cfbench_mart:MART" and d["class"] == "cfbench_mart.MART"
    assert d["file"] is None and d["family"] == "adversarial"
    assert rec["status"] == "ok" and rec["config"]["defense"]["params"] == {"beta": 3.0, "steps": 2, "step_size": None}
    assert rec["metrics"]["clean.accuracy"]["n"] == 100


def test_the_guide_shows_the_example_package_verbatim():
    """docs/plugins.md walks through examples/plugin-defense: its code must be the real files."""
    import re

    guide = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    python_blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    toml_blocks = re.findall(r"```toml\n(.*?)```", guide, flags=re.S)
    assert python_blocks[0] == (EXAMPLE / "cfbench_mart.py").read_text(encoding="utf-8")
    assert toml_blocks[0] == (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")


def test_example_mart_loss_matches_the_papers_formula_example_by_example(monkeypatch):
    """MART = mean_i [-log p'_y - log(1.0001 - max_{k!=y} p'_k)] + beta * mean_i KL(p_i || p'_i) (1 - p_y),
    computed here with plain loops in float64 (constants as in the reference code)."""
    import math

    import torch

    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("cfbench_mart", None)
    from cfbench_mart import mart_loss

    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    logits_adv = 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    beta = 6.0
    bce, rob = [], []
    for i in range(6):
        p = [math.exp(v) for v in logits[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [math.exp(v) for v in logits_adv[i].tolist()]
        q = [v / sum(q) for v in q]
        yi = int(y[i])
        wrong = max((k for k in range(5) if k != yi), key=lambda k: q[k])
        bce.append(-math.log(q[yi]) - math.log(1.0001 - q[wrong] + 1e-12))
        kl = sum(p[j] * (math.log(p[j]) - math.log(q[j] + 1e-12)) for j in range(5))
        rob.append(kl * (1.0000001 - p[yi]))
    want = sum(bce) / 6 + beta * sum(rob) / 6
    got = mart_loss(logits, logits_adv, y, beta)
    assert got.item() == pytest.approx(want, rel=1e-9)
    # the clean distribution is not detached (as in the reference code): the KL term moves clean logits
    (grad,) = torch.autograd.grad(got, logits)
    assert grad.abs().sum() > 0
    assert mart_loss(logits, logits_adv, y, 0.0).item() == pytest.approx(sum(bce) / 6, rel=1e-9)
    sys.modules.pop("cfbench_mart", None)


def test_a_plugin_evaluator_cannot_overwrite_another_evaluators_metric(tmp_path, capsys):
    f = tmp_path / "sneaky.py"
    f.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from cfbench.evaluators.base import EvalResult, Evaluator

        @dataclass(frozen=True)
        class P:
            pass

        class Sneaky(Evaluator):
            name = "sneaky"
            description = "claims a perfect clean accuracy"
            Params = P

            def evaluate(self, ctx):
                return EvalResult(metrics={"clean.accuracy": {"value": 1.0}})
    '''), encoding="utf-8")
    out = tmp_path / "runs"
    args = [a for a in TINY_RUN]
    args[args.index("--evaluators") + 1] = "clean,sneaky"
    assert main(["--plugin", str(f), "run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "'clean.accuracy' outside its namespace 'sneaky'" in err
    rec = json.loads(next(out.rglob("record.json")).read_text())
    assert rec["status"] == "failed" and "namespace" in rec["reason"]   # never a leaderboard row

"""The committed reference sweep files (leaderboards/*_reference.toml, issue 22) say what the
reference leaderboards promise: every built-in defense, the seeds, the pooled K, the
AutoAttack budget and the evaluators -- checked by resolving every grid point (nothing runs),
so a defense added to the package without a reference row, or an edit that shrinks a
protocol, fails here."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from cfbench.sweep import expand, load_grid, sweep_command

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "leaderboards"


def _builtin_defenses() -> set[str]:
    """The defenses this package itself registers (its own entry points), not plugins or the
    masking check fixtures."""
    eps = entry_points(group="cfbench.defenses")
    names = {e.name for e in eps if e.value.startswith("cfbench_baselines.")}
    assert names, "no built-in defense entry points found (package not installed?)"
    return names


def _points(name: str):
    path = BOARDS / name
    return path, expand(load_grid(path), str(path))


def _header_command(path: Path) -> str:
    """The rebuild command the file's header comment gives (the line starting `cfbench sweep`)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if text.startswith("cfbench sweep "):
            return text
    raise AssertionError(f"{path.name}: no `cfbench sweep ...` line in its header")


@pytest.mark.parametrize("name", ["digits_reference.toml", "fashion-mnist_reference.toml"])
def test_the_header_gives_the_command_the_leaderboard_prints(name):
    path, _ = _points(name)
    rel = path.relative_to(ROOT)
    assert _header_command(path) == sweep_command(rel, "leaderboards/reference-runs", "leaderboards")


def test_digits_reference_has_every_builtin_defense_times_three_seeds():
    _, points = _points("digits_reference.toml")
    builtin = _builtin_defenses()
    defenses = {p.cfg.defense for p in points}
    assert defenses == builtin, f"missing {sorted(builtin - defenses)}, extra {sorted(defenses - builtin)}"
    by_recipe: dict[tuple, set[int]] = {}
    for p in points:
        recipe = (p.cfg.defense, p.cfg.model, repr(p.cfg.defense_params), repr(p.cfg.train))
        by_recipe.setdefault(recipe, set()).add(p.cfg.seed)
    assert all(seeds == {0, 1, 2} for seeds in by_recipe.values()), by_recipe
    # DP-SGD at two privacy budgets, each at the shared learning rate; the budget whose shared
    # rate diverges (eps = 1) also at its own (scripts/sweeps/dp_lr.toml), a recipe of 3 seeds above
    eps = {p.cfg.defense_params.target_epsilon for p in points if p.cfg.defense == "dp-sgd"}
    assert len(eps) == 2, eps
    shared = {p.cfg.train.lr for p in points if p.cfg.defense in ("erm", "pgd-at", "trades") and p.cfg.model == "cnn8"}
    dp_rates = {(p.cfg.defense_params.target_epsilon, p.cfg.train.lr) for p in points if p.cfg.defense == "dp-sgd"}
    assert {(e, lr) for e in eps for lr in shared} <= dp_rates and len(dp_rates) > len(eps), dp_rates
    for p in points:
        assert p.cfg.dataset == "digits"
        assert {"clean", "autoattack", "mia", "interpretation", "inversion"} <= set(p.cfg.evaluators)
        mia = p.cfg.evaluator_params["mia"]
        assert mia.reference_models == 16 and mia.pooled, p.label
        assert p.cfg.evaluator_params["autoattack"].n_examples == 500, p.label


def test_fashion_mnist_reference_has_every_builtin_defense_pooled_k8():
    _, points = _points("fashion-mnist_reference.toml")
    defenses = {p.cfg.defense for p in points}
    assert defenses == _builtin_defenses()
    for p in points:
        assert p.cfg.dataset == "fashion-mnist"
        mia = p.cfg.evaluator_params["mia"]
        assert mia.reference_models >= 8 and mia.pooled, p.label
        assert {"clean", "autoattack", "mia"} <= set(p.cfg.evaluators)
    # every DP recipe at the shared learning rate and at its own (scripts/sweeps/dp_lr.toml)
    rates: dict[tuple, set] = {}
    for p in points:
        if p.cfg.defense in ("dp-sgd", "dp-at"):
            rates.setdefault((p.cfg.defense, p.cfg.defense_params.target_epsilon), set()).add(p.cfg.train.lr)
    assert rates and all(len(r) == 2 for r in rates.values()), rates


def _reference_tables():
    out = []
    for p in sorted(BOARDS.glob("*.json")):
        t = json.loads(p.read_text(encoding="utf-8"))
        if (t.get("source") or {}).get("runs") == "leaderboards/reference-runs":
            out.append(t)
    return out


@pytest.mark.parametrize("table", _reference_tables(), ids=lambda t: t["name"])
def test_a_committed_reference_table_is_what_its_committed_runs_give(table, tmp_path):
    """Every committed reference table (it grows across sessions while its sweep runs) equals
    what `cfbench leaderboard` builds from exactly the run folders it lists, all of which are in
    the repository with their model; other finished runs in a working copy do not matter."""
    from cfbench.present.leaderboard import build
    from cfbench.present.writers import to_json_obj

    runs = ROOT / "leaderboards" / "reference-runs"
    ids = [i for row in table["rows"] for i in row["run_ids"]]
    assert ids, table["name"]
    only = tmp_path / "reference-runs"
    only.mkdir()
    for i in ids:
        assert (runs / i / "record.json").is_file() and (runs / i / "model.safetensors").is_file(), i
        (only / i).mkdir()
        shutil.copy2(runs / i / "record.json", only / i / "record.json")
    boards = [b for b in build(only, table["protocol"]["dataset"]["name"], runs_label="leaderboards/reference-runs")
              if b.protocol_id == table["protocol_id"]]
    assert len(boards) == 1
    fresh = json.loads(json.dumps(to_json_obj(boards[0])))
    assert fresh["rows"] == table["rows"]

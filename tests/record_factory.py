"""Synthetic result records that follow cfbench's record schema (benchmark/store/record.py,
benchmark/runner.py), including membership-inference metrics in the form the ``mia``
evaluator writes (``mia.<attack>.*``, ``mia.best.*``, ``notes['mia']``).

Used by the leaderboard and report tests; numbers are chosen by the caller so that the
tests can compare the tables with an independent aggregation of the same inputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

FPRS = ("0.01", "0.001", "0.0001")


def cp(k: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson 95% interval, straight from the beta quantiles."""
    lo = 0.0 if k == 0 else float(stats.beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(0.975, k + 1, n - k))
    return lo, hi


def rate(value: float, n: int) -> dict[str, Any]:
    k = int(round(value * n))
    lo, hi = cp(k, n)
    return {"value": k / n, "ci_low": lo, "ci_high": hi, "n": n}


def make_record(*, defense: str = "erm", family: str = "erm", seed: int = 0, clean: float = 0.9,
                robust: float | None = 0.5, mia: dict[str, dict[str, float | None]] | None = None,
                epsilon: float | str | None = None, status: str = "ok", reason: str | None = None,
                dataset: str = "digits", model: str = "cnn8", norm: str = "Linf", eps: float = 0.1,
                mia_params: dict[str, Any] | None = None, with_mia: bool = True,
                params: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                description: str | None = None, n_test: int = 500, n_members: int = 600,
                n_nonmembers: int = 600, train_s: float = 10.0, eval_s: dict[str, float] | None = None,
                warnings: list[str] | None = None, flags: list[str] | None = None,
                created: str = "2026-01-01T00:00:00+00:00", evaluators: tuple[str, ...] | None = None
                ) -> dict[str, Any]:
    """One record.  ``mia`` maps attack -> {"auc": v, "tpr.0.001": v, ...}; a ``None`` rate is
    n/a.  Default attacks: ``loss`` and ``lira_online`` with fixed, distinct values."""
    if evaluators is None:
        evaluators = ("clean", "pgd", "autoattack") + (("mia",) if with_mia else ())
    ev_cfg = {"clean": {"version": 1, "params": {}},
              "pgd": {"version": 1, "params": {"steps": 20, "step_size": None, "restarts": 1,
                                               "n_examples": None, "batch_size": 256}},
              "autoattack": {"version": 1, "params": {"n_examples": n_test, "version": "standard",
                                                      "batch_size": 250}},
              "mia": {"version": 1, "params": mia_params or {"reference_models": 4, "attacks": "all"}}}
    config = {
        "protocol": 1,
        "dataset": {"name": dataset, "version": 1},
        "model": {"name": model, "version": 1, "params": {"width": 32}},
        "defense": {"name": defense, "version": 1, "params": params or {}},
        "train": train or {"epochs": 5, "batch_size": 64, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9,
                           "weight_decay": 0.0005, "schedule": "cosine", "augment": False},
        "threat": {"norm": norm, "eps": eps},
        "data": {"pool_size": None, "member_fraction": 0.5, "split_seed": 0, "test_size": None},
        "evaluators": {e: ev_cfg[e] for e in evaluators},
        "seed": seed, "device": "cpu", "data_dir": None,
    }
    cfg_hash = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in ("device", "data_dir")},
                                         sort_keys=True).encode()).hexdigest()
    run_id = f"{dataset}-{defense}-{model}-s{seed}-{cfg_hash[:10]}"
    metrics: dict[str, Any] = {"clean.accuracy": rate(clean, n_test)}
    notes: dict[str, Any] = {"defense": {}}
    timings = {"data": 0.5, "train": train_s}
    eval_s = eval_s or {"clean": 0.1, "pgd": 2.0, "autoattack": 30.0, "mia": 60.0}
    for e in evaluators:
        timings[f"eval.{e}"] = eval_s.get(e, 1.0)
    timings["eval.mia.reference_models"] = 55.0  # a sub-timing: not added to the evaluation cost
    if "pgd" in evaluators and robust is not None:
        metrics["robust.pgd.accuracy"] = rate(min(1.0, robust + 0.02), n_test)
    if "autoattack" in evaluators and robust is not None:
        metrics["robust.autoattack.accuracy"] = rate(robust, n_test)
        metrics["robust.autoattack.n"] = n_test
        notes["robust.autoattack"] = {
            "package": "pyautoattack", "version": "standard", "norm": norm, "eps": eps, "n_examples": n_test,
            "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "seed": seed, "flags": list(flags or []),
            "resumed": False,
            "breakdown": {"clean": clean, "apgd-ce": robust + 0.01, "apgd-t": robust, "fab-t": robust,
                          "square": robust}}
    if "mia" in evaluators:
        if mia is None:
            mia = {"loss": {"auc": 0.58, "tpr.0.01": 0.02, "tpr.0.001": 0.004, "tpr.0.0001": None},
                   "lira_online": {"auc": 0.62, "tpr.0.01": 0.05, "tpr.0.001": 0.01, "tpr.0.0001": None}}
        roc = {}
        best: dict[str, tuple[str | None, float | None]] = {}
        for a, vals in mia.items():
            auc = vals.get("auc")
            se = 0.02
            metrics[f"mia.{a}.auc"] = ({"value": auc, "ci_low": auc - 1.96 * se, "ci_high": auc + 1.96 * se,
                                        "n": n_members + n_nonmembers} if auc is not None
                                       else {"value": None, "reason": "not supported"})
            metrics[f"mia.{a}.balanced_accuracy"] = {"value": 0.5 + (auc - 0.5) / 2 if auc else None}
            for f in FPRS:
                v = vals.get(f"tpr.{f}")
                if v is None:
                    metrics[f"mia.{a}.tpr_at_fpr.{f}"] = {
                        "value": None, "ci_low": None, "ci_high": None, "n": n_members,
                        "reason": f"FPR {f} is below 10/N_out (N_out = {n_nonmembers} non-members): "
                                  "not supported by the data"}
                else:
                    metrics[f"mia.{a}.tpr_at_fpr.{f}"] = rate(v, n_members)
            for key, m in [("auc", metrics[f"mia.{a}.auc"])] + [(f"tpr_at_fpr.{f}", metrics[f"mia.{a}.tpr_at_fpr.{f}"])
                                                                for f in FPRS]:
                v = m.get("value")
                if v is not None and (best.get(key, (None, None))[1] is None or v > best[key][1]):
                    best[key] = (a, v)
                best.setdefault(key, (None, None))
            fpr = np.geomspace(1 / n_nonmembers, 1, 30)
            power = max(0.05, 1 - 2 * ((auc or 0.5) - 0.5))
            roc[a] = {"fpr": fpr.tolist(), "tpr": np.clip(fpr ** power, 0, 1).tolist()}
        for key, (a, v) in best.items():
            src = metrics.get(f"mia.{a}.{key}") if a else {}
            metrics[f"mia.best.{key}"] = {"value": v, "ci_low": src.get("ci_low"), "ci_high": src.get("ci_high"),
                                          "attack": a}
        notes["mia"] = {"roc": roc, "protocol": {"reference_models": 4, "members": n_members,
                                                 "nonmembers": n_nonmembers}}
    if epsilon is not None:
        metrics["dp.epsilon"] = epsilon
        metrics["dp.delta"] = 1e-5
    timings["total"] = sum(v for k, v in timings.items() if k.count(".") <= 1)
    return {
        "schema_version": 1, "run_id": run_id, "name": f"{dataset}:defense={defense},model={model},seed={seed}",
        "created": created, "status": status, "reason": reason, "config": config, "config_hash": cfg_hash,
        "components": {
            "dataset": {"name": dataset, "version": 1, "source": "cfbench 0.1.0", "family": None},
            "model": {"name": model, "version": 1, "source": "cfbench 0.1.0", "family": None},
            "defense": {"name": defense, "version": 1, "source": "test", "distribution": None,
                        "distribution_version": None, "class": f"tests.{defense}", "family": family,
                        "description": description if description is not None else f"the {defense} defense"},
            "evaluators": {e: {"name": e, "version": 1, "source": "cfbench 0.1.0"} for e in evaluators}},
        "versions": {"python": "3.11.7", "platform": "Linux", "cfbench": "0.1.0", "git_commit": "abc123",
                     "packages": {"torch": "2.13.0", "numpy": "2.4.6"}},
        "splits": {"split_seed": 0, "pool_size": n_members + n_nonmembers, "members": n_members,
                   "nonmembers": n_nonmembers, "test": n_test},
        "timings": timings, "warnings": list(warnings or []) + [f"autoattack: {f}" for f in flags or []],
        "metrics": metrics, "notes": notes,
        "history": [{"epoch": i + 1, "loss": 2.0 / (i + 1), "lr": 0.05 * (1 - i / 5), "seconds": 1.0,
                     "train_accuracy": min(1.0, 0.3 + 0.15 * i)} for i in range(5)],
    }


def write_record(root: Path, rec: dict[str, Any], name: str | None = None) -> Path:
    d = Path(root) / (name or rec["run_id"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "record.json").write_text(json.dumps(rec, indent=1), encoding="utf-8")
    return d


def write_examples(run_dir: Path, n: int = 8, shape=(1, 8, 8), eps: float = 0.1, counterfactual: bool = False) -> None:
    """examples.safetensors through the harness's own save_examples (cfbench.store.examples)."""
    import torch
    from cfbench.store.examples import save_examples

    g = torch.Generator().manual_seed(0)
    x = torch.rand((n,) + tuple(shape), generator=g)
    adv = (x + eps * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1)
    y = torch.arange(n) % 10
    examples: dict[str, Any] = {"pgd": (x, adv, y), "autoattack": (x, adv.flip(0), y)}
    if counterfactual:
        examples["counterfactual"] = {"clean": x, "adv": (1 - x), "y": y}
    assert save_examples(examples, run_dir / "examples.safetensors")[1] == []

"""The run record: one immutable, versioned JSON document per run.

``<out>/<run-id>/record.json``, written once through :mod:`cfbench.store.io` (atomically).
The schema is documented in README.md ("Result records") and typed by :class:`RunRecord`;
:data:`SCHEMA_VERSION` changes when it does, and :func:`upgrade` turns a record of any
earlier version into the current shape when it is read, so old stores keep loading into
leaderboards.

Versions
    1. the first schema (sessions 1-2);
    2. ``jobs`` (the training jobs the run declared -- membership reference models, a
       defense's oracle -- with their cache paths) and ``examples`` (prefixes of the example
       images in ``examples.safetensors``, from every generator, one channel) added;
    3. ``flags`` added: the named sanity flags of the robustness evaluation
       (:mod:`cfbench.evaluators.sanity`), one ``{name, evaluators, message, evidence}`` per
       name.  An older record gets one flag per warning of AutoAttack's own checks that it
       kept in ``notes["robust.autoattack"]["flags"]`` (named by :func:`autoattack_flag_name`;
       its Square warning is not a flag, as in schema 3).
"""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

SCHEMA_VERSION = 3
RECORD = "record.json"
MODEL = "model.safetensors"
EXAMPLES = "examples.safetensors"
SPLITS = "splits.npz"
PER_EXAMPLE = "per_example.npz"

KEY_PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "pyautoattack", "opacus", "safetensors", "pandas")
STATUSES = ("running", "ok", "failed")


class RunRecord(TypedDict, total=False):
    schema_version: int
    run_id: str
    name: str
    created: str
    status: str                  # one of STATUSES
    reason: str | None
    config: dict[str, Any]       # RunConfig.to_dict(): canonical config + device, data_dir
    config_hash: str
    components: dict[str, Any]
    versions: dict[str, Any]
    splits: dict[str, Any] | None
    timings: dict[str, float]
    warnings: list[str]
    metrics: dict[str, Any]
    notes: dict[str, Any]
    history: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    examples: list[str]
    flags: list[dict[str, Any]]  # named sanity flags (schema 3)


#: top-level fields and the JSON types they must have (``None`` allowed where listed)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,), "status": (str,), "config": (dict,), "config_hash": (str,), "metrics": (dict,),
    "timings": (dict,), "warnings": (list,), "notes": (dict,), "history": (list,), "jobs": (list,),
    "examples": (list,), "components": (dict,), "versions": (dict,), "flags": (list,),
}


def upgrade(rec: dict[str, Any]) -> dict[str, Any]:
    """A record of any earlier schema version in the current shape (in place; returned)."""
    v = rec.get("schema_version", 1)
    if v < 2:
        rec.setdefault("jobs", [])
        rec.setdefault("examples", [])
        rec["schema_version"] = 2
    if isinstance(rec.get("schema_version"), int) and rec["schema_version"] < 3:
        flags: list[dict[str, Any]] = []
        notes = rec.get("notes")
        aa = notes.get("robust.autoattack") if isinstance(notes, Mapping) else None
        for msg in (aa.get("flags") or []) if isinstance(aa, Mapping) else []:
            name = autoattack_flag_name(str(msg))
            if name is None:
                continue
            if any(f["name"] == name for f in flags):
                continue
            flags.append({"name": name, "evaluators": ["autoattack"], "message": f"AutoAttack: {msg}",
                          "evidence": {"source": "pyautoattack.checks", "upgraded_from_schema": 2}})
        rec.setdefault("flags", flags)
        rec["schema_version"] = 3
    return rec


def autoattack_flag_name(message: str) -> str | None:
    """The flag name of a warning of pyautoattack's checks (None for its Square check, which
    ``cfbench.evaluators.sanity`` replaces with an interval-based rule); the one mapping, used
    by the AutoAttack evaluator and by :func:`upgrade`."""
    m = message.lower()
    if "square attack has decreased" in m:
        return None
    for needle, name in (("randomized defense", "randomized_forward"), ("zero gradient", "vanishing_gradients"),
                         ("probability distribution", "autoattack.probability_output"),
                         ("dynamic defense", "autoattack.dynamic"), ("target classes", "autoattack.n_classes"),
                         ("not possible to use the", "autoattack.n_classes")):
        if needle in m:
            return name
    return "autoattack.other"


def problems(rec: Any) -> list[str]:
    """Why ``rec`` is not a usable record ([] if it is): wrong type, missing or mistyped fields,
    a schema version newer than this cfbench, an unknown status, a config without a dataset."""
    if not isinstance(rec, Mapping):
        return [f"is a JSON {type(rec).__name__}, not an object"]
    out = []
    v = rec.get("schema_version", 1)
    if not isinstance(v, int) or isinstance(v, bool):
        out.append(f"schema_version {v!r} is not an integer")
    elif v > SCHEMA_VERSION:
        out.append(f"schema_version {v} is newer than this cfbench's ({SCHEMA_VERSION}); upgrade cfbench")
    for key in ("run_id", "status", "config"):
        if key not in rec:
            out.append(f"has no {key!r}")
    for key, types in _FIELD_TYPES.items():
        if key in rec and rec[key] is not None and not isinstance(rec[key], types):
            out.append(f"{key!r} is a {type(rec[key]).__name__}, expected {types[0].__name__}")
    if isinstance(rec.get("status"), str) and rec["status"] not in STATUSES:
        out.append(f"status {rec['status']!r} is not one of {', '.join(STATUSES)}")
    cfg = rec.get("config")
    if isinstance(cfg, Mapping):
        ds = cfg.get("dataset")
        if not (isinstance(ds, Mapping) and isinstance(ds.get("name"), str)):
            out.append("config.dataset.name is missing or not a string")
    return out


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """The record of a run folder, upgraded to the current schema."""
    path = Path(run_dir) / RECORD
    with open(path, encoding="utf-8") as f:
        rec = json.load(f)
    return upgrade(rec) if isinstance(rec, dict) else rec


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5,
                             check=False)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    """Interpreter, platform, cfbench, git commit, key packages and torch's thread count."""
    import importlib.metadata as md

    import torch

    from .. import __version__

    pk = {}
    for name in KEY_PACKAGES:
        try:
            pk[name] = md.version(name)
        except md.PackageNotFoundError:
            pk[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cfbench": __version__,
            "git_commit": git_commit(), "packages": pk, "torch_threads": torch.get_num_threads()}

"""The typed run configuration and its canonical hash (the run's identity and cache key).

``--set key=value`` settings are resolved into sections:

==========  ==========================================================================
section     holds
==========  ==========================================================================
defense     the defense's own ``Params`` (e.g. ``steps``, ``beta``)
train       :class:`TrainParams` (epochs, batch size, optimizer, schedule, ...)
threat      :class:`ThreatParams` (``norm``, ``eps``)
data        :class:`DataParams` (population pool, member/non-member split)
model       the model's ``Params`` (e.g. ``width``)
<evaluator> each evaluator's ``Params`` (e.g. ``autoattack.n_examples``, ``pgd.steps``)
==========  ==========================================================================

A qualified key (``train.epochs``) names its section.  A bare key (``epochs``) is looked up
in the order defense, train, threat, data, model, evaluators, and the first section that
has it wins; the resolved configuration (every value, defaults included) is stored in the
record, so nothing is hidden.  Every value is cast to the declared type; unknown keys are
errors with close-match suggestions.

The hash covers everything that changes a result: dataset, model, defense (with their
versions), all parameters, evaluators (with versions), and the seed.  It does not cover
the device, the data directory or the output directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from . import params as P
from .errors import UsageError, suggest
from .params import param
from .registry import get, registry

#: bump when the harness changes in a way that changes results of unchanged components
PROTOCOL_VERSION = 1

DEFAULT_EVALUATORS = ("clean", "pgd", "autoattack", "mia")


@dataclass(frozen=True)
class TrainParams:
    epochs: int | None = param(None, "training epochs (default: the dataset's)", ge=1)
    batch_size: int | None = param(None, "mini-batch size (default: the dataset's)", ge=1)
    lr: float | None = param(None, "peak learning rate (default: the dataset's)", gt=0)
    optimizer: Literal["sgd", "adam"] = param("sgd", "optimizer")
    momentum: float = param(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = param(5e-4, "L2 weight decay", ge=0)
    schedule: Literal["cosine", "step", "constant"] = param(
        "cosine", "LR schedule per epoch: cosine to 0, step (x0.1 at 50% and 75%), or constant")
    augment: bool = param(False, "random shifts (and flips for CIFAR) during training")


@dataclass(frozen=True)
class ThreatParams:
    norm: Literal["Linf", "L2"] = param("Linf", "threat-model norm")
    eps: float | None = param(None, "radius of the threat model (default: the dataset's for this norm)", ge=0)


@dataclass(frozen=True)
class DataParams:
    pool_size: int | None = param(None, "size of the population pool drawn from the training split (default: all)", ge=2)
    member_fraction: float = param(0.5, "fraction of the pool that the target model trains on (members)", gt=0, lt=1)
    split_seed: int = param(0, "seed of the pool / member / non-member split (fixed across training seeds)")
    test_size: int | None = param(None, "number of test examples used for accuracy (default: all)", ge=1)


BASE_SECTIONS = {"train": TrainParams, "threat": ThreatParams, "data": DataParams}


@dataclass(frozen=True)
class RunConfig:
    dataset: str
    defense: str
    model: str
    seed: int
    defense_params: Any
    model_params: Any
    train: TrainParams
    threat: ThreatParams
    data: DataParams
    evaluators: tuple[str, ...]
    evaluator_params: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    data_dir: str | None = None
    download: bool = False

    # -- resolved values ----------------------------------------------------------------
    def dataset_spec(self):
        return get("dataset", self.dataset)()

    def eps(self) -> float:
        if self.threat.eps is not None:
            return self.threat.eps
        spec = self.dataset_spec()
        return spec.default_eps if self.threat.norm == "Linf" else spec.default_eps_l2

    def resolved_train(self) -> TrainParams:
        spec = self.dataset_spec()
        import dataclasses
        return dataclasses.replace(
            self.train,
            epochs=self.train.epochs or spec.default_epochs,
            batch_size=self.train.batch_size or spec.default_batch_size,
            lr=self.train.lr or spec.default_lr,
        )

    # -- identity -----------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """Everything that determines the result, with defaults resolved."""
        comp = {k: registry(k).get(n) for k, n in (("dataset", self.dataset), ("defense", self.defense),
                                                    ("model", self.model))}
        ev = {}
        for name in self.evaluators:
            cls = get("evaluator", name)
            ev[name] = {"version": getattr(cls, "version", 1),
                        "params": P.to_dict(self.evaluator_params[name]) if name in self.evaluator_params else {},
                        **_file_digest("evaluator", name)}
        return {
            "protocol": PROTOCOL_VERSION,
            "dataset": {"name": self.dataset, "version": comp["dataset"].version, **_file_digest("dataset", self.dataset)},
            "model": {"name": self.model, "version": comp["model"].version, "params": P.to_dict(self.model_params),
                      **_file_digest("model", self.model)},
            "defense": {"name": self.defense, "version": comp["defense"].version,
                        "params": P.to_dict(self.defense_params), **_file_digest("defense", self.defense)},
            "train": P.to_dict(self.resolved_train()),
            "threat": {"norm": self.threat.norm, "eps": self.eps()},
            "data": P.to_dict(self.data),
            "evaluators": ev,
            "seed": self.seed,
        }

    def config_hash(self) -> str:
        return canonical_hash(self.canonical())

    def run_id(self) -> str:
        return f"{self.dataset}-{self.defense}-{self.model}-s{self.seed}-{self.config_hash()[:10]}"

    def to_dict(self) -> dict[str, Any]:
        d = self.canonical()
        d["device"] = self.device
        d["data_dir"] = self.data_dir
        return d


def _file_digest(kind: str, name: str) -> dict[str, str]:
    """A component loaded from a ``--plugin`` file is identified by the sha256 of its bytes too,
    so editing the file without bumping its ``version`` cannot reuse records made with the old
    code.  Installed components (entry points) are identified by name and version only."""
    digest = registry(kind).entry(name).sha256
    return {"file_sha256": digest} if digest else {}


def canonical_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def parse_sets(items: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}.")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise UsageError(f"--set expects key=value, got {item!r}.")
        out.append((k, v.strip()))
    return out


def make_config(*, dataset: str = "digits", defense: str = "erm", model: str | None = None, seed: int = 0,
                sets: list[tuple[str, Any]] | dict[str, Any] | None = None,
                evaluators: tuple[str, ...] | list[str] | None = None, device: str = "cpu",
                data_dir: str | None = None, download: bool = False) -> RunConfig:
    """Build and validate a :class:`RunConfig` (raises :class:`UsageError` on bad input)."""
    spec_cls = get("dataset", dataset)
    defense_cls = get("defense", defense)
    model = model or spec_cls.default_model
    model_cls = get("model", model)
    evaluators = tuple(evaluators) if evaluators is not None else DEFAULT_EVALUATORS
    for e in evaluators:
        get("evaluator", e)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}. Valid choices: cpu, cuda, cuda:N.")

    sections: dict[str, type] = {"defense": defense_cls.Params, "train": TrainParams, "threat": ThreatParams,
                                 "data": DataParams, "model": model_cls.Params}
    for e in evaluators:
        sections[e] = get("evaluator", e).Params
    values: dict[str, dict[str, Any]] = {s: {} for s in sections}
    items = sets.items() if isinstance(sets, dict) else (sets or [])
    all_keys = [f"{s}.{f['name']}" for s, c in sections.items() for f in P.describe(c)]
    for key, value in items:
        if "." in key:
            sec, _, name = key.partition(".")
            if sec not in sections:
                raise UsageError(f"unknown setting {key!r}: no section {sec!r}." + suggest(key, all_keys))
            if name not in {f["name"] for f in P.describe(sections[sec])}:
                raise UsageError(f"unknown setting {key!r}." + suggest(key, all_keys))
            values[sec][name] = value
        else:
            for sec, cls in sections.items():
                if key in {f["name"] for f in P.describe(cls)}:
                    values[sec][key] = value
                    break
            else:
                raise UsageError(f"unknown setting {key!r}." + suggest(key, all_keys + [k.split('.', 1)[1] for k in all_keys]))

    for key, value in getattr(spec_cls, "default_evaluator_settings", {}).items():
        sec, _, name = key.partition(".")
        if sec in evaluators and name not in values[sec]:
            values[sec][name] = value
    built = {s: P.build(c, values[s], where=f"{s}.") for s, c in sections.items()}
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was asked for, but torch.cuda.is_available() is False "
                             "on this machine. Valid choice here: cpu.")
    cfg = RunConfig(dataset=dataset, defense=defense, model=model, seed=seed,
                    defense_params=built["defense"], model_params=built["model"], train=built["train"],
                    threat=built["threat"], data=built["data"], evaluators=evaluators,
                    evaluator_params={e: built[e] for e in evaluators}, device=device, data_dir=data_dir,
                    download=download)
    check = getattr(defense_cls, "check_config", None)
    if callable(check):
        check(cfg)
    return cfg

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

A qualified key (``train.epochs``, ``defense.steps``, ``pgd.steps``) names its section.  A
bare key (``epochs``) is accepted when exactly one section has it; when several do (``steps``
is both the defense's and the ``pgd`` evaluator's) it is an error naming every qualified key.
A key given twice is an error too.  The resolved configuration (every value, defaults
included) is stored in the record, so nothing is hidden.  Every value is cast to the
declared type; unknown keys are errors with close-match suggestions.

The hash covers everything that changes a result: dataset, model, defense (with their
versions), all parameters, evaluators (with versions), the seed, and the device *type*
(``cpu`` or ``cuda``: their kernels give different numbers, so a CPU record is never reused
for a CUDA run).  It does not cover the device index (``cuda:0`` and ``cuda:1`` are one
type), ``--deterministic`` (recorded, see :func:`apply_determinism`), the data directory or
the output directory.  Adding the device type changed every config hash, hence every run id,
of earlier cfbench versions.

A dataset may declare literature defaults for defenses (``default_defense_settings``, e.g.
MNIST's 40 PGD steps of 0.01 for ``pgd-at``): they fill the defense's fields the user did not
set, exactly like its ``default_evaluator_settings`` do for evaluators.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from . import params as P
from .errors import UsageError, suggest
from .hashing import canonical_hash
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
    """A run's configuration, resolved once by :func:`make_config` into plain data.

    ``train`` and ``threat`` hold the resolved values (the dataset's defaults filled in);
    ``components`` the name, version and (for ``--plugin`` files) file digest of every
    component; ``dataset_info`` the dataset's image shape, class count and augmentation
    family.  :meth:`canonical` and :meth:`config_hash` are pure functions of this value:
    they never ask the registry again.
    """

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
    #: torch.use_deterministic_algorithms for the run (recorded; not part of the hash)
    deterministic: bool = False
    #: {"dataset"|"model"|"defense": {"name", "version"[, "file_sha256"]}, "evaluators": {name: {...}}}
    components: dict[str, Any] = field(default_factory=dict)
    #: {"shape": [C, H, W], "num_classes": int, "augmentation": str}
    dataset_info: dict[str, Any] = field(default_factory=dict)

    # -- values -------------------------------------------------------------------------
    @property
    def eps(self) -> float:
        return float(self.threat.eps)

    def dataset_spec(self):
        """The dataset component (to load the data; not part of the identity)."""
        return get("dataset", self.dataset)()

    def with_defense(self, defense: str, defense_params: Any) -> RunConfig:
        """The same run with another defense (e.g. a composite defense's base recipe),
        re-resolved so its identity names the new defense's version and digest."""
        comps = dict(self.components)
        comps["defense"] = _component("defense", defense)
        return dataclasses.replace(self, defense=defense, defense_params=defense_params, components=comps)

    # -- identity -----------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """Everything that determines the result, with defaults resolved."""
        c = self.components
        ev = {name: {"version": c["evaluators"][name]["version"],
                     "params": P.to_dict(self.evaluator_params[name]) if name in self.evaluator_params else {},
                     **_digest(c["evaluators"][name])}
              for name in self.evaluators}
        return {
            "protocol": PROTOCOL_VERSION,
            "dataset": {"name": self.dataset, "version": c["dataset"]["version"], **_digest(c["dataset"])},
            "model": {"name": self.model, "version": c["model"]["version"], "params": P.to_dict(self.model_params),
                      **_digest(c["model"])},
            "defense": {"name": self.defense, "version": c["defense"]["version"],
                        "params": P.to_dict(self.defense_params), **_digest(c["defense"])},
            "train": P.to_dict(self.train),
            "threat": {"norm": self.threat.norm, "eps": self.threat.eps},
            "data": P.to_dict(self.data),
            "evaluators": ev,
            "seed": self.seed,
            "device_type": device_type(self.device),
        }

    def config_hash(self) -> str:
        return canonical_hash(self.canonical())

    def run_id(self) -> str:
        """``<dataset>-<defense>-<model>-s<seed>-<hash10>``: one folder name, whatever the names hold
        (registration refuses names outside ``[a-z0-9][a-z0-9._-]*``; :func:`safe_name` is the
        second line of defence, so no name can reach outside ``--out``)."""
        return (f"{safe_name(self.dataset)}-{safe_name(self.defense)}-{safe_name(self.model)}-s{self.seed}-"
                f"{self.config_hash()[:10]}")

    def to_dict(self) -> dict[str, Any]:
        d = self.canonical()
        d["device"] = self.device
        d["data_dir"] = self.data_dir
        d["deterministic"] = self.deterministic
        return d


def device_type(device: str) -> str:
    """``cpu`` or ``cuda`` (``cuda:1`` -> ``cuda``): the part of the device in a run's identity."""
    return str(device).split(":", 1)[0]


def apply_determinism(enabled: bool, *, reset: bool = False) -> None:
    """``--deterministic``: ``torch.use_deterministic_algorithms(True)`` (an op without a
    deterministic implementation raises instead of running), cuDNN's deterministic kernels
    without benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (which deterministic cuBLAS
    needs on CUDA >= 10.2; set before the first CUDA call).  On CPU cfbench's ops are
    deterministic already; the switch matters on CUDA.  ``False`` leaves torch as it is, unless
    ``reset``: then a switch left on (by an earlier job in a shared worker process) is turned
    off again -- what a pool or Ray worker, which runs jobs of several runs, needs."""
    import torch

    if not enabled:
        if reset and torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(False)
            torch.backends.cudnn.deterministic = False
        return
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def safe_name(name: str) -> str:
    """``name`` as a piece of a folder name: every character outside ``[A-Za-z0-9._-]`` (``/``,
    ``\\``, spaces, ...) becomes ``_`` and leading dots are dropped (no hidden folder, no ``..``);
    a valid component name is unchanged."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip(".")
    return out or "_"


def check_eps(threat: ThreatParams, shape) -> None:
    """The threat radius must be finite and inside the input range: inputs lie in [0, 1], so an
    Linf radius above 1 and an L2 radius above sqrt(C*H*W) (the diameter of the image cube)
    allow any image at all and measure nothing."""
    eps = float(threat.eps)
    c_h_w = math.prod(int(v) for v in shape)
    top, what = (1.0, "1 (images lie in [0, 1])") if threat.norm == "Linf" else (
        math.sqrt(c_h_w), f"sqrt(C*H*W) = sqrt({c_h_w}) = {math.sqrt(c_h_w):.4g}, the diameter of the image cube")
    if not math.isfinite(eps) or not 0 <= eps <= top:
        raise UsageError(f"threat.eps={eps!r} is outside the valid range for the {threat.norm} threat model: "
                         f"0 <= eps <= {what}.")


def _digest(comp: dict[str, Any]) -> dict[str, str]:
    return {"file_sha256": comp["file_sha256"]} if comp.get("file_sha256") else {}


def _component(kind: str, name: str) -> dict[str, Any]:
    """Name, version and -- for a component loaded from a ``--plugin`` file -- the sha256 of the
    file's bytes, so editing the file without bumping its ``version`` cannot reuse records made
    with the old code.  Installed components (entry points) are identified by name and version."""
    reg = registry(kind)
    out = {"name": name, "version": getattr(reg.get(name), "version", 1)}
    digest = reg.entry(name).sha256
    if digest:
        out["file_sha256"] = digest
    return out


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
                data_dir: str | None = None, download: bool = False, deterministic: bool = False) -> RunConfig:
    """Build and validate a :class:`RunConfig` (raises :class:`UsageError` on bad input)."""
    spec_cls = get("dataset", dataset)
    defense_cls = get("defense", defense)
    model = model or spec_cls.default_model
    model_cls = get("model", model)
    evaluators = tuple(evaluators) if evaluators is not None else DEFAULT_EVALUATORS
    if not evaluators:
        raise UsageError("no evaluator given (--evaluators was empty). Valid choices: "
                         + ", ".join(registry("evaluator").names()) + ".")
    dup = sorted({e for e in evaluators if evaluators.count(e) > 1})
    if dup:
        raise UsageError(f"evaluator {dup[0]!r} is listed twice in --evaluators; list each once.")
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
        else:
            owners = [sec for sec, cls in sections.items() if key in {f["name"] for f in P.describe(cls)}]
            if not owners:
                raise UsageError(f"unknown setting {key!r}." + suggest(key, all_keys + [k.split('.', 1)[1] for k in all_keys]))
            if len(owners) > 1:
                raise UsageError(f"setting {key!r} is ambiguous: it is "
                                 + " and ".join(f"{s}.{key}" for s in owners)
                                 + ". Name one: " + ", ".join(f"--set {s}.{key}={value}" for s in owners) + ".")
            sec, name = owners[0], key
        if name in values[sec]:
            raise UsageError(f"setting {sec}.{name} is given twice ({values[sec][name]!r} and "
                             f"{value!r}); give it once.")
        values[sec][name] = value

    for key, value in getattr(spec_cls, "default_evaluator_settings", {}).items():
        sec, _, name = key.partition(".")
        if sec in evaluators and name not in values[sec]:
            values[sec][name] = value
    for name, value in (getattr(spec_cls, "default_defense_settings", {}).get(defense) or {}).items():
        if name not in values["defense"]:
            values["defense"][name] = value
    built = {s: P.build(c, values[s], where=f"{s}.") for s, c in sections.items()}
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was asked for, but torch.cuda.is_available() is False "
                             "on this machine. Valid choice here: cpu.")
    spec = spec_cls()
    train = dataclasses.replace(built["train"], epochs=built["train"].epochs or spec.default_epochs,
                                batch_size=built["train"].batch_size or spec.default_batch_size,
                                lr=built["train"].lr or spec.default_lr)
    threat = built["threat"]
    if threat.eps is None:
        threat = dataclasses.replace(threat, eps=spec.default_eps if threat.norm == "Linf" else spec.default_eps_l2)
    check_eps(threat, spec.shape)
    components = {"dataset": _component("dataset", dataset), "model": _component("model", model),
                  "defense": _component("defense", defense),
                  "evaluators": {e: _component("evaluator", e) for e in evaluators}}
    info = {"shape": list(spec.shape), "num_classes": int(spec.num_classes), "augmentation": spec.augmentation}
    cfg = RunConfig(dataset=dataset, defense=defense, model=model, seed=seed,
                    defense_params=built["defense"], model_params=built["model"], train=train,
                    threat=threat, data=built["data"], evaluators=evaluators,
                    evaluator_params={e: built[e] for e in evaluators}, device=device, data_dir=data_dir,
                    download=download, deterministic=bool(deterministic), components=components,
                    dataset_info=info)
    check = getattr(defense_cls, "check_config", None)
    if callable(check):
        check(cfg)
    return cfg

"""The shared contract test of defenses: ``check_defense(MyDefense)``.

Every defense -- built-in or plugin -- should pass it (like scikit-learn's
``check_estimator`` / timm's tests over ``list_models``).  It runs in seconds on a tiny
subset of the bundled digits data and raises :class:`ContractError` (an ``AssertionError``,
so pytest shows it as a test failure) naming the first broken rule:

metadata
    ``name`` is a lowercase identifier usable in run ids (``[a-z0-9][a-z0-9._-]*``);
    ``description`` is one non-empty line; ``version`` is an int >= 1; ``api_version``
    equals :data:`cfbench.PLUGIN_API_VERSION`; ``family`` is a non-empty string.
params
    ``Params`` is a *frozen* dataclass; every field has a default and a description (built
    with :func:`cfbench.params.param`) and a type ``--set`` can cast (bool, int, float, str,
    a ``Literal``, an optional of these, or a tuple/list of them); ``Params()`` passes its own
    range checks; no field shadows a run setting of the train / threat / data sections (a
    defense field named ``eps`` would capture ``--set eps=...``).
set round trip
    every field's default, written as ``--set`` would receive it (a string), is cast back by
    :func:`cfbench.params.build` to the same value; so is every declared choice; a malformed
    value of a non-string field is a :class:`~cfbench.errors.UsageError` naming the field.
fit
    ``fit`` on a tiny digits run (default: 128 members of a seeded pool of 256, 1 epoch,
    ``cnn8`` of width 8; the context carries the run's config and data as in a real run)
    trains the model it was given *in place* (the weights change), leaves every parameter,
    buffer and output finite, does not modify the training tensors, leaves autograd enabled,
    and puts only JSON-serialisable values into ``ctx.metrics`` / ``ctx.notes``.
reload
    the trained model saved by :func:`cfbench.store.models.save_model` and loaded back gives
    bit-identical logits (on uniform probe images and on training images): everything the
    model computes is in its state dict and its registered architecture -- a forward hook or
    an input transform added in ``fit`` is refused, as a run refuses to save such a model.
determinism
    a second fit with the same seed gives bit-identical weights.
resume
    a fit interrupted at the start of epoch 2 (after the epoch-1 checkpoint) and started
    again gives bit-identical weights to an uninterrupted 2-epoch fit: the defense's own state
    must round-trip through ``state_tensors`` / ``load_state_tensors``.  Skipped (and
    reported) when ``fit`` does not use the shared loop's epoch hooks.

To stay fast, ``check_defense`` uses the defense settings given as ``params`` (``--set``
style), else the class attribute ``contract_params`` if the defense declares one (e.g.
``contract_params = {"steps": 2}``), else sets every integer field called ``steps`` or
``*_steps`` to 2.  ``contract_model`` (class attribute) picks another model than ``cnn8``.

    from cfbench.testing import check_defense
    from my_plugin import MyDefense

    def test_contract():
        check_defense(MyDefense)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import torch

from .. import PLUGIN_API_VERSION
from .. import params as P
from ..errors import UsageError

__all__ = ["check_defense", "quick_settings", "set_string", "ContractError", "ContractReport"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SCALARS = (bool, int, float, str)


class ContractError(AssertionError):
    """A defense broke its contract (the message names the rule and the defense)."""


class _SimulatedInterrupt(BaseException):
    """Raised to interrupt a fit between epochs (a BaseException, like KeyboardInterrupt)."""


@dataclass
class ContractReport:
    """What :func:`check_defense` checked."""

    defense: str
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- --set strings ------------------------------------------------------------------------

def set_string(value: Any) -> str:
    """``value`` written as a ``--set key=VALUE`` string."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return ",".join(set_string(v) for v in value)
    return str(value)


def _supported(tp: Any) -> bool:
    origin = get_origin(tp)
    if tp in _SCALARS:
        return True
    if origin is Literal:
        return all(isinstance(c, _SCALARS) for c in get_args(tp))
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        args = [a for a in get_args(tp) if a is not type(None)]
        return bool(args) and all(_supported(a) for a in args)
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return len(args) >= 1 and all(a in _SCALARS for a in args)
    return False


def _accepts_any_string(tp: Any) -> bool:
    if tp is str:
        return True
    origin = get_origin(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType" or origin in (tuple, list):
        return any(_accepts_any_string(a) for a in get_args(tp))
    return False


def quick_settings(defense_cls) -> dict[str, Any]:
    """Settings that keep a contract fit fast (see the module docstring)."""
    declared = getattr(defense_cls, "contract_params", None)
    if declared is not None:
        return dict(declared)
    out: dict[str, Any] = {}
    params_cls = getattr(defense_cls, "Params", None)
    if params_cls is None or not dataclasses.is_dataclass(params_cls):
        return out
    hints = typing.get_type_hints(params_cls)
    for f in dataclasses.fields(params_cls):
        if (f.name == "steps" or f.name.endswith("_steps")) and hints.get(f.name) is int:
            lo = f.metadata.get("ge") or 0
            if lo <= 2:
                out[f.name] = 2
    return out


# -- the checks -----------------------------------------------------------------------------

def _fail(cls, rule: str, detail: str) -> ContractError:
    return ContractError(f"check_defense({cls.__qualname__}) [{rule}]: {detail}")


def _check_metadata(cls) -> None:
    from ..defenses.base import Defense

    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        raise _fail(cls, "metadata", f"{cls!r} is not a subclass of cfbench.defenses.Defense.")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _fail(cls, "metadata", f"name = {name!r}; it must match {NAME_RE.pattern} "
                                     "(it becomes part of run ids and folder names).")
    desc = getattr(cls, "description", "")
    if not isinstance(desc, str) or not desc.strip() or "\n" in desc:
        raise _fail(cls, "metadata", f"description = {desc!r}; give one non-empty line for `cfbench list`.")
    version = getattr(cls, "version", None)
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
        raise _fail(cls, "metadata", f"version = {version!r}; it must be an int >= 1 (part of the cache key).")
    api = getattr(cls, "api_version", None)
    if api != PLUGIN_API_VERSION:
        raise _fail(cls, "metadata", f"api_version = {api!r}, but this cfbench provides plugin API "
                                     f"{PLUGIN_API_VERSION}.")
    family = getattr(cls, "family", None)
    if not isinstance(family, str) or not family:
        raise _fail(cls, "metadata", f"family = {family!r}; give a non-empty string (e.g. 'adversarial').")


def _check_params(cls, report: ContractReport) -> None:
    from ..config import BASE_SECTIONS

    pc = getattr(cls, "Params", None)
    if not (isinstance(pc, type) and dataclasses.is_dataclass(pc)):
        raise _fail(cls, "params", f"Params = {pc!r}; declare a frozen dataclass (an empty one if there "
                                   "are no hyper-parameters).")
    if not pc.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise _fail(cls, "params", f"{pc.__qualname__} is not frozen; use @dataclass(frozen=True).")
    try:
        hints = typing.get_type_hints(pc)
    except Exception as e:  # noqa: BLE001
        raise _fail(cls, "params", f"the type hints of {pc.__qualname__} cannot be resolved: {e}") from e
    reserved = {f.name: sec for sec, c in BASE_SECTIONS.items() for f in dataclasses.fields(c)}
    for f in dataclasses.fields(pc):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise _fail(cls, "params", f"field {f.name!r} has no default; every hyper-parameter needs one.")
        if not str(f.metadata.get("help", "")).strip():
            raise _fail(cls, "params", f"field {f.name!r} has no description; declare it with "
                                       f"cfbench.params.param(default, 'what it does').")
        if not _supported(hints[f.name]):
            raise _fail(cls, "params", f"field {f.name!r} has type {hints[f.name]!r}, which --set cannot cast; "
                                       "use bool, int, float, str, a Literal, an optional or a tuple of these.")
        if f.name in reserved:
            raise _fail(cls, "params", f"field {f.name!r} shadows the run setting {reserved[f.name]}.{f.name}: "
                                       f"a bare `--set {f.name}=...` would change the defense instead; rename it.")
    try:
        defaults = pc()
    except Exception as e:  # noqa: BLE001
        raise _fail(cls, "params", f"{pc.__qualname__}() fails: {type(e).__name__}: {e}") from e
    for f in dataclasses.fields(pc):
        try:
            P.check_value(f, getattr(defaults, f.name), f.name)
        except UsageError as e:
            raise _fail(cls, "params", f"the defaults fail their own checks: {e}") from e
    validate = getattr(defaults, "validate", None)
    if callable(validate):
        try:
            validate()
        except UsageError as e:
            # allowed (e.g. DP training has no sensible default budget), but the contract
            # settings must then complete the configuration
            report.notes.append(f"the defaults alone are not a valid configuration: {e}")
        except Exception as e:  # noqa: BLE001
            raise _fail(cls, "params", f"{pc.__qualname__}.validate() raised {type(e).__name__}: {e}; "
                                       "bad settings must raise cfbench.errors.UsageError.") from e


def _set_one(cls, base: dict[str, Any], f: dataclasses.Field, tp: Any, s: str) -> Any:
    """The value ``--set f.name=s`` gives, through :func:`cfbench.params.build` on top of the
    contract settings ``base``; when only the combination is invalid (``validate``), through the
    per-field cast that ``build`` applies."""
    try:
        return getattr(P.build(cls.Params, {**base, f.name: s}), f.name)
    except UsageError:
        value = P._cast(s, tp, f.name)  # raises if the value itself is bad ...
        P.check_value(f, value, f.name)
        return value                     # ... else only the combination was (validate)


def _check_round_trip(cls, base: dict[str, Any]) -> None:
    pc = cls.Params
    hints = typing.get_type_hints(pc)
    default = pc()
    for f in dataclasses.fields(pc):
        tp = hints[f.name]
        values = [getattr(default, f.name)]
        if get_origin(tp) is Literal:
            values += list(get_args(tp))
        values += list(f.metadata.get("choices") or ())
        for v in values:
            s = set_string(v)
            try:
                got = _set_one(cls, base, f, tp, s)
            except UsageError as e:
                raise _fail(cls, "set round trip", f"--set {f.name}={s} (from {v!r}) is rejected: {e}") from e
            want = list(v) if isinstance(v, tuple) else v
            got_cmp = list(got) if isinstance(got, tuple) else got
            if got_cmp != want or (type(got) is not type(v) and not isinstance(v, (tuple, list))):
                raise _fail(cls, "set round trip", f"--set {f.name}={s} gives {got!r} ({type(got).__name__}), "
                                                   f"expected {v!r} ({type(v).__name__}); if the default's type "
                                                   "differs from the declared one, the record and the config "
                                                   "hash differ between the default and the same value set "
                                                   "explicitly.")
        if not _accepts_any_string(tp) or f.metadata.get("choices"):
            bad = "not-a-value!"
            try:
                _set_one(cls, base, f, tp, bad)
            except UsageError as e:
                if f.name not in str(e):
                    raise _fail(cls, "set round trip", f"the error for --set {f.name}={bad} does not name "
                                                       f"the field: {e}") from e
            else:
                raise _fail(cls, "set round trip", f"--set {f.name}={bad} was accepted; declare a narrower "
                                                   "type or `choices`.")


# -- fitting ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits():
    from ..data.specs import Digits

    return Digits().load()


def _state(model) -> dict[str, torch.Tensor]:
    from ..models import unwrap

    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[str, float]:
    worst, where = -1.0, ""
    for k in a:
        if k not in b or a[k].shape != b[k].shape:
            return k, math.inf
        d = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        if d > worst:
            worst, where = d, k
    return where, worst


@dataclass
class _Setup:
    cls: type
    params: Any
    cfg: Any
    x: torch.Tensor
    y: torch.Tensor
    ds: Any
    device: torch.device
    root: Path
    data: Any = None            # the RunData the members came from (as in a run)


def _fit(s: _Setup, *, epochs: int, ckpt: Path, cls=None):
    from ..execution.local import run_jobs
    from ..models import build_model
    from ..training.context import FitContext
    from ..training.recipe import threat_of

    cls = cls or s.cls
    torch.manual_seed(s.cfg.seed)
    model = build_model(s.cfg.model, s.ds.shape, s.ds.num_classes, s.ds.mean, s.ds.std,
                        P.to_dict(s.cfg.model_params))
    initial = _state(model)
    train = dataclasses.replace(s.cfg.train, epochs=epochs)
    # what cfbench.training.recipe.fit_recipe passes in a run: the config, the data, the
    # positions of the training examples in the pool, and an executor for declared jobs
    ctx = FitContext(threat=threat_of(s.cfg), train=train, device=s.device, seed=s.cfg.seed,
                     num_classes=s.ds.num_classes, augmentation="shift", checkpoint_dir=ckpt,
                     cache_dir=s.root / "cache", progress=False, desc="contract", config=s.cfg, data=s.data,
                     pool_positions=None if s.data is None else s.data.member_mask.nonzero()[0],
                     run_jobs=run_jobs)
    defense = cls(s.params)
    try:
        defense.fit(model, s.x, s.y, ctx)
    except Exception as e:  # noqa: BLE001 - report which defense and settings failed
        raise _fail(s.cls, "fit", f"fit ({epochs} epoch(s), digits, {s.cfg.model}, settings "
                                  f"{P.to_dict(s.params)}) raised {type(e).__name__}: {e}") from e
    return model, ctx, initial


def check_defense(defense_cls, params: dict[str, Any] | None = None, *, n_train: int = 128,
                  epochs: int = 1, batch_size: int = 64, model: str | None = None,
                  model_params: dict[str, Any] | None = None, seed: int = 0, norm: str = "Linf",
                  eps: float = 0.1, device: str = "cpu", check_resume: bool = True,
                  threads: int | None = 1) -> ContractReport:
    """Run the defense contract (module docstring) and return what was checked.

    ``params`` are defense settings in ``--set`` form (strings or values); the default is
    :func:`quick_settings`.  ``n_train`` members are drawn from a pool of ``2 * n_train``
    digits training images (at most 648).  The tiny fits run with ``threads`` torch threads
    (default 1, restored afterwards: on a busy machine, spinning OpenMP threads make tiny
    convolutions 10-50x slower; ``None`` leaves the setting alone).  Raises
    :class:`ContractError` at the first broken rule.
    """
    if threads is None:
        return _check_defense(defense_cls, params, n_train=n_train, epochs=epochs, batch_size=batch_size,
                              model=model, model_params=model_params, seed=seed, norm=norm, eps=eps,
                              device=device, check_resume=check_resume)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _check_defense(defense_cls, params, n_train=n_train, epochs=epochs, batch_size=batch_size,
                              model=model, model_params=model_params, seed=seed, norm=norm, eps=eps,
                              device=device, check_resume=check_resume)
    finally:
        torch.set_num_threads(before)


def _check_defense(defense_cls, params, *, n_train, epochs, batch_size, model, model_params, seed, norm, eps,
                   device, check_resume) -> ContractReport:
    from ..config import DataParams, RunConfig, ThreatParams, TrainParams
    from ..defenses.base import Defense

    t0 = time.perf_counter()
    cls = defense_cls
    report = ContractReport(defense=getattr(cls, "name", repr(cls)))
    _check_metadata(cls)
    report.passed.append("metadata")
    _check_params(cls, report)
    settings = quick_settings(cls) if params is None else dict(params)
    report.settings = settings
    try:
        defense_params = P.build(cls.Params, settings, where="defense.")
    except UsageError as e:
        raise _fail(cls, "params", f"the contract settings {settings} are rejected: {e}"
                                   + ("" if settings else "; declare `contract_params` on the class or "
                                                          "pass params= to check_defense")) from e
    report.passed.append("params")
    _check_round_trip(cls, settings)
    report.passed.append("set round trip")
    model = model or getattr(cls, "contract_model", None) or "cnn8"
    if model == "cnn8" and model_params is None:
        model_params = {"width": 8}  # a narrow cnn8 keeps every contract fit well under a second
    from ..data.specs import Digits
    from ..registry import get

    model_cls = get("model", model)
    model_params_obj = P.build(model_cls.Params, model_params or {}, where="model.")
    # resolved by hand (the class under test need not be registered)
    cfg = RunConfig(dataset="digits", defense=cls.name, model=model, seed=seed, defense_params=defense_params,
                    model_params=model_params_obj,
                    train=TrainParams(epochs=epochs, batch_size=batch_size, lr=0.05),
                    threat=ThreatParams(norm=norm, eps=eps),  # type: ignore[arg-type]
                    data=DataParams(pool_size=2 * n_train, test_size=100), evaluators=(),
                    evaluator_params={}, device=device,
                    components={"dataset": {"name": "digits", "version": Digits.version},
                                "model": {"name": model, "version": model_cls.version},
                                "defense": {"name": cls.name, "version": getattr(cls, "version", 1)},
                                "evaluators": {}},
                    dataset_info={"shape": list(Digits.shape), "num_classes": Digits.num_classes,
                                  "augmentation": Digits.augmentation})
    if getattr(cls.check_config, "__func__", None) is not Defense.check_config.__func__:
        try:
            cls.check_config(cfg)
        except UsageError as e:
            raise _fail(cls, "check_config", f"rejects the contract configuration (digits, {model}, "
                                             f"{norm} eps={eps}, {settings}): {e}") from e
        report.passed.append("check_config")

    from ..data.splits import make_split

    ds = _digits()
    # a run's split in miniature: a pool of 2 * n_train, half of it members (the training set)
    data = make_split(ds, cfg.data.pool_size, cfg.data.member_fraction, cfg.data.split_seed, cfg.data.test_size)
    x, y = data.x_train, data.y_train
    x0, y0 = x.clone(), y.clone()
    with tempfile.TemporaryDirectory(prefix="cfbench-contract-") as tmp:
        s = _Setup(cls, defense_params, cfg, x, y, ds, torch.device(device), Path(tmp), data)
        grad_before = torch.is_grad_enabled()
        model_a, ctx_a, initial = _fit(s, epochs=epochs, ckpt=s.root / "a")
        if not (torch.equal(x, x0) and torch.equal(y, y0)):
            raise _fail(cls, "fit", "fit modified the training tensors it was given.")
        if torch.is_grad_enabled() != grad_before:
            raise _fail(cls, "fit", "fit left autograd disabled (torch.is_grad_enabled() changed).")
        after = _state(model_a)
        if set(after) != set(initial):
            raise _fail(cls, "fit", "the trained model's state-dict keys differ from the model it was "
                                    f"given: {sorted(set(after) ^ set(initial))[:5]}.")
        bad = [k for k, v in after.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise _fail(cls, "fit", f"non-finite values in {bad[:5]} after fit.")
        _, change = _max_diff(initial, after)
        if not change > 0:
            raise _fail(cls, "fit", "the weights did not change: fit must train the model it is given in place.")
        model_a.eval()
        with torch.no_grad():
            out = model_a(x[:32].to(s.device))
        if out.shape != (min(32, len(x)), ds.num_classes) or not torch.isfinite(out).all():
            raise _fail(cls, "fit", f"the trained model's logits are {tuple(out.shape)} or non-finite.")
        for what, d in (("metrics", ctx_a.metrics), ("notes", ctx_a.notes)):
            from ..store.io import clean as _clean

            try:
                json.dumps(_clean(copy.deepcopy(d)), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise _fail(cls, "fit", f"ctx.{what} is not JSON-serialisable: {e}") from e
        report.passed.append("fit")

        _check_reload(s, model_a, ctx_a)
        report.passed.append("reload")

        model_b, _, _ = _fit(s, epochs=epochs, ckpt=s.root / "b")
        where, diff = _max_diff(after, _state(model_b))
        if diff != 0:
            raise _fail(cls, "determinism", f"two fits with seed {seed} differ (max |diff| {diff:.3g} in {where}); "
                                            "draw all randomness from torch's seeded generator.")
        report.passed.append("determinism")

        if check_resume:
            _check_resume(s, report)
        else:
            report.skipped["resume"] = "check_resume=False"
    report.seconds = time.perf_counter() - t0
    return report


def _check_reload(s: _Setup, model, ctx) -> None:
    """What a run does when it saves the model: save, reload, compare logits bit for bit."""
    from ..store.models import ModelReloadError, save_model
    from ..training.recipe import model_meta

    try:
        save_model(model, s.root / "reload" / "model.safetensors", model_meta(s.cfg, s.data, ctx), probe=s.x[:32])
    except ModelReloadError as e:
        raise _fail(s.cls, "reload", str(e)) from e


def _check_resume(s: _Setup, report: ContractReport) -> None:
    cls = s.cls

    class Interrupted(cls):  # type: ignore[misc, valid-type]
        fired = False

        def on_epoch_start(self, model, epoch, ctx):
            if epoch == 1:
                type(self).fired = True
                raise _SimulatedInterrupt
            super().on_epoch_start(model, epoch, ctx)

    full, _, _ = _fit(s, epochs=2, ckpt=s.root / "full")
    ckpt = s.root / "resumed"
    try:
        _fit(s, epochs=2, ckpt=ckpt, cls=Interrupted)
    except _SimulatedInterrupt:
        pass
    if not Interrupted.fired:
        report.skipped["resume"] = "fit does not call the shared loop's on_epoch_start; resume not checked"
        return
    resumed, ctx, _ = _fit(s, epochs=2, ckpt=ckpt)
    where, diff = _max_diff(_state(full), _state(resumed))
    if diff != 0:
        raise _fail(cls, "resume", f"a fit interrupted after epoch 1 and resumed differs from an uninterrupted "
                                   f"one (max |diff| {diff:.3g} in {where}); save the defense's state in "
                                   "state_tensors() and restore it in load_state_tensors().")
    if ctx.notes.get("resumed_from_epoch") != 1:
        report.skipped["resume"] = "fit retrained from scratch instead of resuming (result identical)"
        return
    report.passed.append("resume")

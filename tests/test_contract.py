"""The shared defense contract (cfbench.testing.check_defense): every registered defense and
the example plugin pass it, and each rule catches the bug it is meant to catch."""

from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from cfbench.defenses import Defense
from cfbench.params import param
from cfbench.registry import get, registry
from cfbench.testing import ContractError, check_defense, quick_settings, set_string

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin-defense"
DEFENSES = registry("defense").names()


#: settings for built-ins whose defaults alone are not a complete configuration (used unless
#: the class declares its own ``contract_params``)
COMPLETING = {"dp-sgd": {"noise_multiplier": "1.0"}, "dp-at": {"noise_multiplier": "1.0", "steps": "2"}}


#: defenses whose fit is costly even on tiny data (privacy accounting after every epoch): the
#: fast suite skips their resume check (3 of the 5 fits); the slow suite runs it
HEAVY = {"dp-sgd", "dp-at"}
CASES = [pytest.param(n, n not in HEAVY, id=n) for n in DEFENSES] + [
    pytest.param(n, True, id=f"{n}-with-resume", marks=pytest.mark.slow) for n in DEFENSES if n in HEAVY]


@pytest.mark.parametrize("name, resume", CASES)
def test_registered_defense_passes_the_contract(name, resume):
    cls = get("defense", name)
    params = None if hasattr(cls, "contract_params") or name not in COMPLETING else COMPLETING[name]
    report = check_defense(cls, params, check_resume=resume)
    assert report.passed[:3] == ["metadata", "params", "set round trip"]
    assert {"fit", "determinism"} <= set(report.passed)
    assert "resume" in report.passed or "resume" in report.skipped


def test_example_plugin_passes_the_contract(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    sys.modules.pop("cfbench_mart", None)
    import cfbench_mart

    report = check_defense(cfbench_mart.MART)
    assert report.settings == {"steps": 2}
    assert report.passed == ["metadata", "params", "set round trip", "fit", "reload", "determinism", "resume"]
    sys.modules.pop("cfbench_mart", None)


# -- each rule catches its bug ---------------------------------------------------------------

@dataclass(frozen=True)
class _P:
    beta: float = param(1.0, "a weight", ge=0)


class _Good(Defense):
    name = "good"
    description = "cross-entropy (a well-behaved test defense)"
    Params = _P

    def loss(self, model, x, y, batch):
        logits = model(x)
        return getattr(self.params, "beta", 1.0) * F.cross_entropy(logits, y), logits


def _variant(**attrs):
    return type("Variant", (_Good,), attrs)


def test_good_defense_passes_and_reports_every_check():
    report = check_defense(_Good)
    assert report.passed == ["metadata", "params", "set round trip", "fit", "reload", "determinism", "resume"]
    assert report.skipped == {} and report.seconds > 0


@pytest.mark.parametrize("attrs, message", [
    ({"name": "My Defense"}, "name = 'My Defense'"),
    ({"description": ""}, "description = ''"),
    ({"version": 0}, "version = 0"),
    ({"api_version": 2}, "api_version = 2"),
])
def test_metadata_rules(attrs, message):
    with pytest.raises(ContractError, match=r"\[metadata\].*" + message.replace("(", r"\(")):
        check_defense(_variant(**attrs))


@dataclass(frozen=True)
class _Incomplete:
    a: float | None = param(None, "a required value", gt=0)

    def validate(self):
        from cfbench.errors import UsageError

        if self.a is None:
            raise UsageError("a: give a value with --set a=...")


def test_incomplete_defaults_need_contract_settings():
    report = check_defense(_variant(Params=_Incomplete), {"a": "0.5"}, check_resume=False)
    assert report.notes == ["the defaults alone are not a valid configuration: a: give a value with --set a=..."]
    assert report.passed[:3] == ["metadata", "params", "set round trip"]


def _params_variant(**fields):
    """A Params class with the given (annotation, field) pairs."""
    ns = {"__annotations__": {k: a for k, (a, _) in fields.items()}, **{k: f for k, (_, f) in fields.items()}}
    return _variant(Params=dataclass(frozen=True)(type("Params", (), ns)))


@pytest.mark.parametrize("make, message", [
    (lambda: _variant(Params=dataclass(type("Params", (), {"__annotations__": {"a": int}, "a": param(1, "x")}))),
     "not frozen"),
    (lambda: _params_variant(a=(int, param(1, ""))), "field 'a' has no description"),
    (lambda: _params_variant(eps=(float, param(0.1, "radius"))), "shadows the run setting threat.eps"),
    (lambda: _params_variant(epochs=(int, param(2, "inner epochs"))), "shadows the run setting train.epochs"),
    (lambda: _params_variant(a=(object, param(None, "anything"))), "which --set cannot cast"),
    (lambda: _params_variant(a=(int, param(0, "positive", ge=1))), "the defaults fail their own checks"),
    (lambda: _variant(Params=_Incomplete), "the contract settings {} are rejected: a: give a value"),
])
def test_params_rules(make, message):
    with pytest.raises(ContractError, match=r"\[params\].*" + message):
        check_defense(make())


def test_set_round_trip_catches_a_default_of_the_wrong_type():
    # beta declared float but defaulting to the int 6: `--set beta=6` would give 6.0, and the
    # record / config hash of the default would differ from the same value set explicitly
    bad = _params_variant(beta=(float, param(6, "a weight", ge=0)))
    with pytest.raises(ContractError, match=r"\[set round trip\]: --set beta=6 gives 6.0 \(float\), expected 6 \(int\)"):
        check_defense(bad)


def test_set_round_trip_covers_every_supported_type():
    rich = _params_variant(
        flag=(bool, param(True, "a switch")),
        ratio=(float | None, param(None, "optional number", gt=0)),
        big=(float, param(float("inf"), "unbounded")),
        mode=(Literal["a", "b-c"], param("a", "a mode")),
        names=(tuple[str, ...], param(("x", "y"), "a list of names")),
        sizes=(tuple[int, ...], param((1, 2), "a list of sizes")),
        kind=(str, param("p", "one of p, q", choices=("p", "q"))),
    )
    assert check_defense(rich, check_resume=False).passed[2] == "set round trip"
    assert [set_string(v) for v in (None, True, 0.1, ("x", "y"), 3)] == ["none", "true", "0.1", "x,y", "3"]


def test_fit_must_train_the_given_model_in_place():
    import copy

    from cfbench.training import train

    class TrainsACopy(_Good):
        def fit(self, model, x, y, ctx):
            train(copy.deepcopy(model), x, y, ctx, self.loss, state=self)

    with pytest.raises(ContractError, match=r"\[fit\]: the weights did not change"):
        check_defense(TrainsACopy)


def test_fit_must_not_modify_the_training_data():
    class Normalises(_Good):
        def fit(self, model, x, y, ctx):
            x.mul_(0.5)
            super().fit(model, x, y, ctx)

    with pytest.raises(ContractError, match=r"\[fit\]: fit modified the training tensors"):
        check_defense(Normalises)


def test_nondeterminism_is_caught():
    class Unseeded(_Good):
        def loss(self, model, x, y, batch):
            loss, logits = super().loss(model, x, y, batch)
            return loss * (1 + random.random()), logits  # Python's unseeded RNG

    with pytest.raises(ContractError, match=r"\[determinism\]: two fits with seed 0 differ"):
        check_defense(Unseeded)


class _Running(_Good):
    """Weights each example by its running mean loss (state that must survive a resume)."""

    def fit(self, model, x, y, ctx):
        self.avg = torch.ones(len(x))
        super().fit(model, x, y, ctx)

    def loss(self, model, x, y, batch):
        logits = model(x)
        per = F.cross_entropy(logits, y, reduction="none")
        w = self.avg[batch.indices]
        self.avg[batch.indices] = 0.5 * w + 0.5 * per.detach()
        return (w * per).mean(), logits


def test_state_lost_on_resume_is_caught_and_state_tensors_fix_it():
    with pytest.raises(ContractError, match=r"\[resume\]: a fit interrupted after epoch 1"):
        check_defense(_Running)

    class Saved(_Running):
        def state_tensors(self):
            return {"avg": self.avg}

        def load_state_tensors(self, tensors):
            self.avg = tensors["avg"].clone()

    assert "resume" in check_defense(Saved).passed


def test_resume_is_skipped_when_fit_bypasses_the_epoch_hooks():
    class OwnLoop(_Good):
        def fit(self, model, x, y, ctx):
            torch.manual_seed(ctx.seed)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            for _ in range(ctx.train.epochs):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()

    report = check_defense(OwnLoop)
    assert "resume" not in report.passed and "on_epoch_start" in report.skipped["resume"]


def test_quick_settings():
    assert quick_settings(get("defense", "pgd-at")) == {"steps": 2}
    assert quick_settings(_variant(contract_params={"beta": "0.5"})) == {"beta": "0.5"}
    assert quick_settings(_Good) == {}


def test_a_fit_that_raises_is_reported_with_its_settings():
    class Diverges(_Good):
        def loss(self, model, x, y, batch):
            return model(x).sum() * float("nan")

    with pytest.raises(ContractError, match=r"\[fit\]: fit \(1 epoch\(s\), digits, cnn8, settings \{'beta': 1.0\}\) "
                                            r"raised TrainingDiverged: training loss became nan"):
        check_defense(Diverges)


# -- every registered model and evaluator passes its contract too (timm / scikit-learn style) --

@pytest.mark.parametrize("name", registry("model").names())
def test_every_registered_model_passes_the_model_contract(name):
    from cfbench.testing import check_model

    checked = check_model(get("model", name))
    assert checked  # at least one (channels, size) combination was built and checked


@pytest.mark.parametrize("name", registry("evaluator").names())
def test_every_registered_evaluator_passes_the_evaluator_contract(name):
    from cfbench.testing import check_evaluator

    metrics = check_evaluator(get("evaluator", name))
    assert metrics


def test_the_model_contract_catches_state_outside_the_state_dict():
    from cfbench.models.small import SmallCNN8
    from cfbench.testing import check_model

    class Leaky(SmallCNN8):
        name = "leaky"

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.scale = float(torch.rand(()))   # not a buffer: lost on save

        def forward(self, x):
            return super().forward(x) * self.scale

    with pytest.raises(ContractError, match="reloaded state dict gives other logits"):
        check_model(Leaky)


def test_the_evaluator_contract_catches_a_metric_outside_the_namespace():
    from cfbench.evaluators.base import EvalResult, Evaluator
    from cfbench.testing import check_evaluator

    @dataclasses.dataclass(frozen=True)
    class NoParams:
        pass

    class Sneaky(Evaluator):
        name = "sneaky"
        description = "writes another evaluator's number"
        Params = NoParams

        def evaluate(self, ctx):
            return EvalResult(metrics={"clean.accuracy": 1.0})

    with pytest.raises(ContractError, match="'clean.accuracy' outside its namespace 'sneaky'"):
        check_evaluator(Sneaky)

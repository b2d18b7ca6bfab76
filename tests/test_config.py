"""Typed --set resolution, validation messages and the config hash."""

from __future__ import annotations

import pytest
from cfbench.config import make_config, parse_sets
from cfbench.errors import UsageError


def test_values_are_cast_to_declared_types():
    cfg = make_config(defense="pgd-at", sets=parse_sets(["eps=0.2", "epochs=7", "defense.steps=3", "rand_init=false",
                                                        "optimizer=adam", "autoattack.n_examples=40"]))
    assert cfg.threat.eps == 0.2 and isinstance(cfg.threat.eps, float)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.defense_params.steps == 3 and cfg.defense_params.rand_init is False
    assert cfg.train.optimizer == "adam"
    assert cfg.evaluator_params["autoattack"].n_examples == 40


def test_fraction_syntax_for_eps():
    cfg = make_config(dataset="digits", sets={"eps": "8/255"})
    assert cfg.eps == pytest.approx(8 / 255)


def test_qualified_keys_reach_the_defense_and_the_evaluator():
    cfg = make_config(defense="pgd-at", sets={"defense.steps": "4", "pgd.steps": "9"})
    assert cfg.defense_params.steps == 4
    assert cfg.evaluator_params["pgd"].steps == 9


@pytest.mark.parametrize("items, needle", [
    ({"eps": "-0.1"}, "threat.eps: -0.1 is out of range; it must be >= 0"),
    ({"defense.steps": "0"}, "defense.steps: 0 is out of range; it must be >= 1"),
    ({"epochs": "ten"}, "train.epochs: expected an integer, got 'ten'"),
    ({"norm": "L3"}, "threat.norm: 'L3' is not allowed. Did you mean 'L2'? Valid choices: L2, Linf"),
    ({"rand_init": "maybe"}, "expected a boolean"),
    ({"epoch": "3"}, "unknown setting 'epoch'. Did you mean 'epochs'"),
    ({"train.epoch": "3"}, "Did you mean 'train.epochs'"),
    ({"foo.bar": "1"}, "no section 'foo'"),
])
def test_bad_settings_name_the_value_and_the_choices(items, needle):
    with pytest.raises(UsageError) as e:
        make_config(defense="pgd-at", sets=items)
    assert needle in str(e.value)


def test_unknown_components_suggest_close_matches():
    with pytest.raises(UsageError, match=r"unknown defense 'pgd_at'\. Did you mean 'pgd-at'.*Valid choices: .*erm"):
        make_config(defense="pgd_at")
    with pytest.raises(UsageError, match=r"unknown dataset 'fashion'.*fashion-mnist"):
        make_config(dataset="fashion")
    with pytest.raises(UsageError, match=r"unknown model 'cnn9'.*cnn8"):
        make_config(model="cnn9")
    with pytest.raises(UsageError, match=r"unknown evaluator 'autoatack'.*autoattack"):
        make_config(evaluators=["clean", "autoatack"])


def test_set_syntax_error():
    with pytest.raises(UsageError, match="key=value"):
        parse_sets(["eps0.1"])


def test_cuda_unavailable_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UsageError, match="cuda"):
        make_config(device="cuda")
    with pytest.raises(UsageError, match="Valid choices: cpu, cuda"):
        make_config(device="tpu")


def test_hash_is_canonical_and_covers_what_changes_results():
    a = make_config(defense="pgd-at", sets={"eps": "0.1"})
    b = make_config(defense="pgd-at", sets={"threat.eps": 0.1})
    assert a.config_hash() == b.config_hash()           # same values, different spelling
    c = make_config(defense="pgd-at")                     # the dataset default eps is 0.1 too
    assert c.config_hash() == a.config_hash()
    assert make_config(defense="pgd-at", sets={"eps": "0.2"}).config_hash() != a.config_hash()
    assert make_config(defense="pgd-at", seed=1).config_hash() != a.config_hash()
    assert make_config(defense="pgd-at", sets={"autoattack.n_examples": 10}).config_hash() != a.config_hash()
    assert make_config(defense="pgd-at", data_dir="/elsewhere").config_hash() == a.config_hash()
    assert a.run_id().startswith("digits-pgd-at-cnn8-s0-")


def test_dataset_evaluator_defaults_apply_and_set_wins():
    from cfbench.config import make_config

    d = make_config(dataset="digits", defense="pgd-at")
    assert d.evaluator_params["autoattack"].n_examples == 200 and d.evaluator_params["mia"].reference_models == 4
    f = make_config(dataset="fashion-mnist", defense="pgd-at")
    assert f.evaluator_params["autoattack"].n_examples == 500 and f.evaluator_params["mia"].reference_models == 8
    s = make_config(dataset="digits", defense="pgd-at", sets={"mia.reference_models": "8", "autoattack.n_examples": "500"})
    assert s.evaluator_params["mia"].reference_models == 8 and s.evaluator_params["autoattack"].n_examples == 500
    # the dataset default is part of the resolved config: explicit 4 == default, explicit 8 != default
    assert make_config(dataset="digits", defense="pgd-at", sets={"mia.reference_models": "4"}).config_hash() \
        == d.config_hash() != s.config_hash()
    # an evaluator that is not selected is not touched
    c = make_config(dataset="digits", defense="pgd-at", evaluators=["clean"])
    assert set(c.evaluator_params) == {"clean"}


def test_auto_threads_one_for_small_cpu_models_only():
    from cfbench.cli import auto_threads

    assert auto_threads(make_config(dataset="digits", defense="erm")) == 1            # cnn8, 0.19M
    assert auto_threads(make_config(dataset="fashion-mnist", defense="erm")) == 1     # cnn28, 0.86M
    assert auto_threads(make_config(dataset="cifar10", defense="erm")) is None        # preact-resnet18, 11M
    # the rule follows the model's actual size, not its name: a wide cnn8 has > 1M parameters
    assert auto_threads(make_config(dataset="digits", defense="erm", sets={"model.width": "256"})) is None


def test_an_ambiguous_bare_key_is_an_error_naming_every_qualified_key():
    # pgd-at has `steps`, and so has the default `pgd` evaluator
    with pytest.raises(UsageError) as e:
        make_config(defense="pgd-at", sets=parse_sets(["steps=5"]))
    msg = str(e.value)
    assert "'steps' is ambiguous" in msg and "defense.steps" in msg and "pgd.steps" in msg
    # either qualified key works, and a bare key is fine where only one section has it
    assert make_config(defense="pgd-at", sets=parse_sets(["defense.steps=5"])).defense_params.steps == 5
    assert make_config(defense="pgd-at", sets=parse_sets(["pgd.steps=5"])).evaluator_params["pgd"].steps == 5
    assert make_config(defense="pgd-at", evaluators=("clean",), sets=parse_sets(["steps=5"])).defense_params.steps == 5


def test_ambiguous_bare_key_exits_2_on_the_command_line(capsys):
    from cfbench.cli import main

    assert main(["run", "--defense", "pgd-at", "--set", "steps=5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "defense.steps" in err and "pgd.steps" in err


def test_a_key_given_twice_is_an_error_not_a_silent_override():
    with pytest.raises(UsageError, match=r"train.epochs is given twice \('abc' and '1'\)"):
        make_config(sets=parse_sets(["epochs=abc", "epochs=1"]))


def test_the_hash_is_computed_from_the_resolved_value_not_the_registry(monkeypatch):
    from cfbench import config as config_mod
    from cfbench import registry as reg

    cfg = make_config(defense="pgd-at")
    h = cfg.config_hash()

    def boom(*a, **k):
        raise AssertionError("the registry was asked again")

    for mod in (reg, config_mod):
        monkeypatch.setattr(mod, "registry", boom)
        monkeypatch.setattr(mod, "get", boom)
    assert cfg.config_hash() == h and cfg.run_id().endswith(h[:10])
    assert cfg.components["defense"] == {"name": "pgd-at", "version": 1}
    assert cfg.train.epochs is not None and cfg.threat.eps == 0.1   # dataset defaults resolved


def test_empty_or_repeated_evaluators_are_errors():
    with pytest.raises(UsageError, match="no evaluator"):
        make_config(evaluators=())
    with pytest.raises(UsageError, match="listed twice"):
        make_config(evaluators=("clean", "clean"))

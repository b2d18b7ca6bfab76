"""Contract checks for plugin authors and cfbench's own tests: :func:`check_defense`
(:mod:`.contract`), :func:`check_model` and :func:`check_evaluator` (:mod:`.components`),
and tiny-run builders shared by the test suite (:mod:`.tiny`)."""

from .components import check_evaluator, check_model
from .contract import ContractError, ContractReport, check_defense, quick_settings, set_string

__all__ = ["check_defense", "check_model", "check_evaluator", "quick_settings", "set_string", "ContractError",
           "ContractReport"]

"""What every parameterised component shares (defenses, attacks, evaluators): registry
metadata and a frozen ``Params`` dataclass of typed hyper-parameters that the constructor
only stores (scikit-learn style; the work happens in ``fit`` / ``perturb`` / ``evaluate``)."""

from __future__ import annotations

from typing import ClassVar


class Component:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: bump when behaviour changes: part of every cache key and record identity
    version: ClassVar[int] = 1
    api_version: ClassVar[int] = 1
    Params: ClassVar[type]

    def __init__(self, params=None):
        self.params = params if params is not None else self.Params()

"""Contract checks of models and evaluators, run by cfbench's tests over every registered
one (built-in or plugin), like :func:`cfbench.testing.check_defense` for defenses.

``check_model(cls)``
    metadata (``name``, ``description``, ``version >= 1``, ``api_version``); a frozen
    ``Params`` whose defaults build; for each supported image size (``input_sizes``, else
    8, 28 and 32) and 1 or 3 channels: the model normalises its input itself (a
    :class:`~cfbench.models.Normalize` at ``self.normalize``), maps a (4, C, H, W) batch in
    [0, 1] to finite (4, num_classes) logits, is initialised deterministically from torch's
    seed, and its saved state dict (safetensors) reloads into a freshly built model that gives
    bit-identical logits -- what is saved is exactly what was evaluated.
``check_evaluator(cls)``
    metadata; a valid metric namespace; ``evaluate`` on a tiny trained digits model (with the
    class attribute ``contract_params`` as settings) returns an ``EvalResult`` whose every
    metric key lies in the namespace, every value is a number, None or a ``{"value", ...}``
    dict, and everything is JSON-serialisable.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from .. import PLUGIN_API_VERSION
from .contract import ContractError

SIZES = (8, 28, 32)


def _meta(kind: str, cls) -> None:
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ContractError(f"{kind} {cls!r}: `name` must be a non-empty string")
    if not isinstance(getattr(cls, "description", ""), str) or not cls.description.strip():
        raise ContractError(f"{kind} {name!r}: `description` must be one non-empty line")
    v = getattr(cls, "version", None)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ContractError(f"{kind} {name!r}: `version` must be an int >= 1, got {v!r}")
    if getattr(cls, "api_version", None) != PLUGIN_API_VERSION:
        raise ContractError(f"{kind} {name!r}: api_version {getattr(cls, 'api_version', None)!r} != "
                            f"{PLUGIN_API_VERSION}")
    params = getattr(cls, "Params", None)
    if not (dataclasses.is_dataclass(params) and params.__dataclass_params__.frozen):
        raise ContractError(f"{kind} {name!r}: `Params` must be a frozen dataclass")
    params()  # every field has a default


def check_model(cls) -> list[str]:
    """Run the model contract (module docstring); returns the sizes checked."""
    from ..models import Normalize
    from ..store.io import load_tensors, save_tensors_atomic

    _meta("model", cls)
    sizes = cls.input_sizes or SIZES
    min_size = getattr(cls, "min_image_size", None)
    checked = []
    for size in sizes:
        if min_size is not None and size < min_size:
            continue
        for c in (1, 3):
            torch.manual_seed(0)
            m = cls(c, 10, size, (0.5,) * c, (0.25,) * c).eval()
            torch.manual_seed(0)
            m2 = cls(c, 10, size, (0.5,) * c, (0.25,) * c).eval()
            if not isinstance(getattr(m, "normalize", None), Normalize):
                raise ContractError(f"model {cls.name!r}: no Normalize at self.normalize (call super().__init__)")
            x = torch.rand(4, c, size, size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                out = m(x)
                if tuple(out.shape) != (4, 10) or not torch.isfinite(out).all():
                    raise ContractError(f"model {cls.name!r} on {c}x{size}x{size}: logits {tuple(out.shape)} "
                                        "or non-finite; expected (4, 10)")
                if not torch.equal(out, m2(x)):
                    raise ContractError(f"model {cls.name!r}: two builds after torch.manual_seed(0) differ")
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "m.safetensors"
                    save_tensors_atomic(path, m.state_dict(), {})
                    torch.manual_seed(123)
                    m3 = cls(c, 10, size, (0.5,) * c, (0.25,) * c).eval()
                    m3.load_state_dict(load_tensors(path)[0])
                    if not torch.equal(out, m3(x)):
                        raise ContractError(f"model {cls.name!r}: the reloaded state dict gives other logits "
                                            "(state outside the state dict?)")
            checked.append(f"{c}x{size}x{size}")
    if not checked:
        raise ContractError(f"model {cls.name!r}: no image size to check")
    return checked


def _metric_ok(v: Any) -> bool:
    if v is None or isinstance(v, (int, float, str)):
        return True
    return isinstance(v, dict) and "value" in v


def check_evaluator(cls, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the evaluator contract (module docstring); returns the metrics it produced."""
    from .. import params as P
    from ..registry import get
    from ..store.io import clean
    from .tiny import eval_context, fit_context, tiny_config, tiny_data

    _meta("evaluator", cls)
    try:
        ns = cls.metric_namespace()
    except ValueError as e:
        raise ContractError(str(e)) from e
    settings = dict(getattr(cls, "contract_params", {}) if params is None else params)
    cfg = tiny_config("erm")
    data = tiny_data(cfg)
    from ..training.recipe import build_model_for

    model = build_model_for(cfg, data, 0)
    get("defense", "erm")().fit(model, data.x_train, data.y_train, fit_context(cfg, data))
    model.eval()
    ev = cls(P.build(cls.Params, settings, where=f"{cls.name}."))
    with tempfile.TemporaryDirectory() as tmp:
        res = ev.evaluate(eval_context(cfg, model, Path(tmp), data))
    bad = [k for k in res.metrics if not k.startswith(ns + ".")]
    if bad:
        raise ContractError(f"evaluator {cls.name!r}: metric {bad[0]!r} outside its namespace {ns!r}")
    wrong = [k for k, v in res.metrics.items() if not _metric_ok(v)]
    if wrong:
        raise ContractError(f"evaluator {cls.name!r}: metric {wrong[0]!r} = {res.metrics[wrong[0]]!r} is not a "
                            "number, None or a {'value', ...} dict")
    try:
        json.dumps(clean({"metrics": res.metrics, "notes": res.notes, "warnings": res.warnings}), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ContractError(f"evaluator {cls.name!r}: result is not JSON-serialisable: {e}") from e
    return res.metrics

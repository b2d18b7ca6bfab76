"""Numbers as text: the one copy of every formatting helper tables, figures and reports share.

Metric entries in records are numbers or ``{value, ci_low?, ci_high?, n?, k?, reason?}``
mappings; :func:`num` reads either (n/a is NaN, ``"inf"`` is inf).  Nothing here imports the
rest of :mod:`cfbench.present`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def num(v: Any) -> float:
    """A metric's number as float; n/a (None, missing, non-numeric) is NaN; 'inf' is inf."""
    if isinstance(v, Mapping):
        v = v.get("value")
    if isinstance(v, bool) or v is None:
        return math.nan
    if isinstance(v, str):
        if v in ("inf", "Infinity"):
            return math.inf
        try:
            return float(v)
        except ValueError:
            return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def isnum(v: Any) -> bool:
    """A real number that is not NaN (``±inf`` counts; bools do not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def isfinite(v: Any) -> bool:
    """A finite real number (bools do not count)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ci(m: Any) -> tuple[float, float]:
    """The ``(ci_low, ci_high)`` of a metric entry, NaN where absent."""
    if isinstance(m, Mapping):
        return num(m.get("ci_low")), num(m.get("ci_high"))
    return math.nan, math.nan


def fmt_eps(eps: Any) -> str:
    """A threat model's eps: ``0.1``, ``0.0314``, ``8`` (4 significant digits); as given if not a number."""
    try:
        return format(float(eps), ".4g")
    except (TypeError, ValueError):
        return str(eps)


def fmt_metric(mean: float, std: float, lo: float, hi: float, *, percent: bool, digits: int | None = None) -> str:
    """'85.4 ± 0.8 [82.0, 88.4]' (percent) or '0.612 [0.580, 0.644]'; 'n/a' when missing."""
    if not isnum(mean):
        return "n/a"
    s = 100.0 if percent else 1.0
    d = digits if digits is not None else (1 if percent else 3)
    text = f"{mean * s:.{d}f}"
    if isnum(std):
        text += f" ± {std * s:.{d}f}"
    if isnum(lo) and isnum(hi):
        text += f" [{lo * s:.{d}f}, {hi * s:.{d}f}]"
    return text


def fmt_epsilon(mean: float, std: float = math.nan) -> str:
    """DP epsilon: '∞', '—' when the run is not DP, else 3 significant digits (± std)."""
    if isinstance(mean, float) and math.isinf(mean):
        return "∞"
    if not isnum(mean):
        return "—"
    return f"{mean:.3g}" + (f" ± {std:.2g}" if isnum(std) and std > 0 else "")


def fmt_seconds(v: float) -> str:
    """'12.3 s', '4.5 min', '2.1 h'; 'n/a' when missing."""
    if not isnum(v):
        return "n/a"
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.1f} h"


def fmt_rate(m: Any, *, percent: bool = True, digits: int | None = None) -> tuple[str, str]:
    """(text, tooltip) of a metric entry: value with its interval, or n/a with the reason."""
    if m is None:
        return "n/a", "not evaluated"
    v = num(m)
    if math.isnan(v):
        reason = m.get("reason") if isinstance(m, Mapping) else None
        return "n/a", str(reason or "not available")
    s = 100.0 if percent else 1.0
    d = digits if digits is not None else (1 if percent else 3)
    text = f"{v * s:.{d}f}"
    tip = ""
    if isinstance(m, Mapping):
        lo, hi = num(m.get("ci_low")), num(m.get("ci_high"))
        if isfinite(lo) and isfinite(hi):
            text += f" [{lo * s:.{d}f}, {hi * s:.{d}f}]"
        if m.get("n") is not None:
            tip = f"n = {m['n']}"
        if m.get("k") is not None:
            tip += f", k = {m['k']}"
        if m.get("fpr") is not None and m.get("fpr_target") is not None:
            tip += f", achieved FPR = {m['fpr']:.3g}"
    return text, tip


def fmt_plain(v: Any) -> str:
    """Any record value as short text (a metric entry as its value and interval)."""
    if isinstance(v, Mapping):
        if "value" in v:
            return fmt_rate(v, percent=False, digits=4)[0]
        return json.dumps(v, default=str)
    if isinstance(v, float):
        return f"{v:.6g}"
    return "n/a" if v is None else str(v)

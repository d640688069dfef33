"""Validation of the flow's configuration objects: a bad value raises a ValueError
that names it."""

from __future__ import annotations

import math


def _finite_at_least(name: str, value, low: float, strict: bool) -> float:
    """``value`` as a float, or a ValueError naming it unless it is finite and >= low
    (> low when ``strict``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and (v > low if strict else v >= low)):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, "
                         f"got {value!r}")
    return v


def _tolerances(prefix: str, rtol, atol) -> tuple[float, float]:
    """(rtol, atol) as floats, each finite and >= 0 and not both 0 (no step could be
    accepted), or a ValueError naming the bad value (``prefix`` names the solver)."""
    r = _finite_at_least(f"{prefix}rtol", rtol, 0.0, False)
    a = _finite_at_least(f"{prefix}atol", atol, 0.0, False)
    if r == 0.0 and a == 0.0:
        raise ValueError(f"{prefix}rtol and atol are both 0: no step could be accepted")
    return r, a

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

"""The one number formatter of every report, table cell and summary line."""

from __future__ import annotations

import math
from typing import Any

MISSING = "n/a"


def fmt(value: Any) -> str:
    """A value as reports show it: 4 significant digits for floats, thousands separators for
    large integers, yes/no for booleans and "n/a" for None, NaN and infinities (JSON stores
    the latter as null, so a page and its results.json agree)."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return MISSING
        return f"{value + 0.0:.4g}"  # + 0.0 turns -0.0 into 0.0
    return str(value)


def fmt_percent(value: Any) -> str:
    """A fraction in [0, 1] as a percentage with one decimal ("n/a" when missing)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{float(value):.1%}"

"""Strict JSON for machines: no ``NaN`` or ``Infinity`` (which ``json.dumps`` writes by default and most
parsers reject). A non-finite number becomes ``null``, and the report says why under ``null_reasons``."""

from __future__ import annotations

import math
from typing import Any

REASONS_KEY = "null_reasons"


def nulls_for_non_finite(report: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``report`` with every non-finite float replaced by ``None``; ``report[REASONS_KEY]`` maps
    the dotted path of each one to what it was."""
    reasons: dict[str, str] = {}
    clean = _walk(report, "", reasons)
    clean[REASONS_KEY] = reasons
    return clean


def _walk(value: Any, path: str, reasons: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        reasons[path] = ("the value was NaN (not a number): the quantity could not be measured" if math.isnan(value)
                         else f"the value was {'+' if value > 0 else '-'}infinity")
        return None
    if isinstance(value, dict):
        return {k: _walk(v, f"{path}.{k}" if path else str(k), reasons) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, f"{path}[{i}]", reasons) for i, v in enumerate(value)]
    return value

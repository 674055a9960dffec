"""Resolve ``package.module:attribute`` paths, the form users give for their own code."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(spec: str) -> Any:
    """The object named by ``package.module:attr.sub``; raises ImportError or AttributeError."""
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj

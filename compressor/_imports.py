"""Resolve ``package.module:attribute`` paths, the form users give for their own code."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(spec: str) -> Any:
    """The object named by ``package.module:attr.sub``; raises ImportError or AttributeError only, whatever
    the path or the imported module's own code does wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name.strip() or module_name.startswith(".") or any(not part for part in module_name.split(".")):
        raise ImportError(f"expected package.module:name, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        raise
    except Exception as exc:  # the module's own code failed while importing
        raise ImportError(f"importing {module_name} raised {type(exc).__name__}: {exc}") from exc
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj

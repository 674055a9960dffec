"""Architectures by name: the one door to models, as criteria and schedules have theirs.

A model factory is registered under the entry-point group ``compressor.models`` (the built-ins in
``models/``, through our own ``pyproject.toml``, exactly as a third party registers theirs) or named as
a ``package.module:factory`` path. ``--arch``, ``compressor models``, ``load_pruned`` and the service's
``arch`` check all look here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .errors import ConfigError, ModelLoadError, one_line
from .registry import Registry

ENTRY_POINT_GROUP = "compressor.models"
REGISTRY = Registry(ENTRY_POINT_GROUP, kind="model", option="--arch")


def available_models() -> list[str]:
    """Every registered architecture name, sorted (nothing is imported)."""
    return [info.name for info in REGISTRY.available()]


def resolve_arch(name: str) -> Callable[..., nn.Module]:
    """The factory of a registered architecture or of a ``package.module:factory`` path."""
    if ":" not in name and name not in REGISTRY.entry_points():
        raise ModelLoadError(f"unknown --arch {name!r}; available: {', '.join(available_models()) or 'none'}",
                             hint="or pass package.module:factory")
    try:
        return REGISTRY.resolve(name)
    except ConfigError as exc:
        raise ModelLoadError(exc.message, hint=exc.hint) from exc


def build_arch(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture or a ``package.module:factory`` path.

    Keyword arguments the factory does not accept are dropped, so one call serves factories that
    take ``num_classes`` and those that do not.
    """
    factory = resolve_arch(name)
    attempts = [kwargs]
    try:
        params = inspect.signature(factory).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            # ``**kwargs`` hides what is accepted (torchvision's factories): fall back to fewer arguments.
            attempts += [{k: v for k, v in kwargs.items() if k == "num_classes"}, {}]
        else:
            attempts = [{k: v for k, v in kwargs.items() if k in params}]
    except (TypeError, ValueError):
        attempts += [{}]
    for i, attempt in enumerate(attempts):
        try:
            model = factory(**attempt)
            break
        except TypeError as exc:
            if i == len(attempts) - 1 or "unexpected keyword" not in str(exc):
                raise ModelLoadError(f"--arch {name}: building the model failed: {one_line(exc)}") from exc
        except Exception as exc:
            raise ModelLoadError(f"--arch {name}: building the model failed: {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--arch {name} returned {type(model).__name__}, not a torch.nn.Module")
    return model

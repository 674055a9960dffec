"""Plug-in registries: named classes discovered through an entry-point group, or imported from a
``package.module:Class`` path without any installation step.

Criteria (``compressor.criteria``) and schedules (``compressor.schedules``) each have one. Built-ins
are registered in our own ``pyproject.toml`` exactly as a third party registers theirs. Listing
imports nothing; a plug-in that fails to import warns and leaves the others working.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib import metadata

from ._imports import import_object
from .errors import ConfigError


@dataclass(frozen=True)
class PluginInfo:
    """Where a registered plug-in comes from, for listings and reports."""

    name: str
    value: str
    distribution: str | None
    version: str | None


class Registry:
    """The plug-ins of one entry-point group; discovery and imports are cached until :meth:`refresh`."""

    def __init__(self, group: str, *, kind: str, option: str) -> None:
        self.group = group
        self.kind = kind
        """What one plug-in is called in messages (``criterion``)."""
        self.option = option
        """The command-line option that names one (``--criterion``)."""
        self._found: dict[str, metadata.EntryPoint] | None = None
        self._loaded: dict[str, type | None] = {}

    def refresh(self) -> None:
        """Forget the cached discovery, e.g. after installing a plug-in in the same process."""
        self._found = None
        self._loaded.clear()

    def entry_points(self) -> dict[str, metadata.EntryPoint]:
        if self._found is None:
            found: dict[str, metadata.EntryPoint] = {}
            for ep in metadata.entry_points(group=self.group):
                if ep.name in found and found[ep.name].value != ep.value:
                    warnings.warn(f"{self.kind} {ep.name!r} is registered twice ({found[ep.name].value} and "
                                  f"{ep.value}); using the first", stacklevel=3)
                    continue
                found.setdefault(ep.name, ep)
            self._found = found
        return self._found

    def available(self) -> list[PluginInfo]:
        """Every registered plug-in, sorted by name (nothing is imported)."""
        infos = []
        for name, ep in sorted(self.entry_points().items()):
            dist = getattr(ep, "dist", None)
            infos.append(PluginInfo(name, ep.value, dist.name if dist else None, dist.version if dist else None))
        return infos

    def _load(self, name: str) -> type | None:
        if name not in self._loaded:
            ep = self.entry_points()[name]
            try:
                self._loaded[name] = ep.load()
            except Exception as exc:  # a broken plug-in must not take the others down
                warnings.warn(f"{self.kind} plug-in {name!r} ({ep.value}) failed to import: {exc}", stacklevel=3)
                self._loaded[name] = None
        return self._loaded[name]

    def resolve(self, name: str) -> type:
        """The class for a registered name or a ``package.module:Class`` path."""
        if ":" in name:
            try:
                cls = import_object(name)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"{self.option} {name}: cannot import it ({exc})") from exc
        elif name in self.entry_points():
            cls = self._load(name)
            if cls is None:
                raise ConfigError(f"{self.option} {name}: the {self.kind} is registered but its plug-in failed to import "
                                  "(see the warning)")
        else:
            names = ", ".join(info.name for info in self.available()) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {names}", hint="or pass package.module:Class")
        if not callable(cls):
            raise ConfigError(f"{self.option} {name}: resolves to {cls!r}, which is not callable")
        return cls

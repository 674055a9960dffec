"""The shared shape of criteria that wrap one torch-pruning importance."""

from __future__ import annotations

import torch
import torch_pruning as tp


class WrappedImportance:
    """Calls the torch-pruning importance that ``build`` returns; subclasses say which and why."""

    needs_gradients = False

    def __init__(self) -> None:
        self._imp = self.build()

    def build(self) -> tp.importance.Importance:
        raise NotImplementedError

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        return self._imp(group)

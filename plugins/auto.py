"""``auto``: the pipeline picks the criterion, among a few candidates, by a cheap proxy of the result.

Each candidate prunes a copy of the model to the run's FLOPs ratio; the copy's batch norms are
recalibrated and its layers reconstructed as the run would (``--bn-recal``, ``--reconstruct``), and its
validation accuracy, with no fine-tuning, decides (:mod:`compressor.prune.choose`). The report says
which candidate won, every candidate's accuracy and what the choice cost.

Used where no choice is made (a library caller scoring groups itself, the latency search that runs
before the choice), ``auto`` ranks as its first candidate does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp

DEFAULT_CANDIDATES = "l2,fpgm,lamp"
"""The best measured at 0.5 and 0.3 of the FLOPs (BENCHMARKS.md, "Each criterion and schedule"), all
three cheap: weights only, no calibration data."""


@dataclass(frozen=True)
class AutoOptions:
    """``auto``'s options (``--criterion-opt KEY=VALUE``)."""

    candidates: str = DEFAULT_CANDIDATES
    """Comma-separated criteria to choose among (registered names or package.module:Class), first = tie-break."""

    def __post_init__(self) -> None:
        names = [n.strip() for n in self.candidates.split(",")]
        if not all(names):
            raise ValueError(f"candidates must be comma-separated criterion names, got {self.candidates!r}")
        if "auto" in names:
            raise ValueError("candidates cannot include auto itself")
        if len(set(names)) != len(names):
            raise ValueError(f"candidates names one criterion twice: {self.candidates!r}")


class Auto:
    """The run picks the best of ``candidates`` by accuracy right after pruning, before fine-tuning.

    The proxy is validation accuracy after the prune, batch-norm recalibration and reconstruction, as the
    run would do them. Where no choice is made, it scores as its first candidate (and declares what that
    one needs, per instance).
    """

    Options = AutoOptions
    needs_gradients = False

    def __init__(self, *, candidates: str = DEFAULT_CANDIDATES) -> None:
        from compressor.criteria import get_criterion

        self.candidates = tuple(n.strip() for n in AutoOptions(candidates).candidates.split(","))
        self._first = get_criterion(self.candidates[0])
        for attr in ("needs_gradients", "needs_per_sample_gradients", "needs_activations", "needs_channel_costs"):
            if hasattr(self._first, attr):
                setattr(self, attr, getattr(self._first, attr))

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        return self._first(group)

    def __getattr__(self, name: str):
        # calibration hooks and the like (prepare, activation stats) of the first candidate
        if name.startswith("__") or name == "_first":
            raise AttributeError(name)
        return getattr(self._first, name)

"""The built-in pruning schedules (see ``compressor.schedules`` for the contract and ``PAPERS.md`` for
the methods): one-shot, gradual (cubic ramp), OCSPruner's stability-driven search, and cyclical soft
masks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from compressor.masks import ChannelMask
from compressor.pruning import PruningPlan
from compressor.schedules import BaseSchedule, Run


def _span(value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"span must lie in (0, 1], got {value}")


def _check_every(value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"check_every must be at least 1, got {value}")


@dataclass(frozen=True)
class GradualOptions:
    """``gradual``'s options (``--schedule-opt KEY=VALUE``)."""

    steps: int = field(default=4, metadata={"shorthand": "prune_steps"})
    """Physical pruning steps along the ramp."""
    span: float = field(default=0.3, metadata={"shorthand": "schedule_span"})
    """Share of the cycle the ramp covers."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        _span(self.span)


@dataclass(frozen=True)
class OCSOptions:
    """``ocs``'s options (``--schedule-opt KEY=VALUE``)."""

    check_every: int | None = field(default=None, metadata={"shorthand": "check_every"})
    """Steps between two searches of the sub-network (none: 1/50 of the cycle)."""
    span: float = field(default=0.3, metadata={"shorthand": "schedule_span"})
    """Share of the cycle after which it prunes, stable or not."""
    threshold: float = field(default=0.999, metadata={"shorthand": "stability_threshold"})
    """Prune once the kept sets' mean Jaccard similarity reaches this."""
    decay: float = field(default=1.0, metadata={"shorthand": "ocs_decay"})
    """Starting lambda of the (1 - lambda * lr) decay of the channels about to go; it grows by as much per epoch."""

    def __post_init__(self) -> None:
        _check_every(self.check_every)
        _span(self.span)
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")
        if not (math.isfinite(self.decay) and self.decay >= 0):
            raise ValueError(f"decay must be 0 or more, got {self.decay}")


@dataclass(frozen=True)
class CyclicalOptions:
    """``cyclical``'s options (``--schedule-opt KEY=VALUE``)."""

    cycles: int = field(default=3, metadata={"shorthand": "cycles"})
    """Mask cycles before the physical prune."""
    span: float = field(default=0.6, metadata={"shorthand": "schedule_span"})
    """Share of the cycle the mask cycles cover."""
    check_every: int | None = field(default=None, metadata={"shorthand": "check_every"})
    """Steps between two mask updates (none: 1/10 of a mask cycle)."""

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError(f"cycles must be at least 1, got {self.cycles}")
        _span(self.span)
        _check_every(self.check_every)


def cubic_ramp(fraction: float, target: float) -> float:
    """Zhu & Gupta's ramp as a FLOPs ratio: 1 at ``fraction`` 0, ``target`` from ``fraction`` 1 on."""
    f = min(max(fraction, 0.0), 1.0)
    return target + (1 - target) * (1 - f) ** 3


def kept_sets(run: Run, plan: PruningPlan) -> dict[str, frozenset[int]]:
    """Group root -> the units the plan keeps (the sub-network, in OCSPruner's terms)."""
    return {spec.root: frozenset(range(spec.units)) - frozenset(plan.removed.get(spec.index, ()))
            for spec in run.graph().groups}


def jaccard(a: dict[str, frozenset[int]], b: dict[str, frozenset[int]]) -> float:
    """Mean over groups of |a ∩ b| / |a ∪ b| (unweighted, as in OCSPruner)."""
    scores = [len(a[k] & b[k]) / len(a[k] | b[k]) if a[k] | b[k] else 1.0 for k in a]
    return sum(scores) / len(scores) if scores else 1.0


class OneShot(BaseSchedule):
    """Prune to the target before the first step; the whole cycle recovers."""

    def begin(self, run: Run) -> None:
        run.prune_to(run.target, reason="one-shot, before fine-tuning")

    def end(self, run: Run) -> None:
        if not run.events:
            run.prune_to(run.target, reason="one-shot")


class Gradual(BaseSchedule):
    """Prune in ``steps`` physical steps spread over the first ``span`` of the cycle, the FLOPs ratio
    following a cubic ramp down to the target, fine-tuning in between."""

    Options = GradualOptions

    def __init__(self, steps: int = 4, span: float = 0.3) -> None:
        self.steps, self.span = steps, span
        self._at: dict[int, float] = {}

    def begin(self, run: Run) -> None:
        last = int(self.span * run.total_steps)
        for j in range(self.steps):
            at = round(j * last / (self.steps - 1)) if self.steps > 1 else 0
            self._at[at] = cubic_ramp((j + 1) / self.steps, run.target)
        self._prune(run)

    def _prune(self, run: Run) -> None:
        ratio = self._at.get(run.step)
        if ratio is not None:
            run.prune_to(ratio, reason=f"gradual step {sorted(self._at).index(run.step) + 1}/{len(self._at)}")

    def after_step(self, run: Run) -> None:
        self._prune(run)

    def end(self, run: Run) -> None:
        if not run.at_target():
            run.prune_to(run.target, reason="gradual, at the end of the cycle")

    def details(self) -> dict[str, Any]:
        return {"steps": self.steps, "span": self.span, "ramp": [{"step": s, "flops_ratio": r} for s, r in sorted(self._at.items())]}


class OCS(BaseSchedule):
    """OCSPruner adapted to a trained model: from step 0, every ``check_every`` steps find the sub-network
    the criterion would keep at the target, shrink the rest by ``(1 - lambda * lr)`` after every
    optimiser step (lambda growing by its start value per epoch), and prune physically once the kept
    sets stop changing (mean Jaccard of check t against t-2, averaged over the last 3 checks, at least
    ``threshold``) or at ``span`` of the cycle at the latest."""

    Options = OCSOptions

    def __init__(self, check_every: int | None = None, span: float = 0.3, threshold: float = 0.999,
                 decay: float = 1.0) -> None:
        self.check_every, self.span, self.threshold, self.decay = check_every, span, threshold, decay
        self._interval = 1
        self._kept: list[dict[str, frozenset[int]]] = []
        self._curve: list[dict[str, float]] = []
        self._mask: ChannelMask | None = None
        self._pruned_at: int | None = None
        self._why = ""

    def begin(self, run: Run) -> None:
        if run.total_steps == 0:
            return
        self._interval = self.check_every or max(1, run.total_steps // 50)
        self._check(run)

    def after_step(self, run: Run) -> None:
        if self._pruned_at is not None:
            return
        if self._mask is not None:
            lam = self.decay * (1 + run.cycle.epoch_progress)
            self._mask.scale(max(0.0, 1 - lam * run.lr))
        if run.step % self._interval == 0 or run.step >= self.span * run.total_steps:
            self._check(run)

    def _check(self, run: Run) -> None:
        planned = run.plan(run.target, quiet=True)
        if planned is None:
            return
        pruned, result = planned
        self._kept.append(kept_sets(run, result.plan))
        point: dict[str, float] = {"step": run.step}
        if len(self._kept) >= 3:
            point["jaccard"] = jaccard(self._kept[-1], self._kept[-3])
            recent = [p["jaccard"] for p in self._curve[-2:] if "jaccard" in p] + [point["jaccard"]]
            if len(recent) == 3:
                point["jaccard_avg"] = sum(recent) / 3
        self._curve.append(point)
        stable = point.get("jaccard_avg", 0.0) >= self.threshold
        if stable or run.step >= self.span * run.total_steps:
            self._why = "stable" if stable else "cap"
            self._pruned_at = run.step
            self._mask = None
            run.prune(pruned, reason=f"OCS: {'sub-network stable' if stable else f'cap at {self.span:g} of the cycle'}")
            return
        self._mask = ChannelMask(run.graph(), result.plan, restorable=False)
        run.progress.note(f"OCS check at step {run.step}: stability "
                          f"{point.get('jaccard_avg', point.get('jaccard', float('nan'))):.4f}")

    def end(self, run: Run) -> None:
        if self._pruned_at is None:
            self._why = "end of the cycle"
            self._pruned_at = run.step
            run.prune_to(run.target, reason="OCS: the cycle ended before the sub-network was stable")

    def details(self) -> dict[str, Any]:
        return {"check_every": self._interval, "span": self.span, "threshold": self.threshold, "decay": self.decay,
                "pruned_at_step": self._pruned_at, "pruned_because": self._why, "stability": self._curve}


class Cyclical(BaseSchedule):
    """``cycles`` cycles of soft channel masks over the first ``span`` of the fine-tuning cycle. Within
    each, the masked FLOPs ratio ramps (cubic, every ``check_every`` steps, over the first half) from
    none to the target and holds; at each cycle's start the masks are released, so channels masked by
    mistake can come back. One physical prune, of the last mask, ends the last cycle."""

    Options = CyclicalOptions

    def __init__(self, cycles: int = 3, span: float = 0.6, check_every: int | None = None) -> None:
        self.cycles, self.span, self.check_every = cycles, span, check_every
        self._length = 0
        self._interval = 1
        self._mask: ChannelMask | None = None
        self._mask_ratio = 1.0
        self._ends: list[dict[str, frozenset[int]]] = []
        self._done = False

    def begin(self, run: Run) -> None:
        self._length = max(1, int(self.span * run.total_steps) // self.cycles)
        self._interval = self.check_every or max(1, self._length // 10)
        if run.total_steps:
            self._update(run)

    def after_step(self, run: Run) -> None:
        if self._done:
            return
        if self._mask is not None:
            self._mask.zero()  # the optimiser step may have moved masked weights
        self._update(run)

    def _update(self, run: Run) -> None:
        cycle, j = divmod(run.step, self._length)
        if j == 0 and self._mask is not None:
            self._ends.append(kept_sets(run, self._mask.plan))
        if cycle >= self.cycles:
            self._prune(run)
            return
        if j == 0 and self._mask is not None:
            self._mask.release()
            self._mask, self._mask_ratio = None, 1.0
            run.progress.note(f"cycle {cycle + 1}/{self.cycles}: masks released")
        if j % self._interval or self._mask_ratio <= run.target:
            return
        ratio = cubic_ramp(j / (self._length / 2), run.target)
        planned = run.plan(ratio, quiet=True) if ratio < 1 else None
        if planned is None:
            return
        if self._mask is not None:
            self._mask.release()
        self._mask = ChannelMask(run.graph(), planned[1].plan)
        self._mask.zero()
        self._mask_ratio = ratio

    def _prune(self, run: Run) -> None:
        self._done = True
        if self._mask is not None and self._mask_ratio <= run.target:
            # The masked model already computes what the pruned one will: prune exactly the mask.
            run.prune(run.pruned(self._mask.plan), reason=f"cyclical: end of cycle {self.cycles}")
        else:
            if self._mask is not None:
                self._mask.release()
            run.prune_to(run.target, reason="cyclical: the cycles ended before the masks reached the target")
        self._mask = None

    def end(self, run: Run) -> None:
        if not self._done:
            if self._mask is not None:
                self._ends.append(kept_sets(run, self._mask.plan))
            self._prune(run)

    def details(self) -> dict[str, Any]:
        changes = [{"cycles": f"{i + 1}->{i + 2}", "jaccard": jaccard(a, b)}
                   for i, (a, b) in enumerate(zip(self._ends, self._ends[1:]))]
        return {"cycles": self.cycles, "span": self.span, "cycle_steps": self._length, "check_every": self._interval,
                "kept_set_change": changes}

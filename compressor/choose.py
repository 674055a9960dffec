"""``--criterion auto``: try each candidate criterion on a cheap proxy and keep the best.

The proxy is what the run would have right before fine-tuning: the model pruned by the candidate to the
run's FLOPs ratio (at the run's rounding and cap), its batch norms recalibrated and its layers
reconstructed where the run does those, scored by validation accuracy. Fine-tuning is what the proxy
leaves out, so the choice is a bet that the best start recovers best; the report shows every candidate's
figure and the cost of the choice, and BENCHMARKS.md whether the bet pays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from . import criteria, pruning
from .calibration import prepare_criterion
from .config import CompressConfig
from .data import LoadedData
from .finetune import accuracy, recalibrate_bn
from .graph import CouplingGraph
from .progress import Progress


@dataclass(frozen=True)
class Trial:
    criterion: str
    accuracy: float
    """Validation accuracy after pruning, recalibration and reconstruction (as the run does them)."""
    flops_ratio: float
    seconds: float


@dataclass(frozen=True)
class Choice:
    chosen: str
    trials: list[Trial]
    proxy: str
    """What the trials measured, in words."""

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.trials)

    def reason(self) -> str:
        best = next(t for t in self.trials if t.criterion == self.chosen)
        others = ", ".join(f"{t.criterion} {t.accuracy:.2%}" for t in self.trials if t.criterion != self.chosen)
        return (f"--criterion auto chose {self.chosen}: {best.accuracy:.2%} {self.proxy}"
                + (f" (against {others})" if others else "") + f"; the choice took {self.seconds:.1f} s")

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "proxy": self.proxy, "seconds": round(self.seconds, 2),
                "trials": [{"criterion": t.criterion, "accuracy": t.accuracy, "flops_ratio": t.flops_ratio,
                            "seconds": round(t.seconds, 2)} for t in self.trials]}


def is_auto(criterion: object) -> bool:
    """Whether ``criterion`` asks the pipeline to choose (the ``auto`` plug-in, or anything with candidates)."""
    return isinstance(getattr(criterion, "candidates", None), tuple)


def choose_criterion(graph: CouplingGraph, config: CompressConfig, data: LoadedData, *, candidates: tuple[str, ...],
                     flops_ratio: float, round_to: int, floor: pruning.Floor | None,
                     device: torch.device | None = None, progress: Progress | None = None) -> tuple[Choice, Any]:
    """Each candidate's proxy accuracy at ``flops_ratio``; returns the choice and the winning criterion
    (an instance, ready for the run). A tie goes to the earlier candidate."""
    from .reconstruct import after_prune

    progress = progress or Progress()
    model = graph.model
    proxy = ("right after pruning" + (", batch-norm recalibration" if config.bn_recalibration else "")
             + (" and reconstruction" if config.reconstruct else "") + ", before fine-tuning")
    trials, best_criterion = [], None
    progress.task("--criterion auto: try each candidate", len(candidates))
    for name in candidates:
        progress.check_cancel()
        start = time.perf_counter()
        criterion = criteria.get_criterion(name)
        prepare_criterion(criterion, model, data, batches=config.calibration_batches, batch_size=config.batch_size)
        costs = pruning.channel_costs(graph) if criteria.needs_channel_costs(criterion) else None
        scores = pruning.score_groups(graph, criterion, costs=costs)
        model.zero_grad(set_to_none=True)
        pruned, result = pruning.search(graph, scores, target_ratio=flops_ratio,
                                        max_prune_fraction=config.cap, round_to=round_to,
                                        known_floor=floor, on_probe=lambda n, r: progress.check_cancel())
        if device is not None:
            pruned.to(device)
        if config.bn_recalibration:
            recalibrate_bn(pruned, data, batch_size=config.batch_size)
        if config.reconstruct:
            after_prune(graph, result.plan, pruned, data, config=config)
        acc = accuracy(pruned, data, device=device)
        trials.append(Trial(criterion=name, accuracy=acc, flops_ratio=result.achieved_ratio,
                            seconds=time.perf_counter() - start))
        if best_criterion is None or acc > max(t.accuracy for t in trials[:-1]):
            best_criterion = criterion  # only the winner's instance is kept (it may hold calibration data)
        progress.advance(1, accuracy=acc)
        del pruned
    progress.done()
    best = max(trials, key=lambda t: t.accuracy)  # max keeps the first of equals
    choice = Choice(chosen=best.criterion, trials=trials, proxy=proxy)
    progress.note(choice.reason())
    return choice, best_criterion

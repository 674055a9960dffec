"""Pruning schedules: when, inside the one fine-tuning cycle, the model loses its channels.

A schedule is a plug-in (entry-point group ``compressor.schedules``, like the criteria) with three
hooks that act on a :class:`Run`: ``begin`` before the first fine-tuning step, ``after_step`` after
every optimiser step, ``end`` after the last. Whatever it does in between (soft masks, decay, several
physical prunes), after ``end`` the model must be physically pruned to the FLOPs target; the run
checks. The built-ins live in ``compressor.plugins.schedules``: ``oneshot``, ``gradual``, ``ocs``
and ``cyclical``.

The :class:`Run` is what a schedule can see and do: the current model and its place in the
learning-rate cycle, :meth:`Run.plan` (the sub-network the criterion would keep at a FLOPs ratio,
searched on measured FLOPs with the current weights) and :meth:`Run.prune` (continue with a
physically pruned model: batch-norm recalibration, fresh optimiser state, accuracy before and after
recorded).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import flops, pruning
from .calibration import prepare_criterion
from .config import CompressConfig
from .criteria import Criterion, needs_channel_costs
from .data import LoadedData
from .errors import ConfigError, GraphError, TargetUnreachableError
from .finetune import Cycle, FinetuneResult, FinetuneSettings, accuracy, recalibrate_bn
from .graph import ROOT_TYPES, CouplingGraph, GroupSpec, trace
from .progress import Progress
from .registry import PluginInfo, Registry

ENTRY_POINT_GROUP = "compressor.schedules"
REGISTRY = Registry(ENTRY_POINT_GROUP, kind="schedule", option="--schedule")


@runtime_checkable
class Schedule(Protocol):
    """Decides when channels go; see the module docstring for the contract."""

    def begin(self, run: Run) -> None: ...

    def after_step(self, run: Run) -> None: ...

    def end(self, run: Run) -> None: ...

    def details(self) -> dict[str, Any]:
        """What the report should show of this schedule's decisions (JSON-serialisable)."""
        ...


class BaseSchedule:
    """No-op hooks, for schedules to override what they need."""

    def begin(self, run: Run) -> None:
        pass

    def after_step(self, run: Run) -> None:
        pass

    def end(self, run: Run) -> None:
        pass

    def details(self) -> dict[str, Any]:
        return {}


def available_schedules() -> list[PluginInfo]:
    """Every registered schedule, sorted by name (nothing is imported)."""
    return REGISTRY.available()


def get_schedule(name: str, config: CompressConfig) -> Schedule:
    """An instance of the named schedule (a registered name or ``package.module:Class``), made from ``config``."""
    cls = REGISTRY.resolve(name)
    schedule = cls.from_config(config) if hasattr(cls, "from_config") else cls()
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"schedule {name!r} does not have begin/after_step/end/details methods")
    return schedule


@dataclass(frozen=True)
class PruneEvent:
    """One physical prune."""

    step: int
    epoch: float
    flops_ratio: float
    """Of the original model, after this prune."""
    accuracy_before: float
    accuracy_after: float
    accuracy_recalibrated: float | None
    reason: str


@dataclass(frozen=True)
class ScheduleResult:
    name: str
    events: list[PruneEvent]
    details: dict[str, Any]
    prune: pruning.PruneResult
    """The whole schedule's pruning, relative to the original model."""
    finetune: FinetuneResult | None
    model: nn.Module = field(repr=False)
    """The pruned, fine-tuned model, in eval mode on the CPU."""


def reinitialise(model: nn.Module) -> None:
    """Fresh random weights everywhere a module knows how to reset itself (``--from-scratch``)."""
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


def _width(model: nn.Module, spec: GroupSpec) -> int:
    m = model.get_submodule(spec.root)
    if isinstance(m, nn.Linear):
        return m.out_features if spec.handler == "out" else m.in_features
    return m.out_channels if spec.handler == "out" else m.in_channels


class Run:
    """One schedule's run over the fine-tuning cycle; see the module docstring."""

    def __init__(self, *, original: nn.Module, data: LoadedData, config: CompressConfig, criterion: Criterion,
                 settings: FinetuneSettings, device: torch.device, progress: Progress | None = None,
                 groups: list[GroupSpec] | None = None) -> None:
        """``groups``: the original model's groups, where it has been traced already."""
        self.original = original
        self.data = data
        self.config = config
        self.criterion = criterion
        self.progress = progress or Progress()
        self.target = config.target_flops
        self.device = device
        model = copy.deepcopy(original)
        if config.from_scratch:
            reinitialise(model)
        self.cycle = Cycle(model, data, settings, teacher=original if config.distill else None, device=device,
                           progress=self.progress)
        self.events: list[PruneEvent] = []
        self._graph: CouplingGraph | None = None
        self._costs: list[float] | None = None
        self._results: list[pruning.PruneResult] = []
        example = data.val_x[:1]
        self.original_cost = flops.measure(original, example)
        self.groups = groups if groups is not None else trace(copy.deepcopy(original), example,
                                                              attention_pruning=config.attention_pruning).groups
        """The original model's groups (the widths every later cap counts from)."""
        self.original_units = {spec.root: spec.units for spec in self.groups}

    # -- where we are ------------------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self.cycle.model

    @property
    def step(self) -> int:
        return self.cycle.step

    @property
    def total_steps(self) -> int:
        return self.cycle.total_steps

    @property
    def lr(self) -> float:
        return self.cycle.lr

    def flops_ratio(self) -> float:
        """The current model's MACs as a fraction of the original's."""
        return flops.measure(self.model, self._example()).macs / self.original_cost.macs

    def at_target(self) -> bool:
        return self.flops_ratio() <= self.target

    def accuracy(self) -> float:
        """Validation accuracy of the current model (left in eval mode; training sets train mode again)."""
        return accuracy(self.model, self.data.val_x, self.data.val_y, device=self.device)

    def _example(self) -> torch.Tensor:
        return self.data.val_x[:1].to(next(self.model.parameters()).device)

    # -- what a schedule can do ----------------------------------------------------------------------------

    def graph(self) -> CouplingGraph:
        """The coupling graph of the current model (traced again after each physical prune)."""
        example = self._example()
        if self._graph is None or self._graph.model is not self.model or self._graph.example_input.device != example.device:
            self._graph = trace(self.model, example, attention_pruning=self.config.attention_pruning)
            self._costs = None
            self.model.train()
        return self._graph

    def plan(self, ratio: float, *, quiet: bool = False) -> tuple[nn.Module, pruning.PruneResult] | None:
        """The current model pruned (a copy) to ``ratio`` of the original's MACs by the criterion on the
        current weights, or None when it is already there."""
        graph = self.graph()
        relative = ratio * self.original_cost.macs / flops.measure(self.model, graph.example_input).macs
        if relative >= 1:
            return None
        training = self.model.training
        c = self.config
        prepare_criterion(self.criterion, self.model, self.data, batches=c.calibration_batches, batch_size=c.batch_size)
        if needs_channel_costs(self.criterion) and self._costs is None:
            self._costs = pruning.channel_costs(graph)
        scores = pruning.score_groups(graph, self.criterion, costs=self._costs)
        self.model.zero_grad(set_to_none=True)
        if not quiet:
            self.progress.task(f"search for {ratio:.3f} of the FLOPs", 0)
        pruned, result = pruning.search(
            graph, scores, target_ratio=relative, max_prune_fraction=c.max_prune_per_group, round_to=c.round_to,
            original_units=self.original_units,
            on_probe=None if quiet else (lambda n, r: self.progress.advance(1, flops_ratio=r)))
        if not quiet:
            self.progress.done()
        self._results.append(result)
        self.model.train(training)
        return pruned, result

    def prune(self, pruned: nn.Module, *, reason: str) -> PruneEvent:
        """Continue the cycle with ``pruned`` (from :meth:`plan`): recalibrate its batch norms, fresh
        optimiser state, and record the accuracy just before and just after."""
        before = self.accuracy()
        pruned.to(self.device)
        after = accuracy(pruned, self.data.val_x, self.data.val_y, device=self.device)
        recalibrated = None
        if self.config.bn_recalibration and recalibrate_bn(pruned, self.data.train_x, batch_size=self.config.batch_size):
            recalibrated = accuracy(pruned, self.data.val_x, self.data.val_y, device=self.device)
        self.cycle.replace_model(pruned)  # the state a non-finite loss falls back to: recalibrated
        event = PruneEvent(step=self.step, epoch=round(self.cycle.epoch_progress, 3), flops_ratio=self.flops_ratio(),
                           accuracy_before=before, accuracy_after=after, accuracy_recalibrated=recalibrated,
                           reason=reason)
        self.events.append(event)
        self.progress.note(f"pruned at step {event.step} to {event.flops_ratio:.3f} of the FLOPs ({reason}): "
                           f"accuracy {before:.2%} -> {after:.2%}"
                           + (f", {recalibrated:.2%} after batch-norm recalibration" if recalibrated is not None else ""))
        return event

    def prune_to(self, ratio: float, *, reason: str) -> PruneEvent | None:
        """:meth:`plan` then :meth:`prune`."""
        planned = self.plan(ratio)
        return None if planned is None else self.prune(planned[0], reason=reason)

    # -- the whole run -------------------------------------------------------------------------------------

    def _result(self) -> pruning.PruneResult:
        final = flops.measure(self.model, self.data.val_x[:1])
        last = self._results[-1]
        layers = [pruning.LayerChange(spec.root, spec.size, _width(self.model, spec)) for spec in self.groups
                  if isinstance(self.model.get_submodule(spec.root), ROOT_TYPES)]
        return dataclasses.replace(
            last, original=self.original_cost, pruned=final, target_ratio=self.target,
            achieved_ratio=final.macs / self.original_cost.macs,
            min_reachable_ratio=self._results[0].min_reachable_ratio,
            probes=sum(r.probes for r in self._results), seconds=sum(r.seconds for r in self._results), layers=layers,
            heads=pruning.head_changes(self.original, self.model))

    def start(self, schedule: Schedule) -> None:
        """Check the target is reachable at all (before any training), then the schedule's ``begin``."""
        graph = self.graph()
        ones = [torch.ones(spec.units) for spec in graph.groups]  # the floor depends on the caps, not the scores
        floor = pruning.floor_ratio(graph, ones, max_prune_fraction=self.config.max_prune_per_group,
                                    round_to=self.config.round_to)
        if floor > self.target:
            raise TargetUnreachableError(
                f"--target-flops {self.target:g} is unreachable: the smallest reachable ratio is {floor:.3f} "
                f"(at most {self.config.max_prune_per_group:.0%} of each group's channels can be removed)",
                hint=f"ask for {math.ceil(floor * 1000) / 1000:g} or more, or raise --max-prune-per-group")
        self.model.train()
        schedule.begin(self)

    def finish(self, schedule: Schedule, name: str, *, train=None) -> ScheduleResult:
        """Train over the cycle with the schedule's hooks, then check it left the model at the target.
        ``train(run, schedule)``, when given, runs the cycle instead (``distributed.trainer``)."""
        if train is not None and self.total_steps:
            finetune = train(self, schedule)
        else:
            finetune = self.cycle.run(lambda _cycle: schedule.after_step(self)) if self.total_steps else None
        if finetune is not None and finetune.stopped_early:
            self.progress.note(f"fine-tuning stopped early: {finetune.stopped_early}")
        schedule.end(self)
        self.model.eval().cpu()
        self._graph = None
        if not self._results or self.flops_ratio() > self.target:
            raise GraphError(f"schedule {name!r} ended with the model at {self.flops_ratio():.3f} of the original FLOPs, "
                             f"above the target {self.target:g}: a schedule must prune to the target by its end")
        return ScheduleResult(name=name, events=list(self.events), details=schedule.details(), prune=self._result(),
                              finetune=finetune, model=self.model)

"""Pruning schedules: when, inside the one fine-tuning cycle, the model loses its channels.

A schedule is a plug-in (entry-point group ``compressor.schedules``, like the criteria) with three
hooks that act on a :class:`Run`: ``begin`` before the first fine-tuning step, ``after_step`` after
every optimiser step, ``end`` after the last. Whatever it does in between (soft masks, decay, several
physical prunes), after ``end`` the model must be physically pruned to the FLOPs target; the run
checks. The built-ins live in ``compressor.plugins.schedules``: ``oneshot``, ``gradual``, ``ocs``
and ``cyclical``. A hook changes weights with torch operations (not through ``.data``): under
``--nproc-per-node`` the hooks run on rank 0 only, and the other ranks learn what changed from the
tensors' version counters (:mod:`compressor.distributed`).

The :class:`Run` is what a schedule can see and do: the current model and its place in the
learning-rate cycle, :meth:`Run.plan` (the sub-network the criterion would keep at a FLOPs ratio,
searched on measured FLOPs with the current weights) and :meth:`Run.prune` (continue with a
physically pruned model: batch-norm recalibration, fresh optimiser state, accuracy before and after
recorded).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import flops, options, pruning
from .calibration import prepare_criterion
from .config import CompressConfig
from .criteria import Criterion, needs_channel_costs
from .data import LoadedData
from .distributed import DataParallelCycle
from .errors import ConfigError, GraphError
from .finetune import Cycle, FinetuneResult, FinetuneSettings, accuracy, recalibrate_bn
from .graph import ROOT_TYPES, CouplingGraph, module_width, trace
from .progress import Progress
from .reconstruct import Reconstruction, after_prune, kept_outputs
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


def schedule_options(name: str, config: CompressConfig) -> dict[str, Any]:
    """The named schedule's options from ``config`` (``schedule_options`` and the shorthand flags),
    validated by the schedule (:mod:`compressor.options`), as keyword arguments of its class."""
    return options.build(REGISTRY.resolve(name), config.schedule_options, flag="--schedule-opt",
                         what=f"schedule {name!r}", config=config)


def get_schedule(name: str, config: CompressConfig) -> Schedule:
    """An instance of the named schedule (a registered name or ``package.module:Class``) with its options
    from ``config``; a class without ``Options`` but with ``from_config(config)`` is made by that."""
    cls = REGISTRY.resolve(name)
    if options.options_class(cls) is None and hasattr(cls, "from_config"):
        schedule = cls.from_config(config)
    else:
        schedule = cls(**schedule_options(name, config))
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
    accuracy_reconstructed: float | None = None
    """After :mod:`compressor.reconstruct` re-fitted the layers (``--reconstruct``), else None."""
    reconstruction: Reconstruction | None = None


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


class Run:
    """One schedule's run over the fine-tuning cycle; see the module docstring."""

    def __init__(self, *, original: nn.Module, data: LoadedData, config: CompressConfig, criterion: Criterion,
                 settings: FinetuneSettings, device: torch.device, progress: Progress | None = None,
                 graph: CouplingGraph | None = None, target: float | None = None, round_to: int | None = None,
                 floor: pruning.Floor | None = None, original_accuracy: float | None = None) -> None:
        """``graph``: the original model's coupling graph, where it has been traced already (the run
        works on a copy of it, made with the model's copy; it is traced here only where it is not given).
        ``target``, ``round_to``, ``floor``: the FLOPs ratio, the rounding multiple and the floor the
        pipeline resolved (:mod:`compressor.resolve`); by default ``config``'s own target and rounding.
        ``original_accuracy``: the original's validation accuracy where the caller measured it (a prune
        before any training then does not measure it again)."""
        self.original = original
        self.data = data
        self.config = config
        self.criterion = criterion
        self.progress = progress or Progress()
        self.target = target if target is not None else config.target_flops
        self.round_to = round_to if round_to is not None else config.round_to
        self.floor = floor
        self.device = device
        example = data.head(1)
        self._example_cpu = example
        if graph is None:
            graph = trace(copy.deepcopy(original), example, attention_pruning=config.attention_pruning)
        elif graph.model is not original:
            raise ValueError("graph must be the coupling graph of original")
        self._graph: CouplingGraph | None = pruning.copy_graph(graph)
        """The current model's coupling graph: a copy of the original's, pruned along with the model."""
        self._planned: tuple[nn.Module, CouplingGraph, pruning.PruningPlan] | None = None
        model = self._graph.model
        if config.from_scratch:
            reinitialise(model)
        teacher = original if config.distill or config.distill_features else None
        if config.nproc_per_node > 1:  # rank 0's cycle: the step counts of the ranks it will train with
            self.cycle: Cycle = DataParallelCycle(model, data, settings, teacher=teacher, device=device, rank=0,
                                                  world=config.nproc_per_node, progress=self.progress)
        else:
            self.cycle = Cycle(model, data, settings, teacher=teacher, device=device, progress=self.progress)
        self.events: list[PruneEvent] = []
        self.prune_seconds = 0.0
        """Seconds spent planning and applying prunes (the pipeline books them under "prune")."""
        self._costs: list[float] | None = None
        self._results: list[pruning.PruneResult] = []
        self.original_cost = flops.measure(original, example)
        self.groups = graph.groups
        """The original model's groups (the widths every later cap counts from)."""
        self.original_units = {spec.root: spec.units for spec in self.groups}
        self._original_accuracy = None if config.from_scratch else original_accuracy
        self.kept_from_original: dict[str, torch.Tensor] | None = None
        """Layer name -> the original's output channels the current model's layer keeps (``--distill-features``);
        None before the first prune, or once a prune's kept channels are unknown."""

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
        return accuracy(self.model, self.data, device=self.device)

    def _example(self) -> torch.Tensor:
        return self._example_cpu.to(next(self.model.parameters()).device)

    # -- what a schedule can do ----------------------------------------------------------------------------

    def graph(self) -> CouplingGraph:
        """The coupling graph of the current model: the run's one trace, pruned along with the model
        (never traced again; see :meth:`prune`)."""
        if self._graph is None or self._graph.model is not self.model:
            raise GraphError("the run's model was replaced other than by Run.prune with a model from Run.plan; "
                             "its coupling graph is unknown")
        example = self._example()
        if self._graph.example_input.device != example.device:
            self._graph = dataclasses.replace(self._graph, example_input=example)
        return self._graph

    def plan(self, ratio: float, *, quiet: bool = False) -> tuple[nn.Module, pruning.PruneResult] | None:
        """The current model pruned (a copy) to ``ratio`` of the original's MACs by the criterion on the
        current weights, or None when it is already there."""
        start = time.perf_counter()
        try:
            return self._plan(ratio, quiet=quiet)
        finally:
            self.prune_seconds += time.perf_counter() - start

    def _plan(self, ratio: float, *, quiet: bool) -> tuple[nn.Module, pruning.PruneResult] | None:
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
        pruned_graph, result = pruning.search(
            graph, scores, target_ratio=relative, max_prune_fraction=c.cap, round_to=self.round_to or 1,
            original_units=self.original_units, with_graph=True, known_floor=None if self.events else self.floor,
            on_probe=(lambda n, r: self.progress.check_cancel()) if quiet else (lambda n, r: self.progress.advance(1, flops_ratio=r)))
        if not quiet:
            self.progress.done()
        self._results.append(result)
        self._planned = (pruned_graph.model, pruned_graph, result.plan)
        self.model.train(training)
        return pruned_graph.model, result

    def pruned(self, plan: pruning.PruningPlan) -> nn.Module:
        """A copy of the current model pruned by ``plan`` (of :meth:`graph`'s groups), for :meth:`prune`."""
        twin = pruning.pruned_graph(self.graph(), plan)
        self._planned = (twin.model, twin, plan)
        return twin.model

    def prune(self, pruned: nn.Module, *, reason: str) -> PruneEvent:
        """Continue the cycle with ``pruned`` (from :meth:`plan` or :meth:`pruned`): recalibrate its batch
        norms, fresh optimiser state, and record the accuracy just before and just after."""
        start = time.perf_counter()
        try:
            return self._prune(pruned, reason=reason)
        finally:
            self.prune_seconds += time.perf_counter() - start

    def _prune(self, pruned: nn.Module, *, reason: str) -> PruneEvent:
        untouched = not self.events and self.step == 0 and self._original_accuracy is not None
        before = self._original_accuracy if untouched else self.accuracy()
        pruned.to(self.device)
        after = accuracy(pruned, self.data, device=self.device)
        recalibrated = None
        if self.config.bn_recalibration and recalibrate_bn(pruned, self.data, batch_size=self.config.batch_size):
            recalibrated = accuracy(pruned, self.data, device=self.device)
        reconstruction = reconstructed = None
        plan = self._planned[2] if self._planned is not None and self._planned[0] is pruned else None
        kept = self._kept_channels(plan) if self.config.distill_features else None
        if self.config.reconstruct:
            reconstruction = after_prune(self.graph(), plan, pruned, self.data, config=self.config, kept=kept)
            reconstructed = accuracy(pruned, self.data, device=self.device)
        self._graph = self._graph_of(pruned)
        self._costs = None
        self.cycle.replace_model(pruned)  # the state a non-finite loss falls back to: recalibrated
        if self.config.distill_features:
            matched = self.cycle.match_features(self.kept_from_original or {})
            self.progress.note(f"feature distillation at {matched} pruned layer(s)" if self.kept_from_original is not None
                               else "feature distillation off from here: this prune's kept channels are unknown")
        event = PruneEvent(step=self.step, epoch=round(self.cycle.epoch_progress, 3), flops_ratio=self.flops_ratio(),
                           accuracy_before=before, accuracy_after=after, accuracy_recalibrated=recalibrated,
                           reason=reason, accuracy_reconstructed=reconstructed, reconstruction=reconstruction)
        self.events.append(event)
        self.progress.note(f"pruned at step {event.step} to {event.flops_ratio:.3f} of the FLOPs ({reason}): "
                           f"accuracy {before:.2%} -> {after:.2%}"
                           + (f", {recalibrated:.2%} after batch-norm recalibration" if recalibrated is not None else "")
                           + (f", {reconstructed:.2%} after reconstruction ({reconstruction.summary()})"
                              if reconstruction is not None else ""))
        return event

    def _kept_channels(self, plan: pruning.PruningPlan | None) -> dict[str, torch.Tensor] | None:
        """:func:`kept_outputs` of ``plan`` (relative to the current model), and :attr:`kept_from_original`
        brought up to date: after this prune, which of the original's output channels each layer keeps."""
        kept = None
        if plan is not None:
            try:
                kept = kept_outputs(self.graph(), plan)
            except RecursionError:  # too deep to copy; reconstruction says so in its own record
                pass
        if kept is None:
            self.kept_from_original = None
        elif not self.events:
            self.kept_from_original = kept
        elif self.kept_from_original is not None:
            before = self.kept_from_original
            self.kept_from_original = {name: before[name][k] if name in before else k for name, k in kept.items()}
        return kept

    def _graph_of(self, pruned: nn.Module) -> CouplingGraph:
        """The coupling graph of ``pruned``: the one :meth:`plan` made with it, else (a model pruned some
        other way, e.g. ``pruning.pruned_copy`` of :meth:`graph`) traced, under the run's tracing budgets."""
        if self._planned is not None and self._planned[0] is pruned:
            graph, self._planned = self._planned[1], None
            return graph
        from . import watchdog

        c = self.config
        return trace(pruned, self._example_cpu.to(next(pruned.parameters()).device), timeout=c.trace_timeout or None,
                     memory=watchdog.memory_budget(c.trace_memory), attention_pruning=c.attention_pruning)

    def prune_to(self, ratio: float, *, reason: str) -> PruneEvent | None:
        """:meth:`plan` then :meth:`prune`."""
        planned = self.plan(ratio)
        return None if planned is None else self.prune(planned[0], reason=reason)

    # -- the whole run -------------------------------------------------------------------------------------

    def _result(self) -> pruning.PruneResult:
        final = flops.measure(self.model, self._example_cpu)
        last = self._results[-1]
        layers = [pruning.LayerChange(spec.root, spec.size, module_width(self.model.get_submodule(spec.root), spec.handler)) for spec in self.groups
                  if isinstance(self.model.get_submodule(spec.root), ROOT_TYPES)]
        return dataclasses.replace(
            last, original=self.original_cost, pruned=final, target_ratio=self.target,
            achieved_ratio=final.macs / self.original_cost.macs,
            min_reachable_ratio=self._results[0].min_reachable_ratio,
            probes=sum(r.probes for r in self._results), seconds=sum(r.seconds for r in self._results), layers=layers,
            heads=pruning.head_changes(self.original, self.model))

    def start(self, schedule: Schedule) -> None:
        """Check the target is reachable at all (before any training), then the schedule's ``begin``."""
        if self.floor is None:
            self.floor = pruning.floor(self.graph(), max_prune_fraction=self.config.cap,
                                       round_to=self.round_to or 1)
        if self.floor.ratio > self.target:
            graph = self.graph()
            raise pruning.unreachable(self.target, self.floor.ratio, max_prune_fraction=self.config.cap,
                                      held=pruning.held_back(graph, self.floor.unsafe_by_root(graph)))
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

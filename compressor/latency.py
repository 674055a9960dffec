"""Resolve a latency target into a FLOPs ratio, by measuring candidates under onnxruntime.

FLOPs predict onnxruntime latency poorly (odd widths, memory-bound ops, layers that cannot be
pruned), so a latency target is met by measurement, never by a model of the hardware: an outer
search over the FLOPs ratio prunes each candidate with the FLOPs search (``pruning.search``),
exports it to ONNX in memory and times it interleaved with the original's export on the execution
provider the run validates on. The pipeline then prunes to the FLOPs ratio found; the FLOPs search
is deterministic, so that reproduces the measured candidate exactly.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import pruning
from .calibration import prepare_criterion
from .criteria import Criterion
from .errors import TargetUnreachableError
from .graph import CouplingGraph
from .progress import Progress

if TYPE_CHECKING:
    from .config import CompressConfig
    from .data import LoadedData

DEFAULT_ROUND_TO = {"CPUExecutionProvider": 16, "CUDAExecutionProvider": 8}
"""``--round-to`` when none is given, per execution provider (the CPU EP's on an x86 CPU without AVX-512:
:data:`CPU_AVX2_ROUND_TO`; see :func:`default_round_to`). Chosen by measurement for the CPU EP (the
figures are in BENCHMARKS.md, "Latency"): odd widths were slower; on an AVX-512 machine 16 was at least
as fast as 8. 8 on CUDA is the common advice for tensor cores; not measured here."""
CPU_AVX2_ROUND_TO = 8
"""The CPU EP's default where the CPU has AVX2 but not AVX-512. onnxruntime's CPU convolutions (MLAS,
NCHWc layout) work in blocks of 16 channels with AVX-512 and of 8 with AVX2: on the AVX2 build machine
8 was as fast as 16 (within 4% either way, three interleaved runs) and kept more accuracy
(BENCHMARKS.md, "Rounding by the CPU's vector width")."""
FLOPS_RESOLUTION = 0.02
"""The search stops when the FLOPs ratios of a meeting and a missing candidate are this close."""
MAX_PROBES = 8
"""At most this many candidates are timed (the floor and the FLOPs target included)."""


@dataclass(frozen=True)
class LatencyMeasurement:
    """A candidate timed against the original, in interleaved rounds (one run of each per round)."""

    ratio: float
    """Median over the rounds of compressed / original: pairing the runs cancels drift in the machine's load."""
    spread: float
    """Interquartile range of the per-round ratios over sqrt(rounds): about the standard error of ``ratio``."""
    original_ms: float
    compressed_ms: float


@dataclass(frozen=True)
class LatencyProbe:
    flops_target: float
    """The FLOPs ratio the candidate was pruned to."""
    flops_ratio: float
    """The FLOPs ratio it achieved."""
    latency_ratio: float
    spread: float
    meets: bool


@dataclass(frozen=True)
class LatencySearchResult:
    """What the latency search asked for, chose and measured."""

    target: float
    batch: int
    provider: str
    flops_ratio: float
    """The FLOPs ratio the pipeline prunes to."""
    latency_ratio: float
    """The chosen candidate's measured latency ratio (during the search)."""
    spread: float
    limited_by: str
    """``"latency"``, or ``"flops"`` where the FLOPs target alone already met the latency target."""
    probes: list[LatencyProbe] = field(default_factory=list)
    seconds: float = 0.0


Timer = Callable[[nn.Module], LatencyMeasurement]
"""Times a pruned candidate against the original."""


class OnnxTimer:
    """Times candidates against the original's ONNX export: same EP, same batch, interleaved runs."""

    def __init__(self, original: nn.Module, *, example_input: torch.Tensor, sample: torch.Tensor, batch: int,
                 runs: int, device: str) -> None:
        from .export import to_onnx_bytes
        from .validate import feed_for, open_session

        self.example_input = example_input
        self.device = device
        self.runs = runs
        self.feed = feed_for(sample, batch)
        self.original = open_session(to_onnx_bytes(original, example_input), device=device)
        self.provider = self.original.get_providers()[0]

    def __call__(self, model: nn.Module) -> LatencyMeasurement:
        from .export import to_onnx_bytes
        from .validate import SETTLE, interleaved_times, iqr, open_session

        candidate = open_session(to_onnx_bytes(model, self.example_input), device=self.device)
        o, c = interleaved_times([self.original, candidate], self.feed, runs=self.runs, settle=SETTLE)
        per_round = [ci / oi for oi, ci in zip(o, c)]
        return LatencyMeasurement(ratio=statistics.median(per_round), spread=iqr(per_round) / math.sqrt(len(per_round)),
                                  original_ms=statistics.median(o), compressed_ms=statistics.median(c))


def search_latency(
    prune: Callable[[float], tuple[nn.Module, pruning.PruneResult]],
    timer: Timer,
    *,
    target: float,
    floor: float,
    flops_cap: float | None,
    batch: int,
    provider: str,
    on_probe: Callable[[LatencyProbe], None] | None = None,
) -> LatencySearchResult:
    """The largest FLOPs ratio (at most ``flops_cap``) whose candidate measures at or below ``target``.

    ``prune(r)`` prunes to FLOPs ratio ``r``; ``floor`` is the smallest ratio it can reach. The
    candidate at the cap is tried first (both targets must hold: if it is fast enough, the FLOPs
    target decides), then the floor (if even that is too slow, measured twice where the first miss
    lay within its own spread, the target is unreachable), then the
    bracket between them shrinks by interpolation, kept inside its middle half so that noise cannot
    stall it, until it is ``FLOPS_RESOLUTION`` wide or ``MAX_PROBES`` candidates were timed.
    """
    start = time.perf_counter()
    probes: list[LatencyProbe] = []

    def probe(r: float) -> LatencyProbe:
        model, result = prune(r)
        m = timer(model)
        p = LatencyProbe(flops_target=r, flops_ratio=result.achieved_ratio, latency_ratio=m.ratio, spread=m.spread,
                         meets=m.ratio <= target)
        probes.append(p)
        if on_probe:
            on_probe(p)
        return p

    def done(chosen: LatencyProbe, limited_by: str) -> LatencySearchResult:
        return LatencySearchResult(target=target, batch=batch, provider=provider, flops_ratio=chosen.flops_target,
                                   latency_ratio=chosen.latency_ratio, spread=chosen.spread, limited_by=limited_by,
                                   probes=probes, seconds=time.perf_counter() - start)

    if flops_cap is not None:
        hi = probe(flops_cap)
        if hi.meets:
            return done(hi, "flops")
    else:
        # The unpruned model: ratio 1 by definition, and the target is below 1.
        hi = LatencyProbe(flops_target=1.0, flops_ratio=1.0, latency_ratio=1.0, spread=0.0, meets=False)
    lo = probe(floor)
    if not lo.meets and lo.latency_ratio - lo.spread <= target:
        lo = probe(floor)  # missed within its own noise: one more measurement before calling the target unreachable
    if not lo.meets:
        best = min(probes, key=lambda p: p.latency_ratio)
        raise TargetUnreachableError(
            f"--target-latency {target:g} is unreachable: the best reachable latency ratio is "
            f"{best.latency_ratio:.3f} (±{best.spread:.3f}, at FLOPs ratio {best.flops_ratio:.3f}) on {provider} "
            f"at batch {batch}",
            hint=f"ask for {min(0.99, math.ceil((best.latency_ratio + best.spread / 2) * 100) / 100):g} or more, "
                 "raise --max-prune-per-group, try another --round-to, or measure at a larger --latency-batch")
    while hi.flops_target - lo.flops_target > FLOPS_RESOLUTION and len(probes) < MAX_PROBES:
        width = hi.flops_target - lo.flops_target
        slope = (hi.latency_ratio - lo.latency_ratio) / width
        guess = lo.flops_target + (target - lo.latency_ratio) / slope if slope > 0 else lo.flops_target + width / 2
        p = probe(min(max(guess, lo.flops_target + width / 4), hi.flops_target - width / 4))
        if p.meets:
            lo = p
        else:
            hi = p
    return done(lo, "latency")


def round_to_for(config: CompressConfig) -> int:
    """``config.round_to``, or the default of the execution provider the run validates on."""
    if config.round_to is not None:
        return config.round_to
    from .validate import providers_for

    return default_round_to(providers_for(config.device)[0])


def default_round_to(provider: str, *, cpu_capability: str | None = None) -> int:
    """The multiple widths are rounded to by default on ``provider``: for the CPU EP, the channel block of
    onnxruntime's convolution kernels on this CPU (16 with AVX-512, 8 with AVX2 only; 16 elsewhere, not
    measured). ``cpu_capability``: torch's name for the CPU's vector instructions (by default this
    machine's, :func:`this_cpu_capability`)."""
    if provider != "CPUExecutionProvider":
        return DEFAULT_ROUND_TO.get(provider, 8)
    capability = cpu_capability or this_cpu_capability()
    return CPU_AVX2_ROUND_TO if capability == "AVX2" else DEFAULT_ROUND_TO[provider]


def this_cpu_capability() -> str:
    """torch's name for this CPU's vector instructions: ``AVX512``, ``AVX2``, ``DEFAULT``..."""
    return torch.backends.cpu.get_cpu_capability()


@dataclass(frozen=True)
class Rounding:
    """The multiple channel counts are rounded to, the floor at it, and why it is below the default."""

    round_to: int
    floor: pruning.Floor
    note: str | None
    """None where the multiple is the default or was given."""


def fit_round_to(graph: CouplingGraph, config: CompressConfig) -> tuple[int, str | None]:
    """:func:`fit_rounding`'s multiple and note."""
    r = fit_rounding(graph, config)
    return r.round_to, r.note


def fit_rounding(graph: CouplingGraph, config: CompressConfig) -> Rounding:
    """The multiple channel counts are rounded to, the floor at it (computed once here), and why the
    multiple is below the default.

    An explicit ``--round-to`` is kept as given. The default multiple (:func:`round_to_for`) is lowered
    where the FLOPs target needs finer widths (:func:`coarsest_reaching`).
    """
    default = round_to_for(config)
    floors: dict[int, pruning.Floor | None] = {}
    if config.round_to is not None or config.target_flops is None:
        return Rounding(default, pruning.floor(graph, max_prune_fraction=config.cap, round_to=default),
                        None)
    round_to, floor = coarsest_reaching(graph, config.target_flops, start=default,
                                        max_prune_fraction=config.cap, floors=floors)
    at = floors.get(round_to) or pruning.floor(graph, max_prune_fraction=config.cap, round_to=round_to)
    if round_to == default:
        return Rounding(default, at, None)
    return Rounding(round_to, at, f"channel counts are rounded to multiples of {round_to}, not {default} (the default on this "
                      f"execution provider): at {default} the smallest reachable FLOPs ratio is {floor:.3f}, above "
                      f"--target-flops {config.target_flops:g}. Pass --round-to to choose the multiple")


def coarsest_reaching(graph: CouplingGraph, target: float, *, start: int, max_prune_fraction: float,
                      floors: dict[int, pruning.Floor | None] | None = None) -> tuple[int, float]:
    """``start`` halved while ``target`` lies below the smallest FLOPs ratio reachable with it; also that
    smallest ratio at ``start``.

    A model with thin layers (ResNet-20's 16-channel first stage cannot lose a channel at 16) would
    otherwise refuse targets it can reach with finer widths; a coarse multiple is a default chosen for
    speed, not a requirement. ``floors``, where given, receives each multiple's :func:`pruning.floor`
    (None where nothing can be pruned at it).
    """
    floors = {} if floors is None else floors

    def floor(multiple: int) -> float:
        try:
            floors[multiple] = pruning.floor(graph, max_prune_fraction=max_prune_fraction, round_to=multiple)
        except TargetUnreachableError:
            floors[multiple] = None
            return 1.0
        return floors[multiple].ratio

    round_to, first = start, floor(start)
    reachable = first <= target
    while not reachable and round_to > 1:
        round_to //= 2
        reachable = floor(round_to) <= target
    return round_to, first


def resolve_target(
    graph: CouplingGraph,
    config: CompressConfig,
    *,
    criterion: Criterion,
    data: LoadedData,
    round_to: int,
    progress: Progress | None = None,
    timer: Timer | None = None,
    floor: pruning.Floor | None = None,
) -> tuple[float, LatencySearchResult | None]:
    """The FLOPs ratio to prune to, and the latency search behind it (None without ``--target-latency``).

    The candidates are ranked by ``criterion`` on the original weights, as the one-shot schedule ranks
    them; schedules that prune later, on fine-tuned weights, can land on other widths, which is why
    validation measures the latency again. ``timer`` replaces the onnxruntime timing (tests inject a
    deterministic one). ``floor``: :func:`pruning.floor` at ``round_to``, where it is known already.
    """
    if config.target_latency is None:
        assert config.target_flops is not None  # the config guarantees one of the two
        return config.target_flops, None
    progress = progress or Progress()
    prepare_criterion(criterion, graph.model, data, batches=config.calibration_batches, batch_size=config.batch_size)
    scores = pruning.score_groups(graph, criterion)
    graph.model.zero_grad(set_to_none=True)
    if timer is None:
        timer = OnnxTimer(graph.model, example_input=graph.example_input, sample=data.head(64),
                          batch=config.latency_batch,
                          runs=config.latency_runs if config.latency_batch == 1 else max(5, config.latency_runs // 3),
                          device=config.device)
    provider = getattr(timer, "provider", "injected timer")
    if floor is None or floor.round_to != round_to:
        floor = pruning.floor(graph, max_prune_fraction=config.cap, round_to=round_to, scores=scores)

    def prune(r: float) -> tuple[nn.Module, pruning.PruneResult]:
        return pruning.search(graph, scores, target_ratio=r, max_prune_fraction=config.cap,
                              round_to=round_to, on_probe=lambda n, ratio: progress.check_cancel(), known_floor=floor)

    progress.task(f"search for the latency target (batch {config.latency_batch})", MAX_PROBES)
    result = search_latency(prune, timer, target=config.target_latency, floor=floor.ratio,
                            flops_cap=config.target_flops, batch=config.latency_batch, provider=provider,
                            on_probe=lambda p: progress.advance(1, flops_ratio=p.flops_ratio,
                                                                latency_ratio=p.latency_ratio))
    progress.done()
    return result.flops_ratio, result

"""Data-parallel fine-tuning (``--nproc-per-node N``): the cycle on N processes with DDP.

The process that runs ``compress`` is rank 0. It alone loads, traces, searches and prunes (the
schedule's ``begin``), then starts ranks 1..N-1 (spawned Python processes on 127.0.0.1, joined through a
``TCPStore`` the way ``torchrun``'s rendezvous joins them) and hands them the model as it stands; they do
not trace or search. Every rank, rank 0 included, trains:

- in one process group (NCCL on CUDA, one GPU per rank; gloo on the CPU);
- on its shard of every epoch (``DistributedSampler``, seeded, re-shuffled per epoch), with a per-rank
  batch of ``batch_size // N``, so that the global batch, the number of steps per epoch and therefore
  the learning-rate cycle are those of one process (the steps are counted that way from the start, so
  a schedule's ``begin`` plans with the step count the ranks will run);
- with the model wrapped in DDP (gradients averaged every step). On CUDA, where the schedule does not
  act between steps, batch norms train as ``SyncBatchNorm``; otherwise (gloo, whose ranks cannot run
  ``SyncBatchNorm``, or a schedule that prunes by the coupling graph of rank 0's own modules) each rank
  keeps plain batch norms over its shard and DDP broadcasts rank 0's running statistics before every
  forward (``broadcast_buffers``).

**Schedules that act between steps** (``gradual``, ``ocs``, ``cyclical``, and any plug-in that
overrides ``after_step``) run on rank 0 only, with its real :class:`~compressor.schedules.Run`; after
every step rank 0 tells the others what the hook did, and they follow:

- nothing: they go on;
- weights or buffers changed in place (soft masks, decay; seen by the tensors' version counters, so a
  schedule must change them with torch operations, not through ``.data``): rank 0 broadcasts those
  parameters and buffers (one flat tensor per dtype);
- the model replaced (a physical prune, already recalibrated and reconstructed on rank 0): after the
  in-place changes the hook made before it, rank 0 sends the pruned model itself; every rank continues
  with it and a fresh optimiser, as one process does.

Before every such prune and at the end the ranks compare a fingerprint of their weights; ranks found
apart (a schedule that changed weights where the ranks cannot see it) fail the run rather than export
rank 0's weights as if nothing happened. Rank 0's weights are the run's; the throughput reported is that of all ranks
together. A rank that dies ends the run with a :class:`RankFailedError` naming it, before anything is
written; a rank 0 that fails (an error, a cancelled job) takes the other ranks down with it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import CompressConfig
from .data import LoadedData
from .errors import ConfigError, TrainingError
from .finetune import Cycle, FinetuneResult, FinetuneSettings
from .progress import Progress

DIE_ENV = "COMPRESSOR_TEST_DIE_AT"
"""Test hook: ``RANK:STEP`` makes that rank (1 or more) ``os._exit(3)`` right after that optimiser step."""

TIMEOUT = datetime.timedelta(hours=2)
"""How long a rank waits in a collective: the others may be waiting for rank 0's prune (a search,
reconstruction, several accuracy passes) between two steps."""

class RankFailedError(TrainingError):
    """A data-parallel fine-tuning rank died."""


def acts_between_steps(schedule: object) -> bool:
    """Whether the schedule has an ``after_step`` of its own (the base one does nothing)."""
    from .schedules import BaseSchedule

    after_step = getattr(type(schedule), "after_step", None)
    return after_step is not None and after_step is not BaseSchedule.after_step


def check(config: CompressConfig, device: torch.device) -> None:
    """Refuse, before any work, what ``--nproc-per-node`` cannot run."""
    if config.nproc_per_node > 1 and device.type == "cuda" and torch.cuda.device_count() < config.nproc_per_node:
        raise ConfigError(f"--nproc-per-node {config.nproc_per_node} on CUDA needs as many GPUs; torch sees "
                          f"{torch.cuda.device_count()}", hint="lower --nproc-per-node or use --device cpu")


def trainer(config: CompressConfig) -> Callable | None:
    """What ``schedules.Run.finish`` should train with: None for one process."""
    return finetune_parallel if config.nproc_per_node > 1 else None


def prepare_model(model: nn.Module, device_type: str) -> tuple[nn.Module, bool]:
    """The rank's model and whether its batch norms are synchronised (CUDA only; see the module docstring)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), True
    return model, False


class DataParallelCycle(Cycle):
    """One rank's :class:`Cycle`: its shard, a per-rank batch, the model wrapped in DDP once the process
    group exists (rank 0's cycle is made before it, and plans with the same step counts)."""

    def __init__(self, model: nn.Module, data: LoadedData, settings: FinetuneSettings, *, teacher: nn.Module | None,
                 device: torch.device, rank: int, world: int, progress: Progress | None = None) -> None:
        self.rank, self.world = rank, world
        self.global_settings = settings
        per_rank = max(1, settings.batch_size // world)
        super().__init__(model, data, dataclasses.replace(settings, batch_size=per_rank), teacher=teacher,
                         device=device, progress=progress)
        shard = math.ceil(len(data.labels("train")) / world)
        self.steps_per_epoch = math.ceil(shard / per_rank)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self._ddp: tuple[nn.Module, nn.Module] | None = None
        die = os.environ.get(DIE_ENV, "")
        self._die_at = tuple(int(v) for v in die.split(":")) if die else None

    @property
    def net(self) -> nn.Module:
        if not dist.is_initialized():
            return self.model
        if self._ddp is None or self._ddp[0] is not self.model:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            self._ddp = (self.model, DistributedDataParallel(self.model, device_ids=ids))  # buffers: rank 0's, every forward
        return self._ddp[1]

    def epoch_order(self, generator: torch.Generator, epoch: int) -> torch.Tensor:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(self.data.labels("train"))), num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=self.settings.seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)

    def finite(self, loss: torch.Tensor) -> bool:
        """Every rank stops at the first step where any rank's loss is not finite (else the others would
        wait for its gradients)."""
        ok = torch.tensor([1 if torch.isfinite(loss).item() else 0], device=self._comm_device)
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def check_step(self) -> None:
        if self._die_at is not None and self.rank > 0 and self._die_at == (self.rank, self.step):
            os._exit(3)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer (detached views: they share the tensors' version counters)."""
        return [t.detach() for t in (*self.model.parameters(), *self.model.buffers())]

    def lead(self, hook: Callable[[], None]) -> None:
        """Rank 0, after a step: run the schedule's ``hook``, then have the other ranks do what it did."""
        model, tensors = self.model, self._tensors()
        versions = [t._version for t in tensors]
        hook()
        changed = [i for i, (t, v) in enumerate(zip(tensors, versions)) if t._version != v]
        replaced = self.model is not model
        dist.broadcast(torch.tensor([int(replaced), len(changed)], device=self._comm_device), 0)
        if changed:  # in place, on the model the step ran on (a prune may follow, as OCS's decay then prune)
            self._broadcast_tensors(tensors, torch.tensor(changed, dtype=torch.long, device=self._comm_device))
        if replaced:
            _raise_if_apart(_fingerprint(model), self.world, when=f"before the prune at step {self.step}")
            dist.broadcast_object_list([copy.deepcopy(self.model).cpu()], src=0)

    def follow(self) -> None:
        """Ranks 1..N-1, after a step: do what rank 0's hook did (see :meth:`lead`)."""
        what = torch.zeros(2, dtype=torch.long, device=self._comm_device)
        dist.broadcast(what, 0)
        replaced, changed = (int(v) for v in what.tolist())
        if changed:
            self._broadcast_tensors(self._tensors(), torch.zeros(changed, dtype=torch.long, device=self._comm_device))
        if replaced:
            _apart(_fingerprint(self.model), self.world)
            received: list[nn.Module | None] = [None]
            dist.broadcast_object_list(received, src=0)
            self.replace_model(received[0])

    @torch.no_grad()
    def _broadcast_tensors(self, tensors: list[torch.Tensor], which: torch.Tensor) -> None:
        """Rank 0's values of ``tensors`` numbered ``which`` (filled in on ranks 1..N-1), one flat broadcast
        per dtype."""
        dist.broadcast(which, 0)
        chosen = [tensors[i] for i in which.tolist()]
        for dtype in dict.fromkeys(t.dtype for t in chosen):
            group = [t for t in chosen if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, 0)
            if self.rank:
                for t, part in zip(group, flat.split([t.numel() for t in group])):
                    t.copy_(part.view_as(t))


Fingerprint = tuple[list[tuple[int, ...]], list[tuple[float, float]]]

FINGERPRINT_TOLERANCE = 1e-6
"""Relative to a tensor's L1 norm: how far two ranks' sums may differ and still count as the same weights
(the ranks' weights are bitwise equal when all goes well; the margin keeps a benign rounding difference,
say in a reduction, from failing a run, and a schedule that changed weights on rank 0 alone is far above it)."""


def _fingerprint(model: nn.Module) -> Fingerprint:
    """Shape, float64 sum and L1 norm of every parameter: what the ranks compare (not the buffers: a rank's
    last forward updated its batch-norm statistics from its own shard)."""
    params = [p.detach() for p in model.parameters()]
    sums = (torch.stack([torch.stack([p.sum(dtype=torch.float64), torch.linalg.vector_norm(p, 1, dtype=torch.float64)])
                         for p in params]).cpu().tolist() if params else [])
    return [tuple(p.shape) for p in params], [(s, l1) for s, l1 in sums]


def _same(a: Fingerprint, b: Fingerprint) -> bool:
    if a[0] != b[0]:
        return False
    tol = FINGERPRINT_TOLERANCE
    return all(abs(s1 - s2) <= tol * max(l1, l2, 1e-12) and abs(l1 - l2) <= tol * max(l1, l2, 1e-12)
               for (s1, l1), (s2, l2) in zip(a[1], b[1]))


def _apart(fingerprint: Fingerprint, world: int) -> int | None:
    """The first rank whose fingerprint differs from rank 0's (every rank calls this at the same point), or None."""
    prints: list[Fingerprint | None] = [None] * world
    dist.all_gather_object(prints, fingerprint)
    return next((r for r, p in enumerate(prints) if not _same(p, prints[0])), None)


def _raise_if_apart(fingerprint: Fingerprint, world: int, *, when: str) -> None:
    apart = _apart(fingerprint, world)
    if apart is not None:
        raise TrainingError(f"data-parallel fine-tuning: rank {apart} had weights other than rank 0's {when}, so a step "
                            "hook changed weights where the other ranks could not follow; nothing was written",
                            hint="a schedule must change weights with torch operations, not through .data; "
                                 "or use --nproc-per-node 1")


def _follower(rank: int, world: int, port: int, model: nn.Module, data: LoadedData, settings: FinetuneSettings,
              teacher: nn.Module | None, device_type: str, threads: int, between: bool, sync_bn: bool) -> None:
    """Ranks 1..N-1: join rank 0, train their shard, follow rank 0's step hook, compare weights at the end."""
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if sync_bn:
        model, _ = prepare_model(model, device_type)
    # Made before joining (the teacher's logits, where distillation precomputes them): rank 0 times the steps.
    cycle = DataParallelCycle(model, data, settings, teacher=teacher, device=device, rank=rank, world=world)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=TIMEOUT)
    store.set(f"ready/{rank}", "1")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        cycle.run((lambda c: c.follow()) if between else None)
        _apart(_fingerprint(cycle.model), world)
        store.set(f"done/{rank}", "1")
    finally:
        dist.destroy_process_group()
    # Past this point the rank's work is done; skip the interpreter's teardown, where gloo's threads were
    # seen to abort the process now and then (rank 0 goes by the "done" key, not this exit code).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Ranks:
    """Ranks 1..N-1 of this process's group: started, joined, watched, and taken down when rank 0 ends."""

    def __init__(self, model: nn.Module, cycle: DataParallelCycle, teacher: nn.Module | None, *, between: bool,
                 sync_bn: bool, progress: Progress) -> None:
        import torch.multiprocessing as mp

        self.world = cycle.world
        self.device_type = cycle.device.type
        threads = max(1, (os.cpu_count() or 1) // self.world) if self.device_type == "cpu" else 1
        self.threads = threads
        self.store = dist.TCPStore("127.0.0.1", 0, self.world, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        context = mp.get_context("spawn")
        model = copy.deepcopy(model).cpu()
        teacher = copy.deepcopy(teacher).cpu() if teacher is not None else None
        self.procs = []
        for rank in range(1, self.world):
            proc = context.Process(target=_follower, daemon=True, name=f"compressor-rank{rank}",
                                   args=(rank, self.world, self.store.port, model, cycle.data, cycle.global_settings,
                                         teacher, self.device_type, threads, between, sync_bn))
            proc.start()
            self.procs.append(proc)
        self.progress = progress

    def join(self) -> None:
        """Wait until every rank has reached the store (naming one that died on the way), then make the group."""
        waiting = {f"ready/{r}" for r in range(1, self.world)}
        while waiting:
            self.raise_if_dead()
            self.progress.check_cancel()
            waiting = {key for key in waiting if not self.store.check([key])}
            time.sleep(0.05)
        backend = "nccl" if self.device_type == "cuda" else "gloo"
        if self.device_type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=self.store, rank=0, world_size=self.world, timeout=TIMEOUT)

    def dead(self, wait: float = 0.0) -> tuple[int, int] | None:
        """(rank, exit code) of the first rank that ended with an error before its work was done, waiting up
        to ``wait`` s for one."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self.procs, start=1):
                if proc.exitcode not in (None, 0) and not self.store.check([f"done/{rank}"]):
                    return rank, proc.exitcode
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def raise_if_dead(self, wait: float = 0.0) -> None:
        found = self.dead(wait)
        if found is None:
            return
        rank, code = found
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise RankFailedError(f"data-parallel fine-tuning: rank {rank} of {self.world} died ({how}); nothing was written",
                              hint="see the rank's output above; --nproc-per-node 1 trains in this process")

    def close(self, *, ok: bool) -> None:
        """End the group; on success wait for the ranks to exit (one that failed is named), else kill them."""
        if dist.is_initialized():
            dist.destroy_process_group()
        for proc in self.procs:
            if ok:
                proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if ok:
            self.raise_if_dead()


def train(cycle: DataParallelCycle, *, teacher: nn.Module | None, hook: Callable[[], None] | None = None,
          between: bool = False, progress: Progress | None = None) -> FinetuneResult:
    """Run rank 0's ``cycle`` with ranks 1..N-1 (started here) over the whole fine-tuning cycle.

    ``hook``: rank 0's step hook (the schedule's ``after_step``); ``between``: whether it may act (the
    other ranks then follow it after every step). The trained weights end in ``cycle.model``."""
    progress = progress or cycle.progress
    sync_bn = cycle.device.type == "cuda" and not between
    plain = cycle.model
    if sync_bn:
        cycle.replace_model(prepare_model(copy.deepcopy(plain), "cuda")[0])
    threads = torch.get_num_threads()
    ranks = _Ranks(plain, cycle, teacher, between=between, sync_bn=sync_bn, progress=progress)
    ok = False
    try:
        torch.set_num_threads(ranks.threads)
        ranks.join()
        step = (lambda c: c.lead(hook)) if between and hook is not None else None
        try:
            result = cycle.run(step)
            _raise_if_apart(_fingerprint(cycle.model), cycle.world, when="at the end of fine-tuning")
        except RuntimeError:  # a broken collective: a rank died, or will be seen dead in a moment
            ranks.raise_if_dead(wait=10.0)
            raise
        ok = True
    finally:
        torch.set_num_threads(threads)
        ranks.close(ok=ok)
    if sync_bn:
        plain.load_state_dict(cycle.model.state_dict())
        cycle.model = plain
    progress.note(f"fine-tuned on {cycle.world} processes ({'NCCL' if cycle.device.type == 'cuda' else 'gloo'}), "
                  f"global batch {cycle.settings.batch_size * cycle.world}, batch norms "
                  + ("synchronised" if sync_bn else "per process (rank 0's statistics kept)"))
    # DistributedSampler pads every shard to the same length: every rank saw as many images as rank 0.
    return dataclasses.replace(result, images_per_second=result.images_per_second * cycle.world, processes=cycle.world)


def finetune_parallel(run, schedule) -> FinetuneResult:
    """Train ``run``'s model over the cycle on ``run.cycle.world`` ranks, the schedule's step hook on rank 0."""
    cycle = run.cycle
    if not isinstance(cycle, DataParallelCycle):
        raise TypeError("the run was not made for data-parallel fine-tuning (config.nproc_per_node)")
    teacher = run.original if run.config.distill else None
    between = acts_between_steps(schedule)
    return train(cycle, teacher=teacher, hook=lambda: schedule.after_step(run), between=between, progress=run.progress)

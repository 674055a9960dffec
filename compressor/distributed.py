"""Data-parallel fine-tuning (``--nproc-per-node N``): the cycle on N processes with DDP.

The process that runs ``compress`` does everything else (loading, tracing, the search, the schedule's
``begin`` prune, export, validation): it is "rank 0" of the job in the sense that it alone decides the
pruned structure. It hands the pruned model to N workers, started the way ``torchrun`` starts them
(torch's elastic launcher, ``torch.distributed.launcher.api.elastic_launch``, which watches them and
names a dead one); they do not trace or search. Each worker:

- joins a process group (NCCL on CUDA, one GPU per worker; gloo on the CPU);
- reads its shard of every epoch (``DistributedSampler``, seeded, re-shuffled per epoch);
- trains with a per-process batch of ``batch_size // N``, so that the global batch, the number of steps
  per epoch and therefore the learning-rate cycle are those of one process;
- on CUDA, turns batch norms into ``SyncBatchNorm``; on the CPU (gloo) torch's ``SyncBatchNorm`` does not
  run, so every worker keeps plain batch norms over its own shard and DDP broadcasts rank 0's running
  statistics before every forward (``broadcast_buffers``): the model that comes back carries rank 0's.

Rank 0's trained weights come back to the parent, which loads them into its (identical) pruned model;
the throughput reported is that of all workers together. A worker that dies ends the run with a
:class:`RankFailedError` naming it, before anything is written.

Schedules that act between steps (``gradual``, ``ocs``, ``cyclical``: prunes, masks, stability checks
in ``after_step``) are not run data-parallel yet: ``check`` refuses them with a one-line error.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import uuid
from collections.abc import Callable

import torch
from torch import nn

from .config import CompressConfig
from .data import LoadedData
from .errors import ConfigError, TrainingError
from .finetune import Cycle, FinetuneResult, FinetuneSettings

DIE_ENV = "COMPRESSOR_TEST_DIE_AT"
"""Test hook: ``RANK:STEP`` makes that worker ``os._exit(3)`` right after that optimiser step."""


class RankFailedError(TrainingError):
    """A data-parallel fine-tuning worker died."""


def check(config: CompressConfig, schedule: object, device: torch.device) -> None:
    """Refuse, before any work, what ``--nproc-per-node`` cannot run."""
    if config.nproc_per_node <= 1:
        return
    from .schedules import BaseSchedule

    after_step = getattr(type(schedule), "after_step", None)
    if after_step is not None and after_step is not BaseSchedule.after_step:
        raise ConfigError(f"--nproc-per-node {config.nproc_per_node} runs schedules that prune before fine-tuning "
                          f"(oneshot) only; --schedule {config.schedule} acts between steps",
                          hint="use --schedule oneshot, or --nproc-per-node 1")
    if device.type == "cuda" and torch.cuda.device_count() < config.nproc_per_node:
        raise ConfigError(f"--nproc-per-node {config.nproc_per_node} on CUDA needs as many GPUs; torch sees "
                          f"{torch.cuda.device_count()}", hint="lower --nproc-per-node or use --device cpu")


def trainer(config: CompressConfig) -> Callable | None:
    """What ``schedules.Run.finish`` should train with: None for one process."""
    if config.nproc_per_node <= 1:
        return None
    return lambda run, _schedule: finetune_parallel(run, config.nproc_per_node)


def prepare_model(model: nn.Module, device_type: str) -> tuple[nn.Module, bool]:
    """The worker's model and whether its batch norms are synchronised (CUDA only; see the module docstring)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), True
    return model, False


class DataParallelCycle(Cycle):
    """One worker's :class:`Cycle`: its shard, a per-process batch, the model wrapped in DDP."""

    def __init__(self, model: nn.Module, data: LoadedData, settings: FinetuneSettings, *, teacher: nn.Module | None,
                 device: torch.device, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.global_batch = settings.batch_size
        per_rank = max(1, settings.batch_size // world)
        model, self.sync_bn = prepare_model(model, device.type)
        super().__init__(model, data, dataclasses.replace(settings, batch_size=per_rank), teacher=teacher,
                         device=device)
        shard = math.ceil(len(data.labels("train")) / world)
        self.steps_per_epoch = math.ceil(shard / per_rank)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self._ddp: tuple[nn.Module, nn.Module] | None = None
        die = os.environ.get(DIE_ENV, "")
        self._die_at = tuple(int(v) for v in die.split(":")) if die else None

    @property
    def net(self) -> nn.Module:
        if self._ddp is None or self._ddp[0] is not self.model:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = (self.model, DistributedDataParallel(self.model, device_ids=ids))  # buffers: rank 0's, every forward
        return self._ddp[1]

    def epoch_order(self, generator: torch.Generator, epoch: int) -> torch.Tensor:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(self.data.labels("train"))), num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=self.settings.seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)

    def check_step(self) -> None:
        if self._die_at is not None and self._die_at == (self.rank, self.step):
            os._exit(3)


def _worker(model: nn.Module, data: LoadedData, settings: FinetuneSettings, teacher: nn.Module | None,
            device_type: str, threads: int) -> tuple[dict | None, FinetuneResult, bool]:
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    try:
        cycle = DataParallelCycle(model, data, settings, teacher=teacher, device=device, rank=rank, world=world)
        result = cycle.run()
        state = None
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in cycle.model.state_dict().items()}
        return state, result, cycle.sync_bn
    finally:
        dist.destroy_process_group()


def launch(model: nn.Module, data: LoadedData, settings: FinetuneSettings, *, teacher: nn.Module | None,
           device: torch.device, nproc: int) -> tuple[dict, FinetuneResult, bool]:
    """Fine-tune ``model`` (not changed) on ``nproc`` workers; rank 0's state dict, the combined result, and
    whether batch norms were synchronised."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch_config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"compressor-{uuid.uuid4().hex[:8]}",
                                 rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                                 monitor_interval=0.2, start_method="spawn")
    threads = max(1, (os.cpu_count() or 1) // nproc) if device.type == "cpu" else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # quiets the launcher's warning; workers set their own
    model = copy.deepcopy(model).cpu()
    teacher = copy.deepcopy(teacher).cpu() if teacher is not None else None
    try:
        returned = elastic_launch(launch_config, _worker)(model, data, settings, teacher, device.type, threads)
    except ChildFailedError as exc:
        # A rank that died on its own (a signal, os._exit, the OOM killer) takes its peers down with a plain
        # exception (exit code 1) from the broken collective; under load the peer can be recorded first.
        failures = sorted(exc.failures.items(), key=lambda item: (item[1].exitcode == 1, item[1].timestamp))
        rank, failure = failures[0]
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise RankFailedError(f"data-parallel fine-tuning: rank {rank} of {nproc} died ({how}); nothing was written",
                              hint="see the worker's output above; --nproc-per-node 1 trains in this process") from None
    state, first, sync_bn = returned[0]
    results = [returned[r][1] for r in sorted(returned)]
    seconds = max(r.seconds for r in results)
    seen = sum(r.images_per_second * r.seconds for r in results)
    combined = dataclasses.replace(first, seconds=seconds, images_per_second=seen / seconds if seconds else 0.0,
                                   processes=nproc)
    return state, combined, sync_bn


def finetune_parallel(run, nproc: int) -> FinetuneResult:
    """Train ``run``'s (already pruned) model over the cycle on ``nproc`` workers and load rank 0's weights."""
    teacher = run.original if run.config.distill else None
    state, result, sync_bn = launch(run.model, run.data, run.cycle.settings, teacher=teacher, device=run.device,
                                    nproc=nproc)
    run.model.load_state_dict(state)
    run.cycle.step = result.steps
    run.progress.note(f"fine-tuned on {nproc} processes ({'NCCL' if run.device.type == 'cuda' else 'gloo'}), "
                      f"global batch {run.cycle.settings.batch_size // nproc * nproc}, batch norms "
                      + ("synchronised" if sync_bn else "per process (rank 0's statistics kept)"))
    return result

"""Fine-tune the pruned model for one cycle (OneCycleLR), optionally distilling from the original."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import LoadedData
from .progress import Progress


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    distill: bool
    temperature: float
    alpha: float
    """Weight of the distillation term; cross-entropy gets ``1 - alpha``."""
    seed: int
    augment: str = "none"
    """``--augment``: none, light (random crops, flips) or strong (adds TrivialAugment, MixUp/CutMix)."""
    features: bool = False
    """``--distill-features``: also match the teacher's outputs at the pruned layers (:class:`FeatureMatch`)."""


@dataclass(frozen=True)
class FinetuneResult:
    epochs: int
    steps: int
    seconds: float
    images_per_second: float
    final_loss: float
    val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: str | None = None
    """Why training stopped before the end (the model then holds the last good state)."""
    amp: str | None = None
    processes: int = 1
    """Data-parallel processes that ran the cycle (``--nproc-per-node``); throughput is theirs together."""
    feature_layers: int = 0
    """Pruned layers matched to the teacher's outputs at the end of the cycle (``--distill-features``)."""
    feature_loss: float | None = None
    """The feature term at the last step (``--distill-features``), else None."""


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when usable, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor | LoadedData | Iterable, *, batch_size: int = 256,
            device: torch.device | None = None) -> torch.Tensor:
    """Logits of ``model`` in eval mode, returned on the CPU, on ``x``: a tensor of images, the
    validation split of ``LoadedData`` (streamed), or an iterable of ``(images, ...)`` batches."""
    device = device or torch.device("cpu")
    model.eval()
    if isinstance(x, LoadedData):
        x = x.batches("val", batch_size=x.eval_batch_size(batch_size), pin_memory=device.type == "cuda")
    if isinstance(x, torch.Tensor):
        outs = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    else:
        outs = [model(batch[0].to(device, non_blocking=True)).float().cpu() for batch in x]
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor | LoadedData, y: torch.Tensor | None = None, *,
             device: torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, or on the validation split of ``LoadedData`` ``x``."""
    labels = x.labels("val") if isinstance(x, LoadedData) else y
    return (predict(model, x, device=device).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor | LoadedData, *, batches: int = 20, batch_size: int = 64) -> bool:
    """Re-estimate batch-norm running statistics on ``x`` (pruning shifts every activation's statistics):
    images, or the training split of ``LoadedData`` (unaugmented, ``batches`` batches read).

    Returns whether the model had batch norms to recalibrate.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    device = next(model.parameters()).device
    if isinstance(x, LoadedData):
        for xb, _ in x.batches("train", batch_size=batch_size, limit=batches):
            model(xb.to(device))
    else:
        for i in range(0, min(len(x), batches * batch_size), batch_size):
            model(x[i : i + batch_size].to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
    return True


def _optimizer(model: nn.Module, s: FinetuneSettings) -> torch.optim.Optimizer:
    # No weight decay on norms and biases: decaying BN scales shrinks channels we just decided to keep.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=s.lr)


PCT_START = 0.2
"""Share of the cycle spent warming up to the peak learning rate."""
_DIV, _FINAL_DIV = 25.0, 1e4
_MOMENTUM = (0.85, 0.95)


def one_cycle(step: int, total: int, peak: float) -> tuple[float, float]:
    """(learning rate, momentum) at ``step`` of a ``total``-step cycle: torch's ``OneCycleLR`` with cosine
    annealing and its defaults, as a function of the step, so the optimiser can be rebuilt mid-cycle
    (after a physical prune) without the schedule noticing."""
    up_end = PCT_START * total - 1
    initial, final = peak / _DIV, peak / _DIV / _FINAL_DIV
    lo_m, hi_m = _MOMENTUM

    def cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    if step <= up_end:
        pct = step / up_end if up_end > 0 else 1.0
        return cos(initial, peak, pct), cos(hi_m, lo_m, pct)
    pct = (step - up_end) / (total - 1 - up_end) if total - 1 > up_end else 1.0
    return cos(peak, final, pct), cos(lo_m, hi_m, pct)


StepHook = Callable[["Cycle"], None]

FEATURE_WEIGHT = 1.0
"""Weight of the feature term (``--distill-features``) next to the (cross-entropy + logit distillation) loss."""


class FeatureMatch:
    """Feature distillation at the pruned layers: the student's output at each pruned convolution or linear
    layer is pulled towards the teacher's output at the layer of the same name, on the channels it kept.

    ``kept`` maps a layer name to the indices of the teacher's output channels the student's layer keeps
    (:func:`compressor.reconstruct.kept_outputs`, composed over a schedule's prunes); only layers that lost
    channels take part. The term is the mean over those layers of the squared error relative to the
    teacher's energy on the kept channels, so layers of any scale weigh alike.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, kept: dict[str, torch.Tensor]) -> None:
        self.layers: dict[str, torch.Tensor] = {}
        modules = dict(teacher.named_modules())
        for name, module in student.named_modules():
            idx = kept.get(name)
            ref = modules.get(name)
            if (idx is None or ref is None or type(ref) is not type(module) or not hasattr(ref, "weight")
                    or idx.numel() != module.weight.shape[0] or idx.numel() >= ref.weight.shape[0]):
                continue
            self.layers[name] = idx
        self._student: dict[str, torch.Tensor] = {}
        self._teacher: dict[str, torch.Tensor] = {}
        self._handles = [student.get_submodule(n).register_forward_hook(self._keep(self._student, n)) for n in self.layers]
        self._handles += [teacher.get_submodule(n).register_forward_hook(self._keep(self._teacher, n)) for n in self.layers]

    @staticmethod
    def _keep(store: dict[str, torch.Tensor], name: str):
        def hook(_module, _inputs, output):
            store[name] = output
        return hook

    def loss(self) -> torch.Tensor:
        """The feature term of the last student and teacher forwards (both must have run on the same batch)."""
        terms = []
        for name, idx in self.layers.items():
            s, t = self._student.pop(name, None), self._teacher.pop(name, None)
            if s is None or t is None:
                continue
            t = t.detach().float().index_select(1 if t.dim() > 2 else -1, idx.to(t.device))
            terms.append(F.mse_loss(s.float(), t) / t.pow(2).mean().clamp_min(1e-8))
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._student.clear()
        self._teacher.clear()


class Cycle:
    """One OneCycle run of fine-tuning steps, which a pruning schedule can act on between steps.

    A hook called after every optimiser step may read the position (``step``, ``total_steps``,
    ``epoch_progress``, ``lr``), change weights in place, or replace the model with a physically
    pruned one (:meth:`replace_model`: fresh optimiser state, same place in the learning-rate cycle).
    """

    def __init__(self, model: nn.Module, data: LoadedData, settings: FinetuneSettings, *,
                 teacher: nn.Module | None = None, device: torch.device, progress: Progress | None = None) -> None:
        self.model = model.to(device)
        self.data = data
        self.settings = settings
        self.device = device
        self.progress = progress or Progress()
        self.steps_per_epoch = math.ceil(len(data.labels("train")) / settings.batch_size)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.step = 0
        self.lr = 0.0
        self.amp_dtype = None
        if device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # Without augmentation the teacher's logits are fixed: compute them once, not every epoch. With it,
        # the teacher sees the very batch the student sees (same crops, flips, mixes), on the fly.
        self.soft = None
        self.teacher = None
        self.features: FeatureMatch | None = None
        self.feature_loss: float | None = None
        """The last step's feature term (``settings.features``), for the record."""
        if (settings.distill or settings.features) and teacher is not None and settings.epochs > 0:
            if settings.augment == "none" and not settings.features:
                teacher.to(device)
                self.soft = predict(teacher, data.batches("train", batch_size=data.eval_batch_size()), device=device)
                teacher.cpu()
            else:
                self.teacher = teacher
        self.optimizer = _optimizer(self.model, settings)
        self._good_state = copy.deepcopy(self.model.state_dict())
        self._good_label = "the start of fine-tuning"

    @property
    def net(self) -> nn.Module:
        """What the training step calls: the model (``distributed`` wraps it in DDP)."""
        return self.model

    def epoch_order(self, generator: torch.Generator, epoch: int) -> torch.Tensor:
        """The training images' order in one epoch (``distributed`` gives this rank's shard)."""
        return torch.randperm(len(self.data.labels("train")), generator=generator)

    def finite(self, loss: torch.Tensor) -> bool:
        """Whether training may take this step (``distributed`` asks every rank)."""
        return bool(torch.isfinite(loss))

    def check_step(self) -> None:
        """Called after every optimiser step, before the schedule's hook (a test hook in ``distributed``)."""

    @property
    def epoch_progress(self) -> float:
        """Epochs done, fractional."""
        return self.step / self.steps_per_epoch

    def match_features(self, kept: dict[str, torch.Tensor]) -> int:
        """With ``settings.features``, pull the current model's pruned layers towards the teacher's outputs
        on their kept channels (:class:`FeatureMatch`; ``kept`` relative to the teacher). Returns the number
        of layers matched (0 where there is no teacher or the setting is off)."""
        self._drop_features()
        if not self.settings.features or self.teacher is None:
            return 0
        self.features = FeatureMatch(self.model, self.teacher, kept)
        return len(self.features.layers)

    def _drop_features(self) -> None:
        if self.features is not None:
            self.features.remove()
            self.features = None

    def replace_model(self, model: nn.Module) -> None:
        """Continue the cycle with ``model`` (a pruned version of the current one): a fresh optimiser."""
        self._drop_features()  # hooked on the old model; the schedule matches the new one
        self.model = model.to(self.device)
        self.optimizer = _optimizer(self.model, self.settings)
        self._good_state = copy.deepcopy(self.model.state_dict())
        self._good_label = ("the start of fine-tuning, right after pruning" if self.step == 0
                            else f"the physical prune at step {self.step}")

    def _set_lr(self) -> None:
        self.lr, momentum = one_cycle(self.step, self.total_steps, self.settings.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            elif "momentum" in group:
                group["momentum"] = momentum

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.net(xb)
            loss = F.cross_entropy(logits.float(), yb)
            soft = self.soft[idx].to(self.device) if self.soft is not None else None
            if self.teacher is not None and (s.distill or self.features is not None):
                with torch.no_grad():  # the same batch as the student's (its hooks feed the feature term)
                    soft = self.teacher.eval()(xb).float()
            if s.distill and soft is not None:
                t = s.temperature
                kd = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(soft / t, 1),
                              reduction="batchmean", log_target=True) * t * t
                loss = (1 - s.alpha) * loss + s.alpha * kd
            if self.features is not None:
                feature = self.features.loss()
                self.feature_loss = feature.item()
                loss = loss + FEATURE_WEIGHT * feature.to(loss.device)
        return loss, logits

    def run(self, after_step: StepHook | None = None) -> FinetuneResult:
        """Train over every epoch; the model ends in eval mode on the CPU."""
        s, data, device = self.settings, self.data, self.device
        generator = torch.Generator().manual_seed(s.seed)
        history: list[dict[str, float]] = []
        stopped = None
        seen, last_loss = 0, float("nan")
        start = time.perf_counter()
        if self.teacher is not None:
            self.teacher.to(device)
        for epoch in range(s.epochs):
            self.progress.task(f"fine-tune epoch {epoch + 1}/{s.epochs}", self.steps_per_epoch)
            loss_sum, correct, count = 0.0, 0, 0
            for xb, yb, idx in data.loader("train", batch_size=s.batch_size, order=self.epoch_order(generator, epoch),
                                           augment=s.augment, pin_memory=device.type == "cuda"):
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                self.model.train()
                self._set_lr()
                loss, logits = self._loss(xb, yb, idx)
                if not self.finite(loss):
                    stopped = f"non-finite loss at epoch {epoch + 1}, step {self.step + 1}: kept the state from {self._good_label}"
                    break
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                seen += len(idx)
                last_loss = loss.item()
                loss_sum += last_loss * len(idx)
                correct += (logits.argmax(1) == (yb.argmax(1) if yb.dim() == 2 else yb)).sum().item()
                count += len(idx)
                self.progress.advance(1, loss=last_loss, acc=correct / count)
                self.check_step()
                if after_step is not None:
                    after_step(self)
            self.progress.done()
            if stopped:
                self.model.load_state_dict(self._good_state)
                break
            val_acc = accuracy(self.model, data, device=device)
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
                            "val_accuracy": val_acc})
            self.progress.note(f"epoch {epoch + 1}: loss {loss_sum / max(count, 1):.4f}, val accuracy {val_acc:.2%}")
            self._good_state = copy.deepcopy(self.model.state_dict())
            self._good_label = f"the end of epoch {epoch + 1}"
        seconds = time.perf_counter() - start
        self.model.eval().cpu()
        if self.teacher is not None:
            self.teacher.cpu()
        feature_layers = len(self.features.layers) if self.features is not None else 0
        self._drop_features()
        final_acc = history[-1]["val_accuracy"] if history else accuracy(self.model, data)
        return FinetuneResult(
            epochs=len(history), steps=self.step, seconds=seconds, images_per_second=seen / seconds if seconds else 0.0,
            final_loss=last_loss, val_accuracy=final_acc, history=history, stopped_early=stopped,
            amp=str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
            feature_layers=feature_layers, feature_loss=self.feature_loss if feature_layers else None,
        )


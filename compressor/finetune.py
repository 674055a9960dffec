"""Fine-tune the pruned model for one cycle (OneCycleLR), optionally distilling from the original."""

from __future__ import annotations

import copy
import math
import time
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


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when usable, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode, returned on the CPU."""
    device = device or torch.device("cpu")
    model.eval()
    outs = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return (predict(model, x, device=device).argmax(1) == y).float().mean().item()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, *, batches: int = 20, batch_size: int = 64) -> bool:
    """Re-estimate batch-norm running statistics on ``x`` (pruning shifts every activation's statistics).

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
    for i in range(0, min(len(x), batches * batch_size), batch_size):
        model(x[i : i + batch_size])
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


def finetune(
    model: nn.Module,
    data: LoadedData,
    settings: FinetuneSettings,
    *,
    teacher: nn.Module | None = None,
    device: torch.device,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train ``model`` in place over ``settings.epochs`` epochs of one OneCycleLR cycle."""
    progress = progress or Progress()
    s = settings
    model.to(device)
    generator = torch.Generator().manual_seed(s.seed)
    steps_per_epoch = math.ceil(len(data.train_x) / s.batch_size)
    total = max(1, s.epochs * steps_per_epoch)
    opt = _optimizer(model, s)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total, pct_start=0.2)

    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # Without augmentation the teacher's logits are fixed: compute them once, not every epoch.
    soft = None
    if s.distill and teacher is not None:
        teacher.to(device)
        soft = predict(teacher, data.train_x, device=device)
        teacher.cpu()

    history: list[dict[str, float]] = []
    good_state = copy.deepcopy(model.state_dict())
    stopped = None
    step, seen, last_loss = 0, 0, float("nan")
    start = time.perf_counter()
    for epoch in range(s.epochs):
        model.train()
        progress.task(f"fine-tune epoch {epoch + 1}/{s.epochs}", steps_per_epoch)
        loss_sum, correct, count = 0.0, 0, 0
        perm = torch.randperm(len(data.train_x), generator=generator)
        for i in range(0, len(perm), s.batch_size):
            idx = perm[i : i + s.batch_size]
            xb, yb = data.train_x[idx].to(device, non_blocking=True), data.train_y[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb)
                if soft is not None:
                    t = s.temperature
                    kd = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(soft[idx].to(device) / t, 1),
                                  reduction="batchmean", log_target=True) * t * t
                    loss = (1 - s.alpha) * loss + s.alpha * kd
            if not torch.isfinite(loss):
                stopped = f"non-finite loss at epoch {epoch + 1}, step {step + 1}: kept the state from the end of epoch {epoch}"
                break
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            seen += len(idx)
            last_loss = loss.item()
            loss_sum += last_loss * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            count += len(idx)
            progress.advance(1, loss=last_loss, acc=correct / count)
        progress.done()
        if stopped:
            model.load_state_dict(good_state)
            break
        val_acc = accuracy(model, data.val_x, data.val_y, device=device)
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
                        "val_accuracy": val_acc})
        progress.note(f"epoch {epoch + 1}: loss {loss_sum / max(count, 1):.4f}, val accuracy {val_acc:.2%}")
        good_state = copy.deepcopy(model.state_dict())
    seconds = time.perf_counter() - start
    model.eval().cpu()
    final_acc = history[-1]["val_accuracy"] if history else accuracy(model, data.val_x, data.val_y)
    return FinetuneResult(
        epochs=len(history), steps=step, seconds=seconds, images_per_second=seen / seconds if seconds else 0.0,
        final_loss=last_loss, val_accuracy=final_acc, history=history, stopped_early=stopped,
        amp=str(amp_dtype).replace("torch.", "") if amp_dtype else None,
    )

"""Load the user's model: a state dict with ``--arch`` (safe), or a whole pickled module with
``--trust-pickle`` (it can run arbitrary code, so only on request).
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import build_arch
from .checkpoint import is_pruned_checkpoint, rebuild
from .errors import ModelLoadError, one_line

SUPPORTED = (
    "a state dict saved with torch.save(model.state_dict()) plus --arch NAME or --arch package.module:factory, "
    "or a whole pickled module (torch.save(model)) with --trust-pickle"
)


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str
    """``"state_dict"``, ``"pickle"`` or ``"pruned"`` (a model.pt written by compress)."""
    arch: dict[str, Any] | None
    """``{"name": ..., "kwargs": {...}}`` when the architecture can be rebuilt by name."""


def _looks_like_pickle(path: Path) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle stream starting with PROTO)."""
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as f:
        return f.read(1) == b"\x80"


def _archive_names(path: Path) -> list[str]:
    if not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


def _reject_unprunable(path: Path) -> None:
    names = _archive_names(path)
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise ModelLoadError(f"{path} is a TorchScript archive, which cannot be pruned; supported: {SUPPORTED}")
    if any("serialized_exported_program" in n or n.endswith("/models/model.json") for n in names):
        raise ModelLoadError(f"{path} is a torch.export program, which cannot be pruned; supported: {SUPPORTED}")


def _state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            # DataParallel / DDP checkpoints prefix every key with "module."
            if all(k.startswith("module.") for k in obj):
                obj = {k[len("module."):]: v for k, v in obj.items()}
            return obj
    return None


def infer_widths(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Guess ``in_channels`` (first conv) and ``num_classes`` (last matrix) from a state dict."""
    widths: dict[str, int] = {}
    weights = [v for k, v in state.items() if k.endswith("weight")]
    convs = [v for v in weights if v.dim() == 4]
    if convs:
        widths["in_channels"] = int(convs[0].shape[1])
    mats = [v for v in weights if v.dim() == 2]
    if mats:
        widths["num_classes"] = int(mats[-1].shape[0])
    return widths


def _load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ModelLoadError(f"the state dict does not match --arch {arch}: {shown}",
                             hint="check --arch, or the number of classes/input channels the model was built with")
    model.load_state_dict(state)


def load_model(path: str | Path, *, arch: str | None = None, trust_pickle: bool = False,
               image_size: int | None = None) -> LoadedModel:
    """Load ``path`` as described in ``SUPPORTED``; the model comes back in eval mode on the CPU, and
    only with finite weights."""
    loaded = _load(Path(path), arch=arch, trust_pickle=trust_pickle, image_size=image_size)
    check_finite(loaded.model, Path(path))
    return loaded


def check_finite(model: nn.Module, path: Path) -> None:
    """Refuse a model holding NaN or infinite weights or buffers: every output it gave would be NaN, and
    a report of its compression would be meaningless."""
    bad = [name for name, t in (*model.named_parameters(), *model.named_buffers())
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ModelLoadError(f"{path} holds NaN or infinite values in {len(bad)} tensor(s): {shown}",
                             hint="the training that produced it diverged; use an earlier checkpoint")


def _load(path: Path, *, arch: str | None, trust_pickle: bool, image_size: int | None) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} not found" if not path.exists() else f"{path} is not a file")
    _reject_unprunable(path)
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty; supported: {SUPPORTED}")
    if not _looks_like_pickle(path):
        raise ModelLoadError(f"{path} is not a file written by torch.save (corrupted or another format); supported: {SUPPORTED}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise ModelLoadError(
                f"{path} holds pickled Python objects (a whole module?), which can run arbitrary code when loaded",
                hint="pass --trust-pickle if you trust the file, or save model.state_dict() and pass --arch",
            ) from exc
        return _load_pickle(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path} ({one_line(exc)}); supported: {SUPPORTED}") from exc

    if is_pruned_checkpoint(obj):
        spec = obj.get("arch")
        if not spec:
            raise ModelLoadError(f"{path} is a pruned checkpoint of a pickled model; load it with compressor.load_pruned(base=...)")
        model = rebuild(obj, build_arch(spec["name"], **spec["kwargs"]))
        return LoadedModel(model.eval(), "pruned", spec)

    state = _state_dict_of(obj)
    if state is None:
        raise ModelLoadError(f"{path} holds neither a state dict nor a module; supported: {SUPPORTED}")
    if arch is None:
        raise ModelLoadError(f"{path} is a state dict, which needs --arch to say what architecture it belongs to",
                             hint="--arch NAME (see `compressor models`) or --arch package.module:factory")
    kwargs: dict[str, Any] = infer_widths(state)
    if image_size is not None:
        kwargs["image_size"] = image_size
    model = build_arch(arch, **kwargs)
    _load_state_dict(model, state, arch)
    return LoadedModel(model.eval(), "state_dict", {"name": arch, "kwargs": kwargs})


def _load_pickle(path: Path) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot unpickle {path}: {one_line(exc)}",
                             hint="the classes the module was built from must be importable") from exc
    if not isinstance(obj, nn.Module):
        if _state_dict_of(obj) is not None:
            raise ModelLoadError(f"{path} is a state dict, not a module: pass --arch instead of --trust-pickle")
        raise ModelLoadError(f"{path} unpickles to {type(obj).__name__}, not a torch.nn.Module; supported: {SUPPORTED}")
    if isinstance(obj, torch.jit.ScriptModule):
        raise ModelLoadError(f"{path} is a TorchScript module, which cannot be pruned; supported: {SUPPORTED}")
    return LoadedModel(obj.float().eval(), "pickle", None)

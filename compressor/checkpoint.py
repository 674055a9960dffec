"""Save and reload a pruned model without pickled code.

The file holds tensors and plain values only, so it loads with ``torch.load(weights_only=True)``:
the pruned state dict, each module's scalar attributes (channel counts, groups, head counts) and how
to build the unpruned architecture. Rebuilding makes the architecture, resizes every module to the
recorded shapes, then loads the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import build_arch
from .errors import ModelLoadError

FORMAT = "compressor.pruned/1"
_PLAIN = (int, float, bool, str, type(None))
_SKIP_ATTRS = {"training", "T_destination", "dump_patches", "call_super_init"}


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)


def module_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each module's public scalar attributes: what torch-pruning changes besides the tensors."""
    structure = {}
    for name, module in model.named_modules():
        attrs = {}
        for key, value in vars(module).items():
            if not key.startswith("_") and key not in _SKIP_ATTRS and _plain(value):
                attrs[key] = list(value) if isinstance(value, tuple) else value
        structure[name] = attrs
    return structure


def save_pruned(model: nn.Module, path: Path, *, arch: dict[str, Any] | None, extra: dict[str, Any]) -> None:
    """Write ``model`` to ``path`` in the pruned-checkpoint format."""
    torch.save(
        {
            "format": FORMAT,
            "arch": arch,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "structure": module_structure(model),
            **extra,
        },
        path,
    )


def is_pruned_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def rebuild(checkpoint: dict[str, Any], base: nn.Module) -> nn.Module:
    """Resize ``base`` (an unpruned instance of the architecture) to the checkpoint and load its weights."""
    structure: dict[str, dict[str, Any]] = checkpoint["structure"]
    state: dict[str, torch.Tensor] = checkpoint["state_dict"]
    modules = dict(base.named_modules())
    missing = sorted(set(structure) - set(modules))
    if missing:
        raise ModelLoadError(f"the checkpoint's structure does not fit this architecture (no module {missing[0]!r})")
    for name, attrs in structure.items():
        module = modules[name]
        for key, value in attrs.items():
            if hasattr(module, key):
                current = getattr(module, key)
                setattr(module, key, tuple(value) if isinstance(current, tuple) else value)
        for key, tensor in list(module._parameters.items()):
            full = f"{name}.{key}" if name else key
            if tensor is not None and full in state and state[full].shape != tensor.shape:
                module._parameters[key] = nn.Parameter(torch.empty_like(state[full]), requires_grad=tensor.requires_grad)
        for key, tensor in list(module._buffers.items()):
            full = f"{name}.{key}" if name else key
            if tensor is not None and full in state and state[full].shape != tensor.shape:
                module._buffers[key] = torch.empty_like(state[full])
    result = base.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            "the checkpoint's weights do not fit this architecture: "
            f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return base.eval()


def load_pruned(path: str | Path, *, base: nn.Module | None = None) -> nn.Module:
    """Load a ``model.pt`` written by ``compress``.

    The architecture is rebuilt from the recorded ``--arch``; for a model that came from a pickled
    module, pass an unpruned instance as ``base``.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not is_pruned_checkpoint(checkpoint):
        raise ModelLoadError(f"{path} is not a pruned checkpoint written by compress")
    if base is None:
        arch = checkpoint.get("arch")
        if not arch:
            raise ModelLoadError(
                f"{path} came from a pickled module, so its architecture is not recorded",
                hint="pass base=<an unpruned instance of the model>",
            )
        base = build_arch(arch["name"], **arch["kwargs"])
    return rebuild(checkpoint, base)

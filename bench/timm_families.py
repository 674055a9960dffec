"""timm's architecture families and the smallest model of each, with an input size it accepts.

A family is the timm module that defines a model (``timm.models.resnet``), as timm's own registry
records it. The smallest model is found cheaply: names that say "large" or "huge" are dropped, the
rest ranked by the size words and numbers in their names, and the first few built with random
weights on the ``meta`` device (no memory, no compute) to count their parameters. Shared by
``bench/timm_matrix.py`` and ``tests/test_timm.py``; nothing is downloaded.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

NUM_CLASSES = 10
SIZES = (32, 64, 96, 128, 160, 192, 224)
"""Input sizes tried, smallest first, until the model's forward accepts one; then the model's own
(``pretrained_cfg.input_size``), for models built for one size only (HaloNet's 256)."""
MIN_SIZE = {"vgg": 224}
"""Families whose smaller inputs run in torch but do not export: timm's VGG pools its last feature map
adaptively to 7x7, which torch's ONNX exporter converts only from a multiple of 7 (224 px and up)."""
CANDIDATES = 4
"""Models per family built on the meta device to count parameters."""

# Smaller first; a name's rank is its smallest size word's (timm's "test_*" models are its tiniest).
_SIZE_WORDS = ["test", "atto", "zepto", "femto", "pico", "nano", "micro", "xxxs", "xxs", "xs", "tiny", "t", "mini", "lite",
               "small", "s", "light", "a0", "b0", "m0", "m1", "r0", "s0", "t0", "t1", "xxt", "xt"]
_BIG_WORDS = ("large", "huge", "giant", "gigantic", "base", "medium", "xlarge", "xxlarge", "big", "1b", "3b", "so400m",
              "so150m", "6b", "7b", "l", "xl", "h", "g", "b", "m", "e")
_NOT_IMAGENET = re.compile(r"_(384|448|512|518|560|576|640|800|1024)(?:_|$)|_in22k|_clip|_siglip|_dinov|_sam_|_reg\d")


@dataclass(frozen=True)
class Family:
    """One timm module and the model chosen for it."""

    module: str
    """The family, as timm's registry names it (``resnet``); the module is ``timm.models.<module>``."""
    model: str
    """Its smallest model (parameters counted with random weights, 10 classes)."""
    params: int


def families() -> dict[str, list[str]]:
    """timm's families (the defining module) -> their model names, from ``timm.list_models()``."""
    import timm
    from timm.models import get_arch_name  # noqa: F401 (the name of a model's architecture; the module is the family)
    from timm.models._registry import _model_to_module

    found: dict[str, list[str]] = {}
    for name in timm.list_models():
        found.setdefault(_model_to_module[name], []).append(name)
    return found


def _name_rank(name: str) -> tuple:
    tokens = re.split(r"[_\-.]", name.lower())
    ranks = [_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS]
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return (min(ranks) if ranks else len(_SIZE_WORDS), numbers[:1] or [1 << 20], len(name), name)


def candidates(names: list[str], *, count: int = CANDIDATES) -> list[str]:
    """The ``count`` names most likely the smallest, by their words (see the module docstring)."""
    def big(name: str) -> bool:
        return bool(set(re.split(r"[_\-.]", name.lower())) & set(_BIG_WORDS)) or bool(_NOT_IMAGENET.search(name))

    small = [n for n in names if not big(n)] or list(names)
    return sorted(small, key=_name_rank)[:count]


def meta_params(name: str) -> int | None:
    """Parameters of ``name`` with 10 classes, built on the meta device; None where that fails."""
    import timm

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    except Exception:  # a model that does not build on meta (or at all) is not a candidate
        return None
    return sum(p.numel() for p in model.parameters())


def smallest(module: str, names: list[str]) -> Family | None:
    """The family's smallest model among its :func:`candidates`, None where none builds."""
    counted = [(p, n) for n in candidates(names) if (p := meta_params(n)) is not None]
    if not counted:
        return None
    params, name = min(counted)
    return Family(module=module, model=name, params=params)


def select(only: list[str] | None = None) -> list[Family]:
    """The smallest model of every family (or of the families in ``only``), by family name."""
    found = families()
    chosen = []
    for module in sorted(found):
        if only is not None and module not in only:
            continue
        family = smallest(module, found[module])
        if family is not None:
            chosen.append(family)
    return chosen


def build(name: str, *, sizes: tuple[int, ...] = SIZES) -> tuple[nn.Module, torch.Tensor, dict]:
    """``name`` with random weights and 10 classes, and the smallest of ``sizes`` its forward accepts
    (``img_size=`` passed to models that take it): the model in eval mode, an example batch of one, and
    the keyword arguments it was created with. Raises the last forward's error where no size fits."""
    import timm

    own = timm.models.get_pretrained_cfg(name)
    own_size = own.input_size[-1] if own is not None and own.input_size else None
    from timm.models._registry import _model_to_module

    sizes = tuple(s for s in sizes if s >= MIN_SIZE.get(_model_to_module.get(name, ""), 0))
    sizes += (own_size,) if own_size and own_size not in sizes else ()
    last: BaseException | None = None
    for size in sizes:
        for kwargs in ({"img_size": size}, {}):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.manual_seed(0)
                    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()
            except TypeError as exc:  # no img_size keyword
                last = exc
                continue
            example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            try:
                with torch.no_grad():
                    out = model(example)
            except Exception as exc:  # this size does not fit the model: the next one
                last = exc
                continue
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (1, NUM_CLASSES):
                return model, example, kwargs | {"input": size}
            last = ValueError(f"output of shape {tuple(getattr(out, 'shape', ()))} at {size} px")
            break  # the output is not logits: a larger size will not change that
    assert last is not None
    raise last

"""What an image goes through before the model sees it: size, crop, interpolation, channels, mean/std.

The values come from the user's flags, else from the model where it says (timm's ``pretrained_cfg``,
read as a plain attribute, so timm itself is never needed), else from the data. The transforms are
torchvision's (v2), built the way torchvision's and timm's eval presets build them: resize the shorter
side to ``size / crop_pct``, then center-crop ``size``. The whole recipe is recorded (report, ONNX
metadata, checkpoint) so that deployment can feed the exported model exactly the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .errors import ConfigError, DataError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
DEFAULT_CROP_PCT = 0.875
"""torchvision's and timm's eval default (resize to 256, crop 224) where neither flag nor model says."""
AUGMENTS = ("none", "light", "strong")
MAX_INPUT_SIDE = 4096


@dataclass(frozen=True)
class Preprocessing:
    """The recipe, as recorded: everything deployment needs to prepare an image for the model."""

    input_size: tuple[int, int]
    """(H, W) the model is fed."""
    resize: tuple[int, ...] | None
    """Resize before the crop: (shorter side,) or (H, W); None when images are used at their own size."""
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    """Per channel, in [0, 1] pixel units."""
    std: tuple[float, ...]
    channels: int
    channel_order: str
    """``RGB`` or ``L`` (greyscale): what every image is converted to first."""
    sources: tuple[tuple[str, str], ...] = ()
    """Where each value came from (``given``, ``model``, ``data``, ``default``, ``inferred``)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"], d["sources"] = list(self.input_size), dict(self.sources)
        d["resize"] = list(self.resize) if self.resize is not None else None
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["steps"] = self.describe()
        return d

    def describe(self) -> str:
        """One line a person can follow: the order of the operations."""
        h, w = self.input_size
        head = f"convert to {self.channel_order}"
        if self.resize is not None:
            side = f"shorter side to {self.resize[0]}" if len(self.resize) == 1 else f"{self.resize[0]}x{self.resize[1]} (HxW)"
            head += f", resize {side} ({self.interpolation}, antialiased), center-crop {h}x{w}"
        return f"{head}, scale to [0, 1], subtract mean {list(self.mean)}, divide by std {list(self.std)}"

    def eval_transform(self):
        """PIL image (or CHW tensor in [0, 1] / uint8) -> normalised float32 CHW tensor."""
        from torchvision.transforms import v2

        steps = self._geometry_eval()
        return v2.Compose([*steps, *self._to_float()])

    def train_transform(self, augment: str):
        """The eval transform, or its augmented counterpart for fine-tuning (``--augment``)."""
        from torchvision.transforms import v2

        if augment == "none":
            return self.eval_transform()
        steps = [v2.RandomResizedCrop(self.input_size, interpolation=_mode(self.interpolation), antialias=True),
                 v2.RandomHorizontalFlip()]
        if augment == "strong":
            steps.append(v2.TrivialAugmentWide(interpolation=_mode(self.interpolation)))
        return v2.Compose([*steps, *self._to_float()])

    def unnormalised_transform(self):
        """The eval transform without the mean/std step (for computing the statistics)."""
        from torchvision.transforms import v2

        return v2.Compose([*self._geometry_eval(), v2.ToImage(), v2.ToDtype(_float32(), scale=True), v2.ToPureTensor()])

    def _geometry_eval(self) -> list:
        from torchvision.transforms import v2

        if self.resize is None:
            return []
        size = self.resize[0] if len(self.resize) == 1 else list(self.resize)
        return [v2.Resize(size, interpolation=_mode(self.interpolation), antialias=True), v2.CenterCrop(self.input_size)]

    def _to_float(self) -> list:
        from torchvision.transforms import v2

        return [v2.ToImage(), v2.ToDtype(_float32(), scale=True), v2.Normalize(list(self.mean), list(self.std)),
                v2.ToPureTensor()]


def _float32():
    import torch

    return torch.float32


def _mode(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def scale_size(input_size: tuple[int, int], crop_pct: float) -> tuple[int, ...]:
    """timm's ``transforms_imagenet_eval``: floor(size / crop_pct), the shorter side when square."""
    scaled = tuple(math.floor(s / crop_pct) for s in input_size)
    return (scaled[0],) if scaled[0] == scaled[1] else scaled


def parse_input_size(text: str) -> tuple[int, int]:
    """``--input-size H`` or ``H,W``."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--input-size takes H or H,W, got {text!r}", hint="e.g. --input-size 224") from None
    if len(values) not in (1, 2) or min(values) < 1 or max(values) > MAX_INPUT_SIDE:
        raise ConfigError(f"--input-size takes one or two whole numbers from 1 to {MAX_INPUT_SIDE}, got {text!r}")
    return (values[0], values[0]) if len(values) == 1 else values  # type: ignore[return-value]


def check_options(*, crop_pct: float | None, interpolation: str | None, augment: str) -> None:
    """Check ``--crop-pct``, ``--interpolation`` and ``--augment``."""
    if crop_pct is not None and not (math.isfinite(crop_pct) and 0 < crop_pct <= 1):
        raise ConfigError(f"--crop-pct must lie in (0, 1], got {crop_pct}", hint="0.875 resizes to 256 and crops 224")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ConfigError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if augment not in AUGMENTS:
        raise ConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")


def model_config(model: nn.Module | None) -> dict[str, Any]:
    """The data config a model carries (timm's ``pretrained_cfg``, or the older ``default_cfg``), or {}."""
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, name, None)
        if isinstance(cfg, dict) and cfg:
            return cfg
    return {}


def model_channels(model: nn.Module | None) -> int | None:
    """Input channels the model takes: its data config's, else its first convolution's."""
    size = model_config(model).get("input_size")
    if size and len(size) == 3:
        return int(size[0])
    for m in (model.modules() if model is not None else ()):
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Conv3d)):
            return int(m.in_channels)
    return None


def resolve(*, model: nn.Module | None, given_size: tuple[int, int] | None, data_size: tuple[int, int] | None,
            crop_pct: float | None, interpolation: str | None, channels: int, arrays: bool,
            stats: tuple[Sequence[float], Sequence[float]] | None, stats_source: str,
            size_example: str = "") -> Preprocessing:
    """The recipe from the flags, the model's config and the data, in that order of precedence.

    ``arrays``: the images are arrays already at their training size (npz/pt): the model's config does
    not resize them. ``stats``: mean/std when known (given, or the model's); None -> filled in later.
    """
    cfg = {} if arrays else model_config(model)
    sources: dict[str, str] = {}
    if given_size is not None:
        size, sources["input_size"] = given_size, "given"
    elif cfg.get("input_size"):
        size, sources["input_size"] = (int(cfg["input_size"][1]), int(cfg["input_size"][2])), "model"
    elif data_size is not None:
        size, sources["input_size"] = data_size, "data"
    else:
        raise DataError(f"the images differ in size ({size_example}) and the model does not say what size it takes",
                        hint="pass --input-size H (or H,W), e.g. --input-size 224; images are resized and center-cropped to it")
    if arrays and data_size is not None and size != data_size:
        raise DataError(f"--input-size {size[0]},{size[1]} differs from the arrays' {data_size[0]}x{data_size[1]} (HxW): "
                        "arrays are used at their own size", hint="resize the arrays, or save them as an image folder")
    if crop_pct is not None:
        sources["crop_pct"] = "given"
    elif cfg.get("crop_pct") is not None:
        crop_pct, sources["crop_pct"] = float(cfg["crop_pct"]), "model"
    elif data_size == size:
        crop_pct, sources["crop_pct"] = 1.0, "data"  # the images already have the model's size: nothing to crop
    else:
        crop_pct, sources["crop_pct"] = DEFAULT_CROP_PCT, "default"
    if interpolation is not None:
        sources["interpolation"] = "given"
    elif cfg.get("interpolation") in INTERPOLATIONS:
        interpolation, sources["interpolation"] = str(cfg["interpolation"]), "model"
    else:
        interpolation, sources["interpolation"] = "bilinear", "default"
    if stats is None and cfg.get("mean") and cfg.get("std") and len(cfg["mean"]) == channels:
        stats, stats_source = (cfg["mean"], cfg["std"]), "model"
    mean, std = (tuple(float(v) for v in stats[0]), tuple(float(v) for v in stats[1])) if stats else ((), ())
    sources["mean_std"] = stats_source if stats else "inferred"
    resize = None if (arrays or (data_size == size and crop_pct == 1.0)) else scale_size(size, crop_pct)
    return Preprocessing(input_size=size, resize=resize, crop_pct=crop_pct, interpolation=interpolation, mean=mean,
                         std=std, channels=channels, channel_order="L" if channels == 1 else "RGB",
                         sources=tuple(sources.items()))

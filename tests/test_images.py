"""Image folders at real resolution: mixed sizes and modes, the preprocessing (torchvision's and timm's,
numerically), lazy reading in bounded memory, factories, --val-data, and each bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from compressor import images as images_module
from compressor.data import load_data
from compressor.errors import ConfigError, DataError
from compressor.preprocess import Preprocessing, parse_input_size, scale_size


def _pixels(rng, w: int, h: int, channels: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def write_mixed_folder(root: Path, *, per_class: int = 6, classes: int = 2, seed: int = 0) -> list[Path]:
    """JPEG and PNG, RGB and greyscale, sizes 20-48 px, one nested sub-folder per class."""
    rng = np.random.default_rng(seed)
    written = []
    for c in range(classes):
        for i in range(per_class):
            w, h = int(rng.integers(20, 49)), int(rng.integers(20, 49))
            grey = i % 3 == 0
            img = Image.fromarray(_pixels(rng, w, h, 1 if grey else 3), mode="L" if grey else "RGB")
            folder = root / f"class{c}" / ("nested" if i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i}.{'jpg' if i % 2 else 'png'}"
            img.save(path)
            written.append(path)
    return written


class Counting(nn.Module):
    """A tiny classifier of ``channels``-channel images of any size."""

    def __init__(self, channels: int = 3, classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


# -- mixed sizes and modes ---------------------------------------------------------------------------


def test_mixed_sizes_need_an_input_size_then_load_at_it(tmp_path):
    write_mixed_folder(tmp_path)
    with pytest.raises(DataError, match=r"images differ in size .* does not say what size") as info:
        load_data(tmp_path)
    assert "--input-size" in info.value.hint
    data = load_data(tmp_path, input_size=(16, 16))
    assert data.info.input_shape == (3, 16, 16) and data.info.lazy
    assert data.head(3, "train").shape == (3, 3, 16, 16)
    assert data.info.preprocessing["resize"] == [18] and data.info.preprocessing["crop_pct"] == 0.875
    x, y = next(data.batches("train", batch_size=4))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the inferred statistics normalise the training images to about zero mean
    everything = torch.cat([x for x, _ in data.batches("train", batch_size=64)])
    assert everything.mean().abs() < 0.3


def test_every_mode_is_converted_to_the_models_channels(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "a"
    folder.mkdir()
    rgb = Image.fromarray(_pixels(rng, 12, 12, 3))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("L").save(folder / "grey.png")
    Image.fromarray((rng.integers(0, 65536, (12, 12))).astype(np.uint16)).save(folder / "deep.png")  # 16-bit
    (tmp_path / "b").mkdir()
    rgb.save(tmp_path / "b" / "rgb.png")
    rgb.save(tmp_path / "b" / "rgb2.png")
    for channels in (3, 1):
        data = load_data(tmp_path, model=Counting(channels), mean=[0.0], std=[1.0])
        assert data.info.input_shape == (channels, 12, 12) and data.preprocessing.channel_order == ("RGB", "L")[channels == 1]
        x = torch.cat([x for x, _ in data.batches("train", batch_size=8)] + [x for x, _ in data.batches("val", batch_size=8)])
        assert x.shape[1] == channels and 0 <= x.min() and x.max() <= 1
    # 16-bit is scaled to 8 bits (Pillow's own conversion would clip almost everything to 255)
    deep = images_module.open_image(folder / "deep.png", "L")
    assert 60 < np.asarray(deep).mean() < 200


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            img.save(tmp_path / c / f"{i}.jpg", exif=exif.tobytes())
    data = load_data(tmp_path, mean=[0.0], std=[1.0])
    assert data.info.input_shape == (3, 8, 4)  # shown 4 wide, 8 tall
    assert data.head(1).shape == (1, 3, 8, 4)


# -- the transform matches torchvision's and timm's ---------------------------------------------------


def test_eval_transform_matches_torchvision_preset():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    img = Image.fromarray(_pixels(np.random.default_rng(1), 45, 37, 3))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = Preprocessing(input_size=(28, 28), resize=scale_size((28, 28), 0.875), crop_pct=0.875,
                         interpolation="bilinear", mean=mean, std=std, channels=3, channel_order="RGB")
    theirs = ImageClassification(crop_size=28, resize_size=32, mean=mean, std=std,
                                 interpolation=InterpolationMode.BILINEAR)
    assert ours.resize == (32,)
    torch.testing.assert_close(ours.eval_transform()(img), theirs(img), rtol=0, atol=1e-6)


def test_timm_data_config_is_used_and_matches_timms_transform(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 24, 24), "crop_pct": 0.8,
                            "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    write_mixed_folder(tmp_path, per_class=3)
    data = load_data(tmp_path, model=model)
    prep = data.info.preprocessing
    assert (prep["input_size"], prep["crop_pct"], prep["interpolation"]) == ([24, 24], 0.8, "bicubic")
    assert (prep["mean"], prep["std"]) == ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]) and data.info.normalization == "model"
    assert set(dict(prep["sources"]).values()) == {"model"}
    theirs = create_transform(**resolve_data_config({}, model=model))
    img = Image.fromarray(_pixels(np.random.default_rng(2), 41, 30, 3))
    torch.testing.assert_close(data.preprocessing.eval_transform()(img), theirs(img), rtol=0, atol=1e-5)
    # a flag still wins over the model's config
    assert load_data(tmp_path, model=model, input_size=(20, 20)).info.input_shape == (3, 20, 20)


# -- bounded memory -----------------------------------------------------------------------------------


def test_a_folder_is_never_materialised(tmp_path, monkeypatch):
    write_mixed_folder(tmp_path, per_class=20)
    reads = []
    real = images_module.open_image
    monkeypatch.setattr(images_module, "open_image", lambda f, m: reads.append(f) or real(f, m))
    data = load_data(tmp_path, input_size=(16, 16), mean=[0.5], std=[0.5])
    assert reads == []  # the scan decodes to check, but keeps no pixels and builds no dataset tensor
    first = next(data.loader("train", batch_size=4, augment="light"))
    assert first[0].shape == (4, 3, 16, 16) and len(reads) == 4
    assert data.head(2).shape[0] == 2 and len(reads) == 6
    held = [v for v in vars(data.train).values() if isinstance(v, (torch.Tensor, np.ndarray))]
    assert all(v.nbytes < 1000 for v in held)  # labels only
    # a lazily read array (uncompressed .npz above the in-memory limit) is read row by row too
    from compressor import arrays

    monkeypatch.setattr(arrays, "IN_MEMORY_LIMIT", 1000)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "big.npz", images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), labels=np.arange(40) % 2)
    big = load_data(tmp_path / "big.npz")
    assert isinstance(big.train.images, arrays.PreadArray) and big.info.lazy
    x, _ = next(big.batches("train", batch_size=5))
    assert x.shape == (5, 1, 8, 8) and abs(big.info.mean[0] - 127.5 / 255) < 0.05


# -- more ways in --------------------------------------------------------------------------------------


def test_dataset_factory_and_pair(tmp_path, monkeypatch):
    (tmp_path / "fake_data.py").write_text(
        "import torch\nfrom PIL import Image\n"
        "class Pics(torch.utils.data.Dataset):\n"
        "    def __init__(self, n): self.n = n; self.targets = [i % 2 for i in range(n)]\n"
        "    def __len__(self): return self.n\n"
        "    def __getitem__(self, i): return Image.new('RGB', (10 + i, 12), (i * 9, 0, 0)), i % 2\n"
        "def one(): return Pics(12)\n"
        "def pair(): return Pics(12), Pics(4)\n"
        "def wrong(): return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_data("fake_data:one", input_size=(8, 8), mean=[0.0], std=[1.0])
    assert data.info.kind == "factory" and data.info.train_size + data.info.val_size == 12
    assert next(data.batches("val", batch_size=16))[0].shape[1:] == (3, 8, 8)
    pair = load_data("fake_data:pair", input_size=(8, 8), mean=[0.0], std=[1.0])
    assert (pair.info.train_size, pair.info.val_size) == (12, 4)
    with pytest.raises(DataError, match="returned int; expected a torch Dataset"):
        load_data("fake_data:wrong")
    with pytest.raises(DataError, match="No module named"):
        load_data("no_such_module_here:make")


def test_separate_validation_folder(tmp_path):
    write_mixed_folder(tmp_path / "train", per_class=4)
    write_mixed_folder(tmp_path / "val", per_class=2, seed=1)
    data = load_data(tmp_path / "train", val_path=tmp_path / "val", input_size=(16, 16))
    assert (data.info.train_size, data.info.val_size) == (8, 4) and data.info.val_source == str(tmp_path / "val")
    assert data.labels("val").tolist() == [0, 0, 1, 1]
    (tmp_path / "val" / "class9").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "val" / "class9" / "x.png")
    with pytest.raises(DataError, match="classes the training data lacks: class9"):
        load_data(tmp_path / "train", val_path=tmp_path / "val", input_size=(16, 16))


# -- bad input -----------------------------------------------------------------------------------------


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels(np.random.default_rng(3), 64, 64, 3)).save(buf, format="JPEG")
    return buf.getvalue()[:600]


def test_a_few_unreadable_images_are_skipped_and_named(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(110):
            Image.new("L", (6, 6), i).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "cut.jpg").write_bytes(_truncated_jpeg())
    (tmp_path / "b" / "notes.txt").write_text("ignored: not an image")
    (tmp_path / "b" / ".hidden.png").write_bytes(b"ignored: hidden")
    data = load_data(tmp_path, mean=[0.5], std=[0.5])
    assert data.info.num_samples == 220 and len(data.info.skipped) == 1 and "cut.jpg" in data.info.skipped[0]
    assert any("1 unreadable image(s) of 221" in n and "cut.jpg" in n for n in data.notes)


def test_too_many_unreadable_images_is_an_error(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("L", (6, 6)).save(tmp_path / c / "ok.png")
    (tmp_path / "a" / "cut.jpg").write_bytes(_truncated_jpeg())
    with pytest.raises(DataError, match=r"could not read image .*cut\.jpg .*1 of 3 images are unreadable"):
        load_data(tmp_path)


def test_decompression_bomb_names_pillows_limit(tmp_path, monkeypatch):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("L", (40, 40)).save(tmp_path / c / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match=r"big\.png is 1600 pixels, beyond Pillow's decompression-bomb limit of 1000"):
        load_data(tmp_path)


def test_empty_class_folder(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("L", (6, 6)).save(tmp_path / "a" / "x.png")
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    with pytest.raises(DataError, match=r"class folder .*b holds no images"):
        load_data(tmp_path)


def test_an_input_size_the_model_cannot_take(tmp_path):
    from compressor.pipeline import check_fit

    write_mixed_folder(tmp_path, per_class=2)
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, 2))
    check_fit(fixed, load_data(tmp_path, input_size=(32, 32)))
    with pytest.raises(DataError, match=r"shape \(3, 24, 24\) \(--input-size\).*it runs on 3x32x32"):
        check_fit(fixed, load_data(tmp_path, input_size=(24, 24)))


@pytest.mark.parametrize("text", ["0", "a", "3,4,5", "99999"])
def test_input_size_flag_errors(text):
    with pytest.raises(ConfigError, match="--input-size"):
        parse_input_size(text)


# -- end to end ----------------------------------------------------------------------------------------


def prepare_like_the_readme(path: Path, p: dict) -> np.ndarray:
    """The README's deployment recipe: Pillow and numpy only, driven by the recorded preprocessing."""
    from PIL import ImageOps

    img = ImageOps.exif_transpose(Image.open(path)).convert(p["channel_order"])
    filt = getattr(Image.Resampling, p["interpolation"].upper())
    if p["resize"] and len(p["resize"]) == 1:  # the shorter side to resize[0], as torchvision does
        w, h = img.size
        s = p["resize"][0]
        img = img.resize((s, int(s * h / w)) if w <= h else (int(s * w / h), s), filt)
    elif p["resize"]:
        img = img.resize((p["resize"][1], p["resize"][0]), filt)
    H, W = p["input_size"]
    left, top = int(round((img.width - W) / 2)), int(round((img.height - H) / 2))
    x = np.asarray(img.crop((left, top, left + W, top + H)), dtype=np.float32) / 255
    x = x[..., None] if x.ndim == 2 else x
    x = (x - np.array(p["mean"], dtype=np.float32)) / np.array(p["std"], dtype=np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def test_compress_a_folder_of_mixed_photos_end_to_end(tmp_path):
    import json

    from torchvision.models.resnet import BasicBlock, ResNet
    from typer.testing import CliRunner

    from compressor.checkpoint import load_pruned
    from compressor.cli.compress import app
    from compressor.validate import open_session

    files = write_mixed_folder(tmp_path / "photos", per_class=8, classes=3)
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3).eval()  # torchvision's ResNet, one block a stage
    torch.save(model, tmp_path / "resnet.pt")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(tmp_path / "resnet.pt"), "--trust-pickle", "--data", str(tmp_path / "photos"),
                                      "--input-size", "32", "--target-flops", "0.5", "--epochs", "1", "--batch-size", "8",
                                      "--latency-runs", "2", "--device", "cpu", "--workers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    prep = report["data"]["preprocessing"]
    assert (prep["input_size"], prep["resize"], prep["crop_pct"], prep["channel_order"]) == ([32, 32], [36], 0.875, "RGB")
    assert report["data"]["lazy"] and report["data"]["num_samples"] == 24
    session = open_session(out / "model.onnx", device="cpu")
    assert json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"]) == prep
    assert torch.load(out / "model.pt", weights_only=False)["preprocessing"] == prep
    pruned = load_pruned(out / "model.pt", base=torch.load(tmp_path / "resnet.pt", weights_only=False)).eval()
    transform = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in prep.items()
                                 if k not in ("steps", "sources")}).eval_transform()
    for path in files[::3]:
        x = prepare_like_the_readme(path, prep)
        ours = transform(images_module.open_image(path, "RGB")).unsqueeze(0)
        np.testing.assert_allclose(x, ours.numpy(), atol=1e-5)
        with torch.no_grad():
            expected = pruned(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, rtol=1e-3, atol=1e-4)


def test_bad_image_input_is_one_line_exit_2_and_nothing_written(tmp_path):
    from typer.testing import CliRunner

    from compressor.cli.compress import app

    write_mixed_folder(tmp_path / "photos", per_class=2)
    torch.save(Counting(), tmp_path / "m.pt")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(tmp_path / "m.pt"), "--trust-pickle", "--data", str(tmp_path / "photos"),
                                      "--target-flops", "0.5", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists() and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "images differ in size" in errors[0] and "--input-size" in result.stderr

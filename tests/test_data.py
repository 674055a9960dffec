"""Tests for ``compressor.data``: every format, the split, the statistics and each error a user can hit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.data import iterate_batches, load_data
from compressor.errors import DataError


def _tagged_uint8(shape: tuple[int, ...], *, seed: int = 0) -> np.ndarray:
    """Random uint8 images whose first value is the image's index, so a sample can be traced back."""
    images = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    images.reshape(shape[0], -1)[:, 0] = np.arange(shape[0])
    return images


def _indices(x: torch.Tensor, info) -> np.ndarray:
    """Undo the normalisation of the first value of each image and read back the index tag."""
    first = x[:, 0, 0, 0].double() * info.std[0] + info.mean[0]
    return np.rint(first.numpy() * 255).astype(np.int64)


def _labels(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# -- formats ------------------------------------------------------------------------------------------


def test_npz_images_labels_uint8_nhw(tmp_path):
    images = _tagged_uint8((20, 5, 6))
    labels = _labels([10, 10])
    data = load_data(_save_npz(tmp_path / "d.npz", images=images, labels=labels), mean=[0.0], std=[1.0])

    info = data.info
    assert (info.kind, info.layout, info.dtype) == ("npz", "NHW", "uint8")
    assert (info.num_samples, info.num_classes, info.input_shape) == (20, 2, (1, 5, 6))
    assert info.class_names is None and info.source == str(tmp_path / "d.npz")
    for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        idx = _indices(x, info)
        torch.testing.assert_close(x[:, 0], torch.from_numpy(images[idx]).float() / 255)
        assert y.tolist() == labels[idx].tolist()


def test_npz_x_y_float_nchw_with_broadcast_mean_std(tmp_path):
    images = np.random.default_rng(1).random((12, 3, 4, 4), dtype=np.float32)
    images[:, 0, 0, 0] = np.arange(12) / 255
    labels = _labels([6, 6])
    data = load_data(_save_npz(tmp_path / "d.npz", x=images, y=labels), mean=[0.5], std=[0.25])

    info = data.info
    assert (info.layout, info.dtype, info.input_shape) == ("NCHW", "float32", (3, 4, 4))
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.25, 0.25, 0.25)
    assert info.normalization == "given"
    idx = _indices(data.train_x, info)
    torch.testing.assert_close(data.train_x * 0.25 + 0.5, torch.from_numpy(images[idx]))


def test_npz_nhwc_rgb(tmp_path):
    images = _tagged_uint8((10, 6, 5, 3))
    data = load_data(_save_npz(tmp_path / "d.npz", images=images, labels=_labels([5, 5])), mean=[0.0], std=[1.0])

    assert (data.info.layout, data.info.input_shape) == ("NHWC", (3, 6, 5))
    idx = _indices(data.val_x, data.info)
    expected = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(data.val_x, expected)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pt_dict_of_tensors(tmp_path, suffix):
    images = _tagged_uint8((8, 1, 4, 4))
    labels = _labels([4, 4])
    path = tmp_path / f"d{suffix}"
    torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}, path)
    data = load_data(path, mean=[0.0], std=[1.0])

    assert (data.info.kind, data.info.layout, data.info.dtype) == ("pt", "NCHW", "uint8")
    idx = _indices(data.train_x, data.info)
    torch.testing.assert_close(data.train_x, torch.from_numpy(images[idx]).float() / 255)
    assert data.train_y.tolist() == labels[idx].tolist()


def _write_folder(root: Path, *, modes: dict[str, list[str]], size=(5, 4)) -> dict[int, tuple[str, np.ndarray]]:
    """Write one tiny PNG per mode into each class folder; return tag -> (class, pixels)."""
    written = {}
    rng = np.random.default_rng(2)
    for name, class_modes in modes.items():
        (root / name).mkdir(parents=True)
        for mode in class_modes:
            tag = len(written)
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            pixels.reshape(-1)[0] = tag
            Image.fromarray(pixels, mode=mode).save(root / name / f"img{tag}.png")
            written[tag] = (name, pixels)
    return written


def test_image_folder_rgb(tmp_path):
    written = _write_folder(tmp_path, modes={"cat": ["RGB"] * 3, "dog": ["RGB"] * 3})
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    data = load_data(tmp_path, mean=[0.0], std=[1.0])

    info = data.info
    assert info.class_names == ("cat", "dog") and info.num_classes == 2
    assert (info.kind, info.layout, info.dtype, info.input_shape) == ("folder", "NHWC", "uint8", (3, 4, 5))
    assert info.num_samples == 6
    for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
        for image, label, tag in zip(x, y, _indices(x, info)):
            name, pixels = written[int(tag)]
            assert info.class_names[int(label)] == name
            torch.testing.assert_close(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


def test_image_folder_grayscale_and_mixed(tmp_path):
    _write_folder(tmp_path / "grey", modes={"a": ["L", "L"], "b": ["L", "L"]})
    _write_folder(tmp_path / "mixed", modes={"a": ["L", "RGB"], "b": ["L", "L"]})
    assert load_data(tmp_path / "grey").info.input_shape == (1, 4, 5)
    assert load_data(tmp_path / "mixed").info.input_shape == (3, 4, 5)


# -- normalisation ------------------------------------------------------------------------------------


def test_inferred_statistics_on_controlled_data(tmp_path):
    # Channels 0 and 2 are constant (std floors), channel 1 a checkerboard of 0 and 255 (mean and std 0.5),
    # so the expected values do not depend on which images the split puts where.
    images = np.zeros((10, 3, 4, 6), dtype=np.uint8)
    images[:, 0] = 51
    images[:, 1] = 255 * (np.indices((4, 6)).sum(axis=0) % 2)
    data = load_data(_save_npz(tmp_path / "d.npz", images=images, labels=_labels([5, 5])))

    info = data.info
    assert info.normalization == "inferred"
    assert info.mean == pytest.approx((0.2, 0.5, 0.0)) and info.std == pytest.approx((1e-6, 0.5, 1e-6))
    assert data.train_x[:, 1].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert data.train_x[:, 1].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_inferred_statistics_use_training_split_only(tmp_path):
    images = _tagged_uint8((30, 3, 4, 4), seed=3)
    data = load_data(_save_npz(tmp_path / "d.npz", images=images, labels=_labels([15, 15])))

    # The tag sits in channel 0, so undo that channel with the stored statistics to find the images.
    train = images[_indices(data.train_x, data.info)].astype(np.float64) / 255
    # float32 pixels (x/255) carry about 1e-8 of rounding; the split moves the mean by far more.
    assert data.info.mean == pytest.approx(tuple(train.mean(axis=(0, 2, 3))), abs=1e-7)
    assert data.info.std == pytest.approx(tuple(train.std(axis=(0, 2, 3))), abs=1e-7)
    everything = images.astype(np.float64) / 255
    assert data.info.mean != pytest.approx(tuple(everything.mean(axis=(0, 2, 3))), abs=1e-4)


# -- split --------------------------------------------------------------------------------------------


def _val_tags(path: Path, **kwargs) -> list[int]:
    data = load_data(path, mean=[0.0], std=[1.0], **kwargs)
    return _indices(data.val_x, data.info).tolist()


def test_stratified_split_sizes_and_determinism(tmp_path):
    labels = _labels([10, 5, 2, 1])
    path = _save_npz(tmp_path / "d.npz", images=_tagged_uint8((18, 3, 3)), labels=labels)
    data = load_data(path, val_fraction=0.2, seed=7, mean=[0.0], std=[1.0])

    # 10*0.2=2, 5*0.2=1, 2*0.2 rounds to 0 but a class of two gives one, a class of one keeps its image
    assert np.bincount(data.val_y.numpy(), minlength=4).tolist() == [2, 1, 1, 0]
    assert np.bincount(data.train_y.numpy(), minlength=4).tolist() == [8, 4, 1, 1]
    assert (data.info.train_size, data.info.val_size, data.info.seed) == (14, 4, 7)
    assert data.train_y.tolist() != sorted(data.train_y.tolist())  # shuffled, not grouped by class
    tags = sorted(_indices(data.train_x, data.info).tolist() + _indices(data.val_x, data.info).tolist())
    assert tags == list(range(18))

    assert _val_tags(path, seed=7) == _val_tags(path, seed=7)
    assert _val_tags(path, seed=7) != _val_tags(path, seed=8)


def test_large_val_fraction_keeps_one_training_image_per_class(tmp_path):
    path = _save_npz(tmp_path / "d.npz", images=_tagged_uint8((6, 3, 3)), labels=_labels([2, 4]))
    data = load_data(path, val_fraction=0.9, mean=[0.0], std=[1.0])
    assert np.bincount(data.train_y.numpy()).tolist() == [1, 1]
    assert np.bincount(data.val_y.numpy()).tolist() == [1, 3]


def test_whole_float_labels_are_accepted(tmp_path):
    path = _save_npz(tmp_path / "d.npz", images=_tagged_uint8((4, 3, 3)), labels=np.array([0.0, 1.0, 0.0, 1.0]))
    data = load_data(path)
    assert data.train_y.dtype == torch.int64 and sorted(data.train_y.tolist()) == [0, 1]


# -- errors -------------------------------------------------------------------------------------------

_OK_IMAGES = np.zeros((4, 3, 3), dtype=np.uint8)
_OK_LABELS = np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"a": _OK_IMAGES, "b": _OK_LABELS}, r"'images' and 'labels'.*found: 'a', 'b'"),
        ({"images": np.zeros((4, 5, 6, 7), np.uint8), "labels": _OK_LABELS}, "channel axis"),
        ({"images": np.zeros((4, 1, 3, 3, 1), np.uint8), "labels": _OK_LABELS}, "3-D"),
        ({"images": np.zeros((4, 3, 3), np.int64), "labels": _OK_LABELS}, "dtype int64"),
        ({"images": np.full((4, 3, 3), np.nan, np.float32), "labels": _OK_LABELS}, "NaN"),
        ({"images": np.full((4, 3, 3), np.inf, np.float32), "labels": _OK_LABELS}, "infinite"),
        ({"images": _OK_IMAGES, "labels": _OK_LABELS[:, None]}, "1-D"),
        ({"images": _OK_IMAGES, "labels": np.array([0, 0.5, 1, 1])}, "whole numbers"),
        ({"images": _OK_IMAGES, "labels": _OK_LABELS[:3]}, "4 images but 3 labels"),
        ({"images": _OK_IMAGES, "labels": np.array([0, -1, 0, 1])}, "negative"),
        ({"images": _OK_IMAGES, "labels": np.array([0, 1, 2, 9])}, "4 images for 10 classes"),
        ({"images": np.zeros((0, 3, 3), np.uint8), "labels": np.zeros(0, np.int64)}, "zero images"),
        ({"images": _OK_IMAGES, "labels": np.array([0, 1, 2, 3])}, "validation split is empty"),
    ],
)
def test_npz_content_errors(tmp_path, arrays, match):
    with pytest.raises(DataError, match=match):
        load_data(_save_npz(tmp_path / "d.npz", **arrays))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, "--val-fraction"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"val_fraction": 1.5}, "--val-fraction"),
        ({"mean": [0.1, 0.2], "std": [0.3, 0.3]}, "--mean has 2 values"),
        ({"mean": [0.1], "std": [0.3, 0.3]}, "--std has 2 values"),
        ({"mean": [0.1], "std": [0.0]}, "--std values must be positive"),
        ({"mean": [0.1], "std": [-1.0]}, "--std values must be positive"),
    ],
)
def test_option_errors(tmp_path, kwargs, match):
    path = _save_npz(tmp_path / "d.npz", images=np.zeros((4, 3, 3, 3), np.uint8), labels=_OK_LABELS)
    with pytest.raises(DataError, match=match):
        load_data(path, **kwargs)


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "missing.npz")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"an \.npz file, a \.pt/\.pth file"):
        load_data(tmp_path / "d.csv")
    for name in ("bad.npz", "bad.pt"):
        (tmp_path / name).write_bytes(b"definitely not an archive")
        with pytest.raises(DataError, match=rf"could not read .*{name}: \w+") as caught:
            load_data(tmp_path / name)
        assert "\n" not in str(caught.value)


def test_pt_that_is_not_a_data_dict(tmp_path):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "model.pt")
    with pytest.raises(DataError, match=r"'images' and 'labels' \(or 'x' and 'y'\); found: 'weight', 'bias'"):
        load_data(tmp_path / "model.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(DataError, match="expected a dict"):
        load_data(tmp_path / "tensor.pt")


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(tmp_path / "empty")

    _write_folder(tmp_path / "gap", modes={"a": ["L"]})
    (tmp_path / "gap" / "b").mkdir()
    (tmp_path / "gap" / "b" / ".hidden.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"class folder .*b holds no images"):
        load_data(tmp_path / "gap")

    _write_folder(tmp_path / "sizes", modes={"a": ["L"]})
    Image.new("L", (7, 3)).save(tmp_path / "sizes" / "a" / "other.PNG")
    with pytest.raises(DataError, match=r"img0\.png is 5x4, .*other\.PNG is 7x3"):
        load_data(tmp_path / "sizes")

    _write_folder(tmp_path / "broken", modes={"a": ["L"]})
    (tmp_path / "broken" / "a" / "zz.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"could not read image .*zz\.jpg"):
        load_data(tmp_path / "broken")


# -- batches ------------------------------------------------------------------------------------------


def test_iterate_batches_in_order_with_partial_last_batch():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    batches = list(iterate_batches(x, y, batch_size=4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(10))


def test_iterate_batches_shuffled_covers_each_sample_once():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    batches = list(iterate_batches(x, y, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    seen = torch.cat([b[1] for b in batches])
    assert [len(b[1]) for b in batches] == [3, 3, 3, 1]
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in batches)  # pairs stay together
    again = iterate_batches(x, y, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.cat([b[1] for b in again]).tolist() == seen.tolist()

"""Loading the user's model: every supported kind, and a ``ModelLoadError`` that says what to do for the rest."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.errors import ModelLoadError
from compressor.loading import build_arch, load_model
from _tiny import IMAGE_SIZE, NUM_CLASSES

X = torch.randn(3, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def _assert_same_function(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(X), b.eval()(X), rtol=0, atol=0)


# -- what loads --------------------------------------------------------------------------------------------


def test_state_dict_with_a_registered_arch(model_path, resnet20):
    loaded = load_model(model_path, arch="resnet20")

    assert loaded.kind == "state_dict"
    assert loaded.arch == {"name": "resnet20", "kwargs": {"in_channels": 1, "num_classes": NUM_CLASSES}}
    assert not loaded.model.training
    _assert_same_function(loaded.model, resnet20)


def test_image_size_is_passed_to_the_factory(model_path):
    loaded = load_model(model_path, arch="resnet20", image_size=IMAGE_SIZE)
    assert loaded.arch["kwargs"]["image_size"] == IMAGE_SIZE


def test_state_dict_with_a_factory_path(model_path, resnet20):
    loaded = load_model(model_path, arch="compressor.models.resnet_cifar:resnet20")

    assert loaded.arch["name"] == "compressor.models.resnet_cifar:resnet20"
    _assert_same_function(loaded.model, resnet20)


@pytest.mark.parametrize("wrap", ["module_prefix", "nested"])
def test_wrapped_state_dicts(tmp_path, resnet20, wrap):
    state = resnet20.state_dict()
    obj = {f"module.{k}": v for k, v in state.items()} if wrap == "module_prefix" else {"state_dict": state, "epoch": 3}
    torch.save(obj, tmp_path / "wrapped.pt")

    _assert_same_function(load_model(tmp_path / "wrapped.pt", arch="resnet20").model, resnet20)


def test_pickled_module_needs_trust_pickle(tmp_path, resnet20):
    path = tmp_path / "whole.pt"
    torch.save(resnet20, path)

    with pytest.raises(ModelLoadError, match="pickled Python objects") as info:
        load_model(path, arch="resnet20")
    assert "--trust-pickle" in info.value.hint

    loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "pickle" and loaded.arch is None
    _assert_same_function(loaded.model, resnet20)


# -- what does not, and says why --------------------------------------------------------------------------


def test_torchscript_is_refused(tmp_path, resnet20):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(resnet20).save(str(tmp_path / "scripted.pt"))
        torch.jit.trace(resnet20, X[:1]).save(str(tmp_path / "traced.pt"))

    for name in ("scripted.pt", "traced.pt"):
        for kwargs in ({"arch": "resnet20"}, {"trust_pickle": True}):
            with pytest.raises(ModelLoadError, match="TorchScript"):
                load_model(tmp_path / name, **kwargs)


def test_torch_export_program_is_refused(tmp_path, resnet20):
    try:
        program = torch.export.export(resnet20, (X[:1],))
        torch.export.save(program, tmp_path / "exported.pt2")
    except Exception as exc:  # torch.export support varies by torch version
        pytest.skip(f"torch.export cannot export resnet20 here: {type(exc).__name__}")

    with pytest.raises(ModelLoadError, match="torch.export program"):
        load_model(tmp_path / "exported.pt2", arch="resnet20")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.pt", arch="resnet20")
    with pytest.raises(ModelLoadError, match="is not a file"):
        load_model(tmp_path, arch="resnet20")


def test_truncated_file(tmp_path, model_path):
    data = model_path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])

    with pytest.raises(ModelLoadError, match="corrupted|cannot read") as info:
        load_model(tmp_path / "truncated.pt", arch="resnet20")
    assert "\n" not in str(info.value)


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def test_random_bytes_raise_a_model_load_error(tmp_path):
    path = _random_bytes(tmp_path / "noise.pt")
    for kwargs in ({"arch": "resnet20"}, {"trust_pickle": True}):
        with pytest.raises(ModelLoadError, match="noise.pt"):
            load_model(path, **kwargs)


def test_random_bytes_are_not_mistaken_for_a_pickled_module(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(_random_bytes(tmp_path / "noise.pt"), arch="resnet20")
    assert "pickled Python objects" not in str(info.value)
    assert "--trust-pickle" not in (info.value.hint or "")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.pt"):
        load_model(tmp_path / "empty.pt", arch="resnet20")


def test_state_dict_without_arch(model_path):
    with pytest.raises(ModelLoadError, match="needs --arch") as info:
        load_model(model_path)
    assert "compressor models" in info.value.hint


def test_state_dict_of_another_arch_lists_the_mismatches(model_path):
    with pytest.raises(ModelLoadError, match="does not match --arch resnet56") as info:
        load_model(model_path, arch="resnet56")
    message = str(info.value)
    assert message.count("missing ") == 4  # the first four shown ...
    assert "missing layers.9.conv1.weight" in message
    assert "more" in message  # ... and a count of the rest


def test_state_dict_mismatch_collects_every_kind(tmp_path, resnet20):
    state = dict(resnet20.state_dict())
    state["layers.0.conv1.weight"] = torch.zeros(8, 16, 3, 3)
    state["extra.weight"] = torch.zeros(2)
    del state["layers.1.bn1.bias"]
    torch.save(state, tmp_path / "edited.pt")

    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "edited.pt", arch="resnet20")

    message = str(info.value)
    assert "missing layers.1.bn1.bias" in message
    assert "unexpected extra.weight" in message
    assert "layers.0.conv1.weight: file (8, 16, 3, 3) vs model (16, 16, 3, 3)" in message


def test_a_file_that_is_neither_state_dict_nor_module(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="neither a state dict nor a module"):
        load_model(tmp_path / "other.pt", arch="resnet20")


@pytest.mark.parametrize(("arch", "match"), [
    ("no_such_net", "unknown --arch 'no_such_net'; available: .*resnet20"),
    ("compressor.models.resnet_cifar:no_such_factory", "cannot import"),
    ("no_such_module_xyz:factory", "cannot import"),
    ("compressor.models:list_models", "not a torch.nn.Module"),
])
def test_bad_arch(model_path, arch, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(model_path, arch=arch)


def test_build_arch_drops_keywords_the_factory_does_not_take():
    model = build_arch("compressor.models.resnet_cifar:CifarResNet", depth=20, num_classes=3, in_channels=1,
                       image_size=IMAGE_SIZE)
    assert model.fc.out_features == 3 and model.conv1.in_channels == 1


def test_factory_hiding_its_arguments_behind_kwargs(model_path):
    loaded = load_model(model_path, arch="helpers_arch:kwargs_factory")
    assert loaded.model.fc.out_features == 4
    assert loaded.arch["name"] == "helpers_arch:kwargs_factory"

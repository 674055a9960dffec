"""The pruned checkpoint (model.pt): tensors and plain values only, rebuilt to the exact pruned model."""

from __future__ import annotations

import pytest
import torch

from compressor import checkpoint, criteria, graph, pruning
from compressor.checkpoint import load_pruned, save_pruned
from compressor.errors import ModelLoadError
from compressor.loading import load_model
from compressor.models import create_model
from _tiny import IMAGE_SIZE, NUM_CLASSES, tiny_resnet20

X = torch.randn(4, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
RESNET_ARCH = {"name": "resnet20", "kwargs": {"in_channels": 1, "num_classes": NUM_CLASSES}}


def _prune(model: torch.nn.Module, target: float = 0.5) -> torch.nn.Module:
    coupling = graph.trace(model, X[:1])
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
    pruned, _ = pruning.search(coupling, scores, target_ratio=target, max_prune_fraction=0.75)
    return pruned.eval()


@pytest.fixture(scope="module")
def pruned_resnet() -> torch.nn.Module:
    return _prune(tiny_resnet20())


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a.eval()(X), b.eval()(X))


def test_round_trip_gives_the_same_model(tmp_path, pruned_resnet):
    path = tmp_path / "model.pt"
    save_pruned(pruned_resnet, path, arch=RESNET_ARCH, extra={"criterion": "l2", "input_shape": [1, 16, 16]})

    loaded = load_pruned(path)

    _assert_identical(loaded, pruned_resnet)
    assert not loaded.training
    assert loaded.layers[0].conv1.out_channels == pruned_resnet.layers[0].conv1.out_channels < 16


def test_the_file_holds_no_pickled_code(tmp_path, pruned_resnet):
    path = tmp_path / "model.pt"
    save_pruned(pruned_resnet, path, arch=RESNET_ARCH, extra={"criterion": "l2"})

    content = torch.load(path, map_location="cpu", weights_only=True)

    assert content["format"] == checkpoint.FORMAT
    assert content["arch"] == RESNET_ARCH
    assert content["criterion"] == "l2"
    assert content["structure"]["layers.0.conv1"]["out_channels"] == pruned_resnet.layers[0].conv1.out_channels
    assert content["state_dict"].keys() == pruned_resnet.state_dict().keys()


def test_load_model_recognises_a_pruned_checkpoint(tmp_path, pruned_resnet):
    path = tmp_path / "model.pt"
    save_pruned(pruned_resnet, path, arch=RESNET_ARCH, extra={})

    loaded = load_model(path)

    assert loaded.kind == "pruned" and loaded.arch == RESNET_ARCH
    _assert_identical(loaded.model, pruned_resnet)


def test_vit_round_trip_restores_the_head_bookkeeping(tmp_path):
    torch.manual_seed(0)
    vit = create_model("vit_tiny", num_classes=NUM_CLASSES, in_channels=1, image_size=IMAGE_SIZE).eval()
    pruned = _prune(vit)
    head_dims = [m.head_dim for m in pruned.modules() if hasattr(m, "head_dim")]
    assert min(head_dims) < 24, "the attention was not pruned, so the round trip checks nothing"
    arch = {"name": "vit_tiny", "kwargs": {"in_channels": 1, "num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE}}
    save_pruned(pruned, tmp_path / "vit.pt", arch=arch, extra={})

    loaded = load_pruned(tmp_path / "vit.pt")

    assert [m.head_dim for m in loaded.modules() if hasattr(m, "head_dim")] == head_dims
    _assert_identical(loaded, pruned)


def test_a_checkpoint_of_a_pickled_model_needs_a_base(tmp_path, pruned_resnet):
    path = tmp_path / "model.pt"
    save_pruned(pruned_resnet, path, arch=None, extra={})

    with pytest.raises(ModelLoadError, match="architecture is not recorded") as info:
        load_pruned(path)
    assert "base=" in info.value.hint
    with pytest.raises(ModelLoadError, match="pickled model"):
        load_model(path)

    _assert_identical(load_pruned(path, base=tiny_resnet20(seed=5)), pruned_resnet)


def test_a_base_of_another_architecture_is_refused(tmp_path, pruned_resnet):
    path = tmp_path / "model.pt"
    save_pruned(pruned_resnet, path, arch=None, extra={})

    with pytest.raises(ModelLoadError, match="does not fit"):
        load_pruned(path, base=create_model("vgg16_bn", num_classes=NUM_CLASSES, in_channels=1))


def test_a_plain_state_dict_is_not_a_pruned_checkpoint(model_path):
    with pytest.raises(ModelLoadError, match="not a pruned checkpoint"):
        load_pruned(model_path)

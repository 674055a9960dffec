"""Every architecture in ``compressor.models`` goes through trace -> score -> prune -> export -> onnxruntime.

Parametrized over the registry, so a model is tested the day it is added.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor import criteria, flops, graph, pruning
from compressor import export
from compressor.errors import ExportError
from compressor.export import INPUT_NAME, export_onnx
from compressor.models import create_model, list_models
from compressor.validate import open_session

# Small enough to keep the whole registry in seconds; a multiple of the ViT's patch size (4).
IMAGE_SIZE = 16
NUM_CLASSES = 10


def test_registry_lists_the_bundled_models():
    assert {"resnet20", "resnet56", "vgg16_bn", "mobilenetv2", "vit_tiny"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_name_lists_the_available_ones():
    with pytest.raises(KeyError, match="resnet20"):
        create_model("no_such_net")


@pytest.mark.parametrize("name", list_models())
def test_model_prunes_exports_and_matches_onnxruntime(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=1, image_size=IMAGE_SIZE).eval()
    example = torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        before = model(example).clone()

    coupling = graph.trace(model, example)
    assert coupling.groups, "nothing prunable was found"
    assert len(coupling.protected) == 1
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
    pruned, result = pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75)

    assert 0.495 <= result.achieved_ratio <= 0.5
    assert flops.measure(pruned, example).macs == result.pruned.macs
    assert result.pruned.params < result.original.params
    assert flops.count_params(pruned) == result.pruned.params
    with torch.no_grad():
        torch.testing.assert_close(model(example), before)  # the original is untouched

    batch5 = torch.randn(5, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        reference = {1: pruned(example), 5: pruned(batch5)}
    assert reference[5].shape == (5, NUM_CLASSES)
    assert torch.isfinite(reference[5]).all()

    path = tmp_path / f"{name}.onnx"
    exported = export_onnx(pruned, path, example_input=example, metadata={"arch": name})
    assert exported.bytes == path.stat().st_size > 0

    session = open_session(path, device="cpu")
    assert session.get_providers()[0] == "CPUExecutionProvider"
    for x in (example, batch5):  # batch 5 checks the dynamic batch axis
        out = session.run(None, {INPUT_NAME: x.numpy()})[0]
        ref = reference[len(x)].numpy()
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-4
        assert (out.argmax(1) == ref.argmax(1)).all()


def test_models_come_through_one_door_the_entry_point_group(monkeypatch):
    import ast
    from importlib import metadata
    from pathlib import Path

    from compressor import architectures
    from compressor.errors import ModelLoadError
    from compressor.loading import build_arch

    listed = {ep.name for ep in metadata.entry_points(group=architectures.ENTRY_POINT_GROUP)}
    assert set(list_models()) == listed == set(architectures.available_models())
    # A third party's architecture, registered like the built-ins, is found by name; the built-ins stay.
    fake = metadata.EntryPoint(name="tiny-cifar", value="compressor.models.resnet_cifar:resnet20",
                               group=architectures.ENTRY_POINT_GROUP)
    real = architectures.REGISTRY.entry_points()
    monkeypatch.setattr(architectures.REGISTRY, "_found", {**real, "tiny-cifar": fake})
    assert "tiny-cifar" in list_models() and "resnet20" in list_models()
    assert isinstance(build_arch("tiny-cifar", num_classes=3), torch.nn.Module)
    with pytest.raises(ModelLoadError, match=r"unknown --arch 'nope'; available: .*tiny-cifar"):
        build_arch("nope")
    # loading needs checkpoint, and checkpoint no longer reaches back into loading.
    source = (Path(architectures.__file__).parent / "checkpoint.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "loading" not in imported and "architectures" in imported


class _Folding(torch.nn.Module):
    """A convolution whose patches ``nn.Fold`` puts back together: ``col2im``, which ONNX has from opset 18."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 2, stride=2)
        self.fold = torch.nn.Fold((8, 8), 2, stride=2)
        self.head = torch.nn.Linear(3 * 64, 10)

    def forward(self, x):
        return self.head(self.fold(self.conv(x).flatten(2)).flatten(1))


def test_an_operator_added_in_a_later_opset_exports_at_that_opset(tmp_path):
    model, x = _Folding().eval(), torch.randn(2, 3, 8, 8)
    result = export_onnx(model, tmp_path / "m.onnx", example_input=x, metadata={})
    assert result.opset == 18
    out = open_session(tmp_path / "m.onnx", device="cpu").run(None, {INPUT_NAME: x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-5)


def test_a_retry_at_a_later_opset_that_fails_too_names_both_reasons(tmp_path, monkeypatch):
    from compressor.errors import ExportError

    reasons = iter([RuntimeError("Exporting the operator 'aten::col2im' to ONNX opset version 17 is not supported. "
                                 "Support for this operator was added in version 18"),
                    TypeError("'NoneType' object is not subscriptable"),
                    RuntimeError("dynamo: no decomposition")])

    def failing(*args, **kwargs):
        raise next(reasons)

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(ExportError) as caught:
        export_onnx(_Folding().eval(), tmp_path / "m.onnx", example_input=torch.randn(1, 3, 8, 8), metadata={})
    message = caught.value.message
    assert message.startswith("ONNX export failed") and "aten::col2im" in message
    assert "; retried at opset 18, it failed again: 'NoneType' object is not subscriptable" in message
    assert message.endswith("; the dynamo exporter failed too: RuntimeError: dynamo: no decomposition")
    assert not (tmp_path / "m.onnx").exists()


class _Antialiased(torch.nn.Module):
    """A resize with antialiasing (NaFlexViT's position embeddings): the TorchScript exporter has no symbolic for it."""

    def __init__(self, batch_fixed: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 4 * 4, 10)
        self.batch_fixed = batch_fixed

    def forward(self, x):
        y = torch.nn.functional.interpolate(self.conv(x), size=(4, 4), mode="bicubic", antialias=True)
        return self.head(y.reshape(2 if self.batch_fixed else y.shape[0], -1))


def test_what_the_torchscript_exporter_cannot_export_goes_through_the_dynamo_exporter(tmp_path):
    model, x = _Antialiased().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ExportError):  # the first exporter alone fails
        export._torchscript_bytes(model, x, opset=export.OPSET)
    export_onnx(model, tmp_path / "m.onnx", example_input=x, metadata={"arch": "toy"})
    batch = torch.randn(3, 3, 8, 8)  # the batch axis stays dynamic
    out = open_session(tmp_path / "m.onnx", device="cpu").run(None, {INPUT_NAME: batch.numpy()})[0]
    np.testing.assert_allclose(out, model(batch).detach().numpy(), atol=1e-5)


def test_a_dynamo_export_that_fixes_the_batch_size_is_refused_with_both_reasons(tmp_path):
    with pytest.raises(ExportError) as caught:
        export_onnx(_Antialiased(batch_fixed=True).eval(), tmp_path / "m.onnx", example_input=torch.randn(1, 3, 8, 8),
                    metadata={})
    message = caught.value.message
    assert message.startswith("ONNX export failed") and "; the dynamo exporter failed too: " in message
    assert not (tmp_path / "m.onnx").exists()

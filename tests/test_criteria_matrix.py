"""Every registered criterion x model: calibrate (as the pipeline does) -> score -> search -> export -> onnxruntime.

Parametrized over the registry, so a criterion is tested the day it is registered.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from compressor import criteria, graph, pruning
from compressor.errors import TargetUnreachableError
from compressor.export import INPUT_NAME, export_onnx
from compressor.models import create_model
from compressor.pipeline import prepare_criterion
from compressor.validate import open_session
from compressor.data import LoadedData

IMAGE_SIZE = 16
NUM_CLASSES = 10
MODELS = ("resnet20", "mobilenetv2", "vit_tiny")


def _trained_looking(name: str) -> nn.Module:
    """A seeded model whose norm layers are not at their initial values, so that norm-based criteria rank."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=1, image_size=IMAGE_SIZE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.2, 1.5)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("criterion_name", [info.name for info in criteria.available_criteria()])
def test_criterion_prunes_every_model_to_the_target(criterion_name, model_name, tmp_path):
    model = _trained_looking(model_name)
    example = torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        before = model(example).clone()
    coupling = graph.trace(model, example)
    criterion = criteria.get_criterion(criterion_name)

    data = LoadedData.from_tensors(torch.randn(16, 1, IMAGE_SIZE, IMAGE_SIZE), torch.arange(16) % NUM_CLASSES)
    prepare_criterion(criterion, model, data, batches=2, batch_size=8)  # what the pipeline feeds it
    if criteria.needs_gradients(criterion):
        assert all(p.grad is not None for p in model.parameters()), "calibration left parameters without .grad"
    scores = pruning.score_groups(coupling, criterion)
    model.zero_grad(set_to_none=True)

    assert len(scores) == len(coupling.groups)
    with torch.no_grad():
        torch.testing.assert_close(model(example), before)  # scoring changed nothing in the model
    if all(torch.isinf(s).all() for s in scores):  # it abstains on every group (bn-scale without batch norms)
        with pytest.raises(TargetUnreachableError, match="nothing in the model can be pruned"):
            pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75)
        return
    assert any(torch.isfinite(s).any() and s[torch.isfinite(s)].std() > 0 for s in scores), "it ranks nothing"

    pruned, result = pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75)
    assert 0.495 <= result.achieved_ratio <= 0.5
    batch = torch.randn(3, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        reference = pruned(batch)
    assert reference.shape == (3, NUM_CLASSES) and torch.isfinite(reference).all()

    path = tmp_path / "pruned.onnx"
    export_onnx(pruned, path, example_input=example, metadata={"criterion": criterion_name})
    out = open_session(path, device="cpu").run(None, {INPUT_NAME: batch.numpy()})[0]
    assert np.abs(out - reference.numpy()).max() < 1e-4

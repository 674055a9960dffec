"""torchvision's classifiers go through trace -> score -> prune to half the FLOPs -> ONNX -> onnxruntime.

Untrained (``weights=None``, nothing is downloaded), 10 classes, the smallest input each model
allows, so the whole matrix stays within minutes on two cores. These are the architectures people
bring, and each one trips torch-pruning somewhere on its own: attention heads (ViT, Swin), channel
shuffle (ShuffleNet), grouped convolutions (RegNet), unwrapped parameters (class token, position
embedding, layer scale), window partitions (Swin), adaptive pooling that upsamples (VGG).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compressor import criteria, flops, graph, pruning
from compressor.export import INPUT_NAME, export_onnx
from compressor.validate import open_session

tvm = pytest.importorskip("torchvision.models")

NUM_CLASSES = 10
slow = pytest.mark.slow


# name -> (factory keyword arguments beyond num_classes, input size)
CASES = {
    "resnet18": ({}, 32),
    "resnet50": ({}, 32),
    "mobilenet_v2": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "regnet_x_400mf": ({}, 32),
    "shufflenet_v2_x1_0": ({}, 32),
    "densenet121": ({}, 32),
    "convnext_tiny": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
    "swin_t": ({}, 32),
    "squeezenet1_1": ({}, 32),
    "googlenet": ({"aux_logits": False, "init_weights": False}, 32),
    "mnasnet0_5": ({}, 32),
    "vgg11_bn": ({}, 32),
}
SLOW = {"densenet121", "vit_b_16", "swin_t", "shufflenet_v2_x1_0", "googlenet", "regnet_x_400mf", "vgg11_bn"}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    kwargs, size = CASES[name]
    factory = getattr(tvm, name)
    model = factory(weights=None, num_classes=NUM_CLASSES, **kwargs).eval()
    example = torch.randn(1, 3, size, size)
    # Untrained heads can be all zeros (ViT's is): random ones make the logits worth comparing.
    head = model.get_submodule(graph.find_classifier(model, example))
    nn.init.normal_(head.weight, std=0.5)
    return model, example


@pytest.mark.parametrize(("name", "attention"),
                         [pytest.param(n, "dims", marks=slow) if n in SLOW else (n, "dims") for n in CASES]
                         + [pytest.param("vit_b_16", "heads", marks=slow)])
def test_torchvision_model_prunes_to_half_and_matches_onnxruntime(name, attention, tmp_path, record_property):
    model, example = _build(name)
    size = example.shape[-1]
    batch = torch.randn(3, 3, size, size)
    with torch.no_grad():
        before = model(batch).clone()

    coupling = graph.trace(model, example, attention_pruning=attention)
    assert coupling.groups, "nothing prunable was found"
    scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
    pruned, result = pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75)

    assert 0.495 <= result.achieved_ratio <= 0.5
    if attention == "heads":  # every block's nn.MultiheadAttention loses the same whole heads of the stream
        assert {(h.heads_before, h.head_dim_before, h.head_dim_after) for h in result.heads} == {(12, 64, 64)}
        assert len({h.heads_after for h in result.heads}) == 1 and result.heads[0].heads_after < 12
    assert flops.measure(pruned, example).macs == result.pruned.macs
    assert flops.count_params(pruned) == result.pruned.params < result.original.params
    with torch.no_grad():
        torch.testing.assert_close(model(batch), before)  # the original is untouched
        reference = pruned(batch).numpy()
    assert reference.shape == (3, NUM_CLASSES)
    assert np.isfinite(reference).all()

    path = tmp_path / f"{name}.onnx"
    export_onnx(pruned, path, example_input=example, metadata={"arch": name})
    out = open_session(path, device="cpu").run(None, {INPUT_NAME: batch.numpy()})[0]  # batch 3: dynamic axis
    assert out.shape == reference.shape
    for key, value in {"input": size, "achieved_ratio": round(result.achieved_ratio, 4), "groups": len(coupling.groups),
                       "protected": len(coupling.protected), "unsafe": len(result.unsafe_groups),
                       "max_abs_diff": float(np.abs(out - reference).max()),
                       "max_abs_logit": float(np.abs(reference).max())}.items():
        record_property(key, value)  # the matrix's table, with --junitxml
    # Relative: untrained deep nets (MobileNets, GoogLeNet) give logits of 1e-9 or so.
    assert np.abs(out - reference).max() <= 1e-3 * np.abs(reference).max()

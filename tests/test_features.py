"""Feature distillation (``--distill-features``): the student's pruned layers are pulled towards the
teacher's outputs on the channels they kept."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from compressor.config import CompressConfig
from compressor.errors import ConfigError
from compressor.finetune import FeatureMatch


def _pair():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    kept = torch.tensor([0, 2, 5])
    student = copy.deepcopy(teacher)
    student[0] = nn.Conv2d(3, 3, 3, padding=1)
    student[2] = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        student[0].weight.copy_(teacher[0].weight[kept])
        student[0].bias.copy_(teacher[0].bias[kept])
        student[2].weight.copy_(teacher[2].weight[:, kept])
        student[2].bias.copy_(teacher[2].bias)
    return teacher, student, {"0": kept, "2": torch.arange(4)}


def test_a_student_that_keeps_the_teachers_channels_exactly_has_no_feature_loss():
    teacher, student, kept = _pair()
    match = FeatureMatch(student, teacher, kept)
    assert list(match.layers) == ["0"]  # layer 2 lost no output channel: not matched
    x = torch.randn(2, 3, 6, 6)
    student(x), teacher(x)
    assert match.loss().item() == pytest.approx(0.0, abs=1e-12)


def test_the_feature_loss_is_the_relative_squared_error_on_the_kept_channels_and_trains_the_student():
    teacher, student, kept = _pair()
    with torch.no_grad():
        student[0].weight.add_(0.3)
    match = FeatureMatch(student, teacher, kept)
    x = torch.randn(2, 3, 6, 6)
    s, t = student[0](x), teacher[0](x)[:, kept["0"]]
    expected = ((s - t) ** 2).mean() / (t**2).mean()
    student(x), teacher(x)
    loss = match.loss()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student[0].weight.grad is not None and teacher[0].weight.grad is None
    match.remove()
    student(x)
    assert match.loss().item() == 0.0  # hooks gone: nothing recorded


def test_feature_distillation_is_refused_with_data_parallel_fine_tuning(tmp_path):
    with pytest.raises(ConfigError, match="--distill-features runs in one process"):
        CompressConfig(model_path=tmp_path / "m.pt", data_path=tmp_path / "d.npz", target_flops=0.5, distill_features=True,
                       nproc_per_node=2)


@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_a_run_with_feature_distillation_matches_the_pruned_layers_of_every_prune(make_config, schedule):
    from compressor import compress
    from compressor.progress import Progress

    notes: list[str] = []

    class Notes(Progress):
        def note(self, text: str) -> None:
            notes.append(text)

    config = make_config(distill_features=True, epochs=2, schedule=schedule, target_flops=0.5)
    result = compress(config, progress=Notes())
    matched = [n for n in notes if n.startswith("feature distillation at")]
    assert len(matched) == len(result.schedule.events) >= 1
    assert all(int(n.split()[3]) > 0 for n in matched), matched
    assert result.finetune is not None and result.finetune.val_accuracy > 0
    assert result.finetune.feature_layers > 0 and result.finetune.feature_loss >= 0
    report = json.loads((config.out_dir / "report.json").read_text())
    assert report["finetune"]["feature_layers"] == result.finetune.feature_layers

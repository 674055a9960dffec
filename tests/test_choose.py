"""``--criterion auto``: the candidates' proxy (accuracy after prune, recalibration, reconstruction), the
choice, and where it is recorded."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compressor import compress, graph, pruning
from compressor.choose import choose_criterion
from compressor.config import CompressConfig
from compressor.criteria import get_criterion
from compressor.data import LoadedData
from compressor.errors import ConfigError
from compressor.finetune import accuracy
from _tiny import make_images


class HalfDead(nn.Module):
    """16 channels, of which 8 carry what the model knows and 8 are zero: one criterion keeps the first
    eight, the other throws them away."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def toy() -> tuple[nn.Module, LoadedData]:
    images, labels = make_images(per_class=30)
    x, y = torch.tensor(images, dtype=torch.float32) / 255, torch.tensor(labels)
    torch.manual_seed(0)
    model = HalfDead()
    live = torch.zeros(16, dtype=torch.bool)
    live[:8] = True
    with torch.no_grad():
        model.conv.weight[~live] = 0
        model.conv.bias[~live] = 0
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        model.conv.weight.grad[~live] = 0
        model.conv.bias.grad[~live] = 0
        opt.step()
    data = LoadedData.from_tensors(x[::2], y[::2], x[1::2], y[1::2])
    model.eval()
    assert accuracy(model, data) >= 0.9, "the toy did not learn its brightness classes"
    return model, data


def _config(tmp_path, **kw) -> CompressConfig:
    return CompressConfig(model_path=tmp_path / "m.pt", data_path=tmp_path / "d.npz", target_flops=0.55, **kw)


def test_auto_picks_the_candidate_that_keeps_the_live_channels(toy, tmp_path):
    model, data = toy
    coupling = graph.trace(model, data.head(1))
    choice, criterion = choose_criterion(coupling, _config(tmp_path), data, candidates=("helpers_criteria:LargestFirst", "l2"),
                                         flops_ratio=0.55, round_to=1, floor=None)
    by_name = {t.criterion: t for t in choice.trials}
    assert choice.chosen == "l2" and type(criterion).__name__ == "GroupL2"
    assert by_name["l2"].accuracy >= 0.9 > 0.5 >= by_name["helpers_criteria:LargestFirst"].accuracy
    assert all(0.5 <= t.flops_ratio <= 0.55 for t in choice.trials)
    assert "chose l2" in choice.reason() and "LargestFirst" in choice.reason()
    # the trials prune copies: the model itself is untouched
    assert model.conv.out_channels == 16


def test_a_tie_goes_to_the_first_candidate(toy, tmp_path):
    model, data = toy
    coupling = graph.trace(model, data.head(1))
    choice, _ = choose_criterion(coupling, _config(tmp_path), data, candidates=("l1", "l2"), flops_ratio=0.55,
                                 round_to=1, floor=None)
    assert [t.criterion for t in choice.trials] == ["l1", "l2"]
    if choice.trials[0].accuracy == choice.trials[1].accuracy:
        assert choice.chosen == "l1"


@pytest.mark.parametrize(("candidates", "message"), [
    ("l2,,fpgm", "comma-separated"), ("l2,auto", "auto itself"), ("l2,l2", "twice"),
])
def test_bad_candidates_are_one_line_errors(tmp_path, candidates, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, criterion="auto", criterion_options={"candidates": candidates})


def test_auto_outside_the_pipeline_ranks_as_its_first_candidate(toy):
    model, data = toy
    coupling = graph.trace(model, data.head(1))
    auto, first = get_criterion("auto", {"candidates": "lamp,l2"}), get_criterion("lamp")
    for a, b in zip(pruning.score_groups(coupling, auto), pruning.score_groups(coupling, first), strict=True):
        torch.testing.assert_close(a, b)


def test_a_run_with_auto_records_its_choice(make_config):
    config = make_config(criterion="auto", criterion_options={"candidates": "l2,fpgm"}, epochs=0)
    result = compress(config)
    d = json.loads((config.output_dir / "report.json").read_text())
    choice = d["criterion_choice"]
    assert d["criterion"] == "auto" and choice["chosen"] in ("l2", "fpgm")
    assert [t["criterion"] for t in choice["trials"]] == ["l2", "fpgm"]
    assert choice["chosen"] == max(choice["trials"], key=lambda t: t["accuracy"])["criterion"]
    assert result.resolved.choice.chosen == choice["chosen"]
    saved = torch.load(config.output_dir / "model.pt", weights_only=False)
    assert saved["resolved"]["criterion"] == choice["chosen"]
    assert f"(chose `{choice['chosen']}`)" in (config.output_dir / "report.md").read_text()

"""Reconstruction after pruning: each re-fitted layer is the least-squares solution worked out here by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor import reconstruct as R


def _images(n: int, channels: int = 3, size: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _fit_rows(n: int) -> int:
    """The images whose rows the fit uses (the rest only check it)."""
    return n - max(1, int(n * R.HELD_OUT))


def _lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares with an intercept column: [features + 1, outputs]."""
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    return torch.linalg.lstsq(x1, y.double()).solution.float()


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Every output position's input patch, [n * positions, C * K], by F.unfold (not the module's own gather)."""
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride, dilation=conv.dilation)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _outputs(y: torch.Tensor) -> torch.Tensor:
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _prune_conv(conv: nn.Conv2d, keep_out: list[int], keep_in: list[int], groups: int = 1) -> nn.Conv2d:
    pruned = nn.Conv2d(len(keep_in), len(keep_out), conv.kernel_size, padding=conv.padding, groups=groups,
                       bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        pruned.weight.copy_(conv.weight[keep_out][:, [i % conv.weight.shape[1] for i in keep_in][: pruned.weight.shape[1]]]
                            if groups > 1 else conv.weight[keep_out][:, keep_in])
        if conv.bias is not None:
            pruned.bias.copy_(conv.bias[keep_out])
    return pruned


def test_a_convolution_is_refitted_to_the_direct_least_squares_solution():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()
    keep = [0, 2, 3, 5]
    pruned = nn.Sequential(_prune_conv(reference[0], keep, [0, 1, 2]), nn.ReLU(),
                           _prune_conv(reference[2], [0, 1, 2, 3], keep)).eval()
    x = _images(40)
    with torch.no_grad():
        target = reference(x)
        before = F.mse_loss(pruned(x), target).item()
    result = R.reconstruct(reference, pruned, kept={"0": torch.tensor(keep), "2": torch.arange(4)}, images=x, ridge=0.0)

    # By hand: conv2's inputs in the pruned model (conv1 is unchanged: its inputs are the images), its outputs
    # in the reference, every position of the images the fit uses.
    m = _fit_rows(len(x))
    with torch.no_grad():
        hidden = pruned[1](pruned[0](x[:m]))
        solution = _lstsq(_patches(hidden, pruned[2]), _outputs(reference(x[:m])))
        refitted = torch.cat([pruned[2].weight.flatten(1), pruned[2].bias[:, None]], 1).T
        after = F.mse_loss(pruned(x), target).item()
    assert torch.allclose(refitted, solution, atol=1e-3, rtol=1e-3)
    assert after < 0.8 * before
    assert [f.name for f in result.layers if f.applied] == ["2"] and not result.skipped


@pytest.mark.parametrize("rows", [30, 80])  # fewer rows than weights (the rows x rows system), and more
def test_the_ridge_solution_is_the_one_worked_out_directly(rows):
    g = torch.Generator().manual_seed(3)
    d, o, groups = 50, 4, 2
    x = torch.cat([torch.randn(groups, rows, d, generator=g), torch.ones(groups, rows, 1)], -1)
    y, w0 = torch.randn(groups, rows, o, generator=g), torch.randn(groups, d + 1, o, generator=g)
    w = R.solve(x, y, w0, ridge=0.1, intercept=True)
    for k in range(groups):  # (x^T x + L) w = x^T y + L w0, L = lam on every weight but the intercept's
        xk, yk, w0k = x[k].double(), y[k].double(), w0[k].double()
        pull = torch.ones(d + 1, dtype=torch.float64)
        pull[-1] = 0
        lam = 0.1 * (xk[:, :d] ** 2).sum(0).mean() * pull
        direct = torch.linalg.solve(xk.T @ xk + torch.diag(lam), xk.T @ yk + lam[:, None] * w0k)
        assert torch.allclose(w[k].double(), direct, atol=1e-4, rtol=1e-4)


def test_a_grouped_convolution_is_solved_per_group():
    torch.manual_seed(1)
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2)).eval()
    keep = [0, 1, 4, 5]  # two of the four channels of each group
    grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    with torch.no_grad():
        grouped.weight.copy_(reference[2].weight[keep][:, [0, 1]])
        grouped.bias.copy_(reference[2].bias[keep])
    pruned = nn.Sequential(_prune_conv(reference[0], keep, [0, 1, 2]), nn.ReLU(), grouped).eval()
    x = _images(40, seed=1)
    R.reconstruct(reference, pruned, kept={"0": torch.tensor(keep), "2": torch.tensor(keep)}, images=x, ridge=0.0)

    m = _fit_rows(len(x))
    with torch.no_grad():
        hidden = pruned[1](pruned[0](x[:m]))
        target = _outputs(reference(x[:m]))[:, keep]
        for g in range(2):  # group g: pruned inputs 2g, 2g+1 -> pruned outputs 2g, 2g+1
            conv = nn.Conv2d(2, 2, 3, padding=1)
            solution = _lstsq(_patches(hidden[:, 2 * g : 2 * g + 2], conv), target[:, 2 * g : 2 * g + 2])
            refitted = torch.cat([grouped.weight[2 * g : 2 * g + 2].flatten(1), grouped.bias[2 * g : 2 * g + 2, None]], 1).T
            assert torch.allclose(refitted, solution, atol=1e-3, rtol=1e-3)


def test_a_linear_after_a_flatten_is_refitted_on_the_kept_channels_positions():
    torch.manual_seed(2)
    reference = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3)).eval()
    keep = [1, 3]
    columns = [c * 25 + p for c in keep for p in range(25)]
    linear = nn.Linear(50, 3)
    with torch.no_grad():
        linear.weight.copy_(reference[3].weight[:, columns])
        linear.bias.copy_(reference[3].bias)
    pruned = nn.Sequential(_prune_conv(reference[0], keep, [0]), nn.ReLU(), nn.Flatten(), linear).eval()
    x = _images(200, channels=1, size=5, seed=2)
    R.reconstruct(reference, pruned, kept={"0": torch.tensor(keep), "3": torch.arange(3)}, images=x, ridge=0.0)

    m = _fit_rows(len(x))
    with torch.no_grad():
        solution = _lstsq(pruned[:3](x[:m]), reference(x[:m]))
        refitted = torch.cat([linear.weight, linear.bias[:, None]], 1).T
    assert torch.allclose(refitted, solution, atol=1e-3, rtol=1e-3)


def test_a_bias_free_convolution_folds_its_intercept_into_the_batch_norm_that_reads_it():
    torch.manual_seed(3)
    reference = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, bias=False),
                              nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        reference[3].running_mean.uniform_(-1, 1)
        reference[3].running_var.uniform_(0.5, 2)
    keep = [1, 2, 4]
    pruned = nn.Sequential(_prune_conv(reference[0], keep, [0, 1, 2]), nn.ReLU(),
                           _prune_conv(reference[2], [0, 1, 2, 3], keep), nn.BatchNorm2d(4)).eval()
    pruned[3].load_state_dict(reference[3].state_dict())
    pruned[3].running_mean.zero_()  # as if recalibrated to something else: the pass must restore it
    x = _images(40, seed=3)
    result = R.reconstruct(reference, pruned, kept={"0": torch.tensor(keep), "2": torch.arange(4)}, images=x, ridge=0.0)

    m = _fit_rows(len(x))
    with torch.no_grad():
        solution = _lstsq(_patches(pruned[1](pruned[0](x[:m])), pruned[2]), _outputs(reference[:3](x[:m])))
    assert torch.allclose(pruned[2].weight.flatten(1).T, solution[:-1], atol=1e-3, rtol=1e-3)
    assert torch.allclose(pruned[3].running_mean, reference[3].running_mean - solution[-1], atol=1e-3)
    assert torch.equal(pruned[3].running_var, reference[3].running_var)
    assert result.norms_restored == 1 and result.layers[-1].bias == "batch norm"


def test_a_layer_it_cannot_handle_is_skipped_and_named():
    reference = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")).eval()
    keep = [0, 1, 2]
    pruned = nn.Sequential(_prune_conv(reference[0], keep, [0, 1, 2]), nn.ReLU(),
                           _prune_conv(reference[2], [0, 1, 2, 3], keep)).eval()
    weight = pruned[2].weight.clone()
    result = R.reconstruct(reference, pruned, kept={"0": torch.tensor(keep), "2": torch.arange(4)}, images=_images(8))

    assert "padding mode 'reflect'" in result.skipped["2"]
    assert torch.equal(pruned[2].weight, weight)
    assert "2: padding mode" in result.summary()


def test_a_projection_not_called_as_a_module_is_skipped_and_named():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Attention().eval()
    result = R.reconstruct(model, model, kept={"attn.out_proj": torch.arange(8)}, images=torch.randn(4, 5, 8))
    assert "not called as a module" in result.skipped["attn.out_proj"]


def test_the_kept_output_channels_are_read_off_a_copy_pruned_by_the_same_plan(resnet20):
    from compressor.graph import trace
    from compressor.pruning import PruningPlan, pruned_copy

    graph = trace(resnet20, torch.randn(1, 1, 16, 16))
    spec = next(s for s in graph.groups if s.units > 4)
    plan = PruningPlan({spec.index: (0, 2)})
    kept = R.kept_outputs(graph, plan)
    pruned = pruned_copy(graph, plan)

    root = graph.module(spec.root)
    assert kept[spec.root].tolist() == [i for i in range(root.weight.shape[0]) if i not in (0, 2)]
    assert torch.equal(pruned.get_submodule(spec.root).weight, root.weight[kept[spec.root]])


def test_no_reconstruct_leaves_the_prune_unreconstructed_and_says_so_in_the_report(model_path, data_path, tmp_path):
    import json

    from typer.testing import CliRunner

    from compressor.cli.compress import app

    out = tmp_path / "o"
    result = CliRunner().invoke(app, [str(model_path), "--arch", "resnet20", "--data", str(data_path), "--target-flops",
                                      "0.5", "--epochs", "0", "--latency-runs", "1", "--device", "cpu", "--out", str(out),
                                      "--no-reconstruct"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["pruned_reconstructed"] is None
    assert [e["reconstruction"] for e in report["schedule"]["events"]] == [None]

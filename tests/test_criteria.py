"""The criteria registry: discovery through entry points, ``package.module:Class`` paths, broken and
duplicate plug-ins, and the contract every registered criterion must keep."""

from __future__ import annotations

import warnings
from importlib import metadata
from types import SimpleNamespace

import pytest
import torch

from compressor.pipeline import prepare_criterion
from typer.testing import CliRunner

import compressor
from compressor import criteria, graph, pruning, registry
from compressor.cli.toolbox import app as toolbox
from compressor.errors import ConfigError
from compressor.plugins.magnitude import GroupL2
from compressor.data import LoadedData
from _tiny import IMAGE_SIZE, tiny_resnet20

GROUP = criteria.ENTRY_POINT_GROUP


@pytest.fixture(autouse=True)
def fresh_registry():
    """Every test discovers from scratch, and leaves no fake plug-in cached behind it."""
    criteria.refresh()
    yield
    criteria.refresh()


@pytest.fixture
def installed(monkeypatch):
    """Make discovery see exactly the given entry points (the real ``l2`` plus fakes)."""
    calls = []

    def install(*entry_points: metadata.EntryPoint) -> list[str]:
        def fake_entry_points(*, group: str):
            calls.append(group)
            return metadata.EntryPoints(ep for ep in entry_points if ep.group == group)

        monkeypatch.setattr(registry, "metadata", SimpleNamespace(entry_points=fake_entry_points))
        criteria.refresh()
        return calls

    return install


@pytest.fixture
def l2_entry_point() -> metadata.EntryPoint:
    (ep,) = [ep for ep in metadata.entry_points(group=GROUP) if ep.name == "l2"]
    return ep


def _fake(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group=GROUP)


@pytest.fixture
def coupling() -> graph.CouplingGraph:
    return graph.trace(tiny_resnet20(), torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE))


# -- the real registry ---------------------------------------------------------------------------------


def test_l2_is_registered_by_the_compressor_distribution():
    infos = {info.name: info for info in criteria.available_criteria()}

    assert "l2" in infos
    assert infos["l2"].distribution == "compressor"
    assert infos["l2"].version == compressor.__version__
    assert infos["l2"].value == "compressor.plugins.magnitude:GroupL2"
    assert [info.name for info in criteria.available_criteria()] == sorted(infos)


def test_get_criterion_by_name():
    criterion = criteria.get_criterion("l2")

    assert isinstance(criterion, GroupL2)
    assert isinstance(criterion, criteria.Criterion)
    assert criteria.resolve_criterion("l2") is GroupL2
    assert criteria.needs_gradients(criterion) is False


@pytest.mark.parametrize("name", [info.name for info in criteria.available_criteria()])
def test_every_registered_criterion_scores_every_group(name, coupling):
    criterion = criteria.get_criterion(name)
    assert isinstance(getattr(type(criterion), "needs_gradients", None), bool), "needs_gradients must be declared"
    x = torch.randn(4, 1, IMAGE_SIZE, IMAGE_SIZE)
    prepare_criterion(criterion, coupling.model, LoadedData.from_tensors(x, torch.arange(4)),
                      batches=1, batch_size=4)

    scores = pruning.score_groups(coupling, criterion)

    assert len(scores) == len(coupling.groups)
    for spec, s in zip(coupling.groups, scores):
        assert s.shape == (spec.units,)
        assert torch.isfinite(s).all(), spec.root
    assert any(s.std() > 0 for s in scores), "a criterion that ranks nothing"


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown criterion 'nope'; available: .*\bl2\b") as info:
        criteria.get_criterion("nope")
    assert "package.module:Class" in info.value.hint


# -- package.module:Class paths ----------------------------------------------------------------------------


def test_import_path_resolves_without_registration():
    criterion = criteria.get_criterion("helpers_criteria:ReverseIndex")

    assert type(criterion).__name__ == "ReverseIndex"
    assert "ReverseIndex" not in {info.value.rpartition(":")[2] for info in criteria.available_criteria()}
    assert criteria.needs_gradients(criterion) is False
    assert criteria.needs_gradients(criteria.get_criterion("helpers_criteria:NeedsGradients")) is True


def test_import_path_criterion_drives_the_pruning(coupling):
    original = coupling.model.get_submodule("layers.0.conv1").weight.detach().clone()
    scores = pruning.score_groups(coupling, criteria.get_criterion("helpers_criteria:ReverseIndex"))

    pruned, _ = pruning.search(coupling, scores, target_ratio=0.5, max_prune_fraction=0.75)

    kept = pruned.get_submodule("layers.0.conv1").weight
    assert kept.shape[0] < original.shape[0]
    # ReverseIndex ranks the first channels highest, so exactly the first ones survive.
    torch.testing.assert_close(kept, original[: kept.shape[0], : kept.shape[1]])


@pytest.mark.parametrize(("spec", "match"), [
    ("helpers_criteria:NoSuchClass", "cannot import"),
    ("no_such_module_xyz:Thing", "cannot import"),
    ("helpers_criteria:NOT_A_CLASS", "not callable"),
])
def test_bad_import_paths_raise_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        criteria.get_criterion(spec)


# -- plug-ins registered through entry points --------------------------------------------------------------


def test_a_third_party_plugin_goes_through_the_same_door(installed, l2_entry_point):
    installed(l2_entry_point, _fake("reverse", "helpers_criteria:ReverseIndex"))

    infos = {info.name: info for info in criteria.available_criteria()}

    assert set(infos) == {"l2", "reverse"}
    assert infos["reverse"].distribution is None
    assert type(criteria.get_criterion("reverse")).__name__ == "ReverseIndex"
    assert isinstance(criteria.get_criterion("l2"), GroupL2)


def test_discovery_is_cached_until_refresh(installed, l2_entry_point):
    calls = installed(l2_entry_point)

    criteria.available_criteria()
    criteria.available_criteria()
    criteria.get_criterion("l2")
    assert len(calls) == 1

    criteria.refresh()
    criteria.available_criteria()
    assert len(calls) == 2


def test_a_broken_plugin_warns_and_the_others_still_load(installed, l2_entry_point):
    installed(_fake("broken", "no_such_module_xyz.plugin:Broken"), l2_entry_point)

    assert [info.name for info in criteria.available_criteria()] == ["broken", "l2"]  # listing imports nothing
    with pytest.warns(UserWarning, match=r"'broken'.*no_such_module_xyz"):
        with pytest.raises(ConfigError, match="failed to import"):
            criteria.get_criterion("broken")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(criteria.get_criterion("l2"), GroupL2)


class _Exploding(metadata.EntryPoint):
    """An entry point whose module raises while being imported."""

    def load(self):
        raise RuntimeError("boom at import")


def test_a_plugin_that_raises_on_import_is_contained(installed, l2_entry_point):
    installed(_Exploding(name="explodes", value="somewhere:Thing", group=GROUP), l2_entry_point)

    with pytest.warns(UserWarning, match=r"'explodes'.*boom at import"):
        with pytest.raises(ConfigError, match="explodes"):
            criteria.resolve_criterion("explodes")
    assert criteria.resolve_criterion("l2") is GroupL2


def test_toolbox_lists_a_broken_plugin_beside_the_working_ones(installed, l2_entry_point):
    installed(_fake("broken", "no_such_module_xyz:Broken"), l2_entry_point)

    with pytest.warns(UserWarning, match="'broken'"):
        result = CliRunner().invoke(toolbox, ["criteria"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("broken" in line and "failed to import" in line for line in lines)
    assert any("l2" in line and "compressor" in line and "weights" in line for line in lines)


def test_a_duplicate_name_warns_and_the_first_wins(installed, l2_entry_point):
    installed(l2_entry_point, _fake("l2", "helpers_criteria:ReverseIndex"))

    with pytest.warns(UserWarning, match=r"'l2' is registered twice.*helpers_criteria:ReverseIndex"):
        infos = criteria.available_criteria()

    assert [info.value for info in infos] == ["compressor.plugins.magnitude:GroupL2"]
    assert isinstance(criteria.get_criterion("l2"), GroupL2)


def test_the_same_entry_point_seen_twice_is_not_a_duplicate(installed, l2_entry_point):
    installed(l2_entry_point, _fake("l2", l2_entry_point.value))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [info.name for info in criteria.available_criteria()] == ["l2"]


# -- the built-in criteria ------------------------------------------------------------------------------------

BUILT_IN = {"activation", "l1", "l2", "bn-scale", "lamp", "fpgm", "taylor", "hessian", "lookahead", "ocs-saliency", "ocs-saliency-flops", "random"}


def test_the_built_ins_come_from_the_compressor_distribution():
    infos = {info.name: info for info in criteria.available_criteria()}

    assert BUILT_IN <= set(infos)
    for name in BUILT_IN:
        assert infos[name].distribution == "compressor", name
        assert infos[name].value.startswith("compressor.plugins."), infos[name].value


@pytest.mark.parametrize("name", [info.name for info in criteria.available_criteria()])
def test_every_registered_criterion_has_a_one_line_summary(name):
    doc = criteria.resolve_criterion(name).__doc__ or ""
    summary = doc.strip().splitlines()[0] if doc.strip() else ""

    assert summary.endswith("."), f"{name}: the docstring must open with a one-line summary (shown by `compressor criteria`)"
    assert len(summary) <= 100, f"{name}: summary too long for the listing: {summary!r}"


def test_per_sample_gradients_are_declared_not_inferred():
    class PerSampleOnly:
        needs_per_sample_gradients = True  # without needs_gradients it means nothing

    assert criteria.needs_per_sample_gradients(criteria.get_criterion("hessian")) is True
    assert criteria.needs_gradients(criteria.get_criterion("hessian")) is True
    assert criteria.needs_per_sample_gradients(criteria.get_criterion("taylor")) is False
    assert criteria.needs_per_sample_gradients(criteria.get_criterion("helpers_criteria:NeedsGradients")) is False
    assert criteria.needs_per_sample_gradients(PerSampleOnly()) is False
    assert criteria.needs_per_sample_gradients(None) is False


def test_toolbox_lists_every_built_in_with_its_needs():
    result = CliRunner().invoke(toolbox, ["criteria"], env={"COLUMNS": "250"})

    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") >= 4}
    assert BUILT_IN <= set(rows)
    for name in BUILT_IN:
        assert f"compressor {compressor.__version__}" in rows[name]
        expected = {"taylor": "gradients", "hessian": "gradients", "activation": "activations"}.get(name, "weights")
        assert expected in rows[name], rows[name]

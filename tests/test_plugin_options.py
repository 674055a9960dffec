"""Plug-ins own their options: declared typed by each plug-in, validated by it, listed by the toolbox.

Generated from the registries: a criterion or schedule registered tomorrow is checked here the same day.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor import CompressConfig, criteria, options, schedules
from compressor.cli.toolbox import app as toolbox
from compressor.errors import ConfigError

PLUGINS = ([("criterion", i.name, criteria.REGISTRY) for i in criteria.available_criteria()]
           + [("schedule", i.name, schedules.REGISTRY) for i in schedules.available_schedules()])
IDS = [f"{kind}-{name}" for kind, name, _ in PLUGINS]
FLAG = {"criterion": "--criterion-opt", "schedule": "--schedule-opt"}
WRONG = {"an integer": "1.5x", "a number": "many", "true or false": "maybe"}
"""A value that does not convert, per type name."""


def _config(**kw) -> CompressConfig:
    return CompressConfig(model_path=Path("m.pt"), data_path=Path("d.npz"), target_flops=0.5, **kw)


def test_the_registries_are_covered():
    assert {"gradual", "ocs", "cyclical", "oneshot"} <= {name for kind, name, _ in PLUGINS if kind == "schedule"}
    assert {"random", "ocs-saliency-flops", "l2"} <= {name for kind, name, _ in PLUGINS if kind == "criterion"}


@pytest.mark.parametrize("kind, name, registry", PLUGINS, ids=IDS)
def test_every_option_is_typed_documented_and_made_by_the_plugin(kind, name, registry):
    cls = registry.resolve(name)
    listed = options.describe(cls)
    cls_options = options.options_class(cls)
    assert [o.name for o in listed] == ([f.name for f in dataclasses.fields(cls_options)] if cls_options else [])
    signature = inspect.signature(cls).parameters
    for o in listed:
        assert o.doc and o.type, f"{name}: option {o.name} has no docstring or no type"
        # The plug-in is made with its options as keyword arguments: its own defaults must agree.
        assert signature[o.name].default == o.default, f"{name}: {o.name}'s default differs from the constructor's"
    made = options.build(cls, {}, flag=FLAG[kind], what=f"{kind} {name!r}")
    assert made == {o.name: o.default for o in listed}
    cls(**made)


@pytest.mark.parametrize("kind, name, registry", PLUGINS, ids=IDS)
def test_an_unknown_option_is_named_with_the_known_ones(kind, name, registry):
    cls = registry.resolve(name)
    known = [o.name for o in options.describe(cls)]
    with pytest.raises(ConfigError) as caught:
        options.build(cls, {"no_such_option": "1"}, flag=FLAG[kind], what=f"{kind} {name!r}")
    assert caught.value.message.startswith(f"{FLAG[kind]} no_such_option")
    if known:
        assert caught.value.message.endswith("known: " + ", ".join(known))
    else:
        assert "takes no options" in caught.value.message


@pytest.mark.parametrize("kind, name, registry", PLUGINS, ids=IDS)
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(kind, name, registry):
    cls = registry.resolve(name)
    for o in options.describe(cls):
        wrong = next((v for t, v in WRONG.items() if o.type.startswith(t)), None)
        if wrong is None:
            continue
        with pytest.raises(ConfigError, match=rf"{FLAG[kind]} {o.name}={wrong}: expected {o.type.split(' or ')[0]}"):
            options.build(cls, {o.name: wrong}, flag=FLAG[kind], what=f"{kind} {name!r}")


def test_values_convert_from_the_command_line_and_the_plugin_checks_them():
    gradual = schedules.REGISTRY.resolve("gradual")
    assert options.build(gradual, {"steps": "3", "span": "0.5"}, flag="--schedule-opt", what="gradual") == \
        {"steps": 3, "span": 0.5}
    assert options.build(schedules.REGISTRY.resolve("ocs"), {"check_every": "none"}, flag="--schedule-opt",
                         what="ocs")["check_every"] is None
    with pytest.raises(ConfigError, match=r"--schedule-opt: gradual: steps must be at least 1, got 0"):
        options.build(gradual, {"steps": 0}, flag="--schedule-opt", what="gradual")
    with pytest.raises(ConfigError, match=r"expected an integer"):
        options.build(gradual, {"steps": True}, flag="--schedule-opt", what="gradual")  # JSON true is no count


def test_the_config_validates_plugin_options_through_the_plugin():
    with pytest.raises(ConfigError, match=r"--schedule-opt stepz: schedule 'gradual' has no such option; known: steps, span"):
        _config(schedule="gradual", schedule_options={"stepz": 3})
    with pytest.raises(ConfigError, match=r"--criterion-opt temperature=hot: expected a number"):
        _config(criterion="ocs-saliency-flops", criterion_options={"temperature": "hot"})
    with pytest.raises(ConfigError, match=r"criterion 'l2' takes no options"):
        _config(criterion_options={"seed": 1})
    assert _config(criterion="random", criterion_options={"seed": "7"}).criterion_options == {"seed": "7"}


def test_the_shorthand_flags_set_the_built_in_schedules_options():
    assert schedules.get_schedule("gradual", _config(schedule="gradual")).steps == 4
    assert schedules.get_schedule("gradual", _config(schedule="gradual", prune_steps=3)).steps == 3
    assert schedules.get_schedule("gradual", _config(schedule="gradual", schedule_options={"steps": "2"})).steps == 2
    ocs = schedules.get_schedule("ocs", _config(schedule="ocs", stability_threshold=0.9, ocs_decay=0.5, check_every=7))
    assert (ocs.threshold, ocs.decay, ocs.check_every, ocs.span) == (0.9, 0.5, 7, 0.3)
    cyclical = schedules.get_schedule("cyclical", _config(schedule="cyclical", cycles=2, schedule_span=0.5))
    assert (cyclical.cycles, cyclical.span) == (2, 0.5)
    with pytest.raises(ConfigError, match=r"--schedule-opt steps and --prune-steps both set"):
        _config(schedule="gradual", prune_steps=3, schedule_options={"steps": 2})


def test_criterion_options_reach_the_criterion():
    assert criteria.get_criterion("ocs-saliency-flops", {"temperature": "0.5"}).temperature == 0.5
    a, b = (criteria.get_criterion("random", {"seed": s}) for s in ("1", "2"))
    assert a._generator.initial_seed() == 1 and b._generator.initial_seed() == 2


def test_option_pairs_are_read_strictly():
    assert options.parse_pairs(["steps=3", "span = 0.5"], flag="--schedule-opt") == {"steps": "3", "span": "0.5"}
    with pytest.raises(ConfigError, match="--schedule-opt takes KEY=VALUE, got 'steps'"):
        options.parse_pairs(["steps"], flag="--schedule-opt")
    with pytest.raises(ConfigError, match="--schedule-opt steps is given twice"):
        options.parse_pairs(["steps=3", "steps=4"], flag="--schedule-opt")


@pytest.mark.parametrize("command, registry", [("schedules", schedules.REGISTRY), ("criteria", criteria.REGISTRY)])
def test_the_toolbox_lists_every_option_with_its_default(command, registry):
    listing = CliRunner().invoke(toolbox, [command], env={"COLUMNS": "400"})
    assert listing.exit_code == 0, listing.output
    text = " ".join(listing.stdout.split())
    for info in registry.available():
        for o in options.describe(registry.resolve(info.name)):
            assert f"{o.name}={o.default} ({o.type}" in text
            assert " ".join(o.doc.split()[:4]) in text


def test_the_service_takes_plugin_options_as_json_objects_validated_by_the_plugin():
    pytest.importorskip("fastapi")
    from compressor.service.app import check_options
    from compressor.service.errors import BadOptions

    good = {"arch": "resnet20", "target_flops": 0.5, "schedule": "gradual", "schedule_options": {"steps": 3},
            "criterion": "random", "criterion_options": {"seed": 1}}
    assert check_options(good, ()) == good
    with pytest.raises(BadOptions) as caught:
        check_options(dict(good, schedule_options={"steps": "x"}, criterion_options=[1], epochs={"n": 1}), ())
    assert caught.value.errors == {
        "schedule_options": "--schedule-opt steps=x: expected an integer",
        "criterion_options": "must be a JSON object of the plug-in's options",
        "epochs": "must be a number, string, boolean, list or null"}

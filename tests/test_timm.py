"""timm's zoo: the smallest model of each architecture family through trace -> score -> prune to half the
FLOPs -> ONNX -> onnxruntime parity, or one of our typed refusals naming a layer or construct.

The families and their smallest models come from ``timm.list_models()`` at collection time
(``bench/timm_families.py``, shared with ``bench/timm_matrix.py``, whose table this file's
expectations were read from); random weights, 10 classes, the smallest input each model accepts.
Every family is either in :data:`EXPECTED` (with the outcome it must have: a regression either way
fails) or in :data:`NOT_RUN` with the reason, so a family a new timm adds fails until it is placed.
The selection is cached per timm version in pytest's cache (counting candidates' parameters on the
meta device takes about a minute).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import timm

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.timm_families import families, select  # noqa: E402
from bench.timm_matrix import run_family  # noqa: E402

PASS = "pass"
_FLOOR = ("TargetUnreachableError", r"smallest reachable ratio is 0\.\d+ .*left unpruned: [\w.]+ \(")
"""A floor above 0.5 that names the layers it leaves unpruned, each with why."""
EXPECTED: dict[str, str | tuple[str, str]] = {
    "byobnet": PASS,
    "coat": _FLOOR,
    "convit": _FLOOR,
    "convmixer": PASS,
    "convnext": PASS,
    "cpubone": PASS,
    "crossvit": _FLOOR,
    "cspnet": PASS,
    "cspnext": PASS,
    "deit": PASS,
    "dla": PASS,
    "edgenext": PASS,
    "efficientnet": PASS,
    "efficientvit_mit": PASS,
    "eva": ("TargetUnreachableError", r"nothing in the model can be pruned without breaking it: blocks\.\d+\.mlp\.fc2: "),
    "fastvit": PASS,
    "fasternet": PASS,
    "gcvit": ("TargetUnreachableError", r"nothing in the model can be pruned without breaking it: [\w.]+: "),
    "hardcorenas": PASS,
    "hgnet": PASS,
    "inception_next": PASS,
    "lcnetv2": PASS,
    "mambaout": ("GraphError", r"scoring the group of '[\w.]+' failed: .* through [\w.]+"),
    "hrnet": PASS,
    "levit": PASS,
    "maxxvit": PASS,
    "metaformer": PASS,
    "mlp_mixer": _FLOOR,
    "mobilenetv3": PASS,
    "mobilevit": PASS,
    "nfnet": PASS,
    "pvt_v2": PASS,
    "regnet": PASS,
    "resnet": PASS,
    "senet": PASS,
    "swin_transformer": _FLOOR,
    "tiny_vit": PASS,
    "vision_transformer": PASS,
    "vovnet": PASS,
    "xcit": _FLOOR,
}
SLOW = {"coat", "convit", "convmixer", "crossvit", "deit", "efficientvit_mit", "fastvit", "hrnet", "levit", "metaformer",
        "mlp_mixer", "mobilevit", "pvt_v2", "swin_transformer", "tiny_vit", "xcit"}
"""Families whose case took more than about 8 s on the shared two-core machine (marked slow; they still run
in ``make test``). The whole matrix took about 5 minutes of CPU there (``-n 0``)."""
_OVER_BUDGET = "passes in bench/timm_matrix.py, over the suite's time budget here"
NOT_RUN: dict[str, str] = {
}
"""Families left out of the suite, with why (``bench/timm_matrix.py`` runs every family)."""

_CACHE_KEY = f"compressor/timm_families/{timm.__version__}"


def _selection(config: pytest.Config) -> dict[str, str]:
    """family -> its smallest model, from pytest's cache where this timm version's selection is stored."""
    cache = getattr(config, "cache", None)
    stored = cache.get(_CACHE_KEY, None) if cache is not None else None
    if stored is None or set(stored) != set(EXPECTED):
        stored = {f.module: f.model for f in select(sorted(EXPECTED))}
        if cache is not None:
            cache.set(_CACHE_KEY, stored)
    return stored


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "timm_family" not in metafunc.fixturenames:
        return
    chosen = _selection(metafunc.config)
    params = [pytest.param(family, model, id=family, marks=[pytest.mark.slow] if family in SLOW else [])
              for family, model in sorted(chosen.items()) if family in EXPECTED]
    metafunc.parametrize(("timm_family", "timm_model"), params)


def test_every_timm_family_is_placed():
    """A family is either expected to pass, expected to be refused with a named reason, or left out with one."""
    found = set(families())
    assert not set(EXPECTED) & set(NOT_RUN)
    assert found - set(EXPECTED) - set(NOT_RUN) == set(), "new timm families: add them to EXPECTED or NOT_RUN"
    assert set(EXPECTED) | set(NOT_RUN) <= found, "families timm no longer has"
    assert len(EXPECTED) >= 30


def test_timm_family(timm_family: str, timm_model: str, record_property):
    record = run_family(timm_model)
    for key in ("input", "achieved_ratio", "max_abs_diff", "outcome", "error"):
        if key in record:
            record_property(key, record[key])  # the matrix's table, with --junitxml
    expected = EXPECTED[timm_family]
    assert record["outcome"] != "crash", f"{timm_model}: {record['error']} at {record.get('where')}"
    assert record["outcome"] != "no-input", f"{timm_model}: no input size fits ({record['error']})"
    if expected == PASS:
        assert record["outcome"] == PASS, f"{timm_model}: {record.get('error') or record}"
        assert 0.495 <= record["achieved_ratio"] <= 0.5
        assert record["max_abs_diff"] <= 1e-3 * record["max_abs_logit"]
    else:
        kind, pattern = expected
        assert record["outcome"] == "refused", f"{timm_model} was expected to be refused, got {record['outcome']}"
        assert record["error"].startswith(f"{kind}: "), record["error"]
        assert re.search(pattern, record["error"]), record["error"]

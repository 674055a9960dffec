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
    "coat": PASS,
    "convit": PASS,
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
    "ghostnet": PASS,
    "hgnet": PASS,
    "inception_next": PASS,
    "lcnetv2": PASS,
    "mambaout": PASS,
    "hrnet": PASS,
    "levit": PASS,
    "maxxvit": PASS,
    "metaformer": PASS,
    "mlp_mixer": PASS,
    "mobilenetv3": PASS,
    "mobilevit": PASS,
    "nfnet": PASS,
    "pvt_v2": PASS,
    "regnet": PASS,
    "resnet": PASS,
    "senet": PASS,
    "sknet": PASS,
    "swin_transformer": PASS,
    "tiny_vit": PASS,
    "vision_transformer": PASS,
    "vovnet": PASS,
    "xcit": PASS,
}
SLOW = {"coat", "ghostnet", "convit", "gcvit", "convmixer", "crossvit", "deit", "efficientvit_mit", "fastvit", "hrnet", "levit", "metaformer",
        "mlp_mixer", "mobilevit", "pvt_v2", "swin_transformer", "tiny_vit", "xcit"}
"""Families whose case took more than about 8 s on the shared two-core machine (marked slow; they still run
in ``make test``). The whole matrix took about 5 minutes of CPU there (``-n 0``)."""
_OVER_BUDGET = "passes in bench/timm_matrix.py, over the suite's time budget here"
NOT_RUN: dict[str, str] = {
    "beit": _OVER_BUDGET + " (beit_base_patch16_224, 25 s)",
    "byoanet": _OVER_BUDGET + " (halonet_h1 at 256 px: 90 s, its nn.Unfold through the dynamo exporter)",
    "cait": _OVER_BUDGET + " (cait_xxs24_224, 99 s)",
    "csatv2": _OVER_BUDGET + " (csatv2, 41 s)",
    "davit": "refused in bench/timm_matrix.py (davit_tiny): TargetUnreachableError: --target-flops 0.5 is unreachable: the smallest reachable ratio is 0.855 (at most 75% of each group'",
    "deepseek_vit": "a vision-language encoder of 90M-400M parameters; not run (bench/timm_matrix.py --families deepseek_vit runs it)",
    "densenet": _OVER_BUDGET + " (densenet121, 44 s)",
    "dpn": _OVER_BUDGET + " (dpn48b, 13 s)",
    "efficientformer": _OVER_BUDGET + " (efficientformer_l1, 16 s)",
    "efficientformer_v2": _OVER_BUDGET + " (efficientformerv2_s0, 27 s)",
    "efficientvim": "refused in bench/timm_matrix.py (efficientvim_m1): TargetUnreachableError: --target-flops 0.5 is unreachable: the smallest reachable ratio is 0.731 (at most 90% of each g",
    "efficientvit_msra": _OVER_BUDGET + " (efficientvit_m0, 112 s)",
    "focalnet": _OVER_BUDGET + " (focalnet_tiny_srf, 59 s)",
    "gemma4_vit": "a vision-language encoder of 90M-400M parameters; not run (bench/timm_matrix.py --families gemma4_vit runs it)",
    "hiera": _OVER_BUDGET + " (hiera_tiny_224, 54 s)",
    "hieradet_sam2": _OVER_BUDGET + " (sam2_hiera_tiny, 66 s)",
    "iformer": _OVER_BUDGET + " (iformer_t, 48 s)",
    "inception_resnet_v2": _OVER_BUDGET + " (inception_resnet_v2, 72 s)",
    "inception_v3": _OVER_BUDGET + " (inception_v3, 23 s)",
    "inception_v4": _OVER_BUDGET + " (inception_v4, 38 s)",
    "lowformer": _OVER_BUDGET + " (lowformer_b0, 17 s)",
    "mobilenetv5": "a vision-language encoder of 90M-400M parameters; not run (bench/timm_matrix.py --families mobilenetv5 runs it)",
    "mvitv2": _OVER_BUDGET + " (mvitv2_tiny, 33 s)",
    "naflexvit": "a vision-language encoder of 90M-400M parameters; not run (passes in bench/timm_matrix.py: 48 s)",
    "nasnet": _OVER_BUDGET + " (nasnetalarge, 89 s)",
    "nest": "refused in bench/timm_matrix.py (nest_tiny): TargetUnreachableError: --target-flops 0.5 is unreachable: the smallest reachable ratio is 0.521 (at most 90% of each group's",
    "nextvit": _OVER_BUDGET + " (nextvit_small, 30 s)",
    "pit": _OVER_BUDGET + " (pit_xs_224, 22 s)",
    "pnasnet": _OVER_BUDGET + " (pnasnet5large, 65 s)",
    "qwen3_vit": "a vision-language encoder of 90M-400M parameters; not run (bench/timm_matrix.py --families qwen3_vit runs it)",
    "rdnet": _OVER_BUDGET + " (rdnet_tiny, 27 s)",
    "repghost": _OVER_BUDGET + " (repghostnet_050, 17 s)",
    "repvit": _OVER_BUDGET + " (repvit_m1, 16 s)",
    "res2net": _OVER_BUDGET + " (res2next50, 18 s)",
    "resnest": _OVER_BUDGET + " (resnest14d, 35 s)",
    "resnetv2": _OVER_BUDGET + " (resnetv2_18, 9 s)",
    "rexnet": _OVER_BUDGET + " (rexnet_100, 24 s)",
    "selecsls": _OVER_BUDGET + " (selecsls42, 19 s)",
    "sequencer": _OVER_BUDGET + " (sequencer2d_s, 28 s)",
    "shvit": _OVER_BUDGET + " (shvit_s1, 20 s)",
    "starnet": _OVER_BUDGET + " (starnet_s1, 11 s)",
    "swiftformer": _OVER_BUDGET + " (swiftformer_xs, 18 s)",
    "swin_transformer_v2": _OVER_BUDGET + " (swinv2_tiny_window16_256, 23 s)",
    "swin_transformer_v2_cr": _OVER_BUDGET + " (swinv2_cr_tiny_224, 58 s)",
    "tnt": _OVER_BUDGET + " (tnt_s_legacy_patch16_224, 133 s)",
    "tresnet": _OVER_BUDGET + " (tresnet_m, 29 s)",
    "twins": "refused in bench/timm_matrix.py (twins_svt_small): TargetUnreachableError: --target-flops 0.5 is unreachable: the smallest reachable ratio is 0.811 (at most 90% of each g",
    "vgg": _OVER_BUDGET + " (vgg11, 45 s)",
    "visformer": _OVER_BUDGET + " (visformer_tiny, 57 s)",
    "vision_transformer_hybrid": _OVER_BUDGET + " (vit_tiny_r_s16_p8_224, 21 s)",
    "vision_transformer_relpos": "refused in bench/timm_matrix.py (test_vit_relpos): TargetUnreachableError: --target-flops 0.5 is unreachable: the smallest reachable ratio is 0.587 (at most 90% of each g",
    "vision_transformer_sam": _OVER_BUDGET + " (samvit_base_patch16_224, 41 s)",
    "vitamin": _OVER_BUDGET + " (vitamin_small_224, 33 s)",
    "volo": _OVER_BUDGET + " (volo_d1_224: 36 s, its nn.Fold through the dynamo exporter)",
    "xception": _OVER_BUDGET + " (legacy_xception, 16 s)",
    "xception_aligned": _OVER_BUDGET + " (xception41p, 17 s)",
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

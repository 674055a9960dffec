"""The search's probes (a bare copy cut by each group's cached walk, `prune.apply.probe_copy`) against
probes pruned by the graph (`pruned_copy`): the same search on one timm model, both ways, in one process;
prints each way's seconds, achieved ratio, probes and unsafe groups, and SAME or DIFF for the plans.

    python bench/probe_check.py nasnetalarge 32

Results: bench/results/probe_copy.txt (random weights, random scores seeded per group, target 0.5,
cap 0.75, round_to 16; the input size the timm matrix uses).
"""
import importlib
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compressor import graph as G  # noqa: E402
from compressor.prune.apply import pruned_copy  # noqa: E402

search = importlib.import_module("compressor.prune.search")  # the module (compressor.prune.search is the function)
screen = importlib.import_module("compressor.prune.screen")
torch.set_num_threads(2)
name, size = sys.argv[1], int(sys.argv[2])
try:
    m = timm.create_model(name, pretrained=False, num_classes=10, img_size=size).eval()
except TypeError:
    m = timm.create_model(name, pretrained=False, num_classes=10).eval()
x = torch.randn(1, 3, size, size)
g = G.trace(m, x)
scores = [torch.rand(s.units, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(g.groups)]
res = {}
for mode in ("fast", "slow"):
    if mode == "slow":  # every probe, and the screen's, pruned by the graph
        search.probe_copy = screen.probe_copy = pruned_copy
    t = time.perf_counter()
    try:
        model, r = search.search(g, scores, target_ratio=0.5, max_prune_fraction=0.75, round_to=16)
        res[mode] = (r.plan, round(r.achieved_ratio, 5), r.probes, sorted(r.unsafe))
    except Exception as e:
        res[mode] = ("ERR", type(e).__name__, str(e)[:200])
    print(mode, round(time.perf_counter() - t, 1), res[mode][1:], flush=True)
print(name, "SAME" if res["fast"] == res["slow"] else "DIFF")

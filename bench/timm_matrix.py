"""timm's zoo through our stages: the smallest model of each family, random weights, a small input.

Each family runs in its own process with a limit of CPU time: build (the smallest input size the model
accepts) -> trace -> score (L2) -> search to half the FLOPs (at
the per-group cap ``compress`` uses by default: 0.75, raised as far as 0.9 where half the FLOPs needs it) -> export ONNX -> onnxruntime parity, as
``tests/test_torchvision.py`` does. The outcome is ``pass``, ``refused`` (one of our typed errors, its
message), ``crash`` (any other exception: its type, message and the frame that raised it), ``timeout``
or ``no-input`` (no size in ``timm_families.SIZES`` gives (1, 10) logits: not an image classifier as
built). Results go to ``bench/results/timm_matrix.json``, one record per family.

    nice -n 19 python bench/timm_matrix.py [--families resnet,vgg] [--limit 240] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET = 0.5


def run_family(model_name: str, *, checkpoint=None) -> dict:
    """One model through the stages; the record of how far it got. ``checkpoint(record)`` is called
    as each stage starts (the parent reads the last one if the time limit stops the process)."""
    import numpy as np
    import torch

    from bench.timm_families import build
    from compressor import criteria, graph, pruning
    from compressor.errors import CompressorError, one_line
    from compressor.export import INPUT_NAME, export_onnx
    from compressor.validate import open_session

    record: dict = {"model": model_name, "seconds": {}}
    stage = "build"
    start = time.perf_counter()

    def done(name: str, following: str) -> None:
        nonlocal start, stage
        record["seconds"][name] = round(time.perf_counter() - start, 2)
        start, stage = time.perf_counter(), following
        if checkpoint is not None:
            checkpoint(record | {"stage": stage})

    try:
        try:
            model, example, kwargs = build(model_name)
        except Exception as exc:  # no size fits: the model is not an image classifier as we build it
            record.update(outcome="no-input", error=one_line(exc, 300))
            return record
        record["input"] = kwargs.pop("input")
        record["kwargs"] = kwargs
        done("build", "head")
        # Untrained heads can be all zeros: random ones make the logits worth comparing.
        head = graph.find_classifier(model, example)
        if head is not None:
            torch.nn.init.normal_(model.get_submodule(head).weight, std=0.5)
        batch = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
        done("head", "trace")
        coupling = graph.trace(model, example)
        record.update(groups=len(coupling.groups), protected=len(coupling.protected))
        done("trace", "score")
        scores = pruning.score_groups(coupling, criteria.get_criterion("l2"))
        done("score", "search")
        # The cap as compress picks it without --max-prune-per-group: 0.75, raised only as far as 0.5 needs.
        floor = pruning.capped_floor(coupling, TARGET, caps=pruning.AUTO_CAPS, scores=scores)
        record["cap"] = floor.max_prune_fraction
        pruned, result = pruning.search(coupling, scores, target_ratio=TARGET, max_prune_fraction=floor.max_prune_fraction,
                                        known_floor=floor)
        record.update(achieved_ratio=round(result.achieved_ratio, 4), floor=round(result.min_reachable_ratio, 4),
                      probes=result.probes, unsafe=result.unsafe_groups)
        done("search", "export")
        with torch.no_grad():
            reference = pruned(batch).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(pruned, path, example_input=example, metadata={"arch": model_name})
            done("export", "parity")
            out = open_session(path, device="cpu").run(None, {INPUT_NAME: batch.numpy()})[0]
        diff = float(np.abs(out - reference).max())
        scale = float(np.abs(reference).max())
        record.update(max_abs_diff=diff, max_abs_logit=scale)
        done("parity", "done")
        within = 0.5 * (1 - pruning.TOLERANCE) <= result.achieved_ratio <= 0.5
        ok = diff <= 1e-3 * max(scale, 1e-12)
        record["outcome"] = "pass" if within and ok else "mismatch"
    except CompressorError as exc:
        record.update(outcome="refused", stage=stage, error=f"{type(exc).__name__}: {exc}", hint=exc.hint)
    except Exception as exc:  # what the matrix is looking for: anything that is not ours
        frames = traceback.extract_tb(exc.__traceback__)
        record.update(outcome="crash", stage=stage, error=one_line(exc, 300),
                      where=[f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:]])
    return record


def _child(model_name: str, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    partial = out.with_suffix(".partial")
    record = run_family(model_name, checkpoint=lambda r: partial.write_text(json.dumps(r)))
    out.write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", help="comma-separated family names (default: all)")
    parser.add_argument("--limit", type=float, default=240, help="CPU seconds per family")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/timm_matrix.json")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]))
        return

    from bench.timm_families import select

    only = args.families.split(",") if args.families else None
    previous = {r["family"]: r for r in json.loads(args.out.read_text())} if args.out.exists() else {}
    chosen = select(only)
    print(f"{len(chosen)} families", flush=True)
    for family in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            t0 = time.perf_counter()
            try:
                # The limit is CPU seconds (the machine is shared: wall time says little); wall time
                # stops a process that waits instead of computing.
                child = subprocess.run([sys.executable, __file__, "--child", family.model, str(out)],
                                       timeout=4 * args.limit, check=False, cwd=ROOT, text=True,
                                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CPU, (int(args.limit),) * 2),
                                       env=os.environ | {"PYTHONWARNINGS": "ignore"},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                if out.exists():
                    record = json.loads(out.read_text())
                elif child.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
                    raise subprocess.TimeoutExpired(child.args, args.limit)
                else:
                    record = {"model": family.model, "outcome": "crash",
                              "error": f"the process died ({child.returncode}): {child.stderr.strip()[-300:]}"}
            except subprocess.TimeoutExpired:
                partial = out.with_suffix(".partial")
                record = json.loads(partial.read_text()) if partial.exists() else {"model": family.model}
                record.update(outcome="timeout", error=f"over {args.limit:g} CPU s in stage {record.get('stage', 'build')}")
        record = {"family": family.module, "params": family.params, **record,
                  "total_seconds": round(time.perf_counter() - t0, 1)}
        previous[family.module] = record
        print(f"{family.module:28s} {family.model:32s} {record['outcome']:9s} {record.get('achieved_ratio', '')} "
              f"{record['total_seconds']}s {record.get('error', '')[:150]}", flush=True)
        args.out.write_text(json.dumps([previous[k] for k in sorted(previous)], indent=1) + "\n")


if __name__ == "__main__":
    main()

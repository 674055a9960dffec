"""Accuracy of a run's ONNX models on the Fashion-MNIST test images that the demo never used.

The demo data (`make_demo_data.py`) takes the first N images per class of the benchmark test split;
the rest of that split was seen neither when the demo model was trained nor when it was compressed,
so it checks the demo's figures (chosen on the demo's own validation split) without bias.

    python bench/eval_heldout.py runs/demo --per-class 400
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fmnist import load_split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a compress output directory")
    p.add_argument("--per-class", type=int, default=400, help="images per class the demo data took")
    args = p.parse_args()

    import onnx
    import onnxruntime as ort

    _, _, x, y = load_split()
    keep = np.concatenate([np.flatnonzero(y == c)[args.per_class :] for c in range(10)])
    meta = {e.key: e.value for e in onnx.load(args.run / "model.onnx").metadata_props}
    mean, std = np.array(json.loads(meta["mean"])), np.array(json.loads(meta["std"]))
    images = ((x[keep].astype(np.float32) / 255.0 - mean[0]) / std[0])[:, None].astype(np.float32)
    result = {"images": int(len(keep))}
    for name in ("original", "model"):
        session = ort.InferenceSession(str(args.run / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        logits = np.concatenate([session.run(None, {"input": images[i : i + 500]})[0] for i in range(0, len(images), 500)])
        result[name] = float((logits.argmax(1) == y[keep]).mean())
    result["difference_points"] = (result["model"] - result["original"]) * 100
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

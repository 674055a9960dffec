"""The demo run (--epochs 0, CPU) through the Python API: stage seconds, process CPU seconds, probes.

    python bench/pipeline_demo_cpu.py OUT_DIR

Used for BENCHMARKS.md, "One pipeline (issue 12)"; put another tree first on PYTHONPATH to time it.
"""

import sys
import time
from pathlib import Path

import compressor
from compressor import CompressConfig, compress

ROOT = Path(__file__).resolve().parent.parent
config = CompressConfig(model_path=ROOT / "models/demo/resnet20_fmnist.pt", arch="resnet20",
                        data_path=ROOT / "models/demo/fmnist_sample.npz", mean=(0.2860,), std=(0.3530,),
                        target_flops=0.5, epochs=0, device="cpu", out_dir=Path(sys.argv[1]), overwrite=True)
start = time.process_time()
result = compress(config)
print(compressor.__file__, result.stage_seconds, "cpu", round(time.process_time() - start, 1),
      "probes", result.prune.probes, result.prune.achieved_ratio)

"""Seconds per function in one `compress` run of torchvision's ResNet-50 at 224 px (bench/cost.py's model
and data, no fine-tuning, default latency runs): where the time outside fine-tuning goes.

    python bench/stage_breakdown.py

Prints the stage times, then each wrapped function's calls and seconds (nested calls count in both),
then each latency batch's rounds and compressed/original time ratio.
"""
import functools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from bench import cost  # noqa: E402
from bench.fmnist import MEAN, STD  # noqa: E402
from compressor import CompressConfig, compress, flops, pipeline, pruning, schedules, validate  # noqa: E402
torch.set_num_threads(2)
T = {}
def timed(mod, name, label=None, *, key=None):
    f = getattr(mod, name); label = label or f"{mod.__name__.split('.')[-1]}.{name}"
    @functools.wraps(f)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); dt = time.perf_counter() - t
        lab = label + (f"[{key(a, k)}]" if key else "")
        c, s = T.get(lab, (0, 0)); T[lab] = (c + 1, s + dt); return r
    setattr(mod, name, g)
timed(validate, "run_all"); timed(validate, "latency", key=lambda a, k: k.get("batch"))
timed(pipeline.profile, "layer_profile"); timed(pipeline, "resolve")
timed(pipeline.ft, "accuracy", "pipeline.accuracy"); timed(pipeline.ft, "predict", "pipeline.predict")
timed(schedules, "accuracy", "schedules.accuracy"); timed(schedules, "recalibrate_bn"); timed(schedules, "after_prune")
timed(pruning, "search"); timed(flops, "measure"); timed(pipeline, "export_onnx")
timed(schedules.Run, "__init__", "Run.__init__"); timed(schedules.Run, "start", "Run.start")
tmp = Path(tempfile.mkdtemp())
model_path, data_path = cost._prepare("tv_resnet50", tmp)
config = CompressConfig(model_path=model_path, data_path=data_path, arch="torchvision.models:resnet50", target_flops=0.5,
                        epochs=0, batch_size=16, device="cpu", mean=(MEAN,) * 3, std=(STD,) * 3, out_dir=tmp / "out", overwrite=True)
t0 = time.perf_counter()
r = compress(config)
print("total", round(time.perf_counter() - t0, 1), {k: round(v, 1) for k, v in r.stage_seconds.items()})
for k, (c, s) in sorted(T.items(), key=lambda kv: -kv[1][1]):
    print(f"  {k:32s} x{c:<3d} {s:6.1f}")
lat = r.validation.latency
print([(l.batch, l.runs, round(l.compressed_ms / l.original_ms, 3)) for l in lat])

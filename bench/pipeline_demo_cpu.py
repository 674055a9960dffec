import sys, time, resource
from pathlib import Path
import compressor
from compressor import CompressConfig, compress
root = Path("/work/wt-i12a")
c = CompressConfig(model_path=root/"models/demo/resnet20_fmnist.pt", arch="resnet20", data_path=root/"models/demo/fmnist_sample.npz",
                   mean=(0.2860,), std=(0.3530,), target_flops=0.5, epochs=0, device="cpu", out_dir=Path(sys.argv[1]), overwrite=True)
t = time.process_time()
r = compress(c)
print(compressor.__file__, r.stage_seconds, "cpu", round(time.process_time() - t, 1), "probes", r.prune.probes, r.prune.achieved_ratio)

"""What the plots and report.html cost: re-render them from a finished run's report.json, three times.

    python bench/plot_cost.py RUN_DIR

Prints the time of importing matplotlib (once per process) and of each ``write_visual_report``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(run: Path, repeats: int = 3) -> None:
    t0 = time.perf_counter()
    from compressor import plots  # noqa: F401 (imports matplotlib)
    from compressor.html_report import write_visual_report

    imported = time.perf_counter() - t0
    times, made = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            d = Path(tmp) / str(i)
            d.mkdir()
            shutil.copy(run / "report.json", d)
            shutil.copy(run / "report.md", d)
            t = time.perf_counter()
            write_visual_report(d)
            times.append(time.perf_counter() - t)
            made = sorted(p.stem for p in (d / "plots").glob("*.png"))
    print(f"{run}: {len(made)} plots ({', '.join(made)}); import of matplotlib {imported:.2f} s; "
          f"write_visual_report {', '.join(f'{x:.2f}' for x in times)} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""``compressor compare RUN_DIR...``: several runs' accuracy vs FLOPs and vs speed-up, as a figure and a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ._render import out, run_guarded


def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Output directories of `compress` runs (each with a report.json).")],
    out_file: Annotated[Path, typer.Option("--out", help="The figure: FILE.png, with FILE.svg and FILE.html next to it.")]
    = Path("compare.png"),
) -> None:
    """Compare runs: accuracy vs FLOPs ratio and vs speed-up (batch 1 and 64) on one figure, and a table."""

    def job():
        from compressor.compare import TABLE_HEADER, compare, table_rows

        result = compare(runs, out=out_file)
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
        for i, name in enumerate(TABLE_HEADER):  # a narrow terminal folds the figures rather than cut the names
            table.add_column(name, no_wrap=i == 0, overflow="fold")
        for row in table_rows(result.runs):
            table.add_row(*(Text(c) for c in row))  # run names are not markup
        out.print(table)
        out.print("Wrote " + ", ".join(str(p) for p in result.files), highlight=False, markup=False)

    run_guarded(job)

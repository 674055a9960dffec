"""Rendering for the command line: errors as one line, progress with rich, the before/after table."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBar, TextColumn, TimeElapsedColumn
from rich.table import Table

from compressor.progress import Progress

err = Console(stderr=True)
out = Console()


def literal(text: object) -> str:
    """User text (paths, names, messages quoting them) as markup that rich prints exactly as it is.

    Everything printed through a rich console is read as markup: ``[/x]`` in a path would raise and
    ``[best]`` would vanish. Every string that may hold user text goes through here, once, where it is
    rendered.
    """
    return escape(str(text))


try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[no-redef]


class _OneLineUsageErrors:
    """A usage error (an unknown option, ``--epochs 1.5``) as one ``error:`` line and exit code 2, like
    every other bad input, instead of click's four-line block."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        call = super().main  # type: ignore[misc]
        if not standalone_mode:
            return call(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = call(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            err.print(f"[bold red]error:[/] {literal(' '.join(exc.format_message().split()))}", highlight=False,
                      soft_wrap=True)
            command = getattr(getattr(exc, "ctx", None), "command_path", None)
            if command:
                err.print(f"[yellow]hint:[/] {literal(command)} --help lists the options", highlight=False)
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("aborted", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class OneLineCommand(_OneLineUsageErrors, TyperCommand):
    """A Typer command whose usage errors are one line."""


class OneLineGroup(_OneLineUsageErrors, TyperGroup):
    """A Typer group whose usage errors (its commands' too) are one line."""


def quiet_library_warnings() -> None:
    """Third-party deprecation chatter is not the user's business; our own warnings still show."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|torch_pruning|onnx|onnxruntime)(\.|$)")


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Call ``fn``; map our typed errors to one line on stderr and a non-zero exit code.

    ``COMPRESSOR_DEBUG=1`` shows the full traceback instead.
    """
    from compressor.errors import CompressorError
    from compressor.outputs import InterruptedAfterOutput

    try:
        return fn()
    except CompressorError as exc:
        if os.environ.get("COMPRESSOR_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] {literal(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(f"[yellow]hint:[/] {literal(exc.hint)}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except InterruptedAfterOutput as exc:
        # The output was already complete: the interrupt lost nothing, so the run succeeded.
        err.print(f"interrupted after the output was complete: {literal(exc.out)}/ holds every file",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        raise typer.Exit(130) from None


class RichProgress(Progress):
    """The library's progress events drawn with rich, on stderr."""

    def __init__(self, console: Console = err) -> None:
        self.console = console
        self.bar: RichBar | None = None
        self.task_id: Any = None
        self.description = ""

    def stage(self, name: str) -> None:
        self.console.print(f"[bold cyan]>[/] {literal(name)}", highlight=False)

    def task(self, description: str, total: int) -> None:
        self.done()
        self.description = description = literal(description)
        self.bar = RichBar(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(),
                           console=self.console, transient=False)
        self.bar.start()
        self.task_id = self.bar.add_task(description, total=total or None, metrics="")

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self.bar is not None:
            text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.bar.update(self.task_id, advance=n, metrics=text)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def heartbeat(self, what: str, *, seconds: float, rss: int | None) -> None:
        memory = f", RSS {rss / 2**30:.1f} GB" if rss is not None else ""
        self.console.print(f"  {literal(what)}… {seconds:.0f} s{memory}", highlight=False)

    def note(self, message: str) -> None:
        self.done()
        self.console.print(f"  {literal(message)}", highlight=False)


def before_after_table(rows: list[tuple[str, str, str, str]], title: str) -> Table:
    table = Table(title=literal(title), title_justify="left")
    for name, justify in (("", "left"), ("original", "right"), ("compressed", "right"), ("change", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        style = "bold red" if "SLOWER" in row[3] or "NOT FASTER" in row[3] else None
        table.add_row(*(literal(cell) for cell in row), style=style)
    return table


def alert_panel(messages: list[str]) -> Panel:
    """Speed problems in a red box: a compressed model that is not faster must not pass unnoticed."""
    return Panel("\n".join(f"[bold red]{literal(m)}[/]" for m in messages), title="[bold red]NOT FASTER[/]",
                 border_style="bold red", title_align="left")



@contextlib.contextmanager
def cancel_on_sigint() -> Iterator[threading.Event]:
    """A cancel token that the first Ctrl-C sets (the run stops at its next check with ``Cancelled``);
    a second Ctrl-C interrupts at once. Outside the main thread, the token only."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        err.print("cancelling at the next check (Ctrl-C again to interrupt at once)", highlight=False)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)

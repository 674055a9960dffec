"""``compressor``: the toolbox around the main job (criteria, models)."""

from __future__ import annotations


import typer
from rich.table import Table

from ._render import out, quiet_library_warnings, run_guarded

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Tools around `compress`: list criteria and models.")


@app.command("criteria")
def list_criteria() -> None:
    """List the registered pruning criteria: name, source distribution, what each needs."""
    quiet_library_warnings()

    def job():
        from compressor import criteria

        table = Table("name", "from", "needs", "description")
        for info in criteria.available_criteria():
            try:
                cls = criteria.resolve_criterion(info.name)
            except Exception:
                table.add_row(info.name, f"{info.distribution} {info.version}", "-", "[red]failed to import[/]")
                continue
            needs = ("per-sample gradients" if criteria.needs_per_sample_gradients(cls)
                     else "gradients" if criteria.needs_gradients(cls) else "weights")
            if criteria.needs_activations(cls):
                needs = "activations" if needs == "weights" else needs + ", activations"
            if criteria.needs_channel_costs(cls):
                needs += ", channel costs"
            doc = (cls.__doc__ or "").strip().splitlines()
            table.add_row(info.name, f"{info.distribution or '?'} {info.version or ''}".strip(), needs, doc[0] if doc else "")
        out.print(table)

    run_guarded(job)


@app.command("models")
def list_models() -> None:
    """List the architectures accepted by `compress --arch NAME`."""
    from compressor.models import list_models as names

    for name in names():
        out.print(name)


def main() -> None:
    app()

"""``compressor``: the toolbox around the main job (criteria, models, inspect)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ._render import OneLineGroup, RichProgress, literal, out, quiet_library_warnings, run_guarded

app = typer.Typer(cls=OneLineGroup, add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  rich_markup_mode=None,
                  help="Tools around `compress`: list criteria, schedules and models, inspect a model.")


@app.command("criteria")
def list_criteria() -> None:
    """List the registered pruning criteria: name, source distribution, what each needs."""
    quiet_library_warnings()

    def job():
        from compressor import criteria

        table = Table("name", "from", "needs", "description", "options (--criterion-opt KEY=VALUE)")
        for info in criteria.available_criteria():
            try:
                cls = criteria.resolve_criterion(info.name)
            except Exception:
                table.add_row(literal(info.name), literal(f"{info.distribution} {info.version}"), "-",
                              "[red]failed to import[/]", "-")
                continue
            needs = ("per-sample gradients" if criteria.needs_per_sample_gradients(cls)
                     else "gradients" if criteria.needs_gradients(cls) else "weights")
            if criteria.needs_activations(cls):
                needs = "activations" if needs == "weights" else needs + ", activations"
            if criteria.needs_channel_costs(cls):
                needs += ", channel costs"
            doc = (cls.__doc__ or "").strip().splitlines()
            table.add_row(literal(info.name), literal(f"{info.distribution or '?'} {info.version or ''}".strip()), needs,
                          literal(doc[0] if doc else ""), _options(cls))
        out.print(table)

    run_guarded(job)


@app.command("schedules")
def list_schedules() -> None:
    """List the registered pruning schedules: name, source distribution, what each does."""
    quiet_library_warnings()

    def job():
        from compressor import schedules

        table = Table("name", "from", "description", "options (--schedule-opt KEY=VALUE)")
        for info in schedules.available_schedules():
            try:
                cls = schedules.REGISTRY.resolve(info.name)
                doc = literal(" ".join((cls.__doc__ or "").strip().split(". ")[0].replace("``", "").split()))
                opts = _options(cls)
            except Exception:
                doc, opts = "[red]failed to import[/]", "-"
            table.add_row(literal(info.name), literal(f"{info.distribution or '?'} {info.version or ''}".strip()), doc,
                          opts)
        out.print(table)

    run_guarded(job)


def _options(cls: type) -> str:
    """A plug-in's options, one a line: ``key=default`` (type, shorthand flag): doc."""
    from compressor.options import describe

    lines = []
    for o in describe(cls):
        extra = o.type + (f"; or {o.shorthand}" if o.shorthand else "")
        lines.append(f"{o.name}={o.default} ({extra}): {o.doc}" if o.doc else f"{o.name}={o.default} ({extra})")
    return literal("\n".join(lines)) if lines else "-"


@app.command("inspect")
def inspect_command(
    model: Annotated[Path, typer.Argument(help="The model file, as for `compress`.")],
    arch: Annotated[Optional[str], typer.Option(help="Architecture of a state dict (see `compressor models`).")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Load a whole pickled module.")] = False,
    input_shape: Annotated[str, typer.Option(help="One input's shape C,H,W.")] = "3,32,32",
    max_prune_per_group: Annotated[Optional[float], typer.Option(
        help="Per-group cap, as for `compress` (default: 0.75, and the floor at 0.9, the most the default is raised to).")] = None,
    trace_timeout: Annotated[float, typer.Option(help="As for `compress` (0: no limit).")] = 600.0,
    trace_memory: Annotated[Optional[float], typer.Option(help="As for `compress` (0: no limit).")] = None,
    attention: Annotated[str, typer.Option(help="dims or heads: how attention is pruned, as for `compress`.")] = "dims",
) -> None:
    """Show what the pruner sees: FLOPs, coupled groups, protected layers, the groups left unpruned because
    pruning them breaks the model, and the smallest reachable FLOPs ratio."""
    quiet_library_warnings()

    def job():
        import torch

        from compressor.config import (check_attention_pruning, check_max_prune_per_group, check_trace_budgets,
                                       parse_input_shape)
        from compressor.loading import load_model
        from compressor.preflight import inspect_model
        from compressor.pruning import AUTO_CAPS, DEFAULT_CAP
        from compressor.watchdog import memory_budget

        # The same checks as compress's, all before the model is loaded.
        shape = parse_input_shape(input_shape)
        check_max_prune_per_group(max_prune_per_group)
        check_trace_budgets(trace_timeout, trace_memory)
        check_attention_pruning(attention)
        loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, image_size=shape[-1])
        report = inspect_model(loaded.model, torch.zeros(1, *shape), max_prune_fraction=max_prune_per_group,
                               timeout=trace_timeout or None, memory=memory_budget(trace_memory),
                               progress=RichProgress(), attention_pruning=attention)
        out.print(f"{literal(model.name)}: {report.macs / 1e6:.2f}M MACs, {report.params / 1e6:.3f}M parameters, "
                  f"{len(report.groups)} prunable groups", highlight=False)
        table = Table("group (root layer)", "channels", "units", "layers")
        for g in report.groups:
            table.add_row(literal(g.root), str(g.channels), f"{g.units} heads" if g.heads_of else str(g.units), str(g.layers))
        out.print(table)
        for name, why in report.protected.items():
            out.print(f"protected: {literal(name)}: {literal(why)}{report.held_share(name)}", highlight=False)
        how = ("whole heads pruned; head_dim stays" if report.attention_pruning == "heads"
               else "head dimensions pruned alike in every head; num_heads stays")
        for name in report.attention:
            heads, head_dim = report.heads[name]
            out.print(f"attention: {literal(name)}: {heads} heads of {head_dim} ({how})", highlight=False)
        if report.frozen:
            out.print(f"frozen parameters (pruned, not fine-tuned): {len(report.frozen)}", highlight=False)
        if report.unwrapped:
            out.print(f"unwrapped parameters: {literal(', '.join(report.unwrapped))}", highlight=False)
        for name, why in report.unsafe.items():
            out.print(f"left unpruned: {literal(name)}{report.held_share(name)}: pruning it breaks the model "
                      f"({literal(why)})", highlight=False)
        if report.min_reachable_ratio is not None:
            cap = max_prune_per_group or DEFAULT_CAP
            out.print(f"smallest reachable FLOPs ratio at --max-prune-per-group {cap:g}: "
                      f"{report.min_reachable_ratio:.3f}", highlight=False)
            if report.min_reachable_ratio_raised is not None:
                out.print(f"smallest reachable FLOPs ratio at {AUTO_CAPS[-1]:g}, the most `compress` raises the cap to "
                          f"where a target needs it: {report.min_reachable_ratio_raised:.3f}", highlight=False)
        else:
            out.print("nothing in this model can be pruned", highlight=False)

    run_guarded(job)


@app.command("models")
def list_models() -> None:
    """List the architectures accepted by `compress --arch NAME`."""
    from compressor.architectures import available_models as names

    for name in names():
        out.print(literal(name), highlight=False)


from ._compare import compare_command  # noqa: E402

app.command("compare")(compare_command)


from .service import register as _register_service  # noqa: E402

_register_service(app)


def main() -> None:
    app()

"""`nexus stages`: the registered NIWT stages, in the default pipeline's order, with what each reads and makes."""

import typer
from rich.console import Console
from rich.table import Table


def stages():
    """List the registered stages: default pipeline or optional, what each needs and produces, its method's source."""
    from .stages import DEFAULT_PIPELINE, stage_registry

    registry = stage_registry()
    order = list(DEFAULT_PIPELINE) + sorted(n for n in registry if n not in DEFAULT_PIPELINE)
    table = Table(title="registered stages (a recipe's `pipeline:` lists the ones to run)")
    for column in ("stage", "in the default pipeline", "needs", "produces", "options", "method"):
        table.add_column(column, no_wrap=column == "stage")
    for name in order:
        cls = registry[name]
        fields = len(cls.options_model.model_fields) if cls.options_model is not None else 0
        default = ("yes (optional)" if cls.optional else "yes") if name in DEFAULT_PIPELINE else "no (optional)"
        table.add_row(name, default, ", ".join(cls.requires) or "–",
                      ", ".join(cls.produces), f"stages.{name} ({fields} fields)" if fields else "–", cls.paper or "–")
    Console().print(table)
    raise typer.Exit(0)

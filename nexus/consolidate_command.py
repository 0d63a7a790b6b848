"""`nexus consolidate RECIPE`: the recipe's stage list, profile -> student build -> distill -> validate -> export by default (see `nexus.stages.pipeline`)."""

import typer
from rich.console import Console

from .errors import clean_errors
from .gate_exit import exit_if_gate_failed


def consolidate(
    recipe: str = typer.Argument(..., help="the recipe YAML (teachers, capabilities, student budget, stage options)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Run every stage after the teachers exist; a rerun reuses finished stages and resumes distillation."""
    from .stages.pipeline import run_consolidate
    from .conversion.recipe import load_recipe

    console = Console()
    with clean_errors():
        done = run_consolidate(load_recipe(recipe), console=console, show_progress=not quiet)
    report = done["report"]
    console.print(f"wrote {done['export']['path']} (report {report['path']})")
    exit_if_gate_failed(report.get("gate"))

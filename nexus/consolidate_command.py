"""`nexus consolidate RECIPE`: the recipe's stage list, profile -> student build -> distill -> validate -> export by default (see `nexus.stages.pipeline`)."""

from pathlib import Path

import typer
from rich.console import Console

from .errors import clean_errors
from .gate_exit import exit_if_gate_failed
from .interrupt_exit import resumable, resume_line


def consolidate(
    recipe: str = typer.Argument(..., help="the recipe YAML (teachers, capabilities, student budget, stage options)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Run every stage after the teachers exist; a rerun reuses finished stages and resumes distillation."""
    console = Console()
    console.print(f"nexus consolidate {recipe}: starting (importing torch and transformers)", highlight=False)
    resume = ["consolidate", str(Path(recipe).absolute())] + (["--quiet"] if quiet else [])
    with resumable(resume):
        from .conversion.recipe import load_recipe
        from .conversion.run_lock import run_lock
        from .stages.pipeline import run_consolidate
        from .training.rank_zero_first import rank_zero_first

        done = None
        with clean_errors(), rank_zero_first():  # several processes: rank 0 alone writes
            loaded = load_recipe(recipe)
            with run_lock(loaded.run_path, command=resume_line(resume)):
                done = run_consolidate(loaded, console=console, show_progress=not quiet)
        if done is None:  # a rank > 0 after training
            return
    report = done["report"]
    console.print(f"wrote {done['export']['path']} (report {report['path']})")
    exit_if_gate_failed(report.get("gate"))

"""`nexus demo`: the embedded default on bundled data (see `nexus.conversion.demo`)."""

import typer
from rich.console import Console

from .errors import clean_errors


def demo(
    out: str = typer.Option("runs", "--out", help="folder for the demo's run (OUT/demo) and its cached teachers"),
    teachers: str = typer.Option(None, "--teachers", help="where the specialist teachers are cached "
                                                          "(default OUT/demo-teachers)"),
    scale: str = typer.Option("full", "--scale", help="full, or test: tiny specialists and a few steps (seconds; "
                                                      "its numbers mean nothing)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Train three specialists, profile them, build and distil one multi-tower student, validate it, export it."""
    from .conversion.demo import run_demo

    with clean_errors():
        run_demo(out, teachers_dir=teachers, console=Console(), show_progress=not quiet, scale=scale)

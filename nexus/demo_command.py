"""`nexus demo`: the embedded default on bundled data (see `nexus.conversion.demo`)."""

import typer
from rich.console import Console

from .errors import clean_errors
from .gate_exit import exit_if_gate_failed


def demo(
    out: str = typer.Option("runs", "--out", help="folder for the demo's run (OUT/demo) and its cached teachers"),
    teachers: str = typer.Option(None, "--teachers", help="where the specialist teachers are cached "
                                                          "(default OUT/demo-teachers)"),
    scale: str = typer.Option("full", "--scale", help="full, or test: tiny specialists and a few steps (seconds; "
                                                      "its numbers mean nothing)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Train three specialists, profile them, build and distil one multi-tower student, validate it, export it.

    Exit codes as `nexus validate`: 0 = the gate passed, 2 = bad input, 3 = the gate failed (failing capabilities last).
    """
    from .conversion.demo import run_demo

    with clean_errors():
        summary = run_demo(out, teachers_dir=teachers, console=Console(), show_progress=not quiet, scale=scale)
    exit_if_gate_failed(summary["gate"])

"""`nexus demo`: the embedded default on bundled data (see `nexus.conversion.demo`)."""

from pathlib import Path

import typer
from rich.console import Console

from .errors import clean_errors
from .gate_exit import exit_if_gate_failed
from .interrupt_exit import resumable, resume_line


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
    console = Console()
    console.print("nexus demo: starting (importing torch and transformers)", highlight=False)
    resume = ["demo", "--out", str(Path(out).absolute()), "--scale", scale]
    resume += (["--teachers", str(Path(teachers).absolute())] if teachers else []) + (["--quiet"] if quiet else [])
    with resumable(resume), clean_errors():
        from .conversion.demo import run_demo
        from .conversion.run_lock import run_lock

        with run_lock(Path(out).resolve() / "demo", command=resume_line(resume)):
            summary = run_demo(out, teachers_dir=teachers, console=console, show_progress=not quiet, scale=scale)
    exit_if_gate_failed(summary["gate"])

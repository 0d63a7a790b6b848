"""`nexus demo`: the embedded default on bundled data (see `nexus.conversion.demo`)."""

import typer
from rich.console import Console

from .errors import clean_errors


def demo(
    out: str = typer.Option("runs", "--out", help="folder for the demo's run and its cached teachers"),
    teachers: str = typer.Option(None, "--teachers", help="where the specialist teachers are cached "
                                                          "(default OUT/demo-teachers)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Train three tiny specialists, import them losslessly, profile them (all on bundled data)."""
    from .conversion.demo import run_demo

    with clean_errors():
        run_demo(out, teachers_dir=teachers, console=Console(), show_progress=not quiet)

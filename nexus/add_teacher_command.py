"""`nexus add-teacher STUDENT_DIR RECIPE_FRAGMENT --out OUT [--replace]`: add one teacher's tower to a student,
training only that tower and the router, and prove that nothing else changed (`conversion.add_teacher`)."""

import typer
from rich.console import Console

from .errors import clean_errors


def add_teacher(
    student: str = typer.Argument(..., help="the NEXUS student folder (never modified)"),
    fragment: str = typer.Argument(..., help="the recipe fragment YAML: one teacher, its capabilities, options"),
    out: str = typer.Option(..., "--out", help="the new student folder (written all at once)"),
    replace: bool = typer.Option(False, "--replace", help="let the new teacher take over capabilities the student "
                                                          "already serves"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Profile the new teacher, build and distil its tower (everything else frozen), validate, export."""
    from .conversion.add_teacher import add_teacher as run
    from .conversion.no_regression import proof_lines

    console = Console(quiet=quiet)
    with clean_errors():
        report = run(student, fragment, out, replace=replace, overwrite=overwrite, console=console,
                     show_progress=not quiet)
    for line in proof_lines(report):
        typer.echo(line)
    typer.echo(f"wrote {report['path']}")

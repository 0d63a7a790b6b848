"""Expected user errors become one red line on stderr and exit code 2, not a traceback."""

import contextlib

import typer
from rich.console import Console

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError)


@contextlib.contextmanager
def clean_errors():
    try:
        yield
    except USER_ERRORS as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None

"""Expected user errors become one red line on stderr and exit code 2, not a traceback.

Library code raises ValueError / OSError subclasses naming the file and the field (the recipe, the load checks, the
safetensors header and config checks). What a third-party reader can still raise on a malformed file (safetensors'
``SafetensorError``, a YAML or JSON parser error, a decode error, a symlink loop's RuntimeError/RecursionError) is
caught here as a last resort and printed as one line too, with the file when the error carries one. A pydantic
``ValidationError`` (typed options and recipes) is joined into one line: model, field, rule, value.
"""

import contextlib

import typer
from rich.console import Console

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError)


def _library_errors():
    """Exception types of the readers NEXUS uses that mean "this file is malformed"."""
    found = [RecursionError]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        found.append(SafetensorError)
    with contextlib.suppress(ImportError):
        import yaml

        found.append(yaml.YAMLError)
    return tuple(found)


def _symlink_loop(exc):
    return isinstance(exc, RuntimeError) and "symlink loop" in str(exc).lower()


def _validation_line(exc):
    """A pydantic ``ValidationError`` (several lines: the model, then each field and its message) as one line:
    ``Model: field: message (got value); other: ...``; None for any other exception."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ != "ValidationError" or not callable(errors):
        return None
    parts = []
    for e in errors():
        where = ".".join(str(x) for x in e.get("loc", ())) or "input"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        parts.append(f"{where}: {e.get('msg', 'invalid')}{got}")
    return f"{getattr(exc, 'title', 'input')}: " + "; ".join(parts)


def one_line(exc) -> str:
    """``exc`` as the error line: its message (a library error also gets its type, and the file it carries)."""
    validation = _validation_line(exc)
    if validation is not None:
        return validation
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, USER_ERRORS) and not isinstance(exc, (UnicodeError,)):
        return text
    name = type(exc).__name__
    filename = getattr(exc, "filename", None)
    return f"{name}: {' '.join(text.split())}" + (f" ({filename})" if filename and str(filename) not in text else "")


def print_error(exc):
    """The red ``error:`` line on stderr, never wrapped (a pipe gets one line whatever its width)."""
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(one_line(exc))}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def clean_errors():
    try:
        yield
    except USER_ERRORS + _library_errors() as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    except RuntimeError as exc:
        if not _symlink_loop(exc):
            raise
        print_error(exc)
        raise typer.Exit(2) from None

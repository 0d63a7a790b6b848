"""`nexus remove-capability STUDENT_DIR NAME --out OUT`: a student without one capability (and, if its tower then
serves nothing, without that tower and its router class); every kept tensor bit-identical."""

import typer

from .errors import clean_errors


def remove_capability(
    student: str = typer.Argument(..., help="the NEXUS student folder (never modified)"),
    name: str = typer.Argument(..., help="the capability to remove"),
    out: str = typer.Option(..., "--out", help="the new student folder (written all at once)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
):
    """Drop a capability; an emptied tower and its router class go too. Writes OUT with remove_capability.json."""
    from .conversion.remove_capability import remove_capability as run

    with clean_errors():
        record = run(student, name, out, overwrite=overwrite)
    tower = record["tower"]
    typer.echo(f"removed capability {name!r} from tower {tower['name']!r}"
               + (f"; tower dropped, router: {record['router']}" if tower["dropped"] else "; the tower stays"))
    typer.echo(f"kept {len(record['kept_tensors'])} tensors, all bit-identical (sha256 in remove_capability.json); "
               f"towers now: {', '.join(record['towers_after'])}")
    typer.echo(f"wrote {record['path']}")

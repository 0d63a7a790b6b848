"""`nexus compress RECIPE`: prune a teacher into the student's initial tower under the recipe's budget."""

import typer
from rich.console import Console

from .errors import clean_errors


def compress(
    recipe: str = typer.Argument(..., help="the recipe YAML (teachers, capabilities, budget, stages.compress)"),
    force: bool = typer.Option(False, "--force", help="recompress even when the inputs are unchanged"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Capability-weighted structured pruning (or a baseline scorer): writes runs/<name>/compress/."""
    from .conversion.compress import run_compress
    from .conversion.recipe import load_recipe

    console = Console()
    with clean_errors():
        from .conversion.run_lock import run_lock

        loaded = load_recipe(recipe)
        with run_lock(loaded.run_path, command=f"nexus compress {recipe}"):
            result = run_compress(loaded, console=console, show_progress=not quiet, force=force)
    params = result["params"]
    console.print(f"scorer {result['scorer']} ({result['allocation']}): "
                  f"{params['teacher']['total']:,} -> {params['student']['total']:,} params "
                  f"(non-embedding {params['teacher']['non_embedding']:,} -> "
                  f"{params['student']['non_embedding']:,}; budget {result['budget']['source']})")
    console.print(f"vocabulary {result['vocab']['original_size']:,} -> {result['vocab']['kept']:,} tokens")
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if result.get("reused"):
        console.print("[dim]inputs unchanged since the last compress: reused it (--force to redo)[/]")
    console.print(f"wrote {result['path']}")

"""`nexus localise RECIPE`: where each capability lives in each teacher (feature map JSON + heatmaps)."""

import typer
from rich.console import Console

from .errors import clean_errors


def localise(
    recipe: str = typer.Argument(..., help="the recipe YAML (teachers, capabilities with a reference set, "
                                           "stages.localise options)"),
    force: bool = typer.Option(False, "--force", help="re-localise even when a feature map with the same inputs exists"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Four measured sub-stages per teacher x capability; writes runs/<name>/localise/ (feature_map.json, PNGs)."""
    from .conversion.localise import localise_table, run_localise
    from .conversion.recipe import load_recipe

    console = Console()
    with clean_errors():
        from .conversion.run_lock import run_lock

        loaded = load_recipe(recipe)
        with run_lock(loaded.run_path, command=f"nexus localise {recipe}"):
            result = run_localise(loaded, console=console, show_progress=not quiet, force=force)
    console.print(localise_table(result))
    if result.get("_reused"):
        console.print("[dim]inputs unchanged since the last localisation: reused it (--force to redo)[/]")
    console.print(f"wrote {result['_path']}")

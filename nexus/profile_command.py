"""`nexus profile RECIPE`: score every teacher on every capability (95% CIs), heatmap and table."""

import typer
from rich.console import Console

from .errors import clean_errors


def profile(
    recipe: str = typer.Argument(..., help="the recipe YAML (teachers, capabilities, stages.profile options)"),
    force: bool = typer.Option(False, "--force", help="re-score even when a profile with the same inputs exists"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Which teacher is best at which capability: writes runs/<name>/profile/ (JSON, heatmap PNG).

    Its peak RAM is planned first and the stage refused (exit 2, nothing written) over memory.ram_gb."""
    from .conversion.profile import run_profile
    from .conversion.profile_report import profile_table
    from .conversion.recipe import load_recipe
    from .conversion.run_lock import run_lock
    from .conversion.stage_ram_guard import guard_stage_ram

    console = Console()
    with clean_errors():
        loaded = load_recipe(recipe)
        guard_stage_ram(loaded, "profile", console)
        with run_lock(loaded.run_path, command=f"nexus profile {recipe}"):
            result = run_profile(loaded, console=console, show_progress=not quiet, force=force)
    console.print(profile_table(result))
    if result.get("reused"):
        console.print("[dim]inputs unchanged since the last profile: reused it (--force to re-score)[/]")
    memory = result["memory"]
    console.print(f"peak RSS {memory['peak_rss_bytes'] / 2**20:.0f} MiB; largest teacher in bf16 "
                  f"{memory['largest_teacher_bf16_bytes'] / 2**20:.0f} MiB (+20%: {memory['budget_bytes'] / 2**20:.0f})")
    console.print(f"wrote {result['path']}")

"""`nexus distill RECIPE`: build the multi-tower student (unless given) and distil every teacher into it.

Reads the profile (`nexus profile RECIPE` first); writes ``runs/<name>/student_build/`` and ``runs/<name>/distill/``
(the student checkpoint, train log, caches with bytes/token, router accuracy, LMC plot). A killed run resumes from
its newest checkpoint when started again. Each stage's peak RAM is planned before it starts and the stage refused
(exit 2, nothing of it written) over memory.ram_gb.
"""

from pathlib import Path

import typer
from rich.console import Console

from .errors import clean_errors
from .interrupt_exit import resumable, resume_line


def distill(
    recipe: str = typer.Argument(..., help="the recipe YAML (teachers, capabilities, stages.student_build/distill)"),
    student_init: str = typer.Option(None, "--student-init", help="an initial student checkpoint folder (default: "
                                                                   "build it into runs/<name>/student_build)"),
    out: str = typer.Option(None, "--out", help="output folder (default runs/<name>/distill)"),
    force: bool = typer.Option(False, "--force", help="redo the stage even when its inputs are unchanged"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Distil the profiled teachers into one multi-tower student (token-aligned KD, router, checkpoints, LMC)."""
    console = Console()
    console.print(f"nexus distill {recipe}: starting (importing torch and transformers)", highlight=False)
    resume = ["distill", str(Path(recipe).absolute())]
    for flag, value in (("--student-init", student_init), ("--out", out)):
        if value is not None:
            resume += [flag, str(Path(value).absolute())]
    resume += (["--force"] if force else []) + (["--quiet"] if quiet else [])
    from .training.rank_zero_first import rank_zero_first

    summary = None
    with resumable(resume), clean_errors(), rank_zero_first():  # several processes: rank 0 alone writes
        from .conversion.recipe import load_recipe
        from .conversion.run_lock import run_lock

        loaded = load_recipe(recipe)
        with run_lock(loaded.run_path, command=resume_line(resume)):
            summary = _distill(loaded, student_init, out, force, quiet, console)
    if summary is None:  # a rank > 0 after training
        return
    router = summary["router_accuracy"]
    console.print(f"router accuracy on held-out rows: {router['overall']:.3f} (n={router['n']})")
    console.print("cache bytes/token: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["bytes_per_token"].items()))
    console.print(f"wrote {summary['student']}" + (" [dim](inputs unchanged: reused)[/]" if summary.get("reused")
                                                   else ""))


def _distill(loaded, student_init, out, force, quiet, console):
    """Build the student unless given, then distil; each stage RAM-planned first."""
    from .conversion.distill import run_distill
    from .conversion.profile import load_profile
    from .conversion.stage_ram_guard import guard_stage_ram
    from .conversion.student_build import run_student_build

    profile = load_profile(loaded.run_path)
    if student_init is None:
        guard_stage_ram(loaded, "student_build", console, profile=profile)
        path, record = run_student_build(loaded, profile, console=console, show_progress=not quiet)
        console.print(f"student init {path}: {record['params']:,} params "
                      f"({record['params_ratio']:.3f} of its teachers)" + (" [dim](reused)[/]" if record["reused"]
                                                                            else ""))
        student_init = path
    guard_stage_ram(loaded, "distill", console, profile=profile, student=student_init)
    return run_distill(loaded, student_init, profile=profile, out=out, console=console,
                       show_progress=not quiet, force=force)

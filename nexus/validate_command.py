"""`nexus validate RECIPE STUDENT`: retention per capability (95% CIs), layer CKA, interference, and the gate.

Exit codes: 0 = validated (gate passed or not requested), 2 = bad input or a peak-RAM plan over memory.ram_gb (one
red line, nothing written), 3 = the gate failed (the report is still written; the failing capabilities are printed).
"""

import typer
from rich.console import Console

from .errors import clean_errors
from .gate_exit import GATE_FAILED, exit_if_gate_failed  # noqa: F401  (GATE_FAILED: re-exported)


def validate(
    recipe: str = typer.Argument(..., help="the recipe YAML (teachers, capabilities, stages.validate options)"),
    student: str = typer.Argument(..., help="the student checkpoint folder (Nexus or HF, safetensors + tokenizer)"),
    checkpoint: list[str] = typer.Option(
        None, "--checkpoint", help="one checkpoint per training phase, in order (repeat; NAME=PATH names a phase): "
                                   "gives the interference matrix"),
    feature_map: str = typer.Option(None, "--feature-map", help="a localise feature_map.json to draw in the report"),
    lmc: str = typer.Option(None, "--lmc", help="an LMC path JSON ({alphas, scores}) to draw in the report"),
    out: str = typer.Option(None, "--out", help="output folder (default runs/<name>/validate)"),
    gate: bool = typer.Option(None, "--gate/--no-gate",
                              help="--gate: require stages.validate.min_retention and gate on it; --no-gate: report "
                                   "only; default: gate when the recipe sets a threshold"),
    force: bool = typer.Option(False, "--force", help="re-validate even when the inputs are unchanged"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Does the student keep every capability? Writes report.json, report.md, PNGs and model_card.md."""
    from .conversion.profile import load_profile
    from .conversion.recipe import load_recipe
    from .conversion.report_render import validation_table
    from .conversion.stage_ram_guard import guard_stage_ram
    from .conversion.validate import check_model_folder, run_validate

    console = Console()
    with clean_errors():
        loaded = load_recipe(recipe)
        try:
            profile = load_profile(loaded.run_path)  # only sharpens the plan: validate runs without one
        except FileNotFoundError:
            profile = None
        guard_stage_ram(loaded, "validate", console, profile=profile, student=check_model_folder(student, "student"))
        from .conversion.run_lock import run_lock

        with run_lock(loaded.run_path, command=f"nexus validate {recipe} {student}"):
            report = run_validate(loaded, student, checkpoints=checkpoint or (), feature_map=feature_map,
                                  lmc=lmc, out=out, gate=gate, console=console, show_progress=not quiet, force=force)
    console.print(validation_table(report))
    if report.get("reused"):
        console.print("[dim]inputs unchanged since the last validation: reused it (--force to redo)[/]")
    console.print(f"wrote {report['path']}")
    exit_if_gate_failed(report["gate"])

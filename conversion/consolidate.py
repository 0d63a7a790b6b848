"""`nexus consolidate RECIPE`: every NIWT stage after the teachers exist, in order, each reusing its own cache.

profile -> student build -> distill -> validate -> export, all under ``runs/<name>/``. Each stage keys its artefacts
by a hash of its inputs: `run_profile` reuses a profile whose inputs did not change, `run_distill` resumes from its
last checkpoint (exactly: the same final weights as an uninterrupted run), `run_validate` reuses an unchanged report
and `run_student_build` a build with the same inputs; the export is cheap and is redone. `nexus demo` is this
function on the bundled specialists.
"""

import time
from pathlib import Path


def _rule(console, n, title):
    console.rule(f"[bold]{n}. {title}")
    return time.perf_counter()


def _say_reused(console, stage, result):
    if result.get("reused"):
        console.print(f"[dim]{stage}: inputs unchanged since the last run, reused[/]")


def run_consolidate(recipe, console=None, show_progress=True, first_stage_number=1, force_distill=False,
                    interference=True, verify_export=True, force_validate=False) -> dict:
    """Run profile -> student build -> distill -> validate -> export for ``recipe``; returns what each produced.

    The result has ``profile``, ``build`` (with ``init_path``), ``distill``, ``report``, ``export`` and ``seconds``
    per stage. The validation gate is not enforced here (the report carries it); the CLI turns it into an exit code.
    """
    from rich.console import Console

    from ..hub.export import export_checkpoint
    from .distill import run_distill
    from .profile import run_profile
    from .profile_report import profile_table
    from .report_render import validation_table
    from .student_build import run_student_build
    from .validate import run_validate

    console = console or Console()
    run = recipe.run_path
    seconds, n = {}, first_stage_number

    t = _rule(console, n, "profile: teacher x capability (95% bootstrap CIs)")
    profile = run_profile(recipe, console=console, show_progress=show_progress)
    console.print(profile_table(profile))
    _say_reused(console, "profile", profile)
    seconds["profile"] = time.perf_counter() - t

    t = _rule(console, n + 1, "student: shared tokenizer, one tower per capability from its best teacher")
    init_path, build = run_student_build(recipe, profile, run / "student_build", console=console,
                                         show_progress=show_progress)
    console.print(f"student init: {build['params']:,} params = {build['params_ratio']:.3f} of the teachers' "
                  f"{build['teacher_params_total']:,} (budget {build['budget']['params']:,}: "
                  f"{build['budget']['source']}); towers: "
                  + ", ".join(f"{tw['capability']} <- {tw['teacher']} ({tw['params']:,})" for tw in build["towers"]))
    console.print(f"shared embedding rows: {build['embedding_rows']}")
    _say_reused(console, "student build", build)
    seconds["student_build"] = time.perf_counter() - t

    t = _rule(console, n + 2, "distill: caches, token-aligned KD, router, LMC")
    distill = run_distill(recipe, init_path, profile=profile, console=console, show_progress=show_progress,
                          force=force_distill)
    student_path = Path(distill["student"])
    _say_reused(console, "distill", distill)
    seconds["distill"] = time.perf_counter() - t

    t = _rule(console, n + 3, "validate: retention per capability vs the best teacher")
    checkpoints = [f"init={init_path}", f"distilled={student_path}"] if interference else ()
    lmc = distill["lmc"]["json"] if distill.get("lmc") else None
    report = run_validate(recipe, student_path, checkpoints=checkpoints, lmc=lmc, console=console,
                          show_progress=show_progress, force=force_validate)
    console.print(validation_table(report))
    _say_reused(console, "validate", report)
    seconds["validate"] = time.perf_counter() - t

    t = _rule(console, n + 4, "export: self-contained checkpoint + model card from report.json")
    exported = export_checkpoint(student_path, run / "export", card=Path(report["path"]) / "model_card.md",
                                 overwrite=True, verify=verify_export)
    seconds["export"] = time.perf_counter() - t
    build["init_path"] = str(init_path)
    return {"profile": profile, "build": build, "distill": distill, "report": report, "export": exported,
            "seconds": seconds, "student": str(student_path)}

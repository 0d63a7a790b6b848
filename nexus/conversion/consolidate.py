"""`nexus consolidate RECIPE`: every NIWT stage after the teachers exist, in order, each reusing its own cache.

profile -> student build -> distill -> validate -> export, all under ``runs/<name>/``. Each stage keys its artefacts
by a hash of its inputs: `run_profile` reuses a profile whose inputs did not change, `run_distill` resumes from its
last checkpoint (exactly: the same final weights as an uninterrupted run), `run_validate` reuses an unchanged report
and `run_student_build` a build with the same inputs; the export is cheap and is redone. `nexus demo` is this
function on the bundled specialists.

Memory (issue 8): before the first stage every stage's peak RAM is planned (`stage_memory`; upper bounds where an
input does not exist yet) and printed, and again from the real inputs just before each later stage; a stage planned
over the budget (``memory.ram_gb``, default the machine's RAM) is refused with its numbers before anything of it is
written. Each stage's measured peak RSS is recorded beside its plan in ``runs/<name>/memory_plan.json``.
"""

import json
import time
from pathlib import Path


def _rule(console, n, title):
    console.rule(f"[bold]{n}. {title}")
    return time.perf_counter()


def _say_reused(console, stage, result):
    if result.get("reused"):
        console.print(f"[dim]{stage}: inputs unchanged since the last run, reused[/]")


class _MemoryWatch:
    """Plans each stage's peak RAM before it runs (refusing one over the budget) and measures its peak RSS."""

    def __init__(self, recipe, console):
        from .peak_rss import current_rss
        from .stage_memory import check_stage_plan, plan_stages, plan_table, ram_budget

        self.recipe, self.console = recipe, console
        self.budget, self.source = ram_budget(recipe)
        self.upfront = plan_stages(recipe, current_rss() or 0)
        console.print(plan_table(self.upfront, self.budget, self.source))
        for plan in self.upfront.values():
            check_stage_plan(plan, self.budget, self.source)
        self.plans, self.measured = {}, {}

    def before(self, stage, **inputs):
        """Re-plan ``stage`` from the inputs the earlier stages produced; refuse it over budget; start its peak."""
        from .peak_rss import reset_peak_rss
        from .stage_ram_guard import guard_stage_ram

        self.plans[stage] = guard_stage_ram(self.recipe, stage, self.console,
                                            plan=None if inputs else self.upfront[stage], **inputs)
        reset_peak_rss()

    def after(self, stage):
        from .peak_rss import peak_rss

        self.measured[stage] = peak_rss()

    def record(self, run):
        """Print plan vs measured and write ``run/memory_plan.json``; returns the record."""
        from .atomic_output import atomic_file
        from .stage_memory import plan_table

        self.console.print(plan_table(self.plans, self.budget, self.source, self.measured))
        record = {"budget_bytes": self.budget, "budget_source": self.source, "upfront": self.upfront,
                  "plans": self.plans, "measured_peak_rss_bytes": self.measured}
        with atomic_file(Path(run) / "memory_plan.json") as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=str))
        return record


def run_consolidate(recipe, console=None, show_progress=True, first_stage_number=1, force_distill=False,
                    interference=True, verify_export=True, force_validate=False) -> dict:
    """Run profile -> student build -> distill -> validate -> export for ``recipe``; returns what each produced.

    The result has ``profile``, ``build`` (with ``init_path``), ``distill``, ``report``, ``export``, ``seconds``
    per stage and ``memory`` (each stage's RAM plan and measured peak). The validation gate is not enforced here
    (the report carries it); the CLI turns it into an exit code. A stage whose RAM plan exceeds the budget raises
    `MemoryPlanError` before it starts.
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
    memory = _MemoryWatch(recipe, console)

    t = _rule(console, n, "profile: teacher x capability (95% bootstrap CIs)")
    memory.before("profile")
    profile = run_profile(recipe, console=console, show_progress=show_progress)
    memory.after("profile")
    console.print(profile_table(profile))
    _say_reused(console, "profile", profile)
    seconds["profile"] = time.perf_counter() - t

    t = _rule(console, n + 1, "student: shared tokenizer, one tower per capability from its best teacher")
    memory.before("student_build", profile=profile)
    init_path, build = run_student_build(recipe, profile, run / "student_build", console=console,
                                         show_progress=show_progress)
    memory.after("student_build")
    console.print(f"student init: {build['params']:,} params = {build['params_ratio']:.3f} of the teachers' "
                  f"{build['teacher_params_total']:,} (budget {build['budget']['params']:,}: "
                  f"{build['budget']['source']}); towers: "
                  + ", ".join(f"{tw['capability']} <- {tw['teacher']} ({tw['params']:,})" for tw in build["towers"]))
    console.print(f"shared embedding rows: {build['embedding_rows']}")
    _say_reused(console, "student build", build)
    seconds["student_build"] = time.perf_counter() - t

    t = _rule(console, n + 2, "distill: caches, token-aligned KD, router, LMC")
    memory.before("distill", profile=profile, student=init_path)
    distill = run_distill(recipe, init_path, profile=profile, console=console, show_progress=show_progress,
                          force=force_distill)
    memory.after("distill")
    student_path = Path(distill["student"])
    _say_reused(console, "distill", distill)
    seconds["distill"] = time.perf_counter() - t

    t = _rule(console, n + 3, "validate: retention per capability vs the best teacher")
    checkpoints = [f"init={init_path}", f"distilled={student_path}"] if interference else ()
    lmc = distill["lmc"]["json"] if distill.get("lmc") else None
    memory.before("validate", profile=profile, student=student_path)
    report = run_validate(recipe, student_path, checkpoints=checkpoints, lmc=lmc, console=console,
                          show_progress=show_progress, force=force_validate)
    memory.after("validate")
    console.print(validation_table(report))
    _say_reused(console, "validate", report)
    seconds["validate"] = time.perf_counter() - t

    t = _rule(console, n + 4, "export: self-contained checkpoint + model card from report.json")
    memory.before("export", profile=profile, student=student_path)
    exported = export_checkpoint(student_path, run / "export", card=Path(report["path"]) / "model_card.md",
                                 overwrite=True, verify=verify_export)
    memory.after("export")
    seconds["export"] = time.perf_counter() - t
    build["init_path"] = str(init_path)
    return {"profile": profile, "build": build, "distill": distill, "report": report, "export": exported,
            "seconds": seconds, "student": str(student_path), "memory": memory.record(run)}

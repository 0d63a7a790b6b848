"""`nexus consolidate RECIPE`: the recipe's stage list, in order, each stage reusing its own cache.

The list is the recipe's ``pipeline:`` (default `DEFAULT_PIPELINE`: profile -> align -> student_build -> distill ->
validate -> export; align is a no-op unless two tower teachers share an architecture and a tokenizer); optional
stages (``localise``) are added there and optional ones may be left out (``align``). `resolve_pipeline` checks that
every stage is registered, appears once, that no required stage is left out and that each stage's inputs come from a
stage earlier in the list. Everything goes under ``runs/<name>/``. Each stage keys its artefacts by a hash of its
inputs, so a rerun reuses finished stages and a killed distillation resumes exactly (the same final weights as an
uninterrupted run); the export is cheap and is redone. `nexus demo` is this function on the bundled specialists.

Memory: before the first stage every stage's peak RAM is planned (upper bounds where an input does not exist yet)
and printed, and again from the real inputs just before each later stage; a stage planned over the budget
(``memory.ram_gb``, default the machine's RAM) is refused with its numbers before anything of it is written. Each
stage's measured peak RSS is recorded beside its plan in ``runs/<name>/memory_plan.json``.
"""

import json
import time
from pathlib import Path

from . import DEFAULT_PIPELINE, stage_registry


class PipelineError(ValueError):
    """A recipe's ``pipeline`` list that cannot run; the message names the entry (``pipeline[i]``)."""


def resolve_pipeline(names=None) -> list[str]:
    """The stage names to run: ``names`` (a recipe's ``pipeline``) checked, or the default list."""
    registry = stage_registry()
    names = list(DEFAULT_PIPELINE if names is None else names)
    produced, seen = {}, set()
    for i, name in enumerate(names):
        if name not in registry:
            raise PipelineError(f"pipeline[{i}]: unknown stage {name!r}; registered stages: "
                                f"{', '.join(sorted(registry))}")
        if name in seen:
            raise PipelineError(f"pipeline[{i}]: stage {name!r} is listed twice")
        seen.add(name)
        cls = registry[name]
        missing = [need for need in cls.requires if need not in produced]
        if missing:
            makers = sorted({n for n, c in registry.items() for p in c.produces if p in missing})
            raise PipelineError(f"pipeline[{i}]: stage {name!r} needs {', '.join(missing)} from "
                                f"{', '.join(makers)}, which must come earlier in the list")
        produced.update({p: name for p in cls.produces})
    required = [n for n in DEFAULT_PIPELINE if not registry[n].optional and n not in seen]
    if required:
        raise PipelineError(f"pipeline: the required stage(s) {', '.join(required)} are missing; only optional "
                            f"stages ({', '.join(sorted(n for n, c in registry.items() if c.optional))}) may be "
                            "left out")
    return names


class MemoryWatch:
    """Plans each stage's peak RAM before it runs (refusing one over the budget) and measures its peak RSS."""

    def __init__(self, recipe, stages, console):
        from ..conversion.peak_rss import current_rss
        from ..conversion.stage_memory import check_stage_plan, plan_table, ram_budget

        self.recipe, self.console = recipe, console
        self.budget, self.source = ram_budget(recipe)
        runtime = current_rss() or 0
        self.upfront = {stage.name: stage.plan_ram({}, runtime) for stage in stages}
        console.print(plan_table(self.upfront, self.budget, self.source))
        for plan in self.upfront.values():
            check_stage_plan(plan, self.budget, self.source)
        self.plans, self.measured = {}, {}

    def before(self, stage, results):
        """Re-plan ``stage`` from what the earlier stages produced; refuse it over budget; start its peak."""
        from ..conversion.peak_rss import current_rss, reset_peak_rss
        from ..conversion.stage_ram_guard import check_stage_ram

        plan = stage.plan_ram(results, current_rss() or 0) if results else self.upfront[stage.name]
        self.plans[stage.name] = check_stage_ram(plan, self.budget, self.source, self.console)
        reset_peak_rss()

    def after(self, stage):
        from ..conversion.peak_rss import peak_rss

        self.measured[stage.name] = peak_rss()

    def record(self, run):
        """Print plan vs measured and write ``run/memory_plan.json``; returns the record."""
        from ..conversion.atomic_output import atomic_file
        from ..conversion.stage_memory import plan_table

        self.console.print(plan_table(self.plans, self.budget, self.source, self.measured))
        record = {"budget_bytes": self.budget, "budget_source": self.source, "upfront": self.upfront,
                  "plans": self.plans, "measured_peak_rss_bytes": self.measured}
        with atomic_file(Path(run) / "memory_plan.json") as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=str))
        return record


def _reused(result) -> bool:
    return any(isinstance(v, dict) and v.get("reused") for v in result.values())


def run_consolidate(recipe, console=None, show_progress=True, first_stage_number=1, force_distill=False,
                    interference=True, verify_export=True, force_validate=False) -> dict:
    """Run the recipe's pipeline; returns what each stage produced.

    The result has each stage's products (``profile``, ``build`` with ``init_path``, ``distill``, ``report``,
    ``export``, and ``feature_map`` when localise ran), ``seconds`` per stage, ``stages`` (the names run, in order),
    ``student`` (the final student folder) and ``memory`` (each stage's RAM plan and measured peak). The validation
    gate is not enforced here (the report carries it); the CLI turns it into an exit code. A stage whose RAM plan
    exceeds the budget raises `MemoryPlanError` before it starts.
    """
    from rich.console import Console

    console = console or Console()
    registry = stage_registry()
    settings = {"distill": {"force": force_distill}, "export": {"verify": verify_export},
                "validate": {"force": force_validate, "interference": interference}}
    names = resolve_pipeline(getattr(recipe, "pipeline", None))
    stages = [registry[n](recipe, console, show_progress, **settings.get(n, {})) for n in names]
    memory = MemoryWatch(recipe, stages, console)
    results, seconds = {}, {}
    for n, stage in enumerate(stages, start=first_stage_number):
        console.rule(f"[bold]{n}. {stage.title}")
        started = time.perf_counter()
        memory.before(stage, results)
        result = stage(results)
        memory.after(stage)
        stage.summarise(result)
        if _reused(result):
            console.print(f"[dim]{stage.name.replace('_', ' ')}: inputs unchanged since the last run, reused[/]")
        results.update({k: v for k, v in result.items() if k in stage.produces})
        seconds[stage.name] = time.perf_counter() - started
    final = results["distill"]["student"] if "distill" in results else results["build"]["init_path"]
    return {**results, "seconds": seconds, "stages": names, "student": str(final),
            "memory": memory.record(recipe.run_path)}

"""The stage registry: every NIWT stage is a `Stage` class registered here once, by name.

`register_stage` refuses a duplicate name and registers the stage's options model with the recipe, so a stage's
options, RAM planner and pipeline place are declared in one class. The built-in stages are imported explicitly (no
package walking): `stage_registry()` imports `BUILTIN_STAGE_MODULES` on first use. A third-party stage is one more
`@register_stage` class imported before the recipe is loaded.
"""

import importlib

from .stage import Stage, StageLifecycleError

STAGES: dict[str, type[Stage]] = {}
BUILTIN_STAGE_MODULES = ("nexus.stages.profile", "nexus.stages.localise", "nexus.stages.align",
                         "nexus.stages.student_build", "nexus.stages.distill", "nexus.stages.validate",
                         "nexus.stages.export")
# What `nexus consolidate` runs when the recipe has no ``pipeline:`` list. ``align`` is optional (a recipe may leave it
# out) but on by default: it is a no-op unless two tower teachers share an architecture and a tokenizer, and where it
# applies it paid (+0.312 min retention, paired, `nexus.stages.align`). ``localise`` is off by default (RESULTS.md
# section 2: its effect was not positive).
DEFAULT_PIPELINE = ("profile", "align", "student_build", "distill", "validate", "export")


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: add ``cls`` under ``cls.name``; a name registered twice is refused."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} has no stage name")
    if name in STAGES and STAGES[name] is not cls:
        raise ValueError(f"stage {name!r} is already registered ({STAGES[name].__qualname__})")
    if cls.options_model is not None:
        from ..conversion.recipe import STAGE_OPTIONS, register_stage_options

        if STAGE_OPTIONS.get(name) is not cls.options_model:
            register_stage_options(name, cls.options_model)
    STAGES[name] = cls
    return cls


def stage_registry() -> dict[str, type[Stage]]:
    """{name: Stage class} of every registered stage (the built-in ones imported on first use)."""
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
    return STAGES


__all__ = ["DEFAULT_PIPELINE", "STAGES", "Stage", "StageLifecycleError", "register_stage", "stage_registry"]

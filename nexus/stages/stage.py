"""The `Stage`: one NIWT step with declared options, inputs, RAM plan, `run()` and outputs.

A stage is a class registered once (`nexus.stages.register_stage`), so its options model, its RAM planner and its
place in the pipeline are declared together:

    @register_stage
    class ProfileStage(Stage):
        name = "profile"
        title = "profile: teacher x capability (95% bootstrap CIs)"
        options_model = ProfileOptions          # validated under ``stages.profile`` in the recipe
        requires = ()                            # stages whose outputs it reads: earlier in the pipeline
        produces = ("profile",)                  # what it adds to the pipeline's results

        def plan_ram(self, results, runtime): ...   # bytes, planned from headers/configs before anything loads
        def run(self, results): ...               # -> its result dict (with "reused" when nothing was redone)
        def outputs(self, result): ...            # -> {label: path} of what it wrote

Lifecycle: a `Stage` object runs once (`__call__`); running it twice, or asking for its outputs before it ran, is an
error (`StageLifecycleError`). Reuse of unchanged work stays inside each stage's own ``run_*`` function, keyed by a
hash of its inputs (the profile, student-build, distill and validate functions all do this).
"""

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel


class StageLifecycleError(RuntimeError):
    """A stage used out of order: run twice, or asked for its outputs before it ran."""


class Stage(ABC):
    name: ClassVar[str]
    title: ClassVar[str]
    options_model: ClassVar[type[BaseModel] | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[bool] = False  # a recipe's pipeline may leave it out
    paper: ClassVar[str] = ""  # where the method comes from (shown by `nexus stages`)

    def __init__(self, recipe, console, show_progress=True, **settings):
        self.recipe, self.console, self.show_progress, self.settings = recipe, console, show_progress, settings
        self._result = None

    @property
    def options(self) -> BaseModel | None:
        """This stage's validated options from the recipe (defaults when the recipe does not mention it)."""
        return self.recipe.stage(self.name) if self.options_model is not None else None

    @abstractmethod
    def plan_ram(self, results: dict, runtime: int) -> dict:
        """This stage's peak-RAM plan (`stage_memory` plan dict) from what ``results`` holds now; upper bounds for
        inputs that do not exist yet."""

    @abstractmethod
    def run(self, results: dict) -> dict:
        """Do the work; ``results`` holds what earlier stages produced (by their ``produces`` names)."""

    @abstractmethod
    def outputs(self, result: dict) -> dict[str, Path]:
        """{label: path} of what ``run`` wrote (or reused)."""

    def summarise(self, result: dict) -> None:
        """Print what a reader wants to see after the stage (default: nothing)."""

    def __call__(self, results: dict) -> dict:
        if self._result is not None:
            raise StageLifecycleError(f"stage {self.name!r} already ran in this pipeline; make a new Stage to rerun")
        missing = [name for name in self.requires if name not in results]
        if missing:
            raise StageLifecycleError(f"stage {self.name!r} needs the results of {missing} first")
        self._result = self.run(results)
        return self._result

    @property
    def result(self) -> dict:
        if self._result is None:
            raise StageLifecycleError(f"stage {self.name!r} has not run yet")
        return self._result

    def written(self) -> dict[str, Path]:
        """`outputs` of this stage's result (after it ran)."""
        return self.outputs(self.result)

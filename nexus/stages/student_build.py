"""The student-build stage: compress each tower's teacher under the budget and assemble the multi-tower student
(`nexus.conversion.student_build`, whose docstring has the method and a sample recipe section).

Reads the profile (which teacher serves which capability), when the pipeline ran ``localise`` first its feature map
(the units it found causally necessary are kept; ``localisation: off`` ignores it), and when it ran ``align`` the
merged teachers (one tower each, serving all their members' capabilities); writes ``runs/<name>/student_build/`` (the initial
student checkpoint, its tokenizer and student_build.json). Sample recipe section::

    stages:
      student_build: {budget_fraction: 0.3333, allocation: dynamic, tower_budget: weighted_share}
"""

from pathlib import Path

from ..conversion.stage_memory import plan_student_build_ram
from ..conversion.student_build import StudentBuildOptions, run_student_build
from . import register_stage
from .stage import Stage


@register_stage
class StudentBuildStage(Stage):
    name = "student_build"
    title = "student: shared tokenizer, towers compressed from their teachers"
    options_model = StudentBuildOptions
    requires = ("profile",)
    produces = ("build",)
    paper = "structured pruning with capability-weighted importance (Taylor: Molchanov et al. 2019; Minitron: " \
            "Muralidharan et al. 2024 as a baseline)"

    def plan_ram(self, results, runtime):
        return plan_student_build_ram(self.recipe, runtime, profile=results.get("profile"))

    def run(self, results):
        fm = results.get("feature_map")  # when the pipeline ran localise before this stage
        init_path, build = run_student_build(self.recipe, results["profile"], self.recipe.run_path / self.name,
                                             console=self.console, show_progress=self.show_progress,
                                             feature_map=fm["path"] if fm else None,
                                             aligned=results.get("aligned"))  # when align ran: merged teachers
        return {"build": {**build, "init_path": str(init_path)}}

    def outputs(self, result):
        return {"student_init": Path(result["build"]["init_path"])}

    def summarise(self, result):
        build = result["build"]
        self.console.print(
            f"student init: {build['params']:,} params = {build['params_ratio']:.3f} of the teachers' "
            f"{build['teacher_params_total']:,} (budget {build['budget']['params']:,}: {build['budget']['source']}); "
            "towers: " + ", ".join(f"{tw.get('capability', tw.get('name'))} <- {tw['teacher']} ({tw['params']:,})"
                                   for tw in build["towers"]))
        self.console.print(f"shared embedding rows: {build['embedding_rows']}")

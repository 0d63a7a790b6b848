"""The validate stage: retention per capability vs the best teacher and each teacher (paired bootstrap CIs), min and
mean, CKA, interference across phases, and the gate (`nexus.conversion.validate`).

Reads the distilled student (and the initial one, for the interference matrix; the LMC path and a localise feature
map when those stages ran); writes ``runs/<name>/validate/`` (report.json, report.md, PNGs, model_card.md). The gate
does not stop the pipeline here: the export still runs and the CLI turns a failed gate into exit code 3. Sample::

    stages:
      validate: {min_retention: 0.95, gate_statistic: value}
"""

from pathlib import Path

from ..conversion.stage_memory import plan_validate_ram
from ..conversion.validate import ValidateOptions, run_validate
from . import register_stage
from .stage import Stage


def _student(results):
    if "distill" in results:
        return results["distill"]["student"]
    return results["build"]["init_path"] if "build" in results else None


@register_stage
class ValidateStage(Stage):
    name = "validate"
    title = "validate: retention per capability vs the best teacher"
    options_model = ValidateOptions
    requires = ("profile", "build")
    produces = ("report",)
    paper = "CKA: Kornblith et al. 2019; paired bootstrap: Koehn 2004"

    def plan_ram(self, results, runtime):
        return plan_validate_ram(self.recipe, runtime, profile=results.get("profile"), student=_student(results))

    def run(self, results):
        student, build = _student(results), results["build"]
        distill = results.get("distill") or {}
        interference = self.settings.get("interference", True) and "distill" in results
        checkpoints = [f"init={build['init_path']}", f"distilled={student}"] if interference else ()
        lmc = distill["lmc"]["json"] if distill.get("lmc") else None
        feature_map = results["feature_map"]["path"] if "feature_map" in results else None
        report = run_validate(self.recipe, student, checkpoints=checkpoints, lmc=lmc, feature_map=feature_map,
                              console=self.console, show_progress=self.show_progress,
                              force=self.settings.get("force", False))
        return {"report": report, "student": str(student)}

    def outputs(self, result):
        return {"report": Path(result["report"]["path"]) / "report.json"}

    def summarise(self, result):
        from ..conversion.report_render import validation_table

        self.console.print(validation_table(result["report"]))

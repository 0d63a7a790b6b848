"""The export stage: a self-contained checkpoint (safetensors, config with auto_map, copied modeling files,
tokenizer, the model card generated from report.json) at ``runs/<name>/export`` (`nexus.hub.export`).

The export is cheap and is redone on every run; ``--overwrite`` semantics are atomic (the old folder is renamed
aside, the new one renamed in). With ``verify`` the folder is loaded in a fresh project-free process first.
"""

from pathlib import Path

from ..conversion.stage_memory import plan_export_ram
from ..hub.export import export_checkpoint
from . import register_stage
from .stage import Stage
from .validate import _student


@register_stage
class ExportStage(Stage):
    name = "export"
    title = "export: self-contained checkpoint + model card from report.json"
    requires = ("build",)
    produces = ("export",)

    def plan_ram(self, results, runtime):
        return plan_export_ram(self.recipe, runtime, profile=results.get("profile"), student=_student(results))

    def run(self, results):
        card = Path(results["report"]["path"]) / "model_card.md" if "report" in results else None
        exported = export_checkpoint(_student(results), self.recipe.run_path / self.name, card=card, overwrite=True,
                                     verify=self.settings.get("verify", True))
        return {"export": exported}

    def outputs(self, result):
        return {"export": Path(result["export"]["path"])}

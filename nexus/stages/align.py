"""The align stage (optional): fold tower teachers of one architecture and one tokenizer into ONE teacher.

Two teachers that are each best at some capability and share an architecture and a tokenizer (e.g. a base model and
its fine-tuned specialist) are merged by optimal-transport unit matching and averaging (`nexus.conversion.align`,
`ot_merge`), so the student builds one tower for both instead of one tower each. Writes ``runs/<name>/align/``
(align.json: the groups, the units moved, each capability's held-out loss under its own teacher, the merge and the
plain average; one HF folder per merged teacher). Teachers that share nothing are left alone: the stage is then a
no-op that says so.

Off by default: add it to the recipe's pipeline after ``profile``::

    pipeline: [profile, align, student_build, distill, validate, export]
    stages:
      align: {method: ot, calibration_tokens: 2048}
"""

from pathlib import Path

from ..conversion.align import AlignOptions, run_align
from ..conversion.stage_memory import plan_align_ram
from . import register_stage
from .stage import Stage


@register_stage
class AlignStage(Stage):
    name = "align"
    title = "align: same-family tower teachers merged into one (OT unit matching, POT)"
    options_model = AlignOptions
    requires = ("profile",)
    produces = ("aligned",)
    optional = True
    paper = "Singh & Jaggi 2020 (model fusion via optimal transport); Ainsworth et al. 2023 (Git Re-Basin)"

    def plan_ram(self, results, runtime):
        return plan_align_ram(self.recipe, runtime, profile=results.get("profile"))

    def run(self, results):
        record = run_align(self.recipe, results["profile"], console=self.console,
                           force=self.settings.get("force", False))
        return {"aligned": record}

    def outputs(self, result):
        return {"align": self.recipe.run_path / self.name / "align.json",
                **{m["name"]: Path(m["folder"]) for m in result["aligned"]["merged"]}}

    def summarise(self, result):
        merged = result["aligned"]["merged"]
        if not merged:
            self.console.print("align: nothing merged (no two tower teachers share an architecture and a tokenizer)")
        for m in merged:
            self.console.print(f"align: {m['name']} -> one teacher serving {', '.join(m['capabilities'])} "
                               f"({m['method']})")

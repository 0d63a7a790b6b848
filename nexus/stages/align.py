"""The align stage (optional): fold tower teachers of one architecture and one tokenizer into ONE teacher.

Two teachers that are each best at some capability and share an architecture and a tokenizer (e.g. a base model and
its fine-tuned specialist) are merged by optimal-transport unit matching and averaging (`nexus.conversion.align`,
`ot_merge`), so the student builds one tower for both instead of one tower each. Writes ``runs/<name>/align/``
(align.json: the groups, the units moved, each capability's held-out loss under its own teacher, the merge and the
plain average; one HF folder per merged teacher). Teachers that share nothing are left alone: the stage is then a
no-op that says so, and a merge that raises a served capability's held-out loss by more than ``max_loss_increase``
(default 10%) is not used.

On by default (`DEFAULT_PIPELINE`), because it paid where it applies: on Gemma-3-270M + its code fine-tune + the
arithmetic specialist at 0.15 of the teachers' parameters, one merged tower keeps min retention 0.843 against 0.531
for two towers, a paired difference of +0.312 [+0.294, +0.329] (``bench/results/gemma_pair/``, RESULTS.md section
10). Leave it out of a recipe's ``pipeline`` list to build one tower per teacher anyway::

    pipeline: [profile, student_build, distill, validate, export]
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
        for r in result["aligned"].get("rejected", []):
            self.console.print(f"align: {r['name']} not merged (held-out loss +{r['max_loss_increase']:.1%} on a "
                               "served capability); one tower each")
        if not merged and not result["aligned"].get("rejected"):
            self.console.print("align: nothing merged (no two tower teachers share an architecture and a tokenizer)")
        for m in merged:
            self.console.print(f"align: {m['name']} -> one teacher serving {', '.join(m['capabilities'])} "
                               f"({m['method']})")

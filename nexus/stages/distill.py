"""The distill stage: teacher-output caches, token-aligned KD from every teacher, router training, checkpoints,
exact resume, preservation and LMC hooks (`nexus.conversion.distill`, engine in `nexus.training.distill_engine`).

Reads the profile and the initial student; writes ``runs/<name>/distill/`` (the student, train log, caches with
bytes/token, router accuracy, LMC plot). A killed run resumes from its newest checkpoint. Sample recipe section::

    stages:
      distill: {steps: 500, batch_size: 8, lr: 2.0e-3, top_k: 32, loss: {kd: 1.0, ce: 0.2, router: 0.1}}
"""

from pathlib import Path

from ..conversion.distill import DistillOptions, run_distill
from ..conversion.stage_memory import plan_distill_ram
from . import register_stage
from .stage import Stage


@register_stage
class DistillStage(Stage):
    name = "distill"
    title = "distill: caches, token-aligned KD, router, LMC"
    options_model = DistillOptions
    requires = ("profile", "build")
    produces = ("distill",)
    paper = "KD: Hinton et al. 2015; cross-tokenizer alignment: FuseLLM (Wan et al. 2024); LMC: Frankle et al. 2020"

    def plan_ram(self, results, runtime):
        build = results.get("build")
        return plan_distill_ram(self.recipe, runtime, profile=results.get("profile"),
                                student=build["init_path"] if build else None)

    def run(self, results):
        distill = run_distill(self.recipe, results["build"]["init_path"], profile=results["profile"],
                              console=self.console, show_progress=self.show_progress,
                              force=self.settings.get("force", False))
        return {"distill": distill}

    def outputs(self, result):
        return {"student": Path(result["distill"]["student"])}

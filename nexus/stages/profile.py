"""The profile stage: which teacher is best at which capability? (`nexus.conversion.profile`)

Every eligible teacher is scored on every capability with its probe, one teacher resident at a time; scores carry
95% bootstrap CIs and sit beside a trivial baseline (unigram bits per byte, chance, majority answer), so a teacher's
competence is measured before any retention of it means anything. Writes ``runs/<name>/profile/`` (profile.json,
heatmap PNG). Sample recipe section::

    stages:
      profile: {max_items: 200, n_bootstrap: 1000, window_tokens: 128}
"""

from ..conversion.profile import ProfileOptions, run_profile
from ..conversion.stage_memory import plan_profile_ram
from . import register_stage
from .stage import Stage


@register_stage
class ProfileStage(Stage):
    name = "profile"
    title = "profile: teacher x capability (95% bootstrap CIs)"
    options_model = ProfileOptions
    produces = ("profile",)
    paper = "bootstrap CIs: Efron & Tibshirani (1993); bits per byte: Gao et al., The Pile (2020)"

    def plan_ram(self, results, runtime):
        return plan_profile_ram(self.recipe, runtime)

    def run(self, results):
        profile = run_profile(self.recipe, console=self.console, show_progress=self.show_progress,
                              force=self.settings.get("force", False))
        return {"profile": profile}

    def outputs(self, result):
        from pathlib import Path

        return {"profile": Path(result["profile"]["path"])}

    def summarise(self, result):
        from ..conversion.profile_report import profile_table

        self.console.print(profile_table(result["profile"]))

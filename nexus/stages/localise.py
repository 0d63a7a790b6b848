"""The localise stage (optional): where in each teacher does each capability live?

Four measured sub-stages per teacher x capability (`nexus.conversion.localise`): perturbation (ablate layers, then
attention/FFN blocks and heads, measure the drop), activation (units whose attribution is specific to the
capability's data), spectral (SVD energy / effective rank of the selected units' weights) and causal (ablate exactly
the selected units vs random sets of the same size). Writes ``runs/<name>/localise/`` (feature_map.json with a
confidence per sub-stage, heatmaps); the validate stage draws the feature map in its report.

Off by default: add it to the recipe's pipeline after ``profile``::

    pipeline: [profile, localise, student_build, distill, validate, export]
    stages:
      localise: {max_items: 24, heads: flagged, attribution: gradient}

Method: causal ablation with a random control follows "Locating and editing factual associations" (Meng et al.
2022) and attribution patching (Nanda 2023); the spectral check follows effective rank (Roy & Vetterli 2007).
"""

from pathlib import Path

from ..conversion.localise import LocaliseOptions, localise_table, run_localise
from ..conversion.stage_memory import plan_localise_ram
from . import register_stage
from .stage import Stage


@register_stage
class LocaliseStage(Stage):
    name = "localise"
    title = "localise: perturbation -> activation -> spectral -> causal vs a random control"
    options_model = LocaliseOptions
    requires = ("profile",)
    produces = ("feature_map",)
    optional = True
    paper = "Meng et al. 2022 (causal tracing); Nanda 2023 (attribution patching); Roy & Vetterli 2007"

    def plan_ram(self, results, runtime):
        return plan_localise_ram(self.recipe, runtime)

    def run(self, results):
        fm = run_localise(self.recipe, console=self.console, show_progress=self.show_progress,
                          force=self.settings.get("force", False))
        folder = Path(fm["_path"])
        return {"feature_map": {"path": str(folder / "feature_map.json"), "reused": fm["_reused"], "map": fm}}

    def outputs(self, result):
        return {"feature_map": Path(result["feature_map"]["path"])}

    def summarise(self, result):
        self.console.print(localise_table(result["feature_map"]["map"]))

"""The Stage registry and the recipe's pipeline: stages registered once by name, the list checked at recipe load
(each entry named by its index), the lifecycle guarded, and an optional stage (localise) added by the recipe running
end to end inside `nexus consolidate` with its feature map drawn by validate."""

import json

import pytest
import yaml
from test_distill_stage import consolidate_recipe_file, two_teachers  # noqa: F401  (fixture)
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.recipe import RecipeError, load_recipe
from nexus.stages import DEFAULT_PIPELINE, Stage, StageLifecycleError, register_stage, stage_registry
from nexus.stages.pipeline import resolve_pipeline, run_consolidate


def test_every_builtin_stage_is_registered_with_its_options():
    registry = stage_registry()
    assert set(DEFAULT_PIPELINE) | {"localise"} <= set(registry)
    assert resolve_pipeline() == list(DEFAULT_PIPELINE)
    assert registry["localise"].optional and "localise" not in DEFAULT_PIPELINE
    # align is optional (a recipe may leave it out) but in the default list; every other default stage is required
    assert [n for n in DEFAULT_PIPELINE if registry[n].optional] == ["align"]
    assert resolve_pipeline(["profile", "student_build", "distill", "validate", "export"])[1] == "student_build"
    from nexus.conversion.recipe import stage_options_registry

    options = stage_options_registry()
    for name, cls in registry.items():
        if cls.options_model is not None:
            assert options[name] is cls.options_model, name


def test_a_stage_name_registered_twice_is_refused():
    class Again(Stage):
        name = "profile"
        title = "again"

        def plan_ram(self, results, runtime):
            return {}

        def run(self, results):
            return {}

        def outputs(self, result):
            return {}

    with pytest.raises(ValueError, match="stage 'profile' is already registered"):
        register_stage(Again)


def _with_pipeline(path, pipeline):
    raw = yaml.safe_load(path.read_text())
    raw["pipeline"] = pipeline
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("pipeline, message", [
    (["profile", "student_build", "distil", "validate", "export"], r"pipeline\[2\]: unknown stage 'distil'"),
    (["profile", "student_build", "distill", "validate"], r"pipeline: the required stage\(s\) export are missing"),
    (["student_build", "profile", "distill", "validate", "export"],
     r"pipeline\[0\]: stage 'student_build' needs profile from profile, which must come earlier"),
    (["profile", "profile", "student_build", "distill", "validate", "export"],
     r"pipeline\[1\]: stage 'profile' is listed twice"),
    (["profile", "student_build", "localise", "distill", "validate", "export", "localise"],
     r"pipeline\[6\]: stage 'localise' is listed twice"),
])
def test_a_bad_pipeline_is_refused_at_recipe_load_naming_the_entry(two_teachers, tmp_path, pipeline,  # noqa: F811
                                                                    message):
    recipe = _with_pipeline(consolidate_recipe_file(two_teachers, tmp_path, steps=1), pipeline)
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)
    result = CliRunner().invoke(app, ["consolidate", str(recipe), "--quiet"])
    assert result.exit_code == 2 and "pipeline" in result.output
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_a_stage_runs_once_and_has_no_outputs_before_it_ran(two_teachers, tmp_path):  # noqa: F811
    from rich.console import Console

    recipe = load_recipe(consolidate_recipe_file(two_teachers, tmp_path, steps=1))
    stage = stage_registry()["profile"](recipe, Console(quiet=True), show_progress=False)
    with pytest.raises(StageLifecycleError, match="has not run yet"):
        stage.written()
    result = stage({})
    assert stage.written()["profile"].is_dir() and result["profile"]["best"]
    with pytest.raises(StageLifecycleError, match="already ran"):
        stage({})
    distill = stage_registry()["distill"](recipe, Console(quiet=True), show_progress=False)
    with pytest.raises(StageLifecycleError, match=r"needs the results of \['build'\]"):
        distill({"profile": result["profile"]})


def test_the_recipe_adds_localise_and_validate_draws_its_feature_map(two_teachers, tmp_path):  # noqa: F811
    from rich.console import Console

    path = consolidate_recipe_file(two_teachers, tmp_path, steps=1)
    raw = yaml.safe_load(path.read_text())
    raw["capabilities"][0]["reference"] = ["code"]
    raw["capabilities"][1]["reference"] = ["prose"]
    raw["stages"]["localise"] = {"max_items": 4, "max_item_tokens": 16, "lm_scored_tokens": 8, "random_sets": 5,
                                 "autocast": False}
    raw["pipeline"] = ["profile", "localise", "student_build", "distill", "validate", "export"]
    path.write_text(yaml.safe_dump(raw))
    done = run_consolidate(load_recipe(path), console=Console(quiet=True), show_progress=False,
                           verify_export=False)
    assert done["stages"] == raw["pipeline"]
    assert list(done["seconds"]) == raw["pipeline"]
    feature_map = json.loads((tmp_path / "runs" / "tiny" / "localise" / "feature_map.json").read_text())
    assert set(two_teachers) <= set(feature_map)
    validate = tmp_path / "runs" / "tiny" / "validate"
    assert (validate / "feature_map.png").is_file()  # validate drew the localise stage's map
    assert "Feature map (localiser confidence)" in (validate / "report.md").read_text()
    memory = json.loads((tmp_path / "runs" / "tiny" / "memory_plan.json").read_text())
    assert set(memory["plans"]) == set(raw["pipeline"]) and memory["measured_peak_rss_bytes"]["localise"] > 0


def test_nexus_stages_lists_every_registered_stage():
    result = CliRunner().invoke(app, ["stages"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in stage_registry():
        assert name in result.output
    assert "optional" in result.output  # localise

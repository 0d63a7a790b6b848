"""The memory planner wired before each consolidate stage (issue 8): every stage's peak RAM is planned from its real
inputs and printed, a stage planned over the RAM budget is refused before anything is written, naming the stage,
the estimate and the budget."""

import json
import re

import pytest
import yaml
from rich.console import Console
from safetensors.torch import load_file
from test_distill_stage import consolidate_recipe_file, two_teachers  # noqa: F401  (two_teachers: a fixture)

from nexus.conversion import peak_rss
from nexus.conversion.memory_plan import MemoryPlanError, safetensors_numel
from nexus.conversion.recipe import load_recipe
from nexus.conversion.stage_memory import (
    STAGE_RAM_PLANS,
    machine_ram_bytes,
    plan_stages,
    ram_budget,
    register_stage_ram_plan,
)
from nexus.stages import DEFAULT_PIPELINE
from nexus.stages.pipeline import run_consolidate

STAGES = list(DEFAULT_PIPELINE)


def recipe_with(teachers, root, **memory):
    path = consolidate_recipe_file(teachers, root, steps=2)
    if memory:
        raw = yaml.safe_load(path.read_text())
        raw["memory"] = memory
        path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def numel(folder):
    return sum(t.numel() for t in load_file(str(folder / "model.safetensors")).values())


def test_a_tiny_run_plans_every_stage_from_its_inputs_prints_and_records_the_plans(two_teachers, tmp_path):  # noqa: F811
    recipe = recipe_with(two_teachers, tmp_path)
    console = Console(record=True, width=220)
    result = run_consolidate(recipe, console=console, show_progress=False, interference=False, verify_export=False)
    memory = result["memory"]
    assert list(memory["plans"]) == list(memory["upfront"]) == STAGES == list(memory["measured_peak_rss_bytes"])
    assert memory["budget_bytes"] == machine_ram_bytes() and "machine's total RAM" in memory["budget_source"]
    for plan in [*memory["plans"].values(), *memory["upfront"].values()]:
        assert plan["total_bytes"] == sum(plan["components"].values()) <= memory["budget_bytes"]
    plans = memory["plans"]
    # align (default pipeline) loads nothing when no two teachers share an architecture, even before the profile
    assert memory["upfront"]["align"]["components"] == plans["align"]["components"] == {}
    # the profile's teachers (fp32 in this recipe), counted from their safetensors headers
    peak = plans["profile"]["assumptions"]["peak"]
    assert plans["profile"]["components"]["teacher_weights"] == 4 * numel(two_teachers[peak])
    # later stages are planned from what the earlier ones wrote: the student init, then the distilled student
    init = tmp_path / "runs" / "tiny" / "student_build"
    assert plans["distill"]["assumptions"]["student_params"] == numel(init) == safetensors_numel(init)
    assert plans["export"]["components"]["student_fp32"] == 4 * numel(tmp_path / "runs" / "tiny" / "distill" /
                                                                      "student")
    assert plans["student_build"]["assumptions"]["student_budget_params"] == result["build"]["budget"]["params"]
    # validate reuses the profile's teacher scores (cka off, same inputs): planned without any teacher, unlike the
    # up-front plan made before the profile existed
    assert not set(plans["validate"]["per_model"]) & set(two_teachers)
    assert set(two_teachers) <= set(memory["upfront"]["validate"]["per_model"])
    assert "teacher_weights" not in plans["validate"]["components"]
    # ... but it loads each teacher's tokenizer to compare tokenisations: the largest one's parse peak is planned
    checks = [k for k in plans["validate"]["per_model"] if k.startswith("tokenizer check ")]
    assert len(checks) == 1 and checks[0].removeprefix("tokenizer check ") in two_teachers
    written = json.loads((tmp_path / "runs" / "tiny" / "memory_plan.json").read_text())
    assert written["plans"]["distill"]["total_bytes"] == plans["distill"]["total_bytes"]
    text = console.export_text()
    assert "memory plan: peak RAM per stage" in text
    for stage in STAGES:
        assert f"memory plan, {stage}: peak RAM" in text


def test_an_absurdly_small_budget_is_refused_before_anything_is_written(two_teachers, tmp_path):  # noqa: F811
    recipe = recipe_with(two_teachers, tmp_path, ram_gb=0.001)
    with pytest.raises(MemoryPlanError) as info:
        run_consolidate(recipe, console=Console(quiet=True), show_progress=False)
    message = str(info.value)
    budget = int(0.001 * 2**30)
    assert message.startswith("stage profile: planned peak RAM")
    assert f"exceeds the budget of 1 MiB ({budget:,} bytes)" in message and "memory.ram_gb = 0.001 GiB" in message
    planned = int(re.search(r"planned peak RAM [\d,]+ MiB \(([\d,]+) bytes\)", message).group(1).replace(",", ""))
    assert planned > budget and "teacher_weights" in message and "runtime" in message
    assert not (tmp_path / "runs").exists()


def test_the_cli_refuses_with_one_line_and_exit_code_2(two_teachers, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from nexus.cli import app

    recipe_with(two_teachers, tmp_path, ram_gb=0.001)
    out = CliRunner().invoke(app, ["consolidate", str(tmp_path / "recipe.yaml"), "--quiet"], env={"COLUMNS": "300"})
    assert out.exit_code == 2 and "stage profile: planned peak RAM" in out.output, out.output
    assert not (tmp_path / "runs").exists()


def test_the_largest_stage_is_refused_up_front_even_when_the_first_stages_fit(two_teachers, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    """With this process's RSS pinned at 0, a budget between the largest plan and the next one refuses the largest
    stage before the first stage runs (planned up front from upper bounds)."""
    monkeypatch.setattr(peak_rss, "current_rss", lambda: 0)
    recipe = recipe_with(two_teachers, tmp_path)
    totals = {name: plan["total_bytes"] for name, plan in plan_stages(recipe, 0).items()}
    ranked = sorted(totals, key=totals.get, reverse=True)
    assert totals[ranked[0]] > totals[ranked[1]], totals
    gib = (totals[ranked[0]] + totals[ranked[1]]) / 2 / 2**30
    recipe = recipe_with(two_teachers, tmp_path, ram_gb=gib)
    assert ram_budget(recipe)[0] == int(gib * 2**30)
    with pytest.raises(MemoryPlanError, match=f"^stage {ranked[0]}: planned peak RAM"):
        run_consolidate(recipe, console=Console(quiet=True), show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_stage_planners_are_a_registry_refusing_duplicates():
    assert list(STAGE_RAM_PLANS) == [n for n in STAGES if n != "align"]  # align plans itself (`plan_align_ram`)
    with pytest.raises(ValueError, match="'distill' already has a RAM planner"):
        register_stage_ram_plan("distill", lambda *a, **k: None)


# ---------------------------------------------------------------- the stand-alone stage commands


WIDE = {"COLUMNS": "2000"}  # one rich line per message, whatever its length


def _cli(*args):
    from typer.testing import CliRunner

    from nexus.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=WIDE)


def _error_lines(output):
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def imported_student(two_teachers, tmp_path_factory):  # noqa: F811
    """A one-tower Nexus checkpoint of ``llama_char`` (a student for validate / distill --student-init / export)."""
    from nexus.conversion.teacher_import import import_teacher

    return import_teacher(two_teachers["llama_char"], tmp_path_factory.mktemp("student") / "llama_char")


def _with_profile(recipe):
    from test_distill_stage import PROFILE

    folder = recipe.run_path / "profile"
    folder.mkdir(parents=True)
    (folder / "profile.json").write_text(json.dumps(PROFILE))


def refuse_profile(recipe, student, tmp_path):
    return ["profile", tmp_path / "recipe.yaml", "--quiet"], "profile", [tmp_path / "runs"]


def refuse_student_build(recipe, student, tmp_path):
    _with_profile(recipe)
    return (["distill", tmp_path / "recipe.yaml", "--quiet"], "student_build",
            [recipe.run_path / "student_build", recipe.run_path / "distill"])


def refuse_distill(recipe, student, tmp_path):
    _with_profile(recipe)
    return (["distill", tmp_path / "recipe.yaml", "--student-init", student, "--quiet"], "distill",
            [recipe.run_path / "distill"])


def refuse_validate(recipe, student, tmp_path):
    return ["validate", tmp_path / "recipe.yaml", student, "--quiet"], "validate", [tmp_path / "runs"]


def refuse_export(recipe, student, tmp_path):
    return ["export", student, tmp_path / "exported", "--ram-gb", "0.001"], "export", [tmp_path / "exported"]


@pytest.mark.parametrize("case", [refuse_profile, refuse_student_build, refuse_distill, refuse_validate,
                                  refuse_export], ids=lambda c: c.__name__.removeprefix("refuse_"))
def test_each_stage_command_refuses_a_stage_over_budget_with_one_line_and_writes_nothing(
        case, two_teachers, imported_student, tmp_path):  # noqa: F811
    recipe = recipe_with(two_teachers, tmp_path, ram_gb=0.001)
    args, stage, never_written = case(recipe, imported_student, tmp_path)
    out = _cli(*args)
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    errors = _error_lines(out.output)
    assert len(errors) == 1, out.output
    assert errors[0].startswith(f"error: stage {stage}: planned peak RAM") and "exceeds the budget of 1 MiB" in errors[0]
    assert ("memory.ram_gb = 0.001 GiB" if stage != "export" else "--ram-gb 0.001 GiB") in errors[0]
    for path in never_written:
        assert not path.exists(), path


def test_each_stage_command_plans_its_stage_and_runs_within_the_budget(two_teachers, tmp_path):  # noqa: F811
    recipe = recipe_with(two_teachers, tmp_path)
    run = recipe.run_path
    expected = {"profile": ["profile"], "distill": ["student_build", "distill"], "validate": ["validate"],
                "export": ["export"]}
    outputs = {
        "profile": _cli("profile", tmp_path / "recipe.yaml", "--quiet"),
        "distill": _cli("distill", tmp_path / "recipe.yaml", "--quiet"),
        "validate": _cli("validate", tmp_path / "recipe.yaml", run / "distill" / "student", "--quiet"),
        "export": _cli("export", run / "distill" / "student", tmp_path / "exported"),
    }
    for command, out in outputs.items():
        assert out.exit_code == 0, (command, out.output)
        for stage in expected[command]:
            assert re.search(rf"^memory plan, {stage}: peak RAM [\d,]+ MiB \(.*runtime.*\); budget [\d,]+ MiB$",
                             out.output, re.M), (stage, out.output)
    for folder in (run / "profile", run / "student_build", run / "distill" / "student", run / "validate",
                   tmp_path / "exported"):
        assert folder.is_dir(), folder
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_the_recipe_less_export_plan_reads_the_checkpoint_headers(imported_student):
    from nexus.conversion.stage_memory import plan_checkpoint_export_ram
    from nexus.conversion.stage_ram_guard import export_ram_budget

    plan = plan_checkpoint_export_ram(imported_student, 0)
    assert plan["stage"] == "export" and plan["components"]["student_fp32"] == 4 * numel(imported_student)
    assert plan["total_bytes"] == 8 * numel(imported_student)
    assert export_ram_budget() == (machine_ram_bytes(), "the machine's total RAM")
    assert export_ram_budget(0.5) == (2**29, "--ram-gb 0.5 GiB")


def test_a_dense_build_plans_the_shared_tokenizer_it_loads(two_teachers, tmp_path):  # noqa: F811
    """layout dense loads no teacher weights, but it does load a teacher's tokenizer (Gemma's 262k entries made the
    measured peak 1.84x a plan without it): the plan carries its load peak."""
    from nexus.conversion.stage_memory import plan_student_build_ram, tokenizer_bytes

    path = consolidate_recipe_file(two_teachers, tmp_path, steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["stages"]["student_build"].update(layout="dense", init="random", embedding_init="random")
    path.write_text(yaml.safe_dump(raw))
    plan = plan_student_build_ram(load_recipe(path), 0)
    assert plan["components"]["tokenizer_load"] == max(tokenizer_bytes(f)["load_peak"] for f in two_teachers.values())
    assert "teacher_fp32" not in plan["components"]

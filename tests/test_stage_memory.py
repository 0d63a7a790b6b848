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
from nexus.conversion.consolidate import run_consolidate
from nexus.conversion.memory_plan import MemoryPlanError, safetensors_numel
from nexus.conversion.recipe import load_recipe
from nexus.conversion.stage_memory import (STAGE_RAM_PLANS, machine_ram_bytes, plan_stages, ram_budget,
                                           register_stage_ram_plan)

STAGES = ["profile", "student_build", "distill", "validate", "export"]


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
    # the profile's teachers (fp32 in this recipe), counted from their safetensors headers
    peak = plans["profile"]["assumptions"]["peak"]
    assert plans["profile"]["components"]["teacher_weights"] == 4 * numel(two_teachers[peak])
    # later stages are planned from what the earlier ones wrote: the student init, then the distilled student
    init = tmp_path / "runs" / "tiny" / "student_build"
    assert plans["distill"]["assumptions"]["student_params"] == numel(init) == safetensors_numel(init)
    assert plans["export"]["components"]["student_fp32"] == 4 * numel(tmp_path / "runs" / "tiny" / "distill" /
                                                                      "student")
    assert plans["student_build"]["assumptions"]["student_budget_params"] == result["build"]["budget"]["params"]
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
    assert list(STAGE_RAM_PLANS) == STAGES
    with pytest.raises(ValueError, match="'distill' already has a RAM planner"):
        register_stage_ram_plan("distill", lambda *a, **k: None)

"""How the student build splits its parameter budget between towers (`student_build.split_budget`)."""

import pytest
from nexus.conversion.student_build import StudentBuildError, split_budget
from test_distill_stage import PROFILE, make_recipe, small_texts, two_teachers  # noqa: F401 (fixture)


def test_proportional_keeps_one_fraction_and_squeezes_a_small_specialist():
    f, budgets = split_budget(1_000 + 90, 1_000, {"prose": 100, "code": 100, "arithmetic": 10})
    assert f == pytest.approx(90 / 210)
    assert budgets == {"prose": 42, "code": 42, "arithmetic": 4}


def test_weighted_share_keeps_a_small_specialist_whole_and_gives_the_rest_to_the_others():
    layers = {"prose": 100, "code": 100, "arithmetic": 10}
    f, budgets = split_budget(1_090, 1_000, layers, {"prose": 1.0, "code": 1.0, "arithmetic": 1.0})
    assert budgets == {"prose": 40, "code": 40, "arithmetic": 10}  # 30 each, arithmetic capped at 10, 20 shared
    assert f == pytest.approx(90 / 210)
    # weights shift the shares; nothing exceeds its teacher or the budget
    _, weighted = split_budget(1_090, 1_000, layers, {"prose": 3.0, "code": 1.0, "arithmetic": 1.0})
    assert weighted == {"prose": 60, "code": 20, "arithmetic": 10}
    _, everything = split_budget(10_000, 1_000, layers, {"prose": 1.0, "code": 1.0, "arithmetic": 1.0})
    assert everything == layers
    with pytest.raises(StudentBuildError, match="do not even hold the shared parts"):
        split_budget(900, 1_000, layers, {"prose": 1.0, "code": 1.0, "arithmetic": 1.0})


def test_the_build_uses_the_recipe_switch_and_the_capability_weights(two_teachers, tmp_path):  # noqa: F811
    from nexus.conversion.student_build import build_student

    recipe = make_recipe(two_teachers, tmp_path)
    recipe.capabilities[0].weight = 3.0  # prose
    options = recipe.stages["student_build"].model_copy(update={"tower_budget": "weighted_share"})
    recipe.stages["student_build"] = type(options).model_validate(options.model_dump())
    _, record = build_student(recipe, PROFILE, tmp_path / "init", texts=small_texts(recipe), show_progress=False)
    # one tower per teacher (here each is the best at one capability), weighted by the capabilities it serves
    budgets = {t["teacher"]: t["layer_budget"] for t in record["towers"]}
    layers = {t["teacher"]: t["teacher_layer_params"] for t in record["towers"]}
    available = record["budget"]["params"] - record["budget"]["fixed_params"]
    assert {t["teacher"]: t["budget_weight"] for t in record["towers"]} == {"llama_char": 3.0, "qwen_bpe": 1.0}
    assert budgets == split_budget(record["budget"]["params"], record["budget"]["fixed_params"], layers,
                                   {"llama_char": 3.0, "qwen_bpe": 1.0})[1]
    assert budgets["llama_char"] > budgets["qwen_bpe"] or budgets["qwen_bpe"] == layers["qwen_bpe"]
    assert sum(budgets.values()) <= available and record["params"] <= record["budget"]["params"]

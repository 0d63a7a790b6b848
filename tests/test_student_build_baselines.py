"""The student_build baselines of issue 7: ``init: random`` (NEXUS's exact shape, no teacher weights) and
``layout: dense`` (one random-init tower for every capability, filling the same budget), on the two tiny teachers of
the distill-stage tests."""

import copy

import pytest
import torch
from nexus.conversion.budget import config_parameter_count
from nexus.conversion.recipe import RecipeError
from nexus.conversion.student_build import build_student
from nexus.modeling_nexus import NexusForCausalLM
from test_distill_stage import PROFILE, make_recipe, small_texts, two_teachers  # noqa: F401 (fixture)


def _build(teachers, root, name, **student_build):
    recipe = make_recipe(teachers, root / name)
    options = recipe.stages["student_build"].model_copy(update=student_build)
    recipe.stages["student_build"] = type(options).model_validate(options.model_dump())
    path, record = build_student(recipe, PROFILE, root / name / "init", texts=small_texts(recipe),
                                 show_progress=False)
    return NexusForCausalLM.from_pretrained(path, dtype=torch.float32), record


@pytest.fixture(scope="module")
def builds(two_teachers, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("baselines")
    return {"teachers": _build(two_teachers, root, "teachers"),
            "random": _build(two_teachers, root, "random", init="random", embedding_init="random"),
            "dense": _build(two_teachers, root, "dense", layout="dense", init="random", embedding_init="random")}


def test_random_init_has_the_exact_shape_of_the_teacher_init_but_none_of_its_weights(builds):
    teacher_model, teacher_record = builds["teachers"]
    random_model, random_record = builds["random"]
    assert random_model.config.towers == teacher_model.config.towers
    assert random_record["params"] == teacher_record["params"] <= teacher_record["budget"]["params"]
    assert random_record["init"] == "random" and random_record["embedding_rows"] == {
        "random (init: random)": random_model.config.vocab_size}
    teacher_state = teacher_model.state_dict()
    std = random_model.config.initializer_range
    for name, value in random_model.state_dict().items():
        if value.ndim == 2 and not name.startswith("model.router."):  # (the router is random in both builds)
            # every matrix is freshly drawn from the model's own init, not copied from a teacher
            assert not torch.equal(value, teacher_state[name]), name
            assert 0.5 * std < value.std().item() < 1.5 * std, name


def test_dense_layout_is_one_tower_for_every_capability_filling_the_budget(builds):
    model, record = builds["dense"]
    assert len(model.config.towers) == 1 and model.model.router is None
    assert model.config.capability_to_tower == {"prose": 0, "code": 0}
    (tower,) = record["towers"]
    assert tower["family_from"] == PROFILE["best"]["prose"] and record["layout"] == "dense"
    params = sum(p.numel() for p in model.parameters())
    assert params == record["params"] <= record["budget"]["params"]
    # the FFN width is the largest that fits: one more unit per layer exceeds the budget
    spec = dict(model.config.towers[0])
    wider = {**spec, "layers": [{**layer, "intermediate_size": layer["intermediate_size"] + 1}
                                for layer in spec["layers"]]}
    config = copy.deepcopy(model.config)
    config.towers = [wider]
    assert config_parameter_count(config)["total"] > record["budget"]["params"]
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("options, message", [
    ({"layout": "dense", "init": "teachers"}, "set init: random"),
    ({"init": "random"}, "set embedding_init: random"),
])
def test_inconsistent_baseline_options_are_refused_naming_the_field(two_teachers, tmp_path, options,  # noqa: F811
                                                                     message):
    recipe = make_recipe(two_teachers, tmp_path)
    raw = recipe.model_dump(mode="json")
    raw["stages"] = {"student_build": options}
    from nexus.conversion.recipe import validate_recipe

    with pytest.raises(RecipeError, match=r"stages\.student_build") as info:
        validate_recipe(raw, base_dir=tmp_path)
    assert message in str(info.value)


def test_the_dense_build_is_planned_without_a_teacher_load(two_teachers, tmp_path):  # noqa: F811
    """layout dense loads no teacher weights: its RAM plan is the random-init student alone, not a teacher's
    fp32 import, gradients and calibration activations (planned 5.7x the measured peak on Gemma-3-270M before)."""
    from nexus.conversion.stage_memory import plan_student_build_ram

    recipe = make_recipe(two_teachers, tmp_path / "r")
    towers = plan_student_build_ram(recipe, 0, profile=PROFILE)
    options = recipe.stages["student_build"].model_copy(update={"layout": "dense", "init": "random",
                                                                "embedding_init": "random"})
    recipe.stages["student_build"] = type(options).model_validate(options.model_dump())
    dense = plan_student_build_ram(recipe, 0, profile=PROFILE)
    budget = dense["assumptions"]["student_budget_params"]
    from nexus.conversion.memory_plan import tokenizer_bytes

    tokenizer_peak = max(tokenizer_bytes(f)["load_peak"] for f in two_teachers.values())
    assert dense["components"] == {"runtime": 0, "student_fp32": 4 * budget, "tokenizer_load": tokenizer_peak}
    assert "teacher_fp32" in towers["components"] and towers["total_bytes"] > dense["total_bytes"]

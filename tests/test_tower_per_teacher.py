"""Issue 16, items 2 and 3: one tower per teacher (not per capability), and capabilities no teacher is competent at.

Two capabilities whose best teacher is the same share ONE tower (named after the teacher, calibrated on both
capabilities' text, its budget split per teacher); ``capability_to_tower`` and the router's training labels map both
to it. A capability no teacher is competent at gets a loud warning in the profile, no tower and no budget, and is
listed first in the validation report as "no competent teacher" instead of a retention number; when no capability
has a competent teacher the build is a clear error. On the two tiny teachers of the distill-stage tests."""

import json

import pytest
import torch
from rich.console import Console
from test_distill_stage import PROFILE, consolidate_recipe_file, make_recipe, small_texts, two_teachers  # noqa: F401

from nexus.conversion import distill as distill_module
from nexus.conversion.distill import run_distill
from nexus.conversion.profile import dropped_capabilities, no_competent_teacher
from nexus.conversion.profile_report import profile_table
from nexus.conversion.recipe import validate_recipe
from nexus.conversion.student_build import StudentBuildError, build_student, split_budget
from nexus.modeling_nexus import NexusForCausalLM

ARITHMETIC = {"name": "arithmetic", "probe": "exact_match", "data": "bundled:arithmetic",
              "options": {"max_new_tokens": 4}}


def with_capabilities(teachers, root, capabilities, **student_build):
    """`make_recipe` (prose + code) with ``capabilities`` appended and ``student_build`` options changed."""
    raw = make_recipe(teachers, root, lmc=False).model_dump(mode="json")
    raw["capabilities"] += capabilities
    raw["stages"]["student_build"].update(student_build)
    return validate_recipe(raw, base_dir=root)


def profile_with(**changes):
    return {**PROFILE, **changes, "best": {**PROFILE["best"], **changes.get("best", {})},
            "capabilities": {**PROFILE["capabilities"], **changes.get("capabilities", {})}}


# llama_char is the best teacher of prose AND arithmetic, qwen_bpe of code (scores by hand, no baselines: every
# teacher counts as competent)
SHARED = profile_with(best={"arithmetic": "llama_char"},
                      capabilities={"arithmetic": {"llama_char": {"score": 0.5, "higher_is_better": True},
                                                   "qwen_bpe": {"score": 0.25, "higher_is_better": True}}})


@pytest.fixture(scope="module")
def shared_build(two_teachers, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("shared")
    recipe = with_capabilities(two_teachers, root, [{**ARITHMETIC, "weight": 2.0}])
    path, record = build_student(recipe, SHARED, root / "init", texts=small_texts(recipe), show_progress=False)
    return recipe, path, record


def test_two_capabilities_with_one_best_teacher_share_one_tower(shared_build):
    _, path, record = shared_build
    assert [(t["name"], t["capabilities"], t["teacher"]) for t in record["towers"]] == [
        ("llama_char", ["prose", "arithmetic"], "llama_char"), ("qwen_bpe", ["code"], "qwen_bpe")]
    assert record["capability_to_tower"] == {"prose": 0, "arithmetic": 0, "code": 1}
    model = NexusForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert [t["name"] for t in model.config.towers] == ["llama_char", "qwen_bpe"]
    assert model.config.towers[0]["capabilities"] == ["prose", "arithmetic"]
    assert model.config.capability_to_tower == {"prose": 0, "arithmetic": 0, "code": 1}
    assert model.model.router.proj.out_features == 2  # the router's classes are the towers
    assert sum(p.numel() for p in model.parameters()) == record["params"] <= record["budget"]["params"]
    # the shared tower was compressed ONCE, calibrated on both capabilities' text with their weights
    calibration = record["towers"][0]["compress"]["capabilities"]
    assert {c: e["weight"] for c, e in calibration.items()} == {"prose": 1.0, "arithmetic": 2.0}
    assert record["towers"][1]["compress"]["capabilities"].keys() == {"code"}
    # a capability's name still picks its tower
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids, tower="arithmetic").logits, model(ids, tower="llama_char").logits)
        assert torch.equal(model(ids, capability="prose").logits, model(ids, tower=0).logits)


def test_the_budget_is_split_per_teacher(shared_build, two_teachers, tmp_path):  # noqa: F811
    _, _, record = shared_build
    total, fixed = record["budget"]["params"], record["budget"]["fixed_params"]
    layers = {t["teacher"]: t["teacher_layer_params"] for t in record["towers"]}
    assert record["teacher_params"].keys() == {"llama_char", "qwen_bpe"}  # each tower teacher counted once
    assert {t["teacher"]: t["layer_budget"] for t in record["towers"]} == split_budget(total, fixed, layers)[1]
    # weighted_share: a teacher's weight is the sum of the weights of the capabilities it serves
    recipe = with_capabilities(two_teachers, tmp_path, [{**ARITHMETIC, "weight": 2.0}],
                               tower_budget="weighted_share")
    _, weighted = build_student(recipe, SHARED, tmp_path / "init", texts=small_texts(recipe), show_progress=False)
    assert {t["teacher"]: t["budget_weight"] for t in weighted["towers"]} == {"llama_char": 3.0, "qwen_bpe": 1.0}
    total, fixed = weighted["budget"]["params"], weighted["budget"]["fixed_params"]
    assert {t["teacher"]: t["layer_budget"] for t in weighted["towers"]} == split_budget(
        total, fixed, layers, {"llama_char": 3.0, "qwen_bpe": 1.0})[1]


def test_router_labels_are_the_tower_of_each_capability(shared_build, tmp_path, monkeypatch):
    recipe, path, _ = shared_build
    seen = {}
    original = distill_module.GroupBatches.__init__

    def capture(self, groups, batch_size, seed):
        seen["groups"] = groups
        original(self, groups, batch_size, seed)

    monkeypatch.setattr(distill_module.GroupBatches, "__init__", capture)
    summary = run_distill(recipe, path, profile=SHARED, out=tmp_path / "distill", show_progress=False)
    assert summary["capability_to_tower"] == {"prose": 0, "arithmetic": 0, "code": 1}
    groups = seen["groups"]
    assert {g["capability"] for g in groups} == {"prose", "arithmetic", "code"}
    for g in groups:  # every row's router label is its capability's tower index
        tower = summary["capability_to_tower"][g["capability"]]
        assert g["tower"] == tower and all(int(row["capability"]) == tower for row in g["rows"])
    router = summary["router_accuracy"]
    assert set(router["per_capability"]) == {"prose", "arithmetic", "code"}  # still reported per capability
    assert summary["caches"]["llama_char--arithmetic"]["tower"] == 0


def test_one_best_teacher_for_everything_is_one_tower_without_a_router(two_teachers, tmp_path):  # noqa: F811
    recipe = with_capabilities(two_teachers, tmp_path, [])
    profile = profile_with(best={"code": "llama_char"})
    path, record = build_student(recipe, profile, tmp_path / "init", texts=small_texts(recipe), show_progress=False)
    assert [t["capabilities"] for t in record["towers"]] == [["prose", "code"]]
    assert record["teacher_params"].keys() == {"llama_char"}  # the budget is a fraction of the tower teachers only
    assert record["budget"]["params"] == int(0.6 * record["teacher_params"]["llama_char"])
    model = NexusForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.model.router is None and model.config.capability_to_tower == {"prose": 0, "code": 0}


# ---------------------------------------------------------------- competence


ZERO = {"metric": "exact_match", "score": 0.0, "ci": [0.0, 0.0], "higher_is_better": True}


def test_no_competent_teacher_is_judged_against_the_trivial_baseline():
    bpb = {"metric": "bpb", "score": 4.5, "ci": [4.4, 4.6], "higher_is_better": False}
    scores = {
        "prose": {"a": {**bpb, "score": 3.0, "ci": [2.9, 3.1]}, "b": {**bpb, "score": 6.0, "ci": [5.9, 6.1]}},
        "code": {"a": {**bpb, "score": 4.4, "ci": [4.2, 4.6]}, "b": {**bpb, "score": 6.0, "ci": [5.9, 6.1]}},
        "arithmetic": {"a": ZERO, "b": ZERO},
        "quiz": {"a": {"metric": "accuracy", "score": 0.9, "ci": [0.8, 1.0], "higher_is_better": True}},
    }
    baselines = {"prose": bpb, "code": bpb, "arithmetic": {**ZERO, "kind": "zero (all answers differ)"},
                 "quiz": {"metric": "accuracy", "score": 0.5, "ci": [0.5, 0.5], "higher_is_better": True}}
    # code: the best CI is not clear of the unigram baseline; arithmetic: exact match 0
    assert no_competent_teacher(scores, baselines) == ["code", "arithmetic"]


def test_the_profile_records_and_shows_a_capability_without_a_competent_teacher(two_teachers, tmp_path):  # noqa: F811
    from nexus.conversion.profile import run_profile
    from nexus.conversion.recipe import load_recipe

    recipe = load_recipe(consolidate_recipe_file(two_teachers, tmp_path, steps=1))
    raw = recipe.model_dump(mode="json")
    raw["capabilities"] = [raw["capabilities"][0], ARITHMETIC]  # random teachers: neither solves a sum
    profile = run_profile(validate_recipe(raw, base_dir=tmp_path), show_progress=False)
    on_disk = json.loads((tmp_path / "runs" / "tiny" / "profile" / "profile.json").read_text())
    assert "arithmetic" in on_disk["no_competent_teacher"] == profile["no_competent_teacher"]
    console = Console(record=True, width=200, force_terminal=True)
    console.print(profile_table(profile))
    text = console.export_text(clear=False)
    assert "NO COMPETENT TEACHER" in text and "WARNING: no competent teacher for" in text
    assert "\x1b[1;31mWARNING" in console.export_text(styles=True)  # in bold red


def test_a_capability_without_a_competent_teacher_gets_no_tower_and_no_budget(two_teachers, tmp_path):  # noqa: F811
    recipe = with_capabilities(two_teachers, tmp_path, [{**ARITHMETIC, "weight": 5.0}],
                               tower_budget="weighted_share")
    profile = profile_with(best={"arithmetic": "llama_char"}, no_competent_teacher=["arithmetic"],
                           capabilities={"arithmetic": {"llama_char": ZERO, "qwen_bpe": ZERO}})
    assert dropped_capabilities(recipe, profile) == ["arithmetic"]
    path, record = build_student(recipe, profile, tmp_path / "init", texts=small_texts(recipe), show_progress=False)
    assert [(t["teacher"], t["capabilities"]) for t in record["towers"]] == [("llama_char", ["prose"]),
                                                                            ("qwen_bpe", ["code"])]
    assert record["no_competent_teacher"].keys() == {"arithmetic"}
    assert record["capability_to_tower"] == {"prose": 0, "code": 1}
    # no budget: llama_char's share is weighted by prose alone, not by arithmetic's 5
    assert {t["teacher"]: t["budget_weight"] for t in record["towers"]} == {"llama_char": 1.0, "qwen_bpe": 1.0}
    assert "arithmetic" not in record["training_text"]
    # distillation skips it (its student has no tower for it) instead of refusing the student
    assert distill_module.capability_teachers(recipe, profile, 1).keys() == {"prose", "code"}
    # require_competent_teacher: false keeps it: a tower (llama_char's) and a share of the budget
    raw = recipe.model_dump(mode="json")
    raw["capabilities"][2]["require_competent_teacher"] = False
    kept = validate_recipe(raw, base_dir=tmp_path)
    _, record = build_student(kept, profile, tmp_path / "kept", texts=small_texts(kept), show_progress=False)
    assert record["capability_to_tower"] == {"prose": 0, "arithmetic": 0, "code": 1} and not record[
        "no_competent_teacher"]


def test_no_competent_teacher_at_all_is_a_clear_error(two_teachers, tmp_path):  # noqa: F811
    recipe = with_capabilities(two_teachers, tmp_path, [])
    profile = profile_with(no_competent_teacher=["prose", "code"])
    with pytest.raises(StudentBuildError, match=r"no capability has a competent teacher \(prose, code\)"):
        build_student(recipe, profile, tmp_path / "init", texts=small_texts(recipe), show_progress=False)
    assert not (tmp_path / "init").exists()
    from nexus.conversion.stage_memory import plan_student_build_ram

    with pytest.raises(StudentBuildError, match="no capability has a competent teacher"):  # refused when planned
        plan_student_build_ram(recipe, 0, profile=profile)


def test_consolidate_lists_it_first_in_the_report_instead_of_a_retention_number(two_teachers, tmp_path):  # noqa: F811
    """profile -> build -> distill -> validate -> export on random teachers: prose is kept (require_competent_teacher
    false), arithmetic (exact match 0 for every teacher) is not."""
    import yaml
    from typer.testing import CliRunner

    from nexus.cli import app

    path = consolidate_recipe_file(two_teachers, tmp_path, steps=1)
    raw = yaml.safe_load(path.read_text())
    raw["capabilities"] = [raw["capabilities"][0], ARITHMETIC]
    path.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(app, ["consolidate", str(path), "--quiet"], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "no competent teacher for" in out.output
    run = tmp_path / "runs" / "tiny"
    profile = json.loads((run / "profile" / "profile.json").read_text())
    assert "arithmetic" in profile["no_competent_teacher"]
    build = json.loads((run / "student_build" / "student_build.json").read_text())
    assert build["capability_to_tower"] == {"prose": 0} and "arithmetic" in build["no_competent_teacher"]
    report = json.loads((run / "validate" / "report.json").read_text())
    assert list(report["no_competent_teacher"]) == ["arithmetic"] and list(report["retention"]) == ["prose"]
    assert report["min"]["capability"] == "prose" and report["mean"]["capabilities"] == ["prose"]
    entry = report["no_competent_teacher"]["arithmetic"]
    assert entry["teacher_score"] == 0 and entry["teacher"] == profile["best"]["arithmetic"]
    md = (run / "validate" / "report.md").read_text()
    top = md.split("\n## ")[0]
    assert "No competent teacher" in top and "arithmetic" in top
    assert top.index("No competent teacher") < top.index("Minimum retention")
    card = (run / "validate" / "model_card.md").read_text()
    assert "**no competent teacher**" in card and "No competent teacher" in card


# ---------------------------------------------------------------- tokenizer: auto (the default)


@pytest.mark.parametrize("best_code, expected", [("llama_char", "base"), ("qwen_bpe", "train_bpe")],
                         ids=["one_teacher", "two_teachers"])
def test_auto_tokenizer_is_the_base_teachers_only_when_one_teacher_serves_everything(two_teachers, tmp_path,  # noqa: F811
                                                                                      best_code, expected):
    recipe = with_capabilities(two_teachers, tmp_path, [], tokenizer="auto")
    assert recipe.stage("student_build").tokenizer == "auto"
    _, record = build_student(recipe, profile_with(best={"code": best_code}), tmp_path / "init",
                              texts=small_texts(recipe), show_progress=False)
    assert record["tokenizer"]["kind"] == expected
    if expected == "base":
        assert record["tokenizer"]["base_teacher"] == "llama_char"


def test_auto_is_the_default_tokenizer():
    from nexus.conversion.student_build import StudentBuildOptions

    assert StudentBuildOptions().tokenizer == "auto"

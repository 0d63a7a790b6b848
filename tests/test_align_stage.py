"""The align stage (issue 17, item 3): tower teachers that share an architecture and a tokenizer are merged into ONE
teacher (OT unit matching, then averaging), and the student build makes one tower of it serving all their
capabilities, at the same budget; teachers of another family are left alone."""

import json

import pytest
import torch
import yaml
from conftest import char_tokenizer, tiny_teacher
from test_distill_stage import consolidate_recipe_file, make_recipe, save_two_teachers, small_texts
from transformers import AutoModelForCausalLM

from nexus.conversion.align import AlignError, merge_groups, run_align
from nexus.conversion.ot_merge import permute_model
from nexus.conversion.student_build import build_student
from nexus.conversion.ties_merge import ties_tensor, trim
from nexus.modeling_nexus import NexusForCausalLM
from nexus.stages.pipeline import PipelineError, resolve_pipeline

# the planted permutation: B is A with its FFN units and heads reordered (the same function, other weights)
NEURONS = {layer: torch.randperm(48, generator=torch.Generator().manual_seed(layer)).tolist() for layer in range(3)}
HEADS = {0: ([2, 3, 0, 1], [1, 0])}
DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """llama_char (A), llama_perm (A permuted: same architecture and tokenizer) and qwen_bpe (another family)."""
    root = tmp_path_factory.mktemp("align-teachers")
    out = save_two_teachers(root)
    a = tiny_teacher("llama", seed=1)
    b = permute_model(a, NEURONS, HEADS)
    out["llama_perm"] = root / "llama_perm"
    b.save_pretrained(out["llama_perm"])
    char_tokenizer().save_pretrained(out["llama_perm"])
    return out


def _profile(best):
    teachers = sorted({t for t in best.values()} | {"qwen_bpe"})
    return {"best": best, "capabilities": {cap: {t: {"score": 2.0 if t == b else 3.0, "higher_is_better": False}
                                                 for t in teachers} for cap, b in best.items()}}


SAME_FAMILY = _profile({"prose": "llama_char", "code": "llama_perm"})


def _recipe(teachers, run_dir, **align):
    recipe = make_recipe(teachers, run_dir)
    recipe.stages["align"] = type(recipe.stage("align")).model_validate(
        {"calibration_tokens": 256, "heldout_tokens": 128, "window_tokens": 32, **align})
    return recipe


def test_groups_are_same_architecture_and_tokenizer_tower_teachers_only(teachers, tmp_path):
    recipe = _recipe(teachers, tmp_path)
    folders = {n: str(p) for n, p in teachers.items()}
    groups, signatures = merge_groups(recipe, SAME_FAMILY, folders)
    assert groups == [["llama_char", "llama_perm"]]
    assert signatures["llama_char"] == signatures["llama_perm"]
    groups, signatures = merge_groups(recipe, _profile({"prose": "llama_char", "code": "qwen_bpe"}), folders)
    assert groups == [] and signatures["llama_char"]["model_type"] != signatures["qwen_bpe"]["model_type"]


def test_ot_merge_recovers_the_permutation_and_the_build_makes_one_tower_at_the_same_budget(teachers, tmp_path):
    recipe = _recipe(teachers, tmp_path / "run")
    record = run_align(recipe, SAME_FAMILY)
    assert not record["reused"] and [m["members"] for m in record["merged"]] == [["llama_char", "llama_perm"]]
    merged = record["merged"][0]
    assert merged["capabilities"] == ["prose", "code"] and merged["steps"][0]["neurons_moved"] > 0
    for cap, loss in merged["heldout_loss"].items():  # B is A permuted: OT finds it, so the merge is A exactly
        assert abs(loss["merged"] - loss["own_teacher"]) < 1e-4, cap
    a = AutoModelForCausalLM.from_pretrained(teachers["llama_char"], dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(merged["folder"], dtype=torch.float32).state_dict()
    assert all(torch.allclose(got[k], a[k], atol=1e-6) for k in a)
    b = AutoModelForCausalLM.from_pretrained(teachers["llama_perm"], dtype=torch.float32).state_dict()
    assert not torch.allclose((a[DOWN] + b[DOWN]) / 2, a[DOWN], atol=1e-3)  # where a plain average would mix units
    on_disk = json.loads((recipe.run_path / "align" / "align.json").read_text())
    assert on_disk["merged"][0]["name"] == "llama_char+llama_perm"
    assert (recipe.run_path / "align" / "merged-0" / "model.safetensors").is_file()
    assert run_align(recipe, SAME_FAMILY)["reused"]

    texts = small_texts(recipe)
    path, build = build_student(recipe, SAME_FAMILY, tmp_path / "merged-init", texts=texts, show_progress=False,
                                merged=record["merged"])
    _, apart = build_student(recipe, SAME_FAMILY, tmp_path / "apart-init", texts=texts, show_progress=False)
    assert [t["capabilities"] for t in build["towers"]] == [["prose", "code"]]
    assert build["towers"][0]["merged_from"] == ["llama_char", "llama_perm"]
    assert [t["capabilities"] for t in apart["towers"]] == [["prose"], ["code"]]
    assert build["budget"]["params"] == apart["budget"]["params"]  # the same fraction of the same teachers
    assert build["params"] <= build["budget"]["params"]
    student = NexusForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert dict(student.config.capability_to_tower) == {"prose": 0, "code": 0}
    assert student.config.nexus_source["teachers"] == {"prose": "llama_char", "code": "llama_perm"}  # distill's


def test_linear_merge_is_the_plain_average(teachers, tmp_path):
    record = run_align(_recipe(teachers, tmp_path, method="linear"), SAME_FAMILY)
    loss = record["merged"][0]["heldout_loss"]["prose"]
    assert loss["merged"] == pytest.approx(loss["plain_average"], abs=1e-6)
    assert "neurons_moved" not in record["merged"][0]["steps"][0]


def test_ties_trims_elects_the_sign_and_averages_only_the_agreeing_task_vectors():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    a = base + torch.tensor([2.0, -4.0, 0.5, 0.0])
    b = base + torch.tensor([2.0, 1.0, -0.5, 3.0])
    # density 1: entry 0 both agree (mean 2); entry 1 sum -3 elects minus, only a agrees (-4); entry 2 sums to 0,
    # which elects plus (mergekit's rule): only a's +0.5; entry 3 only b moved it (3)
    assert torch.equal(ties_tensor(base, [a, b], density=1.0, weights=[1, 1]) - base,
                       torch.tensor([2.0, -4.0, 0.5, 3.0]))
    assert torch.equal(trim(torch.tensor([0.1, -3.0, 2.0, 0.2]), 0.5), torch.tensor([0.0, -3.0, 2.0, 0.0]))
    # density 0.5: a keeps 2 and -4, b keeps 3 and 2; entry 1: only a's -4 is left, entry 2 nothing
    assert torch.equal(ties_tensor(base, [a, b], density=0.5, weights=[1, 1]) - base,
                       torch.tensor([2.0, -4.0, 0.0, 3.0]))


def test_ties_merge_adds_the_trimmed_task_vector_to_the_named_base(teachers, tmp_path):
    recipe = _recipe(teachers, tmp_path / "run", method="ties", base="llama_char", density=0.3)
    record = run_align(recipe, SAME_FAMILY)
    merged = record["merged"][0]
    assert merged["method"] == "ties" and merged["steps"] == [{"base": "llama_char", "members": ["llama_perm"],
                                                               "density": 0.3}]
    a = AutoModelForCausalLM.from_pretrained(teachers["llama_char"], dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(teachers["llama_perm"], dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(merged["folder"], dtype=torch.float32).state_dict()
    delta, moved = b[DOWN] - a[DOWN], got[DOWN] - a[DOWN]
    kept = moved != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # 30% of the task vector kept, the largest in magnitude
    assert torch.allclose(moved[kept], delta[kept]) and delta[kept].abs().min() >= delta[~kept].abs().max()
    with pytest.raises(AlignError, match="stages.align.base: unknown teacher 'nope'"):
        run_align(_recipe(teachers, tmp_path / "bad", method="ties", base="nope"), SAME_FAMILY)
    with pytest.raises(AlignError, match="stages.align.base: teacher 'qwen_bpe' does not share"):
        run_align(_recipe(teachers, tmp_path / "bad2", method="ties", base="qwen_bpe"), SAME_FAMILY)
    assert not (tmp_path / "bad" / "tiny" / "align").exists()


def test_the_ram_plan_counts_the_ties_working_set_of_the_largest_tensor(teachers, tmp_path):
    from nexus.conversion.stage_memory import plan_align_ram

    ot = plan_align_ram(_recipe(teachers, tmp_path), 0, profile=SAME_FAMILY)
    ties = plan_align_ram(_recipe(teachers, tmp_path, method="ties"), 0, profile=SAME_FAMILY)
    config = AutoModelForCausalLM.from_pretrained(teachers["llama_char"]).config
    largest = config.hidden_size * max(config.vocab_size, config.intermediate_size)
    assert "ties_working_set_fp32" not in ot["components"]
    assert ties["components"]["ties_working_set_fp32"] == (3 * 1 + 5) * 4 * largest  # two members: one task vector
    assert ties["total_bytes"] == ot["total_bytes"] + ties["components"]["ties_working_set_fp32"]


def test_a_merge_that_raises_a_capability_loss_past_the_limit_is_not_used(teachers, tmp_path):
    # B: A with its logits sharpened 30x (final norm). The average is sharper than A, so prose (served by A) loses.
    sharp = tiny_teacher("llama", seed=1)
    with torch.no_grad():
        sharp.model.norm.weight.mul_(30.0)
    folder = tmp_path / "llama_sharp"
    sharp.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    teachers = {**teachers, "llama_sharp": folder}
    pair = _profile({"prose": "llama_char", "code": "llama_sharp"})
    record = run_align(_recipe(teachers, tmp_path / "strict", method="linear"), pair)  # the default limit, 10%
    assert record["merged"] == [] and [r["name"] for r in record["rejected"]] == ["llama_char+llama_sharp"]
    rejected = record["rejected"][0]
    worst = max((lo["merged"] - lo["own_teacher"]) / lo["own_teacher"] for lo in rejected["heldout_loss"].values())
    assert rejected["max_loss_increase"] == pytest.approx(worst) and worst > 0
    assert not (tmp_path / "strict" / "tiny" / "align" / "merged-0").exists()
    assert rejected["heldout_loss"]["prose"]["merged"] > 1.10 * rejected["heldout_loss"]["prose"]["own_teacher"]
    recipe = _recipe(teachers, tmp_path / "strict")
    _, build = build_student(recipe, pair, tmp_path / "init", texts=small_texts(recipe), show_progress=False,
                             merged=record["merged"] or None)
    assert [t["capabilities"] for t in build["towers"]] == [["prose"], ["code"]]  # one tower per member, as without
    loose = run_align(_recipe(teachers, tmp_path / "loose", method="linear", max_loss_increase=None), pair)
    assert [m["name"] for m in loose["merged"]] == ["llama_char+llama_sharp"] and loose["rejected"] == []


def test_other_families_are_left_alone_and_too_little_text_is_named(teachers, tmp_path):
    record = run_align(_recipe(teachers, tmp_path / "a"), _profile({"prose": "llama_char", "code": "qwen_bpe"}))
    assert record["merged"] == [] and set(record["signatures"]) == {"llama_char", "qwen_bpe"}
    with pytest.raises(AlignError, match="capability 'prose'.*fewer than 100000 tokens"):
        run_align(_recipe(teachers, tmp_path / "b", window_tokens=100000), SAME_FAMILY)
    assert not (tmp_path / "b" / "tiny" / "align").exists() and (tmp_path / "a" / "tiny" / "align").is_dir()


def test_the_pipeline_places_align_after_profile():
    assert resolve_pipeline(["profile", "align", "student_build", "distill", "validate", "export"])[1] == "align"
    with pytest.raises(PipelineError, match="'align' needs profile"):
        resolve_pipeline(["align", "profile", "student_build", "distill", "validate", "export"])


def test_consolidate_with_align_builds_one_tower_for_the_same_family_pair_end_to_end(teachers, tmp_path):
    from rich.console import Console

    from nexus.conversion.recipe import load_recipe
    from nexus.stages.pipeline import run_consolidate

    pair = {n: teachers[n] for n in ("llama_char", "llama_perm")}
    path = consolidate_recipe_file(pair, tmp_path, steps=1)
    raw = yaml.safe_load(path.read_text())
    raw["capabilities"][0]["teachers"] = ["llama_char"]  # each capability scored on one member: both are towers
    raw["capabilities"][1]["teachers"] = ["llama_perm"]
    raw["stages"]["align"] = {"calibration_tokens": 128, "heldout_tokens": 64, "window_tokens": 32}
    raw["pipeline"] = ["profile", "align", "student_build", "distill", "validate", "export"]
    path.write_text(yaml.safe_dump(raw))
    done = run_consolidate(load_recipe(path), console=Console(quiet=True), show_progress=False, verify_export=False)
    assert done["stages"] == raw["pipeline"]
    run = tmp_path / "runs" / "tiny"
    build = json.loads((run / "student_build" / "student_build.json").read_text())
    assert [t["merged_from"] for t in build["towers"]] == [["llama_char", "llama_perm"]]
    exported = AutoModelForCausalLM.from_pretrained(run / "export", trust_remote_code=True)
    assert dict(exported.config.capability_to_tower) == {"prose": 0, "code": 0}
    memory = json.loads((run / "memory_plan.json").read_text())
    assert memory["plans"]["align"]["total_bytes"] > 0 and memory["measured_peak_rss_bytes"]["align"] > 0

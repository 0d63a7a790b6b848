"""Towers of non-base teachers keep their own embedding, final norm and head (issue 16; `tower_vocabulary`), and the
router is fitted at build time (`router_fit`).

A base student (``tokenizer: base``, base teacher ``qwen_bpe``) with a character-level Llama tower kept whole: on
text the base tokenizer splits into single characters, that tower gives the character teacher's own logits on those
characters (<= 1e-4), before any training. With ``tower_vocabulary: shared`` (the former behaviour) it does not."""

import pytest
import torch
from conftest import char_tokenizer
from test_distill_stage import PROFILE, make_recipe, small_texts, two_teachers  # noqa: F401 (fixture)
from transformers import AutoModelForCausalLM

from nexus.conversion.student_build import build_student
from nexus.conversion.teacher_source import load_tokenizer
from nexus.modeling_nexus import NexusForCausalLM

TEXT = "0123+4567=89"  # single characters in both vocabularies


def _build(teachers, tmp_path, **options):
    recipe = make_recipe(teachers, tmp_path / "run")
    update = {"base_teacher": "qwen_bpe", "budget_fraction": None, **options}
    opts = recipe.stages["student_build"].model_copy(update=update)
    recipe.stages["student_build"] = type(opts).model_validate(opts.model_dump())
    recipe.student.budget.memory_gb = None
    recipe.student.budget.params = 10**6  # both towers whole (an own vocabulary costs rows the teachers' sum lacks)
    path, record = build_student(recipe, PROFILE, tmp_path / "init", texts=small_texts(recipe), show_progress=False)
    _build.last = (recipe, path)
    return NexusForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path), record


def _char_logits_gap(student, student_tok, teacher):
    char = char_tokenizer()
    sid = student_tok(TEXT, add_special_tokens=False)["input_ids"]
    tid = char(TEXT, add_special_tokens=False)["input_ids"]
    assert len(sid) == len(tid) == len(TEXT)  # one token per character in both
    alphabet = sorted(set(TEXT))
    s_cols = [student_tok(c, add_special_tokens=False)["input_ids"][0] for c in alphabet]
    t_cols = [char(c, add_special_tokens=False)["input_ids"][0] for c in alphabet]
    with torch.no_grad():
        s = student(torch.tensor([sid]), capability="prose").logits[0][:, s_cols]
        t = teacher(torch.tensor([tid])).logits[0][:, t_cols]
    return (s - t).abs().max().item()


def test_an_own_vocabulary_tower_reproduces_its_character_teacher(two_teachers, tmp_path):  # noqa: F811
    teacher = AutoModelForCausalLM.from_pretrained(two_teachers["llama_char"], dtype=torch.float32).eval()
    student, student_tok, record = _build(two_teachers, tmp_path)
    towers = {t["name"]: t for t in record["towers"]}
    assert towers["llama_char"]["vocabulary"] == "own" and towers["qwen_bpe"]["vocabulary"] == "shared"
    assert towers["qwen_bpe"]["exact"] and not towers["llama_char"]["exact"]
    rows = towers["llama_char"]["own_vocabulary_rows"]
    assert rows["exact"] > 50 and rows.get("composed", 0) > 0 and rows["special"] >= 1
    # rows only for what its teacher and its text use, not the whole shared vocabulary
    assert sum(rows.values()) == len(student.config.towers[0]["vocabulary_ids"]) < len(student_tok)
    tower = student.model.towers[student.config.capability_to_tower["prose"]]
    assert tower.in_proj is None and tower.embed_tokens.weight.shape[1] == teacher.config.hidden_size
    assert record["params"] <= record["budget"]["params"]
    gap = _char_logits_gap(student, student_tok, teacher)
    assert gap <= 1e-4, gap


def test_the_shared_vocabulary_option_keeps_edge_projections_and_loses_the_teacher(two_teachers, tmp_path):  # noqa
    teacher = AutoModelForCausalLM.from_pretrained(two_teachers["llama_char"], dtype=torch.float32).eval()
    student, student_tok, record = _build(two_teachers, tmp_path, tower_vocabulary="shared")
    assert {t["name"]: t["vocabulary"] for t in record["towers"]} == {"llama_char": "shared", "qwen_bpe": "shared"}
    assert _char_logits_gap(student, student_tok, teacher) > 1e-2


def test_the_router_is_fitted_at_build_time(two_teachers, tmp_path):  # noqa: F811
    student, student_tok, record = _build(two_teachers, tmp_path)
    fit = record["router_fit"]
    assert fit["windows"] > 20 and set(fit["per_capability"]) == {"prose", "code"}
    assert fit["held_out_accuracy"] >= 0.75, fit  # prose vs code from pooled embeddings
    _, _, random_record = _build(two_teachers, tmp_path / "random", router_init="random")
    assert random_record["router_fit"] is None


@pytest.mark.parametrize("bad", [{"tower_vocabulary": "mine"}, {"router_init": "kmeans"}])
def test_bad_choices_name_the_field(two_teachers, tmp_path, bad):  # noqa: F811
    from nexus.conversion.recipe import RecipeError

    with pytest.raises((RecipeError, ValueError), match=next(iter(bad))):
        _build(two_teachers, tmp_path, **bad)


def test_distillation_freezes_the_exact_tower_and_trains_the_others(two_teachers, tmp_path):  # noqa: F811
    from nexus.conversion.distill import run_distill

    before, _, record = _build(two_teachers, tmp_path)
    recipe, init = _build.last
    exact = [t["index"] for t in record["towers"] if t["exact"]]
    assert len(exact) == 1
    opts = recipe.stages["distill"].model_copy(update={"lmc": False})  # keep the distilled end point to compare
    recipe.stages["distill"] = type(opts).model_validate(opts.model_dump())
    summary = run_distill(recipe, init, profile=PROFILE, out=tmp_path / "distill", show_progress=False)
    assert summary["frozen"]["shared embedding"] > 0 and any(k.startswith("tower qwen_bpe") for k in summary["frozen"])
    assert summary["caches"]["qwen_bpe--code"]["mode"] == "frozen (router only)"
    assert "train_cache" not in summary["caches"]["qwen_bpe--code"]  # no teacher pass for a frozen tower
    after = NexusForCausalLM.from_pretrained(tmp_path / "distill" / "student", dtype=torch.float32)
    b, a = before.state_dict(), after.state_dict()
    frozen_keys = [k for k in b if k.startswith(f"model.towers.{exact[0]}.") or k in (
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")]
    moved = [k for k in b if k.startswith("model.towers.") and not k.startswith(f"model.towers.{exact[0]}.")
             and not torch.equal(a[k], b[k])]
    assert frozen_keys and all(torch.equal(a[k], b[k]) for k in frozen_keys)
    assert moved  # the other tower trained
    assert not torch.equal(a["model.router.proj.weight"], b["model.router.proj.weight"])  # the router trained


def test_freezing_is_an_option(two_teachers, tmp_path):  # noqa: F811
    from nexus.conversion.distill import run_distill

    before, _, _ = _build(two_teachers, tmp_path)
    recipe, init = _build.last
    opts = recipe.stages["distill"].model_copy(update={"freeze_exact_towers": False, "lmc": False})
    recipe.stages["distill"] = type(opts).model_validate(opts.model_dump())
    summary = run_distill(recipe, init, profile=PROFILE, out=tmp_path / "distill", show_progress=False)
    assert summary["frozen"] == {}
    after = NexusForCausalLM.from_pretrained(tmp_path / "distill" / "student", dtype=torch.float32)
    assert not torch.equal(after.state_dict()["model.embed_tokens.weight"], before.state_dict()["model.embed_tokens.weight"])


def test_a_base_teachers_remote_code_reference_does_not_reach_the_student(two_teachers, tmp_path):  # noqa: F811
    import json
    import shutil

    teachers = {name: tmp_path / name for name in two_teachers}
    for name, folder in two_teachers.items():
        shutil.copytree(folder, teachers[name])
    config = teachers["qwen_bpe"] / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    config.write_text(json.dumps(data))
    _, _, record = _build(teachers, tmp_path)
    _, path = _build.last
    assert "auto_map" not in json.loads((path / "tokenizer_config.json").read_text())
    assert any("auto_map" in note for note in record["tokenizer_remote_code_removed"])

"""The student speaks its base teacher's tokenizer (issue 16, item 1; `nexus.conversion.base_vocabulary`).

A student built with ``tokenizer: base`` from one tiny teacher of every family, with a budget that keeps its tower
whole, reproduces the teacher's logits on the kept tokens (fp32, <= 1e-4), and its trimmed tokenizer encodes the
capabilities' text to the teacher's token strings. The default base teacher is the one best on the most
capabilities (ties: capability weight, size, recipe order), a lossy tokenizer is passed over, and a character-level
second teacher still distils into a base student through token alignment."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import _COMMON, char_tokenizer, digits_tokenizer, small_bpe_tokenizer, tiny_teacher
from test_distill_stage import PROFILE, make_recipe, small_texts, two_teachers  # noqa: F401 (fixture)
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from nexus.conversion import base_vocabulary as bv
from nexus.conversion.recipe import validate_recipe
from nexus.conversion.student_build import StudentBuildError, build_student
from nexus.conversion.teacher_source import load_tokenizer
from nexus.conversion.training_text import training_text
from nexus.modeling_nexus import NexusForCausalLM

TOLERANCE = 1e-4
BPE_VOCAB = 700  # the byte-level BPE teachers' vocabulary (trained on 12 KB of prose + code: the trim keeps part)


def teacher_with_vocab(family, vocab_size, seed=0):
    """`conftest.tiny_teacher` of ``family`` with another vocabulary size (norms and biases perturbed the same way)."""
    if vocab_size == _COMMON["vocab_size"]:
        return tiny_teacher(family, seed)
    torch.manual_seed(seed)
    common = {**_COMMON, "vocab_size": vocab_size}
    model = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)),
        "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
            **common, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    }[family]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def one_teacher_recipe(folder, run_dir, **student_build):
    raw = {
        "name": "base", "run_dir": str(run_dir),
        "teachers": [{"name": "teacher", "source": str(folder), "dtype": "fp32"}],
        "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose"},
                         {"name": "code", "probe": "lm", "data": "bundled:code"}],
        "stages": {"student_build": {"budget_fraction": 1.0, "calibration_tokens": 64, "window_tokens": 32,
                                     **student_build}},
    }
    return validate_recipe(raw, base_dir=run_dir)


def texts_of(recipe, n=20):
    out = {}
    for cap in recipe.capabilities:
        t = training_text(cap.name, cap.data, chunk_chars=100)
        t.chunks = t.chunks[:n]
        out[cap.name] = t
    return out


@pytest.fixture(scope="module", params=[(f, k) for f in ("llama", "qwen2", "qwen3", "gemma3") for k in ("char", "bpe")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def base_build(request, tmp_path_factory):
    family, kind = request.param
    root = tmp_path_factory.mktemp(f"base-{family}-{kind}")
    tok = char_tokenizer() if kind == "char" else small_bpe_tokenizer(BPE_VOCAB)
    teacher = teacher_with_vocab(family, len(tok))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    recipe = one_teacher_recipe(root / "teacher", root)
    texts = texts_of(recipe)
    path, record = build_student(recipe, {"best": {"prose": "teacher", "code": "teacher"}}, root / "init",
                                 texts=texts, show_progress=False)
    student = NexusForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return SimpleNamespace(family=family, kind=kind, teacher=teacher, tok=tok, student=student,
                           student_tok=load_tokenizer(path), record=record, texts=texts, path=path)


def test_a_whole_base_tower_reproduces_the_teachers_logits_on_the_kept_tokens(base_build):
    b = base_build
    record = b.record
    assert record["tokenizer"]["kind"] == "base" and record["tokenizer"]["base_teacher"] == "teacher"
    assert record["towers"][0]["compress"]["note"] == "budget holds the whole teacher: not pruned"
    kept = record["tokenizer"]["kept"]
    assert kept == len(b.student_tok) == b.student.config.vocab_size <= len(b.tok)
    if b.kind == "bpe":
        assert kept < len(b.tok)  # trimmed: the byte alphabet, specials and what prose + code use
    # the head is the teacher's: scale, norm type, softcap, tying and hidden size
    config = b.student.config
    assert config.hidden_size == b.teacher.config.hidden_size
    assert config.tie_word_embeddings == b.teacher.config.tie_word_embeddings
    assert config.final_norm == ("gemma_rms" if b.family == "gemma3" else "rms")
    if b.family == "gemma3":
        assert config.embedding_scale == pytest.approx(math.sqrt(b.teacher.config.hidden_size))
        assert config.final_logit_softcapping == b.teacher.config.final_logit_softcapping
    else:
        assert config.embedding_scale is None and config.final_logit_softcapping is None
    # kept ids, recovered from the student's token strings
    vocab = b.tok.get_vocab()
    kept_ids = [vocab[t] for t in b.student_tok.convert_ids_to_tokens(list(range(kept)))]
    assert kept_ids == sorted(kept_ids)
    worst = 0.0
    for text in b.texts.values():
        sample = "".join(text.chunks[:3])
        teacher_ids = b.tok(sample, add_special_tokens=False)["input_ids"][:96]
        student_ids = b.student_tok(sample, add_special_tokens=False)["input_ids"][:96]
        # the trimmed tokenizer encodes the capability's text to the teacher's token strings
        assert b.student_tok.convert_ids_to_tokens(student_ids) == b.tok.convert_ids_to_tokens(teacher_ids)
        diff = bv.logit_check(b.student, b.teacher, kept_ids, torch.tensor([teacher_ids]))
        worst = max(worst, diff)
    print(f"\n{b.family}/{b.kind}: kept {kept}/{len(b.tok)} tokens, max |logit diff| {worst:.2e}")
    assert worst <= TOLERANCE
    # not vacuous: the same comparison sees a final norm that is off by 1%
    norm = b.student.model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.add_(0.01)
        assert bv.logit_check(b.student, b.teacher, kept_ids, torch.tensor([teacher_ids])) > TOLERANCE
        norm.copy_(saved)
    # the saved checkpoint loads through AutoModelForCausalLM (remote code) with the same logits
    auto = AutoModelForCausalLM.from_pretrained(b.path, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor([b.student_tok(b.texts["prose"].chunks[0], add_special_tokens=False)["input_ids"][:32]])
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, b.student(ids).logits)


def test_every_chunk_of_the_capabilities_encodes_to_the_teachers_tokens(base_build):
    b = base_build
    for text in b.texts.values():
        for chunk in text.chunks:
            want = b.tok.convert_ids_to_tokens(b.tok(chunk, add_special_tokens=False)["input_ids"])
            got = b.student_tok.convert_ids_to_tokens(b.student_tok(chunk, add_special_tokens=False)["input_ids"])
            assert got == want
    if b.kind == "bpe":  # byte-level: text outside the kept domain still round-trips, in more pieces
        other = "naïve café ∑ {x: [1]}\t~|\n"
        assert b.student_tok.decode(b.student_tok(other, add_special_tokens=False)["input_ids"]) == other


# ---------------------------------------------------------------------------------------------------- choosing


def _fake(teachers, capabilities):
    return SimpleNamespace(teachers=[SimpleNamespace(name=n) for n in teachers],
                           capabilities=[SimpleNamespace(name=c, weight=w) for c, w in capabilities.items()])


def test_the_default_base_teacher_is_best_on_the_most_capabilities_then_weight_then_size_then_order():
    rank = bv.rank_base_teachers
    recipe = _fake(["a", "b", "c"], {"x": 1.0, "y": 1.0, "z": 1.0})
    params = {"a": 10, "b": 30, "c": 20}
    assert rank(recipe, {"best": {"x": "a", "y": "a", "z": "b"}}, {}, params)[0][0] == "a"  # most capabilities
    assert rank(recipe, {"best": {"x": "a", "y": "b"}}, {}, params)[0] == ["b", "a", "c"]  # tie: the larger
    weighted = _fake(["a", "b", "c"], {"x": 2.0, "y": 1.0})
    assert rank(weighted, {"best": {"x": "a", "y": "b"}}, {}, params)[0][0] == "a"  # tie: the heavier capabilities
    assert rank(recipe, {"best": {"x": "a", "y": "c"}}, {}, {"a": 5, "b": 5, "c": 5})[0] == ["a", "c", "b"]
    # only the served capabilities count (a dropped one's best teacher does not)
    assert rank(recipe, {"best": {"x": "a", "y": "a", "z": "b"}}, {}, params, capabilities=["z"])[0][0] == "b"


def test_a_default_base_teacher_whose_tokenizer_loses_the_text_is_passed_over(tmp_path):
    root = tmp_path / "teachers"
    folders = {}
    for name, model, tok in (("digits", tiny_teacher("gemma3", seed=2), digits_tokenizer()),
                             ("chars", tiny_teacher("llama", seed=1), char_tokenizer())):
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    raw = {"name": "pick", "run_dir": str(tmp_path),
           "teachers": [{"name": n, "source": str(p), "dtype": "fp32"} for n, p in folders.items()],
           "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose"}]}
    recipe = validate_recipe(raw, base_dir=tmp_path)
    texts = texts_of(recipe, n=5)
    profile = {"best": {"prose": "digits"}}
    tok, base = bv.base_vocabulary(recipe, profile, texts, folders)
    assert base.teacher == "chars" and "digits" in base.choice["passed_over"]
    assert base.choice["ranking"][0]["teacher"] == "digits"
    assert bv.of(tok) is base and len(tok) == len(base.kept_ids)
    with pytest.raises(ValueError, match="teacher 'digits'"):  # a named base teacher must round-trip
        bv.base_vocabulary(recipe, profile, texts, folders, base_teacher="digits")
    with pytest.raises(bv.BaseVocabularyError, match="differs from the base teacher"):
        bv.shared_hidden_size(tok, requested=64)
    assert bv.shared_hidden_size(tok) == 32 and bv.shared_hidden_size(char_tokenizer()) is None


def test_base_teacher_option_needs_tokenizer_base(two_teachers, tmp_path):  # noqa: F811
    from nexus.conversion.recipe import RecipeError

    raw = make_recipe(two_teachers, tmp_path).model_dump(mode="json")
    raw["stages"]["student_build"] = {"tokenizer": "train_bpe", "base_teacher": "qwen_bpe"}
    with pytest.raises(RecipeError, match="base_teacher is for tokenizer: base"):
        validate_recipe(raw, base_dir=tmp_path)
    recipe = make_recipe(two_teachers, tmp_path)
    options = recipe.stages["student_build"].model_copy(update={"base_teacher": "nobody"})
    recipe.stages["student_build"] = type(options).model_validate(options.model_dump())
    with pytest.raises(StudentBuildError, match="'nobody' is not a teacher"):
        build_student(recipe, PROFILE, tmp_path / "init", texts=small_texts(recipe), show_progress=False)


def test_train_bpe_and_a_teachers_name_still_build_as_before(two_teachers, tmp_path):  # noqa: F811
    for kind in ("train_bpe", "llama_char"):
        recipe = make_recipe(two_teachers, tmp_path / kind)
        options = recipe.stages["student_build"].model_copy(update={"tokenizer": kind})
        recipe.stages["student_build"] = type(options).model_validate(options.model_dump())
        path, record = build_student(recipe, PROFILE, tmp_path / kind / "init", texts=small_texts(recipe),
                                     show_progress=False)
        assert record["tokenizer"] == {"kind": kind, "vocab_size": record["tokenizer"]["vocab_size"]}
        assert any("owner" in k for k in record["embedding_rows"])  # rows by token string, from the owning teacher
        config = NexusForCausalLM.from_pretrained(path).config
        assert config.tie_word_embeddings and config.embedding_scale is None and config.final_norm == "rms"
        assert record["params"] <= record["budget"]["params"]


def test_edge_init_fit_maps_the_base_embedding_onto_a_narrower_teachers_own_rows(two_teachers, tmp_path):  # noqa: F811
    torch.manual_seed(5)
    wide = LlamaForCausalLM(LlamaConfig(**{**_COMMON, "hidden_size": 48, "intermediate_size": 64},
                                        tie_word_embeddings=False)).eval()
    teachers = {"llama_char": tmp_path / "llama48", "qwen_bpe": two_teachers["qwen_bpe"]}
    wide.save_pretrained(teachers["llama_char"])
    char_tokenizer().save_pretrained(teachers["llama_char"])
    recipe = make_recipe(teachers, tmp_path / "run")
    options = recipe.stages["student_build"].model_copy(update={"base_teacher": "qwen_bpe", "edge_init": "fit",
                                                                "tower_vocabulary": "shared",
                                                                "budget_fraction": 1.0})
    recipe.stages["student_build"] = type(options).model_validate(options.model_dump())
    path, record = build_student(recipe, PROFILE, tmp_path / "init", texts=small_texts(recipe), show_progress=False)
    fit = record["tokenizer"]["edge_fit"]
    assert set(fit) == {"llama_char"} and fit["llama_char"]["matched"] > 90  # printable ASCII + specials
    student = NexusForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tower = student.model.towers[student.config.capability_to_tower["prose"]]
    assert tower.in_proj.weight.shape == (48, 32)
    student_tok, char = load_tokenizer(path), char_tokenizer()
    letters = "abcxyzABC0123+="
    sid = [student_tok(c, add_special_tokens=False)["input_ids"] for c in letters]
    tid = [char(c, add_special_tokens=False)["input_ids"] for c in letters]
    assert all(len(i) == 1 for i in sid + tid)  # a single-character token in both vocabularies
    sid, tid = [i[0] for i in sid], [i[0] for i in tid]
    with torch.no_grad():
        rows = student.model.embed_tokens(torch.tensor(sid))  # (n, 32)
        want = wide.model.embed_tokens.weight[tid]  # (n, 48): the tower teacher's own rows
        fitted = (tower.in_proj(rows) - want).norm() / want.norm()
        identity = (torch.nn.functional.pad(rows, (0, 16)) - want).norm() / want.norm()  # [I | 0]
    # least squares over ~95 shared characters in 32 dimensions: not exact here (exact when the shared width exceeds
    # the shared tokens, as in the demo), but far closer to the tower's own rows than [I | 0]
    print(f"\nedge fit: relative error {fitted:.3f} (fit) vs {identity:.3f} ([I | 0]); record {fit['llama_char']}")
    assert fitted < 0.9 * identity and fit["llama_char"]["in_fit_error"] < 1.0


# ---------------------------------------------------------------------------------------------------- distilling


def test_a_character_level_teacher_distils_into_a_base_student_through_token_alignment(two_teachers,  # noqa: F811
                                                                                        tmp_path):
    from nexus.conversion.distill import run_distill
    from nexus.training.token_alignment import vocabulary_map

    recipe = make_recipe(two_teachers, tmp_path / "run")
    options = recipe.stages["student_build"].model_copy(update={"base_teacher": "qwen_bpe"})
    recipe.stages["student_build"] = type(options).model_validate(options.model_dump())
    init, record = build_student(recipe, PROFILE, tmp_path / "init", texts=small_texts(recipe), show_progress=False)
    assert record["tokenizer"]["base_teacher"] == "qwen_bpe"
    assert [(t["name"], t["capabilities"]) for t in record["towers"]] == [("llama_char", ["prose"]),
                                                                          ("qwen_bpe", ["code"])]
    assert record["embedding_rows"] == {"from base teacher qwen_bpe (exact)": record["tokenizer"]["kept"]}
    # the character teacher's tokens map onto the base vocabulary's single-character tokens
    student_tok = load_tokenizer(init)
    vmap = vocabulary_map(char_tokenizer(), student_tok)
    strings = student_tok.convert_ids_to_tokens(vmap.teacher_to_student[vmap.teacher_to_student >= 0].tolist())
    assert vmap.fraction_mapped > 0.9 and all(len(student_tok.convert_tokens_to_string([s])) == 1 for s in strings
                                              if s != student_tok.eos_token)
    out = tmp_path / "distill"
    summary = run_distill(recipe, init, profile=PROFILE, out=out, show_progress=False)
    assert summary["train"]["steps"] == 4 and summary["train"]["skipped_steps"] == 0
    # the base teacher: identity when nothing was trimmed (its 320-token BPE is all used), else token-aligned
    untrimmed = record["tokenizer"]["kept"] == record["tokenizer"]["teacher_vocab_size"]
    assert summary["alignment"] == {"llama_char": "token_aligned",
                                    "qwen_bpe": "identity" if untrimmed else "token_aligned"}
    char_caches = [entry for key, entry in summary["caches"].items() if key.startswith("llama_char")]
    assert char_caches and all(0 < e["train_alignment"]["aligned_fraction"] <= 1 for e in char_caches)
    router = summary["router_accuracy"]
    assert router["n"] > 0 and set(router["per_capability"]) == {"prose", "code"}
    saved = json.loads((out / "distill.json").read_text())
    assert saved["router_accuracy"] == router and set(saved["caches"]) == set(summary["caches"])
    model = AutoModelForCausalLM.from_pretrained(out / "student", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]]), tower=0).logits).all()

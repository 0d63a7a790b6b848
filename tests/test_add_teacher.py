"""`nexus add-teacher` (issue 19): a third teacher joins a built two-tower student; only its tower and the router
train, every old tensor is bit-identical (sha256 per tensor), the old capabilities score the same on the same items,
and bad input (an existing capability, an incompetent teacher, a modified student) is refused with nothing written."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import char_tokenizer, tiny_teacher
from safetensors.torch import load_file, save_file
from test_distill_stage import PROFILE, make_recipe, small_texts, two_teachers  # noqa: F401 (fixture)
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.add_teacher import AddTeacherError, add_teacher
from nexus.conversion.student_build import build_student
from nexus.conversion.student_hashes import StudentFolderError, write_student_hashes
from nexus.modeling_nexus import NexusForCausalLM

DISTILL = {"steps": 2, "batch_size": 2, "tokens": 300, "chunk_chars": 100, "seq_len": 32, "checkpoint_every": 2,
           "top_k": 4, "cache_batch_size": 4}
PROFILE_OPTS = {"max_items": 8, "n_bootstrap": 100, "window_tokens": 32}


@pytest.fixture(scope="module")
def student(two_teachers, tmp_path_factory):  # noqa: F811
    """A base student (prose: llama_char with its own vocabulary, code: qwen_bpe exact) and the recipe file it was
    built from; plus a third teacher (Gemma-3 family, character tokenizer) saved beside them."""
    root = tmp_path_factory.mktemp("add-teacher")
    recipe = make_recipe(two_teachers, root / "run")
    opts = recipe.stages["student_build"].model_copy(update={"base_teacher": "qwen_bpe", "budget_fraction": None})
    recipe.stages["student_build"] = type(opts).model_validate(opts.model_dump())
    recipe.student.budget.memory_gb = None
    recipe.student.budget.params = 10**6
    folder, _ = build_student(recipe, PROFILE, root / "student", texts=small_texts(recipe), show_progress=False)
    raw = {"name": "tiny", "run_dir": str(root / "run"),
           "teachers": [{"name": n, "source": str(p), "dtype": "fp32"} for n, p in two_teachers.items()],
           "capabilities": [{"name": "prose", "probe": "lm", "data": "bundled:prose"},
                            {"name": "code", "probe": "lm", "data": "bundled:code"}],
           "stages": {"profile": PROFILE_OPTS, "student_build": {"chunk_chars": 100}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    gemma = tiny_teacher("gemma3", seed=5)
    gemma.save_pretrained(root / "gemma_char")
    char_tokenizer().save_pretrained(root / "gemma_char")
    return root, folder


def fragment(root, caps=None, name="frag.yaml", **extra):
    raw = {"student_recipe": "recipe.yaml",
           "teachers": [{"name": "gemma_char", "source": "gemma_char", "dtype": "fp32"}],
           "capabilities": caps or [{"name": "arith", "probe": "exact_match", "data": "bundled:arithmetic",
                                     "require_competent_teacher": False}],
           "stages": {"profile": PROFILE_OPTS, "student_build": {"calibration_tokens": 64, "window_tokens": 32},
                      "distill": DISTILL}, **extra}
    (root / name).write_text(yaml.safe_dump(raw))
    return root / name


def test_add_teacher_trains_only_the_new_tower_and_proves_no_regression(student, tmp_path):
    root, folder = student
    report = add_teacher(folder, fragment(root), tmp_path / "out", show_progress=False)
    out = tmp_path / "out"
    assert report["capability_to_tower"] == {"prose": 0, "code": 1, "arith": 2}
    proof = report["proof"]
    assert proof["tensors"]["all_equal"] and proof["tensors"]["n"] > 10 and proof["passed"]
    assert "model.router.proj.weight[:2]" in proof["tensors"]["sha256"]  # router: new_row keeps the old rows
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key, value in before.items():  # every old tower and shared tensor as it was
        if not key.startswith("model.router."):
            assert torch.equal(after[key], value), key
    assert after["model.router.proj.weight"].shape[0] == 3
    assert torch.equal(after["model.router.proj.weight"][:2], before["model.router.proj.weight"])
    new_keys = [k for k in after if k.startswith("model.towers.2.")]
    assert new_keys and any(k.endswith("embed_tokens.weight") for k in new_keys)
    frozen = report["distill"]["frozen"]
    assert "tower llama_char" in frozen and "tower qwen_bpe" in frozen and frozen["shared embedding"] > 0
    assert report["distill"]["train"]["steps"] == 2
    for cap in ("prose", "code"):
        r = proof["retention"][cap]
        assert r["n"] == 8 and r["metric"] == "bpb" and r["after_over_before_ci"] is not None
        assert set(proof["router"][cap]) >= {"before", "before_ci", "after", "after_ci"}
        assert proof["interference"][cap]["new_tower_forced"] > 0
    assert set(report["new_capabilities"]) == {"arith"}
    assert report["build"]["vocabulary_coverage"]["rows"]["exact"] > 5  # digits are one token in both vocabularies
    # the written folder records its hashes and capabilities, so a further add-teacher needs no recipe
    assert json.loads((out / "nexus_hashes.json").read_text())["tensors"]
    caps = json.loads((out / "nexus_capabilities.json").read_text())["capabilities"]
    assert [c["name"] for c in caps] == ["prose", "code", "arith"]
    assert (out / "add_teacher_report.md").read_text().count("sha256") >= 1
    model = NexusForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]]), capability="arith").logits).all()
    assert not list(tmp_path.glob(".out.work-*"))  # the work folder is gone


def test_an_existing_capability_needs_replace(student, tmp_path):
    root, folder = student
    frag = fragment(root, caps=[{"name": "code", "probe": "lm", "data": "bundled:code"}], name="code.yaml")
    with pytest.raises(AddTeacherError, match="capability 'code' already exists .*--replace"):
        add_teacher(folder, frag, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_an_incompetent_teacher_is_refused_with_its_scores(student, tmp_path):
    root, folder = student
    frag = fragment(root, caps=[{"name": "arith", "probe": "exact_match", "data": "bundled:arithmetic"}],
                    name="strict.yaml")
    with pytest.raises(AddTeacherError, match=r"not competent .*arith: exact_match 0\.0000 .*trivial baseline"):
        add_teacher(folder, frag, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_modified_student_is_refused_and_the_cli_prints_one_line(student, tmp_path):
    root, folder = student
    copy = tmp_path / "student"
    shutil.copytree(folder, copy)
    write_student_hashes(copy)
    tensors = load_file(str(copy / "model.safetensors"))
    key = next(k for k in tensors if k.startswith("model.towers.1."))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StudentFolderError, match=f"modified .*{key}"):
        add_teacher(copy, fragment(root), tmp_path / "out", show_progress=False)
    result = CliRunner().invoke(app, ["add-teacher", str(copy), str(fragment(root)), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error:" in result.output and "modified" in result.output
    bad = fragment(root, name="bad.yaml", add_teacher={"tower_budget": 2})
    result = CliRunner().invoke(app, ["add-teacher", str(folder), str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "bad.yaml" in result.output and "add_teacher.tower_budget" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_replace_hands_an_existing_capability_to_the_new_teacher(student, tmp_path):
    """--replace: code leaves qwen_bpe's tower (emptied, so it goes), gemma_char's new tower serves it; prose's
    tower and the shared rows stay bit-identical, and the proof reports prose before and after."""
    root, folder = student
    frag = fragment(root, caps=[{"name": "code", "probe": "lm", "data": "bundled:code",
                                 "require_competent_teacher": False}], name="replace.yaml")
    report = add_teacher(folder, frag, tmp_path / "out", replace=True, show_progress=False)
    assert report["replaced"] == ["code"] and set(report["new_capabilities"]) == {"code"}
    assert report["capability_to_tower"] == {"prose": 0, "code": 1}
    model = NexusForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert [t["name"] for t in model.config.towers] == ["llama_char", "gemma_char"]
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in before.items():  # prose's tower and the shared embedding exactly as they were
        if key.startswith("model.towers.0.") or key.startswith("model.embed_tokens"):
            assert torch.equal(after[key], value), key
    proof = report["proof"]
    assert proof["tensors"]["all_equal"] and set(proof["retention"]) == {"prose"} and set(proof["router"]) == {"prose"}
    # one old tower left, so the router was refitted (not grown by a row): prose windows may route differently, and
    # the proof says whether prose's score stayed within its CI rather than assuming it
    assert "refit" in proof["router_tensors"]
    assert proof["passed"] == (proof["retention"]["prose"]["unchanged_within_ci"]
                               and proof["router"]["prose"]["not_below_before_ci"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]]), capability="code").logits).all()


def test_a_student_with_an_attached_speech_encoder_is_refused(student, tmp_path):
    from test_speech_attach import speech_folder

    from nexus.conversion.speech_attach import attach_speech

    root, folder = student
    attached = tmp_path / "attached"
    attach_speech(folder, speech_folder(tmp_path / "speech"), attached)
    with pytest.raises(AddTeacherError, match=r"has encoder\(s\) \['speech'\] \(nexus attach-speech\)"):
        add_teacher(attached, fragment(root), tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()

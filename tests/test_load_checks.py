"""Every weight load is checked (issue 15, item 3): a missing, unexpected or wrong-shaped tensor, or a NaN/Inf, is one
clear error naming the tensor and the file, and nothing is written.

Covered: `nexus import` (teacher folder), `nexus export` (plain and --standard), the student build (teacher load and
tower copy), the distill stage's student init, validate's student load, the engine's resume (model, optimizer,
preservation anchor) and LMC endpoints.
"""

import re
import shutil

import pytest
import torch
from conftest import char_tokenizer, tiny_teacher
from safetensors.torch import load_file, save_file
from test_bad_inputs import PLAN_LINE, PROGRESS_NOISE, snapshot
from test_distill_engine import CELoss, run, tiny_student, token_batches
from test_distill_stage import PROFILE, make_recipe
from test_import_cli import _assert_clean_failure
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.load_check import CHUNK, LoadCheckError, check_finite, checked_from_pretrained
from nexus.conversion.teacher_import import import_teacher, nexus_from_teacher
from nexus.training.distill_engine import list_checkpoints
from nexus.training.distill_options import EngineOptions
from nexus.training.lmc import lmc_path
from nexus.training.preservation import Preservation, taylor_importance

DOWN = "model.layers.0.mlp.down_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
TOWER_UP = "model.towers.0.layers.1.mlp.up_proj.weight"


def _cli(*args):
    """(exit code, the output's lines without transformers' progress bars or the memory plan)."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines()
             if ln.strip() and not PROGRESS_NOISE.match(ln) and not PLAN_LINE.match(ln)]
    return result, lines


def _one_error(args, out, *needles):
    result, lines = _cli(*args)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    _assert_clean_failure(result, out, *needles)
    return lines[0]


def _rewrite(folder, mutate, name="model.safetensors"):
    """Apply ``mutate(tensors)`` to ``folder/name`` in place."""
    path = folder / name
    tensors = dict(load_file(str(path)))
    mutate(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _nan(key, count=None):
    def mutate(t):
        t[key] = t[key].clone()
        t[key].view(-1)[:count] = float("nan")
    return mutate


def _inf(key, count):
    def mutate(t):
        t[key] = t[key].clone()
        t[key].view(-1)[:count] = float("inf")
    return mutate


def _drop(key):
    return lambda t: t.pop(key)


# -------------------------------------------------------------------------------------------- nexus import


TEACHER_DEFECTS = {
    "missing": (_drop(DOWN), [f"missing tensor {DOWN} (1 of 1 missing)", "refusing to initialise it at random"]),
    "unexpected": (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(4, 4)}),
                   ["unexpected tensor model.layers.0.mlp.extra.weight"]),
    "wrong_shape": (lambda t: t.update({DOWN: torch.zeros(3, 3)}),
                    [f"tensor {DOWN} has shape [3, 3] in the file but [32, 48] in the model (1 of 1 mismatched)"]),
    "all_nan": (_nan(Q), [f"tensor {Q} has 1024 NaN/Inf values (of 1024)"]),
    "some_inf": (_inf(Q, 5), [f"tensor {Q} has 5 NaN/Inf values (of 1024)"]),
}


@pytest.mark.parametrize("defect", list(TEACHER_DEFECTS))
def test_import_refuses_a_defective_teacher_and_writes_nothing(defect, llama_dir, tmp_path):
    src, out = tmp_path / "teacher", tmp_path / "out"
    shutil.copytree(llama_dir, src)
    mutate, needles = TEACHER_DEFECTS[defect]
    weights = _rewrite(src, mutate)
    before = snapshot(tmp_path)
    _one_error(["import", src, out], out, f"error: teacher {weights}: ", *needles)
    assert snapshot(tmp_path) == before


def test_untouched_teachers_import_and_tied_lm_head_is_not_reported(teacher_dir, tmp_path, caplog):
    family, src = teacher_dir
    out = tmp_path / "out"
    result, _ = _cli("import", src, out)
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith(f"wrote {out}") and "error" not in result.output, result.output
    assert "MISSING" not in caplog.text and "LOAD REPORT" not in caplog.text
    model = checked_from_pretrained(AutoModelForCausalLM, src, what="teacher")
    if model.config.tie_word_embeddings:  # qwen3, gemma3: lm_head.weight is not in the file, and not missing
        assert "lm_head.weight" not in load_file(str(src / "model.safetensors"))
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_nan_count_spans_chunks():
    t = torch.zeros(CHUNK + 7)
    t[-3:] = float("nan")
    t[0] = float("-inf")
    with pytest.raises(LoadCheckError, match=r"tensor big has 4 NaN/Inf values \(of 4194311\)") as err:
        check_finite({"ok": torch.ones(3), "ids": torch.arange(3), "big": t}, "/x/model.safetensors")
    assert str(err.value).startswith("checkpoint /x/model.safetensors: ")


# -------------------------------------------------------------------------------------------- nexus export


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A one-tower Nexus checkpoint (a tiny Llama import) with its tokenizer."""
    out = tmp_path_factory.mktemp("load-check-student") / "student"
    nexus_from_teacher(tiny_teacher("llama")).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def _bad_student(student_dir, tmp_path, mutate):
    src = tmp_path / "student"
    shutil.copytree(student_dir, src)
    return src, _rewrite(src, mutate)


STUDENT_DEFECTS = {
    "missing_tower_weight": (_drop(TOWER_UP), f"missing tensor {TOWER_UP} (1 of 1 missing)"),
    "nan_tower_weight": (_nan(TOWER_UP, 2), f"tensor {TOWER_UP} has 2 NaN/Inf values"),
}


@pytest.mark.parametrize("standard", [False, True], ids=["self_contained", "standard"])
@pytest.mark.parametrize("defect", list(STUDENT_DEFECTS))
def test_export_refuses_a_defective_student_and_writes_nothing(defect, standard, student_dir, tmp_path):
    mutate, needle = STUDENT_DEFECTS[defect]
    src, weights = _bad_student(student_dir, tmp_path, mutate)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    _one_error(["export", src, out, *(["--standard"] if standard else [])], out,
               f"error: checkpoint {weights}: ", needle)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- student build, distill, validate


def test_student_build_refuses_a_defective_teacher_and_tower_copy(llama_dir, tmp_path):
    from nexus.conversion.student_build import StudentBuildOptions, _compress_tower, assemble_student

    src = tmp_path / "teacher"
    shutil.copytree(llama_dir, src)
    weights = _rewrite(src, _drop(DOWN))
    with pytest.raises(LoadCheckError, match=re.escape(f"teacher {weights}: missing tensor {DOWN}")):
        _compress_tower("prose", "t", src, torch.float32, None, 0, StudentBuildOptions(), None, False)

    nexus = nexus_from_teacher(tiny_teacher("llama"))
    good = {k: v.clone() for k, v in nexus.model.towers[0].state_dict().items()}
    tower = {"tower_spec": dict(nexus.config.towers[0]), "max_positions": 256, "source": str(src)}
    for state, needle in (({k: v for k, v in good.items() if k != "layers.1.mlp.up_proj.weight"},
                           "missing tensor layers.1.mlp.up_proj.weight"),
                          ({**good, "layers.0.self_attn.q_proj.weight": torch.full((32, 32), float("nan"))},
                           "tensor layers.0.self_attn.q_proj.weight has 1024 NaN/Inf values")):
        with pytest.raises(LoadCheckError, match=re.escape(f"tower 'prose' from teacher {src}: {needle}")):
            assemble_student({"prose": {**tower, "tower_state": state}}, char_tokenizer(), 32, ["prose"], {},
                             StudentBuildOptions())


def test_distill_and_validate_refuse_a_defective_student(student_dir, llama_dir, tmp_path):
    from nexus.conversion.distill import run_distill
    from nexus.conversion.validate import load_scored_model

    src, weights = _bad_student(student_dir, tmp_path, _drop(TOWER_UP))
    recipe = make_recipe({"llama_char": llama_dir, "qwen_bpe": llama_dir}, tmp_path / "run")
    with pytest.raises(LoadCheckError, match=re.escape(f"student init {weights}: missing tensor {TOWER_UP}")):
        run_distill(recipe, src, profile=PROFILE, out=tmp_path / "distill", show_progress=False)
    assert not (tmp_path / "distill").exists()
    with pytest.raises(LoadCheckError, match=re.escape(f"student {weights}: missing tensor {TOWER_UP}")):
        load_scored_model(src, torch.float32)


# ------------------------------------------------------------------------------------------ distill resume


RESUME_DEFECTS = {
    "model_missing": ("model.safetensors", _drop(TOWER_UP), f"missing tensor {TOWER_UP}"),
    "model_nan": ("model.safetensors", _nan(TOWER_UP, 3), f"tensor {TOWER_UP} has 3 NaN/Inf values"),
    "model_shape": ("model.safetensors", lambda t: t.update({TOWER_UP: torch.zeros(2, 2)}),
                    f"tensor {TOWER_UP} has shape [2, 2] in the file but [48, 32] in the model"),
    "optimizer_nan": ("optimizer.safetensors", lambda t: _nan(sorted(t)[0], 1)(t), "has 1 NaN/Inf value"),
    "anchor_nan": ("anchor", lambda t: _nan(sorted(t)[0], 1)(t), "has 1 NaN/Inf value"),
}


@pytest.mark.parametrize("defect", list(RESUME_DEFECTS))
def test_resume_refuses_a_defective_checkpoint(defect, tmp_path):
    opts = EngineOptions(steps=4, micro_batches_per_step=1, lr=1e-2, warmup_steps=1, checkpoint_every=2, keep_last=1)
    importance = taylor_importance(tiny_student(0), [token_batches(seed=7)(0)], CELoss())
    keep = {"mode": "anchor", "anchor_lambda": 10.0}
    good = token_batches()

    def crashing(i):
        if i == 2:  # step 3: the checkpoint of step 2 is on disk
            raise RuntimeError("simulated crash")
        return good(i)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_student(0), opts, tmp_path, batches=crashing, preservation=Preservation(keep, importance))
    (_, folder), = list_checkpoints(tmp_path)
    name, mutate, needle = RESUME_DEFECTS[defect]
    path = _rewrite(tmp_path, mutate, "preservation_anchor.safetensors") if name == "anchor" else \
        _rewrite(folder, mutate, name)
    before = snapshot(tmp_path)
    with pytest.raises(LoadCheckError, match=re.escape(needle)) as err:
        run(tiny_student(0), opts, tmp_path, preservation=Preservation(keep, importance))
    assert f" {path}: " in str(err.value)
    assert snapshot(tmp_path) == before  # no new checkpoint, log line or anchor


def test_lmc_refuses_a_nonfinite_endpoint(tmp_path):
    model = tiny_student(0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "a.safetensors"))
    path = _rewrite(tmp_path, _nan(TOWER_UP.replace("layers.1", "layers.0"), 4), "a.safetensors")
    with pytest.raises(LoadCheckError, match=re.escape(f"LMC endpoint {path}: tensor ") + ".* has 4 NaN/Inf values"):
        lmc_path(model, path, model, lambda m: 0.0, alphas=[0.0, 1.0])


def test_import_library_call_raises_the_same_error(llama_dir, tmp_path):
    src = tmp_path / "teacher"
    shutil.copytree(llama_dir, src)
    _rewrite(src, _drop(DOWN))
    with pytest.raises(LoadCheckError, match=DOWN):
        import_teacher(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()

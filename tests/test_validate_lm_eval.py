"""Issue 18 item 4: `nexus validate` runs a recipe's local lm-eval tasks (HFLM on the loaded model) on the student and
every teacher, and the report gives each model's score with a bootstrap CI and the stderr. Nothing is downloaded."""

import json

import pytest
import yaml
from test_probes import write_local_task

from nexus.conversion.recipe import RecipeError, load_recipe
from nexus.conversion.teacher_import import import_teacher
from nexus.conversion.validate import run_validate

pytest.importorskip("lm_eval", reason="lm-eval tasks need `pip install lm-eval`")

FAST = {"max_items": 8, "n_bootstrap": 200, "window_tokens": 64, "batch_size": 8, "compute": "native"}
ROWS = [{"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "answer": k % 3}
        for k, (a, b) in enumerate([(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (6, 1), (4, 4), (8, 3)])]


def write_recipe(folder, teachers, tasks):
    (folder / "quiz.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1)], "answer": 0}) + "\n"
        for a in range(4)))
    raw = {"name": "lmeval", "run_dir": str(folder / "runs"),
           "teachers": [{"name": n, "source": str(teachers[n]), "dtype": "fp32"} for n in ("llama_char", "qwen_bpe")],
           "capabilities": [{"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl",
                             "teachers": ["llama_char"], "require_competent_teacher": False}],
           "stages": {"profile": FAST, "validate": {"cka": False, "student_dtype": "fp32", "lm_eval_tasks": tasks}}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / "recipe.yaml"


def test_validate_reports_local_lm_eval_tasks_for_the_student_and_each_teacher(profile_teachers, tmp_path,
                                                                                monkeypatch):
    write_local_task(tmp_path / "tasks", ROWS, name="tiny_sum")
    recipe = load_recipe(write_recipe(tmp_path, profile_teachers, [{"yaml": "tasks/tiny_sum.yaml"}]))  # relative
    student = import_teacher(profile_teachers["llama_char"], tmp_path / "student")  # the teacher's own weights
    monkeypatch.chdir(student)  # the task path resolved against the recipe's folder, not the working directory
    report = run_validate(recipe, student, show_progress=False)
    table = report["lm_eval"]["tiny_sum"]
    assert table["metric"] == "acc" and table["n"] == len(ROWS)
    assert set(table["models"]) == {"student", "llama_char", "qwen_bpe"}
    for entry in table["models"].values():
        lo, hi = entry["ci"]
        assert lo <= entry["score"] <= hi and entry["n"] == len(ROWS)
        assert entry["stderr"] is not None and entry["stderr"] >= 0
    # the student holds the llama_char teacher's weights: lm-eval scores it identically
    assert table["models"]["student"]["score"] == pytest.approx(table["models"]["llama_char"]["score"])
    written = json.loads((tmp_path / "runs" / "lmeval" / "validate" / "report.json").read_text())
    assert written["lm_eval"]["tiny_sum"]["models"]["qwen_bpe"]["ci"] == table["models"]["qwen_bpe"]["ci"]
    markdown = (tmp_path / "runs" / "lmeval" / "validate" / "report.md").read_text()
    entry = table["models"]["qwen_bpe"]
    assert "## lm-eval tasks" in markdown
    assert f"| tiny_sum | acc ↑ | qwen_bpe | {entry['score']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}] |" \
        in markdown


def test_a_task_that_would_download_is_refused_before_scoring(profile_teachers, tmp_path):
    (tmp_path / "hub.yaml").write_text("task: hubby\ndataset_path: some_org/some_dataset\n"
                                       "output_type: multiple_choice\nmetric_list: [{metric: acc}]\n")
    recipe = load_recipe(write_recipe(tmp_path, profile_teachers, [{"yaml": "hub.yaml"}]))
    student = import_teacher(profile_teachers["llama_char"], tmp_path / "student")
    with pytest.raises(ValueError, match=r"hub\.yaml.*hub datasets cannot be downloaded"):
        run_validate(recipe, student, show_progress=False)
    assert not (tmp_path / "runs" / "lmeval" / "validate").exists()


def test_a_misspelt_task_field_names_its_path(profile_teachers, tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.validate\.lm_eval_tasks"):
        load_recipe(write_recipe(tmp_path, profile_teachers, [{"yml": "x.yaml"}]))

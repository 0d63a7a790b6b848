"""Stage caches are keyed by a hash of their inputs (issue 8): a changed recipe field (or a data file edited in place)
invalidates exactly the stage that reads it and every stage after it, and the stages before it are reused.

One tiny consolidate run folder is edited one field at a time and rerun with `run_consolidate` in the same process;
each step checks which stages report ``reused``. Then a distillation crashed mid-training is rerun after an earlier
stage's field changed: its stale checkpoints must not be resumed."""

import json

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from test_distill_stage import consolidate_recipe_file, two_teachers  # noqa: F401  (two_teachers: a fixture)

from nexus.conversion import distill as distill_module
from nexus.stages.pipeline import run_consolidate
from nexus.conversion.corpora import corpus_text
from nexus.conversion.distill import run_distill
from nexus.conversion.recipe import load_recipe

STAGES = ("profile", "student_build", "distill", "validate")


def write_recipe(root, edit):
    """Apply ``edit(raw)`` to the recipe YAML at ``root/recipe.yaml``."""
    path = root / "recipe.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))


def consolidate(root):
    result = run_consolidate(load_recipe(root / "recipe.yaml"), console=Console(quiet=True), show_progress=False,
                             interference=False, verify_export=False)
    return result, {"profile": result["profile"]["reused"], "student_build": result["build"]["reused"],
                    "distill": result["distill"]["reused"], "validate": result["report"]["reused"]}


def reruns_from(first):
    """Reuse flags when ``first`` and every later stage rerun (None: nothing reruns)."""
    cut = len(STAGES) if first is None else STAGES.index(first)
    return {s: i < cut for i, s in enumerate(STAGES)}


def set_option(stage, key, value):
    def edit(raw):
        raw["stages"][stage][key] = value
    return edit


def append_to(path, text):
    def edit(_raw):
        path.write_text(path.read_text() + text)
    return edit


@pytest.fixture
def run_root(two_teachers, tmp_path):  # noqa: F811
    """The tiny consolidate recipe, with prose scored on a held-out text file and trained on a training text file (so
    both can be edited in place)."""
    consolidate_recipe_file(two_teachers, tmp_path, steps=2)
    (tmp_path / "prose_heldout.txt").write_text(corpus_text("prose", "heldout"))
    (tmp_path / "prose_train.txt").write_text(corpus_text("prose", "train"))

    def files(raw):
        raw["capabilities"][0]["data"] = str(tmp_path / "prose_heldout.txt")
        raw["stages"]["distill"]["train_data"] = {"prose": str(tmp_path / "prose_train.txt")}
    write_recipe(tmp_path, files)
    return tmp_path


def test_a_changed_field_reruns_its_stage_and_the_later_ones_only(run_root):
    _, fresh = consolidate(run_root)
    assert fresh == reruns_from("profile"), "the first run computes every stage"
    cases = [  # (what changed, the edit, the first stage that must rerun)
        ("nothing", lambda raw: None, None),
        ("the RAM budget (no stage's input)", lambda raw: raw.update(memory={"ram_gb": 20.0}), None),
        ("validate option", set_option("validate", "min_retention", 0.001), "validate"),
        ("distill option", set_option("distill", "lr", 2e-3), "distill"),
        ("student_build option", set_option("student_build", "seed", 1), "student_build"),
        ("training text file edited in place", append_to(run_root / "prose_train.txt", "\nOne more line.\n"),
         "student_build"),
        ("profile option max_items", set_option("profile", "max_items", 5), "profile"),
        ("held-out data file edited in place", append_to(run_root / "prose_heldout.txt", "\nA new line.\n"),
         "profile"),
        ("a capability's teacher subset", lambda raw: raw["capabilities"][1].update(teachers=["qwen_bpe",
                                                                                             "llama_char"]),
         "profile"),
    ]
    wrong = []
    for what, edit, first in cases:
        write_recipe(run_root, edit)
        _, reused = consolidate(run_root)
        if reused != reruns_from(first):
            wrong.append(f"{what}: expected reused={reruns_from(first)}, got {reused}")
    assert not wrong, "\n".join(wrong)


def crashing_batches(monkeypatch):
    """Make the distill engine crash inside step 2 (step 1's checkpoint is on disk); returns the undo."""
    original = distill_module.GroupBatches.__call__

    def crashing(self, i):
        if i == len(self.groups) + 1:
            raise RuntimeError("simulated crash")
        return original(self, i)

    monkeypatch.setattr(distill_module.GroupBatches, "__call__", crashing)
    return lambda: monkeypatch.setattr(distill_module.GroupBatches, "__call__", original)


def test_a_crashed_distillation_is_not_resumed_after_an_earlier_stage_changed(run_root, monkeypatch, tmp_path_factory):
    """The first distillation crashes; a student_build field changes; the rerun rebuilds the student and distils the
    new init afresh (not from the crashed run's checkpoints, trained from the old init), ending where an
    uninterrupted distillation of the new init ends."""
    undo = crashing_batches(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        consolidate(run_root)
    engine = run_root / "runs" / "tiny" / "distill" / "engine"
    assert (engine / "checkpoints" / "step-00000001").is_dir()
    undo()

    write_recipe(run_root, set_option("student_build", "seed", 1))
    result, reused = consolidate(run_root)
    assert reused == reruns_from("student_build")
    assert result["distill"]["train"]["resumed_from"] is None, "resumed checkpoints trained from the old init"
    recipe = load_recipe(run_root / "recipe.yaml")
    straight = run_distill(recipe, result["build"]["init_path"], profile=result["profile"],
                           out=tmp_path_factory.mktemp("straight") / "distill", show_progress=False)
    a, b = load_file(str(engine.parent / "student" / "model.safetensors")), load_file(
        str(f"{straight['student']}/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recorded = json.loads((engine / distill_module.ENGINE_INPUTS).read_text())["inputs_digest"]
    assert recorded == result["distill"]["inputs_digest"]


def test_a_crashed_distillation_with_the_same_inputs_resumes(run_root, monkeypatch):
    """The counterpart: nothing changed since the crash, so the rerun resumes from the newest checkpoint."""
    undo = crashing_batches(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        consolidate(run_root)
    undo()
    result, reused = consolidate(run_root)
    assert reused == reruns_from("distill") and result["distill"]["train"]["resumed_from"] == 1

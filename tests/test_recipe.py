"""The recipe: typed validation with field-path errors, cross-field checks, path resolution, the resolved YAML."""

import os

import pytest
import torch
import yaml

from nexus.conversion.recipe import (
    RecipeError,
    field_path,
    load_recipe,
    register_stage_options,
    validate_recipe,
    write_resolved_recipe,
)


@pytest.fixture()
def folder(tmp_path, profile_teachers):
    """A recipe folder with a relative teacher path (a symlink to a tiny teacher) and a JSONL data file."""
    os.symlink(profile_teachers["llama_char"], tmp_path / "teacher_a")
    (tmp_path / "quiz.jsonl").write_text('{"prompt": "p", "choices": ["a", "b"], "answer": 0}\n')
    return tmp_path


def base(**overrides):
    raw = {
        "name": "demo",
        "teachers": [{"name": "a", "source": "teacher_a"}],
        "capabilities": [
            {"name": "prose", "probe": "lm", "data": "bundled:prose", "reference": True},
            {"name": "quiz", "probe": "multiple_choice", "data": "quiz.jsonl"},
        ],
    }
    raw.update(overrides)
    return raw


def write(folder, raw, name="recipe.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def problems(folder, raw):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(folder, raw))
    return info.value


def test_valid_recipe_fills_defaults_and_resolves_paths_against_its_folder(folder, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative paths must not depend on the cwd
    recipe = load_recipe(write(folder, base()))
    teacher = recipe.teachers[0]
    assert teacher.source == (folder / "teacher_a").resolve()
    assert (teacher.dtype, teacher.allow_pickle, teacher.trust_remote_code) == ("bf16", False, False)
    assert recipe.capabilities[1].data == str(folder / "quiz.jsonl")
    assert recipe.capabilities[0].data == "bundled:prose" and recipe.capabilities[0].options["chunk_chars"] == 1000
    assert recipe.run_path == folder / "runs" / "demo"
    assert recipe.student.budget.memory_gb == 16.0 and recipe.student.budget.params is None
    profile = recipe.stage("profile")
    assert profile.n_bootstrap == 1000 and profile.max_items == 200
    assert [t.name for t in recipe.eligible_teachers(recipe.capabilities[0])] == ["a"]


def test_resolved_recipe_is_written_atomically_and_reloads_identically(folder):
    raw = base(stages={"profile": {"n_bootstrap": 50}}, student={"budget": {"params": 5_000_000}})
    recipe = load_recipe(write(folder, raw))
    out = write_resolved_recipe(recipe)
    assert out == recipe.run_path / "recipe.resolved.yaml"
    assert sorted(p.name for p in out.parent.iterdir()) == ["recipe.resolved.yaml"]  # no temp file left
    resolved = yaml.safe_load(out.read_text())
    assert resolved["teachers"][0]["source"] == str((folder / "teacher_a").resolve())
    assert resolved["stages"]["profile"]["n_bootstrap"] == 50 and resolved["stages"]["profile"]["seed"] == 0
    assert resolved["capabilities"][0]["options"]["primary"] == "bpb"
    again = validate_recipe(resolved, base_dir="/")
    assert again.model_dump(mode="json") == recipe.model_dump(mode="json")


def test_typos_are_errors_naming_the_field_path(folder):
    err = problems(folder, {**base(), "capabilites": []})
    assert "capabilites: unknown field (a typo?); allowed: cache_dir, capabilities" in str(err)
    raw = base()
    raw["teachers"][0]["dtyp"] = "bf16"
    raw["capabilities"][1]["wieght"] = 2
    err = problems(folder, raw)
    assert [p for p, _ in err.problems] == ["teachers[0].dtyp", "capabilities[1].wieght"]
    assert "allowed: allow_pickle, dtype, name, source, trust_remote_code" in str(err)
    assert "2 problems" in str(err)


def test_bad_values_name_the_field_path(folder):
    raw = base()
    raw["teachers"][0]["dtype"] = "fp8"
    raw["capabilities"][0]["weight"] = -1
    raw["capabilities"][0]["reference"] = "yes please"
    raw["name"] = "has space"
    err = problems(folder, raw)
    paths = [p for p, _ in err.problems]
    assert "teachers[0].dtype" in paths and "capabilities[0].weight" in paths and "name" in paths
    assert "capabilities[0].reference" in paths  # a union field: one path, no pydantic member tags
    assert "'fp8'" in str(err)
    assert field_path(("capabilities", 1, "reference", "list[str]", 0)) == "capabilities[1].reference[0]"


def test_unknown_probe_lists_the_registered_probes(folder):
    raw = base()
    raw["capabilities"][1]["probe"] = "vibes"
    err = problems(folder, raw)
    assert err.problems[0][0] == "capabilities[1].probe"
    assert "unknown probe 'vibes'; registered probes: exact_match, lm, lm_eval, multiple_choice" in str(err)


def test_probe_and_stage_options_are_validated_with_their_paths(folder):
    raw = base(stages={"profile": {"n_boot": 3, "max_items": 0}, "profil": {}})
    raw["capabilities"][0]["options"] = {"chunk_char": 10}
    err = problems(folder, raw)
    paths = [p for p, _ in err.problems]
    assert "capabilities[0].options.chunk_char" in paths
    assert "stages.profile.n_boot" in paths and "stages.profile.max_items" in paths
    assert "stages.profil" in paths
    listed = str(err).split("stages with options: ")[1].split("\n")[0]
    assert "profile" in listed.split(", ")  # the error lists the registered stages


def test_cross_field_checks(folder):
    raw = base()
    raw["teachers"].append({"name": "a", "source": "teacher_a"})
    raw["capabilities"].append({"name": "quiz", "probe": "lm", "data": "bundled:arithmetic"})
    raw["capabilities"].append({"name": "none", "probe": "lm", "data": "bundled:code", "teachers": []})
    raw["capabilities"].append({"name": "ghost", "probe": "lm", "data": "bundled:code", "teachers": ["zed"],
                                "reference": ["nope"]})
    err = problems(folder, raw)
    text = str(err)
    assert "teachers[1].name: duplicate teacher name 'a' (also teachers[0])" in text
    assert "capabilities[2].name: duplicate capability name 'quiz'" in text
    assert "capabilities[2].data: bundled:arithmetic gives jsonl data but probe 'lm' needs text data" in text
    assert "capabilities[3].teachers: empty list: no teacher can be scored on capability 'none'" in text
    assert "capabilities[4].teachers[0]: unknown teacher 'zed'; teachers: a, a" in text
    assert "capabilities[4].reference[0]: 'nope' is not another capability" in text


def test_missing_teacher_path_and_data_file(folder):
    raw = base()
    raw["teachers"][0]["source"] = "no_such_teacher"
    raw["capabilities"][1]["data"] = "missing.jsonl"
    err = problems(folder, raw)
    assert f"teachers[0].source: teacher path {folder / 'no_such_teacher'} does not exist" in str(err)
    assert f"capabilities[1].data: data file {folder / 'missing.jsonl'} does not exist" in str(err)


def test_pickle_only_checkpoint_is_refused_unless_allowed(folder, profile_teachers):
    pickled = folder / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((profile_teachers["llama_char"] / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    raw = base(teachers=[{"name": "p", "source": "pickled"}])
    err = problems(folder, raw)
    assert err.problems[0][0] == "teachers[0].source" and "pickle" in str(err)
    assert "allow_pickle" in str(err)
    raw["teachers"][0]["allow_pickle"] = True
    assert load_recipe(write(folder, raw)).teachers[0].allow_pickle is True


def test_budget_needs_exactly_one_of_params_or_memory(folder):
    for budget in ({}, {"params": 10, "memory_gb": 4}):
        err = problems(folder, base(student={"budget": budget}))
        assert err.problems[0][0] == "student.budget"
        assert "exactly one of params or memory_gb" in str(err)


def test_unreadable_files_are_recipe_errors(folder):
    bad = folder / "bad.yaml"
    bad.write_text("name: x\nteachers: [\n")
    with pytest.raises(RecipeError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_recipe(bad)
    empty = folder / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(empty)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(folder / "absent.yaml")
    with pytest.raises(ValueError, match="top level must be a mapping"):  # RecipeError is a ValueError
        validate_recipe(["a", "list"])


def test_stage_option_registry_rejects_duplicates():
    from nexus.conversion.profile import ProfileOptions

    with pytest.raises(ValueError, match="already has options registered"):
        register_stage_options("profile", ProfileOptions)


def test_absurd_seeds_and_resample_counts_are_refused_at_load(folder):
    """Found by bench/fuzz_inputs.py: these loaded, and failed (or allocated without bound) only when a stage ran."""
    raw = base(stages={"profile": {"n_bootstrap": 10**30, "seed": -1}, "distill": {"seed": 2**40}})
    paths = [p for p, _ in problems(folder, raw).problems]
    assert {"stages.profile.n_bootstrap", "stages.profile.seed", "stages.distill.seed"} <= set(paths), paths

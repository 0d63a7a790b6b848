"""The recipe fragment of ``nexus add-teacher``: one new teacher, the capabilities it should serve, and options.

The ``teachers`` / ``capabilities`` / ``stages`` sections have the schema of a recipe's (`recipe.Recipe`) and are
validated as one, so an error names the fragment file and the field (``teachers[0].source``). Sample::

    student_recipe: ../recipes/gemma_arith.yaml   # the recipe the student was built from (its old capabilities'
                                                  # probes and data); not needed when the student folder records
                                                  # them (nexus_capabilities.json, written by add-teacher)
    teachers:
      - {name: reverser, source: ../cache/specialists/reverse, dtype: fp32}
    capabilities:
      - {name: reverse, probe: exact_match, data: reverse_probe.jsonl}
    stages:
      profile: {max_items: 100}
      student_build: {calibration_tokens: 2048}        # compression of the new tower (as in consolidate)
      distill: {steps: 200, train_data: {reverse: reverse_train.txt}}
    add_teacher: {tower_budget_fraction: 1.0, router: new_row}
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .recipe import Recipe, RecipeError, _problems_from, validate_recipe

STUDENT_TEACHER = "nexus-student"  # the existing student, as the (frozen) "teacher" of its old capabilities


class AddTeacherOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tower_budget_fraction: float = Field(1.0, gt=0, le=1, description="the new tower keeps this fraction of its "
                                                                      "teacher's layer parameters (compressed with "
                                                                      "the student build's scorer, as consolidate "
                                                                      "does); 1 keeps it whole")
    router: Literal["new_row", "refit"] = Field(
        "new_row", description="new_row: fit only the new class's row, every old row kept bit-identical, and the "
                               "router is not trained by distillation (`router_new_class`); refit: refit the whole "
                               "router on old + new text (`router_fit`) and let distillation's router loss train it "
                               "(old capabilities may then be routed differently: measured on the tiny test student, "
                               "prose bpb moved outside its paired CI)")
    router_items: int = Field(200, ge=1, description="probe items per capability the router accuracy is measured on")


class AddTeacherFragment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student_recipe: Path | None = Field(None, description="the recipe the student was built from (relative to the "
                                                          "fragment): its old capabilities' probes and data")
    teachers: list[dict[str, Any]] = Field(min_length=1, max_length=1, description="exactly one new teacher")
    capabilities: list[dict[str, Any]] = Field(min_length=1, description="the capabilities it should serve")
    stages: dict[str, Any] = Field(default_factory=dict, description="profile / student_build / distill options")
    add_teacher: AddTeacherOptions = Field(default_factory=AddTeacherOptions, description="add-teacher options")


def read_yaml_mapping(path):
    """The fragment file parsed strictly (duplicate keys, .inf/.nan refused), errors naming the file."""
    import yaml

    from .strict_yaml import StrictYAMLError, load_strict_yaml, nonfinite_paths

    path = Path(path)
    if not path.is_file():
        raise RecipeError([("", f"fragment file {path} does not exist or is not a file")])
    try:
        raw = load_strict_yaml(path.read_text(encoding="utf-8"))
    except (StrictYAMLError, UnicodeDecodeError) as exc:
        raise RecipeError([("", str(exc))], path) from None
    except yaml.YAMLError as exc:
        raise RecipeError([("", f"not valid YAML: {' '.join(str(exc).split())}")], path) from None
    if not isinstance(raw, dict):
        raise RecipeError([("", "the top level must be a mapping (teachers, capabilities, stages, ...)")], path)
    bad = nonfinite_paths(raw)
    if bad:
        raise RecipeError([(p, "not a finite number (.inf / .nan are refused)") for p in bad], path)
    return raw


def load_fragment(path, work_dir) -> tuple[AddTeacherFragment, Recipe]:
    """(fragment, the new teacher's recipe) from the YAML at ``path``; the recipe's run folder is ``work_dir``."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    try:
        fragment = AddTeacherFragment.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_problems_from(exc, AddTeacherFragment), path) from None
    if fragment.student_recipe is not None and not fragment.student_recipe.is_absolute():
        fragment.student_recipe = (path.parent / fragment.student_recipe).resolve()
    name = fragment.teachers[0].get("name")
    if name == STUDENT_TEACHER:
        raise RecipeError([("teachers[0].name", f"{STUDENT_TEACHER!r} is reserved (the existing student)")], path)
    recipe = validate_recipe({"name": "add-teacher", "run_dir": str(Path(work_dir).resolve()),
                              "teachers": fragment.teachers, "capabilities": fragment.capabilities,
                              "stages": fragment.stages}, base_dir=path.parent, source=path)
    return fragment, recipe

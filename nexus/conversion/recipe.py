"""The recipe: one YAML file, validated once, as a tree of pydantic models, before any stage runs.

Sample::

    name: demo
    run_dir: runs                    # runs/<name>/ holds every artefact; relative to this file's folder
    teachers:
      - {name: gemma, source: /models/gemma-3-270m-q4_k_m.gguf}       # an HF folder or a .gguf file
      - {name: arith, source: specialists/arithmetic, dtype: bf16}
    capabilities:
      - {name: prose, probe: lm, data: bundled:prose, reference: true}  # the general set localisation contrasts with
      - {name: code, probe: lm, data: bundled:code}
      - {name: arithmetic, probe: exact_match, data: bundled:arithmetic, weight: 2, teachers: [arith, gemma]}
      - {name: quiz, probe: multiple_choice, data: quiz.jsonl, options: {}}
    student:
      budget: {memory_gb: 16}        # or {params: 50_000_000}
    memory: {ram_gb: 24}             # peak RAM every stage is planned against (default: the machine's total RAM)
    stages:
      profile: {n_bootstrap: 1000, max_items: 200, seed: 0}

Every model forbids unknown keys, so a typo is an error. All problems are reported at once, each under the path of
its field in the YAML (``capabilities[1].probe``), as one `RecipeError`. Relative paths resolve against the recipe
file's folder; `write_resolved_recipe` writes the recipe back with absolute paths and every default filled in.
Stages register their option models with `register_stage_options`; probes come from the probe registry.
"""

import importlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from .atomic_output import atomic_file
from .probes import PROBES
from .probes.data_source import ProbeDataError, data_kind, is_bundled, parse_bundled
from .teacher_source import TeacherSourceError, check_teacher_source

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=64)]
RESOLVED_RECIPE = "recipe.resolved.yaml"

# Stages register their options here; the modules of the built-in stages are imported (explicitly) on first use.
STAGE_OPTIONS: dict[str, type[BaseModel]] = {}
BUILTIN_STAGE_MODULES = ("nexus.conversion.profile", "nexus.conversion.localise", "nexus.conversion.compress",
                         "nexus.conversion.validate", "nexus.conversion.student_build", "nexus.conversion.distill")


class RecipeError(ValueError):
    """Everything wrong with a recipe, each problem under its field path."""

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        self.source = source
        where = f"recipe {source}" if source else "recipe"
        lines = [f"{path}: {msg}" if path else msg for path, msg in self.problems]
        if len(lines) == 1:
            super().__init__(f"{where}: {lines[0]}")
        else:
            super().__init__(f"{where} has {len(lines)} problems:\n" + "\n".join(f"  - {ln}" for ln in lines))


def register_stage_options(name, cls):
    """Register the options model of stage ``name`` (the key under ``stages:``); duplicates are refused."""
    if name in STAGE_OPTIONS:
        raise ValueError(f"stage {name!r} already has options registered ({STAGE_OPTIONS[name].__qualname__})")
    STAGE_OPTIONS[name] = cls
    return cls


def stage_options_registry():
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
    importlib.import_module("nexus.stages").stage_registry()  # the pipeline stages register their options too
    return STAGE_OPTIONS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherSpec(_Strict):
    name: Name = Field(description="the teacher's name in scores and reports (letters, digits, _ . -)")
    source: Path = Field(description="an HF folder of safetensors, or a .gguf file; relative to the recipe's folder")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="weights dtype while the teacher is resident")
    allow_pickle: bool = Field(False, description="allow .bin/.pt pickle weights (they can run arbitrary code)")
    trust_remote_code: bool = Field(False, description="allow the checkpoint's own modeling code to run")


class CapabilitySpec(_Strict):
    name: Name = Field(description="the capability's name in scores and reports")
    probe: str = Field(description="how it is scored: a registered probe (lm, exact_match, multiple_choice, lm_eval)")
    data: str = Field(description="a data file (relative to the recipe's folder) or bundled:prose|code|arithmetic|reversal")
    weight: float = Field(1.0, gt=0, description="the capability's weight in importance and in the overall score")
    teachers: list[str] | None = Field(
        None, description="score only these teachers on it (default: every teacher)")
    reference: bool | list[str] = Field(
        False, description="true: this data is the general (reference) set localisation contrasts capabilities "
                           "with; a list: the capabilities whose data form this capability's reference set")
    options: dict[str, Any] = Field(default_factory=dict, description="the probe's own options (see its docs)")
    require_competent_teacher: bool = Field(
        True, description="true: when no teacher is competent at it (the profile: no teacher's CI clear of the "
                          "trivial baseline, or exact match 0) it gets no tower and no budget, and validate lists "
                          "it as 'no competent teacher' instead of a retention number; false: keep it anyway "
                          "(toy teachers, or too few items to separate a teacher from the baseline), still flagged")

    @field_validator("probe")
    @classmethod
    def _registered_probe(cls, name):
        if name not in PROBES:
            raise ValueError(f"unknown probe {name!r}; registered probes: {', '.join(sorted(PROBES))}")
        return name


class Budget(_Strict):
    params: int | None = Field(None, gt=0, description="the student's parameter count")
    memory_gb: float | None = Field(None, gt=0, description="the memory the student must fit in (weights, bf16)")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.params is None) == (self.memory_gb is None):
            raise ValueError("give exactly one of params or memory_gb")
        return self


class StudentSpec(_Strict):
    budget: Budget = Field(default_factory=lambda: Budget(memory_gb=16.0),
                           description="the size the student must fit (used by compress and distill)")


class MemorySpec(_Strict):
    ram_gb: float | None = Field(
        None, gt=0, description="peak RAM (GiB) a stage may plan for: a stage planned over it is refused before it "
                                "starts, naming the numbers (default: the machine's total RAM)")


class Recipe(_Strict):
    name: Name = Field(description="the run's name: artefacts go to <run_dir>/<name>/")
    run_dir: Path = Field(Path("runs"), description="where runs live; relative to the recipe's folder")
    cache_dir: Path | None = Field(
        None, description="where GGUF teachers are converted to safetensors once (default ~/.cache/nexus/gguf)")
    teachers: list[TeacherSpec] = Field(min_length=1, description="the models to fold into the student")
    capabilities: list[CapabilitySpec] = Field(min_length=1, description="what the student must keep")
    student: StudentSpec = Field(default_factory=StudentSpec, description="the student's budget")
    memory: MemorySpec = Field(default_factory=MemorySpec, description="the RAM budget every stage is planned against")
    stages: dict[str, Any] = Field(default_factory=dict, description="per-stage options, keyed by stage name")
    pipeline: list[str] | None = Field(
        None, description="the stages `nexus consolidate` runs, in order (default: profile, student_build, distill, "
                          "validate, export); optional stages such as localise are added here")

    @property
    def run_path(self) -> Path:
        """``<run_dir>/<name>``; `safe_run_path` refuses a name that would resolve outside ``run_dir``."""
        from .run_paths import safe_run_path

        return safe_run_path(self.run_dir, self.name, field="name")

    def teacher(self, name) -> TeacherSpec:
        return next(t for t in self.teachers if t.name == name)

    def eligible_teachers(self, capability: CapabilitySpec) -> list[TeacherSpec]:
        """The teachers a capability is scored on (its ``teachers`` subset, in recipe order)."""
        if capability.teachers is None:
            return list(self.teachers)
        return [t for t in self.teachers if t.name in capability.teachers]

    def stage(self, name) -> BaseModel:
        """The validated options of stage ``name`` (defaults when the recipe does not mention it)."""
        return self.stages[name]


# ---------------------------------------------------------------- error paths


_TAG_NAMES = {"bool", "int", "float", "str", "list", "dict", "none"}


def field_path(loc) -> str:
    """pydantic's loc tuple -> ``capabilities[1].probe`` (dropping union-member tags such as ``list[str]``)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in _TAG_NAMES or part.startswith("function-"):
            continue
        else:
            path += f".{part}" if path else part
    return path


def _allowed_fields(model_cls, loc):
    """Field names of the model that holds the last element of ``loc`` (for 'unknown field' hints)."""
    current = model_cls
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _model_in(field.annotation)
    return sorted(current.model_fields) if current is not None else None


def _model_in(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _problems_from(exc: ValidationError, model_cls, prefix=()):
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(prefix) + tuple(err["loc"])
        path = field_path(loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(model_cls, tuple(err["loc"]))
            hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
            problems.append((path, f"unknown field (a typo?){hint}"))
        elif err["type"] == "missing":
            problems.append((path, "required field is missing"))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) and repr(value) not in msg else ""
            problems.append((path, f"{msg}{shown}"))
    # a union field fails once per member; keep one message per path and text
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------- cross-field checks


def _resolve(path, base_dir: Path) -> Path:
    path = Path(path).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # a symlink loop: keep the path, the existence checks name it
        return Path(os.path.abspath(path))


def _check_unique(items, what, key):
    problems, seen = [], {}
    for i, item in enumerate(items):
        name = item.name
        if name in seen:
            problems.append((f"{key}[{i}].name", f"duplicate {what} name {name!r} (also {key}[{seen[name]}])"))
        seen.setdefault(name, i)
    return problems


def _check_capability(i, cap, recipe, base_dir, check_paths):
    problems = []
    where = f"capabilities[{i}]"
    teacher_names = [t.name for t in recipe.teachers]
    probe_cls = PROBES.get(cap.probe)
    if probe_cls is None:
        problems.append((f"{where}.probe",
                         f"unknown probe {cap.probe!r}; registered probes: {', '.join(sorted(PROBES))}"))
    else:
        try:
            cap.options = probe_cls.Options(**cap.options).model_dump(mode="json")  # defaults filled in
        except ValidationError as exc:
            problems += _problems_from(exc, probe_cls.Options, ("capabilities", i, "options"))
    if is_bundled(cap.data):
        try:
            kind = data_kind(cap.data)
            parse_bundled(cap.data)
        except ProbeDataError as exc:
            problems.append((f"{where}.data", str(exc)))
        else:
            if probe_cls is not None and kind != probe_cls.data_kind:
                needs = f"needs {probe_cls.data_kind} data"
                problems.append((f"{where}.data", f"{cap.data} gives {kind} data but probe {cap.probe!r} {needs}"))
    else:
        path = _resolve(cap.data, base_dir)
        cap.data = str(path)
        if check_paths and not path.is_file():
            looped = os.path.lexists(path) and not path.exists()
            problems.append((f"{where}.data", f"data path {path} is a symlink that loops or points to nothing"
                             if looped else f"data file {path} does not exist" if not path.exists()
                             else f"data path {path} is not a file"))
    if cap.teachers is not None:
        if not cap.teachers:
            problems.append((f"{where}.teachers", f"empty list: no teacher can be scored on capability {cap.name!r}"))
        for k, name in enumerate(cap.teachers):
            if name not in teacher_names:
                problems.append((f"{where}.teachers[{k}]",
                                 f"unknown teacher {name!r}; teachers: {', '.join(teacher_names)}"))
    if isinstance(cap.reference, list):
        names = [c.name for c in recipe.capabilities]
        for k, name in enumerate(cap.reference):
            if name not in names or name == cap.name:
                problems.append((f"{where}.reference[{k}]",
                                 f"{name!r} is not another capability; capabilities: {', '.join(names)}"))
    return problems


def _check_stages(recipe, base_dir=None):
    problems, registry, stages = [], stage_options_registry(), {}
    for name, options in recipe.stages.items():
        if name not in registry:
            problems.append((f"stages.{name}", f"unknown stage; stages with options: {', '.join(sorted(registry))}"))
            continue
        if options is None:
            options = {}
        if not isinstance(options, (dict, BaseModel)):
            problems.append((f"stages.{name}", f"expected a mapping of options, got {options!r}"))
            continue
        try:
            stages[name] = options if isinstance(options, registry[name]) else registry[name].model_validate(
                dict(options), context={"base_dir": base_dir})  # options with file paths resolve them there
        except ValidationError as exc:
            problems += _problems_from(exc, registry[name], ("stages", name))
    for name, cls in registry.items():
        stages.setdefault(name, cls())
    recipe.stages = {name: stages[name] for name in sorted(stages)}
    return problems


def _check_pipeline(recipe):
    """``pipeline``: registered stages, each once, none required left out, each after the stages it reads."""
    if recipe.pipeline is None:
        return []
    pipeline = importlib.import_module("nexus.stages.pipeline")
    try:
        pipeline.resolve_pipeline(recipe.pipeline)
    except pipeline.PipelineError as exc:
        where, _, message = str(exc).partition(": ")
        return [(where, message)]
    return []


def _check_run_dir_vs_teachers(recipe):
    """The run folder must not lie inside a teacher's folder, nor hold one (a stage would write into it)."""
    from .run_paths import is_within

    problems = []
    try:
        run = (Path(recipe.run_dir) / recipe.name).resolve()
    except (OSError, RuntimeError) as exc:
        return [("run_dir", f"cannot resolve {recipe.run_dir}: {exc}")]
    for i, teacher in enumerate(recipe.teachers):
        try:
            source = Path(teacher.source).resolve()
        except (OSError, RuntimeError):
            continue  # the source check names it
        if source.is_dir() and is_within(run, source):
            problems.append(("run_dir", f"the run folder {run} is inside teacher {teacher.name!r}'s folder "
                                        f"{source}; outputs never go into a teacher: choose another run_dir"))
        elif source.exists() and is_within(source, run):
            problems.append((f"teachers[{i}].source", f"teacher {teacher.name!r} ({source}) is inside the run "
                                                      f"folder {run}; move it or choose another run_dir"))
    return problems


def validate_recipe(raw, base_dir=".", source=None, check_paths=True) -> Recipe:
    """A validated `Recipe` from a parsed YAML mapping; relative paths resolve against ``base_dir``."""
    base_dir = Path(base_dir).resolve()
    if not isinstance(raw, dict):
        raise RecipeError([("", f"the top level must be a mapping of sections, got {type(raw).__name__}")], source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_problems_from(exc, Recipe), source) from None
    recipe.run_dir = _resolve(recipe.run_dir, base_dir)
    if recipe.cache_dir is not None:
        recipe.cache_dir = _resolve(recipe.cache_dir, base_dir)
    problems = _check_unique(recipe.teachers, "teacher", "teachers")
    problems += _check_unique(recipe.capabilities, "capability", "capabilities")
    for i, teacher in enumerate(recipe.teachers):
        teacher.source = _resolve(teacher.source, base_dir)
        if check_paths:
            try:
                check_teacher_source(teacher.source, teacher.allow_pickle)
            except TeacherSourceError as exc:
                problems.append((f"teachers[{i}].source", str(exc)))
    if check_paths:
        problems += _check_run_dir_vs_teachers(recipe)
    for i, cap in enumerate(recipe.capabilities):
        problems += _check_capability(i, cap, recipe, base_dir, check_paths)
    problems += _check_stages(recipe, base_dir)
    problems += _check_pipeline(recipe)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def load_recipe(path, check_paths=True) -> Recipe:
    """Read and validate a recipe YAML file; raises `RecipeError` naming every bad field."""
    from .strict_yaml import StrictYAMLError, load_strict_yaml, nonfinite_paths

    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise RecipeError([("", f"recipe path {path} is a folder; give the recipe's YAML file")])
        if os.path.lexists(path) and not path.exists():
            raise RecipeError([("", f"recipe path {path} is a symlink that loops or points to nothing")])
        raise RecipeError([("", f"recipe file {path} does not exist")])
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError([("", f"cannot read it: {exc.strerror or exc}")], path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([("", f"not UTF-8 text (byte offset {exc.start}); a recipe is a YAML text file")],
                          path) from None
    if "\x00" in text:
        raise RecipeError([("", "holds NUL bytes (a binary file?); a recipe is a YAML text file")], path)
    try:
        raw = load_strict_yaml(text)
    except StrictYAMLError as exc:
        raise RecipeError([("", str(exc))], path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise RecipeError([("", f"not valid YAML{where}: {problem}")], path) from None
    except RecursionError:
        raise RecipeError([("", "not valid YAML: nested too deeply")], path) from None
    if raw is None:
        raise RecipeError([("", "the file is empty")], path)
    bad = nonfinite_paths(raw)
    if bad:
        raise RecipeError([(p, "not a finite number (.inf / .nan are refused)") for p in bad], path)
    return validate_recipe(raw, base_dir=path.parent, source=path, check_paths=check_paths)


def resolved_recipe_dict(recipe: Recipe) -> dict:
    """The recipe as plain data: absolute paths, every default (stage and probe options included) filled in."""
    return recipe.model_dump(mode="json")


def write_resolved_recipe(recipe: Recipe, folder=None) -> Path:
    """Write ``recipe.resolved.yaml`` into ``folder`` (default: the run folder), atomically; return its path."""
    target = Path(folder if folder is not None else recipe.run_path) / RESOLVED_RECIPE
    with atomic_file(target) as tmp:
        tmp.write_text(yaml.safe_dump(resolved_recipe_dict(recipe), sort_keys=False), encoding="utf-8")
    return target

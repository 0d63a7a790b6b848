"""Quality at equal budget and NIWT ablations (issue 7, parts 1 and 2), on the demo specialists.

    OMP_NUM_THREADS=1 python bench/compare_methods.py [--scale bench|gemma|test] [--only NAME ...] [--force] [--steps N]
    python bench/results.py          # renders bench/RESULTS.md + bench/RESULTS_retention.png from the JSON

Every variant is the demo's `nexus consolidate` pipeline on the same teachers (the three specialists: arithmetic
Llama + characters, code Gemma-3 + BPE, prose Qwen-3 + BPE) with ONE recipe switch changed, so all of them share:

- the student **parameter budget** (``student_build.budget_fraction``: 1/3 of the teachers' summed parameters; each
  built student's count is recorded and checked against it);
- the **training**: the same distill stage options (steps, batch, rows, learning rate, loss mix, LMC), so the same
  optimizer steps over the same student tokens (recorded per variant from ``distill.json``);
- the **evaluation**: the same validate stage on the same held-out items (retention vs each capability's best
  teacher, paired bootstrap 95% CIs, minimum and mean); the teachers' per-item scores come from one shared profile.

Variants (the registry ``VARIANTS``; a name's JSON is ``<out>/<name>.json``):

- ``nexus``: the demo recipe as `nexus demo` runs it;
- baselines (a)-(f): random-init student of NEXUS's exact shape (``init: random``), magnitude / Minitron (uniform
  activation importance) / weight-PCA (SliceGPT-like) pruning instead of the capability scorer, mergekit
  (recorded as not applicable when no two teachers share an architecture, with the teachers' shapes as evidence),
  and a FuseLLM-style dense student (``layout: dense``: one random-init tower of the same budget, no pruning, no
  router, distilled from each capability's best teacher);
- ablations: each NIWT part that is a recipe switch, switched (capability weighting, dynamic allocation, teacher
  embedding rows, preservation, LMC); parts that are not switches of this pipeline (localisation, OT alignment, the
  manifold option) get a JSON saying why, not a faked number.

Stages cache by input hash under ``--runs`` (profile once; a variant's build / distill / validate are reused when
unchanged); a variant whose JSON exists is skipped unless ``--force``. The teachers' top-k caches are the same for
every variant (they depend on the teacher and the training text only), so each variant's ``distill/caches`` links
to one shared folder. Scales: ``bench`` = the real specialists (``--teachers``, default runs/demo-teachers from `nexus demo` or $NEXUS_TEACHERS,
never retrained here) with the demo's full profile/validate settings; ``gemma`` = Gemma-3-270M + the arithmetic
specialist with `recipes/consolidate_real.yaml` (its budget, student build, 200 distill steps, validate items),
NEXUS and the baselines only; ``test`` = tiny specialists trained in seconds and a few steps (the smoke test),
numbers measured but meaningless. Each JSON holds the per-item student and teacher rows, so `results.py` computes
paired differences from NEXUS (same items, same resamples).

Where it writes (``bench/paths.py``): the per-variant JSON, committed, in ``bench/results/compare/`` (``bench``) and
``bench/results/compare-gemma/`` (``gemma``); the stage artefacts (``--runs``: profile, students, teacher caches,
reports) in ``bench/out/compare-runs/<scale>/``, not tracked. A JSON names its run's folders under ``paths``
(absolute, on the machine that ran it). The ``test`` scale's smoke-run JSON stays in ``bench/out/compare-test/``.
"""

import argparse
import copy
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from nexus.conversion.atomic_output import atomic_file
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py, also when a test loads this by file path
from paths import ARTEFACTS, RESULTS  # noqa: E402

HERE = Path(__file__).resolve().parent
SCHEMA = "nexus.bench.compare/1"
# The demo's specialists: `nexus demo` trains them into runs/demo-teachers (NEXUS_TEACHERS overrides, e.g. a shared cache)
DEFAULT_TEACHERS = Path(os.environ.get("NEXUS_TEACHERS", HERE.parent / "runs" / "demo-teachers"))
SPECIALISTS = ("arithmetic", "code", "prose")

# Per scale: where the recipe comes from (the demo's, at a demo scale, or a recipe file), its distill steps, where
# JSON / runs go by default, and which variant groups it runs (``gemma``: NEXUS and the baselines; the ablations are
# measured on the demo specialists). Result JSON under RESULTS (committed), run folders under ARTEFACTS; the test
# scale's smoke-run JSON is not a result, so it stays with the artefacts.
SCALES = {
    "bench": {"demo_scale": "full", "steps": 500, "out": RESULTS / "compare",
              "runs": ARTEFACTS / "compare-runs" / "bench", "groups": ("nexus", "baseline", "ablation")},
    "test": {"demo_scale": "test", "steps": 2, "out": ARTEFACTS / "compare-test",
             "runs": ARTEFACTS / "compare-runs" / "test", "groups": ("nexus", "baseline", "ablation")},
    "gemma": {"recipe": HERE / "recipes" / "consolidate_real.yaml", "steps": 200, "out": RESULTS / "compare-gemma",
              "runs": ARTEFACTS / "compare-runs" / "gemma", "groups": ("nexus", "baseline")},
    # issue 17 item 3: Gemma + its code fine-tune + the arithmetic specialist, towers vs one merged tower
    "gemma-pair": {"recipe": HERE / "recipes" / "gemma_pair.yaml", "steps": 100, "out": RESULTS / "gemma_pair",
                   "runs": ARTEFACTS / "compare-runs" / "gemma-pair", "groups": ("nexus", "baseline", "ablation")},
}


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: recipe switches to run, or the reason there is nothing to run."""

    name: str
    group: str  # "nexus" | "baseline" | "ablation"
    label: str
    method: str
    student_build: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)
    localise: bool = False  # run the localise stage first and hand its feature map to the student build
    align: dict | None = None  # run the align stage with these options first (same-family teachers -> one tower)
    not_run: str | None = None  # "not_applicable" | "not_a_switch" (then `reason` says why)
    reason: str | None = None
    same_as: str | None = None  # an identical run under another name
    evidence: str | None = None  # a function name in EVIDENCE that measures why (teacher shapes)


VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant):
    """Add a variant; a taken name is an error, never a silent override."""
    if variant.name in VARIANTS:
        raise ValueError(f"variant {variant.name!r} is already registered")
    if variant.group not in ("nexus", "baseline", "ablation"):
        raise ValueError(f"variant {variant.name!r}: group must be nexus, baseline or ablation, got {variant.group!r}")
    VARIANTS[variant.name] = variant
    return variant


RANDOM_INIT = {"init": "random", "embedding_init": "random"}
for _v in (
    Variant("nexus", "nexus", "NEXUS (all stages the demo runs)",
            "one tower per capability from its best teacher, compressed with the capability scorer (gradient-Taylor "
            "+ activation on the capability's training text), per-layer widths as the recipe says (auto: the "
            "widths and scorer mix with the lowest held-aside loss), shared embedding rows from the teachers; "
            "token-aligned KD + CE + router; LMC init -> distilled"),
    Variant("random_init_kd", "baseline", "(a) KD into a random-init student of the same shape",
            "NEXUS's exact student shape (towers, widths, router), every weight randomly initialised; the same KD",
            student_build=RANDOM_INIT),
    Variant("magnitude_kd", "baseline", "(b) magnitude pruning + the same KD",
            "towers pruned by weight magnitude (same allocator, dynamic widths) instead of the capability scorer",
            student_build={"scorer": "magnitude"}),
    Variant("minitron_kd", "baseline", "(c) Minitron-style pruning + the same KD",
            "uniform widths by activation importance on the pooled calibration text (Muralidharan et al. 2024)",
            student_build={"scorer": "minitron", "allocation": "uniform"}),
    Variant("weight_pca_kd", "baseline", "(d) weight-PCA (SliceGPT-like) pruning + the same KD",
            "units kept by their leverage in the principal weight subspace (the `weight_pca` scorer; no rotation)",
            student_build={"scorer": "weight_pca"}),
    Variant("mergekit_linear_ties", "baseline", "(e) mergekit linear / TIES",
            "parameter averaging (linear) or trimmed sign-consensus merging (TIES) of teachers of one architecture",
            not_run="not_applicable", evidence="teacher_architectures",
            reason="linear and TIES merging average parameters tensor by tensor, so they need teachers with the "
                   "same architecture, the same shapes and one tokenizer; no two of these teachers share one (see "
                   "evidence: each teacher's family, shapes and vocabulary, read from its config). mergekit is not "
                   "installed and was not run."),
    Variant("fusellm_dense_kd", "baseline", "(f) FuseLLM-style multi-teacher KD into a dense student",
            "one dense random-init tower of the same budget for every capability (no pruning, no router), trained "
            "on the teachers' distributions: each capability's rows from its best teacher (FuseLLM's MinCE fusion "
            "taken per capability, not per sequence)",
            student_build={"layout": "dense", **RANDOM_INIT}, distill={"loss": {"router": 0.0}}),
    Variant("no_capability_weighting", "ablation", "capability weighting off (magnitude scorer)",
            "the capability scorer replaced by weight magnitude; everything else as NEXUS",
            same_as="magnitude_kd"),
    Variant("no_dynamic_allocation", "ablation", "dynamic weight budgeting off (uniform widths)",
            "the capability scorer with allocation uniform (every layer keeps the same fraction)",
            student_build={"allocation": "uniform"}),
    Variant("no_allocation_selection", "ablation", "allocation selection off (dynamic widths, configured mix)",
            "the capability scorer's configured mix (Taylor + activation) with dynamic widths (global ranking), "
            "instead of the candidate with the lowest held-aside loss",
            student_build={"allocation": "dynamic"}),
    Variant("no_teacher_embedding", "ablation", "shared embedding from the teachers off (random rows)",
            "towers from the teachers as NEXUS, but the shared embedding randomly initialised",
            student_build={"embedding_init": "random"}),
    Variant("vocab_by_id", "ablation", "extra vocabulary by id (not by the teacher's next-token mass)",
            "as NEXUS, but the trimmed base vocabulary's keep_top_tokens extra tokens are the tokenizer's first by id "
            "instead of those the base teacher gives the most next-token mass on the training text",
            student_build={"keep_top_by": "id"}),
    Variant("no_localisation", "ablation", "localisation off",
            "", not_run="not_a_switch",
            reason="nothing to switch off: NEXUS's default pipeline does not run the localise stage (it is optional "
                   "until it is measured to pay), so NEXUS as measured here already runs without localisation. "
                   "Switching it ON is measured instead: the rows 'localisation ON' (the student build keeps the "
                   "units the localiser found causally necessary, critical_units.py) and 'preservation ON, critical "
                   "units' (distillation also protects exactly those units)."),
    Variant("preservation_on", "ablation", "preservation ON (lr_scale 0.9; off in the demo recipe)",
            "in-process preservation switched on: per-element learning rate x (1 - 0.9 x Taylor importance rank)",
            distill={"preservation": {"mode": "lr_scale", "strength": 0.9}}),
    Variant("no_ot_alignment", "ablation", "OT alignment off",
            "", not_run="not_applicable", evidence="teacher_architectures",
            reason="the align stage (optimal-transport neuron matching before averaging, nexus/conversion/ot_merge.py) "
                   "merges two teachers of one family; no two demo specialists share an architecture (evidence) "
                   "and the student build takes one teacher per tower, so the pipeline has no alignment step to "
                   "switch off. bench/compress_real.py measures the OT merge on its own."),
    Variant("no_manifold", "ablation", "manifold (activation low-rank) option off",
            "", not_run="not_a_switch",
            reason="nothing to switch off: the manifold-aware option (student_build's `low_rank`: prune a tower only "
                   "to budget / keep, then store every projection as two factors of the activation-aware SVD, "
                   "low_rank_linear.py) is off in NEXUS's default pipeline until it is measured to pay, so NEXUS as "
                   "measured here already runs without it. Switching it ON at the same parameter budget is measured "
                   "instead: the row 'manifold ON'."),
    Variant("manifold_on", "ablation", "manifold ON (prune to budget / 0.75, then low-rank factors; equal params)",
            "student_build low_rank keep 0.75: each pruned tower is pruned to its budget / 0.75, then every "
            "projection is stored as the two factors of its activation-aware SVD in the capabilities' input "
            "subspace (SVD-LLM), sized so that the tower meets the same budget as NEXUS's pruning alone",
            student_build={"low_rank": {"keep": 0.75, "method": "activation"}}),
    Variant("align_ot", "ablation", "align ON: same-family teachers OT-merged into one tower",
            "the align stage runs after profile: tower teachers sharing an architecture and a tokenizer are merged by "
            "optimal-transport unit matching on their capabilities' text, then averaged (ot_merge.py); the student "
            "builds ONE tower from the merge, serving all their capabilities with their summed budget",
            align={"method": "ot"}),
    Variant("align_linear", "baseline", "(e) linear merge (mergekit linear) of same-family teachers, one tower",
            "as 'align ON' but the members are averaged tensor by tensor without matching (mergekit's linear method, "
            "equal weights); then the same compression and KD",
            align={"method": "linear"}),
    Variant("align_ties", "baseline", "(e) TIES merge (mergekit ties) of same-family teachers, one tower",
            "as 'align ON' but the members' task vectors against the first tower teacher (the base) are trimmed to "
            "their 20% largest entries, sign-elected and averaged onto it (ties_merge.py, mergekit's ties method, "
            "density 0.2); then the same compression and KD",
            align={"method": "ties"}),
    Variant("distill_all_text", "ablation", "all of each capability's training text (no distill.tokens cap)",
            "as NEXUS, but distillation reads every chunk of each capability's training text instead of the "
            "recipe's distill.tokens budget per capability (issue 16: does a longer run overfit the capped text?)",
            distill={"tokens": None}),
    Variant("no_lmc", "ablation", "LMC off",
            "the distilled end point as it is (no walk along init -> distilled for the best alpha)",
            distill={"lmc": False}),
    Variant("localisation_on", "ablation", "localisation ON (critical units kept by the student build)",
            "the localise stage runs after profile; each tower's compression adds the feature map's importance "
            "terms and keeps the heads and neurons whose selection beat random units in the causal check",
            localise=True),
    Variant("preservation_critical", "ablation", "localisation + preservation ON on exactly the critical units",
            "as 'localisation ON', and distillation scales the learning rate of exactly the critical units' "
            "rows/columns by 1 - 0.9 (preservation importance: critical)",
            localise=True, distill={"preservation": {"mode": "lr_scale", "strength": 0.9, "importance": "critical"}}),
):
    register_variant(_v)


# ------------------------------------------------------------------------------------------------ evidence


def teacher_architectures(teachers: dict) -> dict:
    """Each teacher's family, shapes and vocabulary from its config, and the groups that share all of them."""
    from transformers import AutoConfig

    shapes = {}
    for name, folder in teachers.items():
        c = AutoConfig.from_pretrained(folder)
        shapes[name] = {k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                         "num_attention_heads", "num_key_value_heads", "head_dim",
                                                         "intermediate_size", "vocab_size")}
    groups = {}
    for name, s in shapes.items():
        groups.setdefault(json.dumps(s, sort_keys=True), []).append(name)
    mergeable = [g for g in groups.values() if len(g) > 1]
    return {"teachers": shapes, "groups_sharing_an_architecture": mergeable}


EVIDENCE = {"teacher_architectures": teacher_architectures}


# ------------------------------------------------------------------------------------------------ recipe


def merge(base: dict, update: dict) -> dict:
    """``base`` with ``update`` merged in, nested dicts key by key."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def variant_recipe(base_raw: dict, variant: Variant, run_dir: Path):
    from nexus.conversion.recipe import validate_recipe

    raw = copy.deepcopy(base_raw)
    raw["stages"]["student_build"] = merge(raw["stages"]["student_build"], variant.student_build)
    raw["stages"]["distill"] = merge(raw["stages"]["distill"], variant.distill)
    return validate_recipe(raw, base_dir=run_dir)


def base_raw_recipe(teachers: dict, run_dir: Path, scale: str, steps: int) -> dict:
    from nexus.conversion.demo import SCALES as DEMO_SCALES
    from nexus.conversion.demo import demo_recipe

    if "recipe" in SCALES[scale]:
        raw = recipe_file_raw(SCALES[scale]["recipe"], run_dir)
    else:
        demo_scale = SCALES[scale]["demo_scale"]
        raw = demo_recipe(teachers, run_dir, max_items=DEMO_SCALES[demo_scale]["profile"]["max_items"],
                          scale=demo_scale)
    raw["name"] = "compare"
    for stage, update in SCALES[scale].get("overrides", {}).items():  # e.g. the size sweep's budget per point
        raw["stages"][stage] = merge(raw["stages"].get(stage, {}), update)
    raw["stages"]["distill"]["steps"] = steps
    raw["stages"]["distill"]["checkpoint_every"] = max(1, min(raw["stages"]["distill"]["checkpoint_every"], steps))
    raw["stages"]["validate"]["cka"] = False
    return raw


def base_recipe_sha256(base_raw: dict) -> str:
    """The base recipe (every variant's before its switches) as a hash, without the run folder and the distill step
    count (each record states its own steps and tokens; a longer budget is a comparison, see size_sweep --long): two
    records are compared item by item only when they were built from the same base recipe (`results.paired_delta`)."""
    body = copy.deepcopy({k: v for k, v in base_raw.items() if k != "run_dir"})
    for key in ("steps", "checkpoint_every"):
        body.get("stages", {}).get("distill", {}).pop(key, None)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


HASHED_STAGES = ("compress", "distill", "localise", "profile", "student_build", "validate")


def resolved_recipe_sha256(base_recipe) -> str:
    """The base recipe as the installed code resolves it (every stage's options with their defaults filled in), as a
    hash, without the run folder and the distill step count. `base_recipe_sha256` hashes the file as written, so it
    cannot see a changed code default (a new ``keep_top_by`` default once paired records built on two vocabularies);
    two records that both carry this hash pair only when it matches (`results.unpaired_reason`). A new option changes
    it even where its default keeps the old behaviour: such records must be re-run to pair, the safe side."""
    body = base_recipe.model_dump(mode="json")
    body.pop("run_dir", None)
    # the stages whose options a record's numbers can depend on through the base recipe; a stage registered later
    # (align) is not among them, so its arrival does not unpair every record: a variant that runs it records its
    # options under ``switches``
    body["stages"] = {k: v for k, v in (body.get("stages") or {}).items() if k in HASHED_STAGES}
    for key in ("steps", "checkpoint_every"):
        (body.get("stages", {}).get("distill") or {}).pop(key, None)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def recipe_file_raw(path: Path, run_dir: Path) -> dict:
    """A recipe file's raw dict with its run folder replaced and every relative teacher source or cache folder made
    absolute (relative to the file), so the recipe validates from ``run_dir``."""
    import yaml

    path = Path(path).resolve()
    raw = yaml.safe_load(path.read_text())
    raw["run_dir"] = str(run_dir)
    if raw.get("cache_dir"):
        raw["cache_dir"] = str((path.parent / raw["cache_dir"]).resolve())
    for teacher in raw["teachers"]:
        teacher["source"] = str((path.parent / teacher["source"]).resolve())
    return raw


def recipe_teacher_folders(recipe) -> dict:
    """{teacher: HF folder} of a recipe's teachers as the stages load them (a GGUF's converted cache folder)."""
    from nexus.conversion.stage_memory import teacher_footprint

    return {t.name: teacher_footprint(recipe, t)["folder"] for t in recipe.teachers}


def specialist_folders(scale: str, teachers_dir: Path, runs: Path, show_progress: bool) -> dict:
    """{specialist: folder}: the finished real specialists (never retrained here), or tiny ones for ``test``;
    empty for a scale whose recipe file names its own teachers."""
    from nexus.training.specialists import load_competence, train_specialist

    if "recipe" in SCALES[scale]:
        return {}
    if scale == "test":
        from nexus.conversion.demo import tiny_specialist_recipes

        recipes = tiny_specialist_recipes()
        return {n: train_specialist(recipes[n], runs / "teachers" / n, progress=show_progress) for n in SPECIALISTS}
    out = {}
    for name in SPECIALISTS:
        folder = Path(teachers_dir) / name
        try:
            load_competence(folder)
        except FileNotFoundError:
            raise SystemExit(f"--teachers {teachers_dir}: {folder} is not a finished specialist; train them first "
                             "(`nexus demo` or `python bench/train_specialists.py`)") from None
        out[name] = folder
    return out


# ------------------------------------------------------------------------------------------------ one variant


def _share_caches(shared: Path, distill_dir: Path):
    """``distill_dir/caches`` -> ``shared`` (a symlink): teacher caches depend only on teacher and text."""
    shared.mkdir(parents=True, exist_ok=True)
    link = distill_dir / "caches"
    distill_dir.mkdir(parents=True, exist_ok=True)
    if not link.exists() and not link.is_symlink():
        link.symlink_to(shared.resolve(), target_is_directory=True)


def item_block(recipe, report, profile_items, student_items):
    """Per capability: the student's and the best teacher's per-item (num, den) rows and the bootstrap seed the
    validate stage used, checked against the report's retention."""
    import math

    from nexus.conversion.retention import (
        clamp_ci,
        item_rows,
        percentile_ci,
        resample_indices,
        retention_samples,
        retention_value,
    )

    probes = {c.name: c.probe for c in recipe.capabilities}
    n_boot, seed = report["settings"]["n_bootstrap"], report["settings"]["seed"]
    out = {}
    for k, (cap, entry) in enumerate(report["retention"].items()):
        metric = entry["metric"]
        s_rows = item_rows(probes[cap], student_items[cap], metric)
        t_rows = item_rows(probes[cap], profile_items[cap][entry["teacher"]], metric)
        value = retention_value(s_rows, t_rows, entry["lower_is_better"])
        if entry["value"] is not None:
            samples = retention_samples(s_rows, t_rows, entry["lower_is_better"], resample_indices(len(s_rows), n_boot,
                                                                                               seed + k))
            ci = clamp_ci(value, percentile_ci(samples))
            if not (math.isclose(value, entry["value"], rel_tol=1e-9, abs_tol=1e-12)
                    and all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(ci, entry["ci"]))):
                raise RuntimeError(f"{cap}: retention {value} {ci} from the item rows differs from the report's "
                                   f"{entry['value']} {entry['ci']}: the items or the resamples are not paired")
        out[cap] = {"probe": probes[cap], "metric": metric, "lower_is_better": entry["lower_is_better"],
                    "teacher": entry["teacher"], "bootstrap_seed": seed + k, "n_bootstrap": n_boot,
                    "student": s_rows.tolist(), "teacher_rows": t_rows.tolist()}
    return out


def tower_summary(build: dict, init_path: Path) -> list:
    config = json.loads((Path(init_path) / "config.json").read_text())
    out = []
    for rec, spec in zip(build["towers"], config["towers"]):
        out.append({"capabilities": spec.get("capabilities"), "teacher": rec.get("teacher"),
                    "hidden_size": spec["hidden_size"], "params": rec["params"],
                    "layers": [[layer["num_attention_heads"], layer["intermediate_size"]] for layer in spec["layers"]]})
    return out


class StageMemory:
    """Each stage's RAM plan (`stage_ram_guard.guard_stage_ram`: printed, refused over the recipe's budget) and its
    measured peak RSS in this process (VmHWM, reset before the stage), for the planner-vs-measured table."""

    def __init__(self, recipe, console):
        self.recipe, self.console, self.record = recipe, console, {}

    def before(self, stage, **inputs):
        from nexus.conversion.peak_rss import reset_peak_rss
        from nexus.conversion.stage_ram_guard import guard_stage_ram

        plan = guard_stage_ram(self.recipe, stage, self.console, **inputs)
        self.record[stage] = {"planned_bytes": plan["total_bytes"], "components": plan["components"],
                              "peak_from": plan["assumptions"].get("peak"), "peak_reset": reset_peak_rss()}

    def after(self, stage, reused):
        from nexus.conversion.peak_rss import peak_rss

        entry = self.record[stage]
        entry["measured_peak_bytes"], entry["reused"] = peak_rss(), bool(reused)
        entry["plan_over_measured"] = round(entry["planned_bytes"] / entry["measured_peak_bytes"], 3)


def run_variant(variant: Variant, base_raw: dict, run_dir: Path, profile: dict, scale: str, console, show_progress,
                force=False) -> dict:
    from nexus.conversion.distill import run_distill
    from nexus.conversion.student_build import run_student_build
    from nexus.conversion.validate import run_validate

    started = time.perf_counter()
    recipe = variant_recipe(base_raw, variant, run_dir)
    vdir = recipe.run_path / "variants" / variant.name
    memory = StageMemory(recipe, console)
    feature_map = None
    if variant.localise:  # one feature map per run folder, shared by every variant that asks for it
        from nexus.conversion.localise import run_localise

        from nexus.conversion.peak_rss import current_rss
        from nexus.conversion.stage_memory import plan_localise_ram

        # the optional stage's planner is its Stage's (not in STAGE_RAM_PLANS, which lists the default pipeline)
        memory.before("localise", plan=plan_localise_ram(recipe, current_rss() or 0, profile=profile))
        fm = run_localise(recipe, console=console, show_progress=show_progress)
        memory.after("localise", fm["_reused"])
        feature_map = Path(fm["_path"]) / "feature_map.json"
    aligned = None
    if variant.align is not None:  # per variant: the merge method is the variant's switch
        from nexus.conversion.align import run_align
        from nexus.conversion.peak_rss import current_rss
        from nexus.conversion.stage_memory import plan_align_ram

        recipe.stages["align"] = type(recipe.stage("align")).model_validate(
            {**recipe.stage("align").model_dump(), **variant.align})
        memory.before("align", plan=plan_align_ram(recipe, current_rss() or 0, profile=profile))
        aligned = run_align(recipe, profile, out=vdir / "align", console=console, force=force)
        memory.after("align", aligned["reused"])
    memory.before("student_build", profile=profile)
    init, build = run_student_build(recipe, profile, out=vdir / "student_build", console=console,
                                    show_progress=show_progress, force=force, feature_map=feature_map,
                                    aligned=aligned)
    memory.after("student_build", build["reused"])
    if build["params"] > build["budget"]["params"]:  # student_build refuses this; checked again for the table
        raise RuntimeError(f"{variant.name}: {build['params']} params over the budget {build['budget']['params']}")
    _share_caches(recipe.run_path / "teacher_caches", vdir / "distill")
    memory.before("distill", profile=profile, student=init)
    distill = run_distill(recipe, init, profile=profile, out=vdir / "distill", console=console,
                          show_progress=show_progress, force=force)
    memory.after("distill", distill["reused"])
    lmc = distill["lmc"]["json"] if distill.get("lmc") else None
    memory.before("validate", profile=profile, student=distill["student"])
    report = run_validate(recipe, distill["student"], lmc=lmc, out=vdir / "validate", console=console,
                          show_progress=show_progress, force=force)
    memory.after("validate", report["reused"])
    student_items = json.loads((vdir / "validate" / "items.json").read_text())["student"]
    profile_items = json.loads((recipe.run_path / "profile" / "items.json").read_text())
    d_opts = distill["options"]
    return {
        "status": "done",
        "retention": {cap: {k: e.get(k) for k in ("value", "ci", "metric", "teacher", "student_score",
                                                  "teacher_score", "n", "competent")}
                      for cap, e in report["retention"].items()},
        "min": report["min"], "mean": report["mean"], "undefined": report["undefined"],
        "params": {"student": report["student_params"], "budget": build["budget"]["params"],
                   "budget_source": build["budget"]["source"], "teacher_total": report["teacher_params_total"],
                   "ratio": report["params_ratio"]},
        "student": {"layout": build.get("layout", "towers"), "init": build.get("init", "teachers"),
                    "towers": tower_summary(build, init), "embedding_rows": build["embedding_rows"],
                    "scorer": build["options"]["scorer"], "allocation": build["options"]["allocation"]},
        "train": {**{k: distill["train"][k] for k in ("steps", "tokens", "wall_seconds", "tokens_per_second",
                                                      "first_loss", "final_loss", "preservation")},
                  "batch_size": d_opts["batch_size"], "seq_len": d_opts["seq_len"], "lr": d_opts["lr"],
                  "micro_batches_per_step": len(distill["rows"]), "rows": distill["rows"], "loss": d_opts["loss"],
                  # keep_best: the held-out CE at each checkpoint step and the step whose weights were kept
                  "heldout_curve": distill["train"].get("evaluations"), "best": distill["train"].get("best")},
        "heldout_ce": distill["heldout_ce"],
        "align": ({"options": aligned["options"], "merged": aligned["merged"], "seconds": aligned.get("seconds")}
                  if aligned else None),
        "lmc": ({k: distill["lmc"][k] for k in ("best_alpha", "best_score", "barrier")} if distill.get("lmc")
                else None),
        "router_accuracy": distill["router_accuracy"]["overall"] if distill["router_accuracy"]["n"] else None,
        "items": item_block(recipe, report, profile_items, student_items),
        "seconds": {"student_build": build["seconds"], "distill": distill["seconds"], "validate": report["seconds"]},
        "reused": {"student_build": build["reused"], "distill": distill["reused"], "validate": report["reused"]},
        "seconds_this_invocation": round(time.perf_counter() - started, 1),
        "memory": memory.record,
        "paths": {"student_build": str(init), "student": distill["student"], "report": report["path"]},
    }


def write_variant_json(out_dir: Path, variant: Variant, order: int, scale: str, body: dict) -> Path:
    record = {"schema": SCHEMA, "variant": variant.name, "order": order, "group": variant.group,
              "label": variant.label, "method": variant.method,
              "switches": {"student_build": variant.student_build, "distill": variant.distill,
                           **({"pipeline": "localise before student_build"} if variant.localise else {}),
                           **({"align": variant.align} if variant.align is not None else {})},
              "scale": scale, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), **body}
    path = Path(out_dir) / f"{variant.name}.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, allow_nan=False))
    return path


def not_run_body(variant: Variant, teachers: dict) -> dict:
    if variant.same_as:
        return {"status": "same_run", "same_as": variant.same_as,
                "reason": f"the identical recipe switch is the run {variant.same_as!r}"}
    body = {"status": variant.not_run, "reason": variant.reason}
    if variant.evidence:
        body["evidence"] = EVIDENCE[variant.evidence](teachers)
        if body["evidence"].get("groups_sharing_an_architecture"):
            # the reason above assumes none: say what the measurement found instead
            body["status"] = "applicable_not_run"
            body["reason"] = ("teachers sharing an architecture: "
                              f"{body['evidence']['groups_sharing_an_architecture']}; this bench does not run it")
    return body


# ------------------------------------------------------------------------------------------------ main


def summary_table(rows, title):
    table = Table(title=title)
    for col in ("variant", "params", "train tokens", "prose", "code", "arithmetic", "min [95% CI]", "mean [95% CI]",
                "time s"):
        table.add_column(col)
    for name, r in rows:
        if r.get("status") != "done":
            table.add_row(name, "-", "-", "-", "-", "-", r.get("status", "?"), "", "")
            continue
        ret = r["retention"]

        def cell(e):
            return "-" if e is None or e.get("value") is None else f"{e['value']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"

        table.add_row(name, f"{r['params']['student']:,}", f"{r['train']['tokens']:,}",
                      *(f"{ret[c]['value']:.3f}" if ret.get(c, {}).get("value") is not None else "-"
                        for c in ("prose", "code", "arithmetic")),
                      cell(r["min"]), cell(r["mean"]), f"{sum(r['seconds'].values()):.0f}")
    return table


def run_comparison(scale="bench", out=None, runs=None, teachers_dir=DEFAULT_TEACHERS, only=None, force=False,
                   steps=None, console=None, show_progress=True) -> dict:
    """Run every variant (or ``only`` those) and write one JSON each; returns {name: record body}."""
    from nexus.conversion.budget import BudgetError
    from nexus.conversion.distill import DistillError
    from nexus.conversion.profile import run_profile
    from nexus.conversion.recipe import validate_recipe

    if scale not in SCALES:
        raise ValueError(f"scale: {scale!r} is not one of {sorted(SCALES)}")
    unknown = sorted(set(only or ()) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--only: unknown variant(s) {unknown}; variants: {', '.join(VARIANTS)}")
    console = console or Console()
    out = Path(out or SCALES[scale]["out"])
    run_dir = Path(runs or SCALES[scale]["runs"]).resolve()
    steps = steps or SCALES[scale]["steps"]
    teachers = specialist_folders(scale, teachers_dir, run_dir, show_progress)
    base_raw = base_raw_recipe(teachers, run_dir, scale, steps)
    base_sha = base_recipe_sha256(base_raw)
    console.rule(f"[bold]profile (shared by every variant), scale {scale}")
    base_recipe = validate_recipe(base_raw, base_dir=run_dir)
    resolved_sha = resolved_recipe_sha256(base_recipe)
    profile = run_profile(base_recipe, console=console, show_progress=show_progress)
    console.print(f"best teachers: {profile['best']}" + (" (reused)" if profile.get("reused") else ""))
    teachers = teachers or recipe_teacher_folders(base_recipe)  # after the profile: a GGUF is converted by now
    results = {}
    for order, (name, variant) in enumerate(VARIANTS.items()):
        path = out / f"{name}.json"
        runs_it = not (variant.not_run or variant.same_as)
        if (only and name not in only) or variant.group not in SCALES[scale]["groups"]:
            continue
        if path.is_file() and not force:
            previous = json.loads(path.read_text())
            same = previous.get("scale") == scale and (not runs_it or previous.get("status") == "not_feasible"
                                                       or (previous.get("train", {}).get("steps") == steps
                                                           and previous.get("base_recipe_sha256") == base_sha
                                                           and previous.get("resolved_recipe_sha256",
                                                                            resolved_sha) == resolved_sha))
            if same:
                results[name] = previous
                console.print(f"[dim]{name}: {path} exists, skipped (--force reruns it)[/]")
                continue
            console.print(f"[yellow]{name}: {path} is from another scale, step count or base recipe: rerun[/]")
        if not runs_it:
            body = not_run_body(variant, teachers)
            write_variant_json(out, variant, order, scale, body)
            results[name] = body
            console.print(f"{name}: {body['status']} ({body['reason'][:100]}...)")
            continue
        console.rule(f"[bold]{name}: {variant.label}")
        try:
            body = run_variant(variant, base_raw, run_dir, profile, scale, console, show_progress, force)
        except (BudgetError, DistillError) as exc:  # the method cannot run on these teachers at this budget: say so
            what = "the student build refused the budget" if isinstance(exc, BudgetError) else "distill refused"
            body = {"status": "not_feasible", "reason": f"{what}: {exc}"}
            write_variant_json(out, variant, order, scale, body)
            results[name] = body
            console.print(f"[yellow]{name}: not feasible: {exc}[/]")
            continue
        body["base_recipe_sha256"] = base_sha
        body["resolved_recipe_sha256"] = resolved_sha
        body["base_overrides"] = SCALES[scale].get("overrides", {})  # what the scale changed in the recipe file
        write_variant_json(out, variant, order, scale, body)
        results[name] = body
        m = body["min"]
        console.print(f"{name}: min retention {m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}] "
                      f"({m['capability']}); {body['params']['student']:,} params; {body['train']['tokens']:,} "
                      f"train tokens; stage seconds {body['seconds']} (this run {body['seconds_this_invocation']} s)")
    console.print(summary_table(list(results.items()), f"retention vs the best teacher (scale {scale}, {steps} "
                                                       "distill steps)"))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="bench")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON folder (default bench/results/compare[-gemma]; test scale: bench/out/compare-test)")
    parser.add_argument("--runs", type=Path, default=None,
                        help="stage artefacts (default bench/out/compare-runs/<scale>)")
    parser.add_argument("--teachers", type=Path, default=DEFAULT_TEACHERS,
                        help="bench scale: folder with the finished arithmetic/code/prose specialists")
    parser.add_argument("--only", action="append", help=f"run only these variants (repeatable): {', '.join(VARIANTS)}")
    parser.add_argument("--force", action="store_true", help="rerun variants whose JSON exists (and their stages)")
    parser.add_argument("--steps", type=int, default=None, help="distill steps (default: the scale's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return run_comparison(args.scale, args.out, args.runs, args.teachers, args.only, args.force, args.steps,
                          console=Console(width=200), show_progress=not args.no_progress)


if __name__ == "__main__":
    main()

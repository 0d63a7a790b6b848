"""The localise stage: where in each teacher does each capability live? Four measured sub-stages per teacher x
capability, each with a confidence, validated against a random-ablation control.

1. **perturbation** (`localise_perturbation`): ablate every layer, attention block, FFN block, then heads; the drop
   on the capability vs. its reference set; flags layers.
2. **activation** (`localise_activation`): activation x gradient attribution of every FFN neuron and head, specific
   to the capability vs. the reference; selects the stand-out units globally and within the flagged layers.
3. **spectral** (`localise_spectral`): SVD energy / effective rank of the selected units' weight rows vs. random sets.
4. **causal** (`localise_causal`): ablate exactly the selected units vs. >= 5 random sets of the same composition.

Scores are teacher-forced and continuous (`localise_items`: mean log-likelihood of the reference tokens per item,
"loglik"), and ablation is mean-ablation by default (`ablation`), so every drop is measured on the same items with a
bootstrap CI. A capability whose score does not beat chance (a unigram over its target tokens, or 1/choices) with a
95% CI, or that the profile stage found at chance, is reported as **not present** and not localised. Each
capability is contrasted with a **reference set**: the recipe marks general data with ``reference: true`` on a
capability, or lists the contrast per capability (``reference: [a, b]``); a recipe with neither is an error.

One teacher is resident at a time (bf16 unless the recipe says fp32), freed before the next loads. Output:
``runs/<name>/localise/feature_map.json`` (schema in `feature_map`), ``heatmap-<teacher>.png`` and
``manifest.json``; a rerun with unchanged inputs is skipped, and nothing is left behind by a failure.

Sample recipe section (all optional)::

    stages:
      localise:
        ablation: mean            # or zero
        score: loglik             # or accuracy
        max_items: 24             # per capability
        heads: flagged            # per-head ablation only in flagged layers (all | none)
        random_sets: 8            # >= 5
        controls: [global]        # add layer_matched for the stricter control

Method sources: mean-ablation and circuit localisation (Wang et al. 2022), attribution patching (Nanda 2023; Syed et
al. 2023), head ablation (Michel et al. 2019); the random-ablation control at equal size is what NEXUS adds.
"""

import gc
import hashlib
import json
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .atomic_output import atomic_dir, atomic_file
from .decoder_units import DecoderUnits
from .feature_map import CONFIDENCE_KEYS, SCHEMA, write_feature_map, write_heatmaps
from .localise_activation import FINE, activation_stage, record_attributions
from .localise_causal import causal_stage
from .localise_context import TeacherLocalisation
from .localise_items import ItemSet
from .localise_perturbation import perturbation_passes, perturbation_stage
from .localise_spectral import spectral_stage
from .probes import ProbeSettings, probe_class
from .progress_bar import stage_progress
from .probes.base import model_max_positions
from .recipe import Recipe, register_stage_options, write_resolved_recipe
from .run_paths import recipe_sources

STAGE = "localise"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class LocaliseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ablation: Literal["mean", "zero"] = Field(
        "mean", description="replace an ablated unit's output by its mean over all items' tokens, or by zero")
    score: Literal["loglik", "accuracy"] = Field(
        "loglik", description="per-item score: mean log-likelihood of the reference tokens, or top-1 accuracy")
    max_items: int = Field(24, ge=4, description="items per capability (a seeded subset)")
    max_item_tokens: int = Field(128, ge=8, description="tokens per lm item (the start of each held-out chunk)")
    lm_scored_tokens: int | None = Field(
        64, ge=1, description="score only the last this-many tokens of an lm item (the rest is context); "
                              "null: all. The LM head costs more than the decoder per position on big vocabularies")
    tokens_per_batch: int = Field(1024, ge=16, description="tokens per forward pass (memory vs. speed)")
    blocks: Literal["all", "flagged"] = Field(
        "all", description="ablate attention and FFN blocks in every layer, or only in layers whose whole-layer "
                           "ablation was flagged (cheaper on big teachers)")
    heads: Literal["flagged", "all", "none"] = Field(
        "flagged", description="ablate heads one by one in the layers stage 1 flagged, in all layers, or never")
    max_detail_layers: int | None = Field(
        None, ge=1, description="with blocks/heads: flagged, look inside at most this many flagged layers (those "
                                "with the largest capability-specific drop); null: every flagged layer")
    flag_min_drop: float = Field(0.02, ge=0, description="a flagged layer's block must cost at least this "
                                                         "fraction of the margin")
    attribution: Literal["gradient", "activation"] = Field(
        "gradient", description="stage 2 unit score: activation x gradient (attribution patching) or mean |activation|")
    z_threshold: float = Field(3.5, gt=0, description="a selected unit's specificity is this many robust SDs "
                                                      "above the median")
    min_share_of_top: float = Field(0.05, ge=0, le=1,
                                    description="and at least this share of the most specific unit's specificity")
    max_neuron_fraction: float = Field(0.02, gt=0, le=1, description="select at most this fraction of FFN neurons")
    max_head_fraction: float = Field(0.25, gt=0, le=1, description="select at most this fraction of heads")
    selection: Literal["global", "flagged"] = Field(
        "global", description="the selection stages 3-4 report as the headline: any layer, or flagged layers only")
    test_both_selections: bool = Field(True, description="also run stage 4 on the other selection")
    random_sets: int = Field(8, ge=5, description="random same-composition sets in the causal control")
    controls: list[Literal["global", "layer_matched"]] = Field(
        ["global"], min_length=1, description="random controls; the first is the headline ratio")
    spectral_random_sets: int = Field(50, ge=5, description="random sets the spectral statistics are compared with")
    spectral_top_k: int = Field(8, ge=1, description="k of the top-k singular-value energy")
    n_bootstrap: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples for every CI")
    min_margin: float = Field(0.05, gt=0, description="margins over chance are floored at this (score units)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed for items, bootstrap and random sets")
    autocast: bool | None = Field(
        None, description="bf16 autocast. Default: on where the CPU multiplies bf16 natively (AVX512-BF16 / AMX), "
                          "off elsewhere, where a bf16-stored teacher is then held in fp32 while it is localised "
                          "(`localise_compute`: bf16 matmuls there take the slow path)")
    tower: int | str | None = Field(None, description="which tower of a multi-tower Nexus teacher to localise")


register_stage_options(STAGE, LocaliseOptions)


def localise_compute(teacher_dtype: str, autocast: bool | None) -> tuple[str, bool]:
    """``(weights dtype, autocast)`` a teacher of recipe dtype ``teacher_dtype`` is localised with.

    Localisation runs the teacher forward and backward many times. On a CPU without native bf16 matmuls
    (`probes.compute_mode.native_bf16_matmul`; ``NEXUS_NATIVE_BF16`` overrides it) bf16 weights take torch's
    reference GEMM: on this project's AVX2 machine Gemma-3-270M's body took 17.3x longer forward + backward with bf16
    weights than with fp32 ones (4.3x forward only; `python bench/bf16_matmul_speed.py`), and the acceptance run's
    Gemma localisation spent 98.5% of its samples in that path (py-spy). There the teacher is held in fp32 for this
    stage (twice its bf16 RAM, planned by `stage_memory.plan_localise_ram`) unless the recipe asks for autocast."""
    from .probes.compute_mode import native_bf16_matmul

    native = native_bf16_matmul()
    autocast = native if autocast is None else autocast
    if teacher_dtype == "bf16" and not native and not autocast:
        return "fp32", autocast
    return teacher_dtype, autocast


class LocaliseError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- planning


def reference_sets(capabilities):
    """``{capability: [reference capability names]}`` from the recipe's ``reference`` fields.

    A list on a capability is its reference; otherwise the capabilities marked ``reference: true`` (other than
    itself) are; a marked capability with no other marked one is contrasted with every other capability. Neither
    -> a LocaliseError naming the field.
    """
    names = [c.name for c in capabilities]
    general = [c.name for c in capabilities if c.reference is True]
    out = {}
    for i, cap in enumerate(capabilities):
        if isinstance(cap.reference, list) and cap.reference:
            out[cap.name] = list(cap.reference)
        elif [g for g in general if g != cap.name]:
            out[cap.name] = [g for g in general if g != cap.name]
        elif cap.name in general and len(names) > 1:
            out[cap.name] = [n for n in names if n != cap.name]
        else:
            raise LocaliseError(
                f"capability {cap.name!r} has no reference set (capabilities[{i}].reference): localisation "
                "contrasts a capability with general data. Mark the general data with `reference: true` on a "
                "capability, or list the capabilities to contrast it with, e.g. `reference: [prose]`")
    return out


def _check_probes(recipe):
    for i, cap in enumerate(recipe.capabilities):
        if cap.probe not in ("lm", "exact_match", "multiple_choice"):
            raise LocaliseError(
                f"capability {cap.name!r} (capabilities[{i}].probe): localisation scores items teacher-forced "
                f"and supports lm, exact_match and multiple_choice, not {cap.probe!r}")


class _NullProgress:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


# ---------------------------------------------------------------------------------------------- one teacher


def localise_model(model, tokenizer, capabilities, references, options=None, localise=None, competent=None,
                   progress=None, label="teacher"):
    """Localise ``capabilities`` in one loaded ``model``; returns the teacher's feature-map entry.

    ``capabilities``: objects with ``name, probe, data, options`` (recipe `CapabilitySpec`s) for every capability
    whose items are used (localised ones and reference ones). ``references``: ``{name: [reference names]}``.
    ``localise``: the names to localise (default: every key of ``references``). ``competent``: optional
    ``{name: bool}`` from the profile (False -> not present).
    """
    options = options or LocaliseOptions()
    progress = progress or _NullProgress()
    localise = list(references) if localise is None else list(localise)
    clock = _Clock()
    units = DecoderUnits(model, options.tower)
    items = ItemSet(tokenizer, options.tokens_per_batch)
    limit = model_max_positions(model.config)
    item_tokens = min(options.max_item_tokens, limit) if limit else options.max_item_tokens  # never past the model's
    for cap in capabilities:
        items.add(cap.name, cap.probe, cap.data, cap.options, options.max_items, item_tokens, options.seed,
                  options.lm_scored_tokens)
        longest = max(len(row.ids) for row in items.rows[slice(*items.capabilities[cap.name].rows)])
        if limit and longest > limit:
            raise LocaliseError(f"capability {cap.name!r}: an item needs {longest} positions; {label} has {limit}")
    clock.lap("items")

    ctx = TeacherLocalisation(model, units, items, options)
    for name in localise:
        missing = [r for r in references[name] if r not in items.capabilities]
        if missing:
            raise LocaliseError(f"capability {name!r}: its reference {missing} has no items for {label}")
        ctx.references[name] = list(references[name])

    task = progress.add_task(f"[cyan]{label}[/]: unablated pass", total=1)
    ctx.progress = lambda k: progress.advance(task, k / len(items.rows))
    ctx.run_base()
    for name in items.capabilities:
        ctx.measure_presence(name)
    clock.lap("base")

    entry = {"_model": _model_info(units, model)}
    present = _presence_entries(ctx, entry, localise, competent)
    if present:
        _localise_present(ctx, entry, present, progress, label, clock)
    entry["_seconds"], entry["_cpu_seconds"] = clock.totals()
    entry["_forwards"] = ctx.forwards
    return entry


def _presence_entries(ctx, entry, localise, competent):
    """Fill ``entry`` for every capability in ``localise`` with its presence; return the present ones."""
    present = []
    for name in localise:
        p = dict(ctx.presence[name])
        if competent is not None and competent.get(name) is not None:
            p["profile_competent"] = bool(competent[name])
        reason = None
        if not p["present"]:
            reason = (f"its {ctx.options.score} score {p['score']:.4g} does not beat chance {p['chance']:.4g} "
                      f"(margin 95% CI {p['margin_ci'][0]:.3g}..{p['margin_ci'][1]:.3g})")
        elif p.get("profile_competent") is False:
            reason = "the profile found its probe at chance for this teacher"
        if reason:
            entry[name] = {"present": False, "presence": p, "reason": f"not present: {reason}", "causal": None,
                           "reference": ctx.references[name],
                           "confidence": {k: (round(p["confidence"], 4) if k == "presence" else None)
                                          for k in CONFIDENCE_KEYS}}
        else:
            entry[name] = {"present": True, "presence": p, "reference": ctx.references[name]}
            present.append(name)
    return present


def _localise_present(ctx, entry, present, progress, label, clock):
    """The four sub-stages for the present capabilities; fills their ``entry`` sections."""
    units, options = ctx.units, ctx.options
    n_rows = len(ctx.items.rows)
    planned = {"n": perturbation_passes(units, options)}
    task = progress.add_task(f"[cyan]{label}[/]: perturbation", total=planned["n"])

    def grow(n):
        planned["n"] += n
        progress.update(task, total=planned["n"])

    ctx.progress = None
    stage1 = perturbation_stage(ctx, present, on_unit=lambda kind, unit: progress.advance(task, 1),
                                on_heads=grow, on_blocks=grow)
    clock.lap("perturbation")

    task = progress.add_task(f"[cyan]{label}[/]: activation x gradient", total=1)
    records = record_attributions(ctx, progress=lambda k: progress.advance(task, k / n_rows))
    flagged = {c: stage1[c]["flagged_layers"] for c in present}
    stage2 = activation_stage(ctx, present, flagged, records)
    del records
    clock.lap("activation")

    primary = options.selection
    other = "flagged" if primary == "global" else "global"
    stage3 = {c: spectral_stage(ctx, stage2[c][1][primary]) for c in present}
    clock.lap("spectral")

    passes_per = 1 + options.random_sets * len(options.controls)
    both = {c: options.test_both_selections and _differs(stage2[c][1], primary, other) for c in present}
    task = progress.add_task(f"[cyan]{label}[/]: causal", total=passes_per * sum(1 + b for b in both.values()))

    def tick():
        progress.advance(task, 1)

    stage4 = {}
    for c in present:
        chosen = stage2[c][1]
        stage4[c] = {"primary": causal_stage(ctx, c, chosen[primary], options.controls, tick)}
        if both[c]:
            stage4[c]["other"] = causal_stage(ctx, c, chosen[other], options.controls, tick)
    clock.lap("causal")

    for c in present:
        result, chosen = stage2[c]
        agreement = _agreement(units, chosen["global"], stage1[c]["flagged_layers"])
        causal = stage4[c]["primary"]
        conf = {
            "presence": round(entry[c]["presence"]["confidence"], 4),
            "perturbation": stage1[c]["confidence"],
            "activation": result["split_half_jaccard" if primary == "global" else "split_half_jaccard_in_flagged"],
            "spectral": stage3[c]["confidence"],
            "causal": causal["confidence"],
            "agreement": agreement["fraction_in_flagged"],
        }
        conf["overall"] = round(min(conf["activation"], conf["causal"]), 4)
        entry[c].update({"perturbation": stage1[c], "activation": result, "spectral": stage3[c],
                         "selection": primary, "causal": causal, "agreement": agreement, "confidence": conf})
        if "other" in stage4[c]:
            entry[c][f"causal_{'in_flagged' if other == 'flagged' else 'global'}"] = stage4[c]["other"]


class _Clock:
    """Wall and CPU (all threads of this process) seconds per stage; CPU time is what a shared machine can't inflate."""

    def __init__(self):
        self.wall, self.cpu = {}, {}
        self.start = self.last = (time.perf_counter(), time.process_time())

    def lap(self, name):
        now = (time.perf_counter(), time.process_time())
        self.wall[name] = now[0] - self.last[0]
        self.cpu[name] = now[1] - self.last[1]
        self.last = now

    def totals(self):
        now = (time.perf_counter(), time.process_time())
        wall = {**self.wall, "total": now[0] - self.start[0]}
        cpu = {**self.cpu, "total": now[1] - self.start[1]}
        return {k: round(v, 2) for k, v in wall.items()}, {k: round(v, 2) for k, v in cpu.items()}


def _differs(chosen, a, b):
    return any(sorted(map(tuple, chosen[a][k])) != sorted(map(tuple, chosen[b][k])) for k in FINE)


def _agreement(units, selection, flagged):
    flagged = set(flagged)
    total = sum(len(selection[k]) for k in FINE)
    if not total:
        return {"fraction_in_flagged": 0.0, "expected_fraction": None, "units": 0}
    inside = sum(1 for k in FINE for u in selection[k] if u[0] in flagged)
    expected = 0.0
    for k in FINE:
        pool = units.units(k)
        if selection[k] and pool:
            expected += len(selection[k]) * sum(1 for u in pool if u[0] in flagged) / len(pool)
    return {"fraction_in_flagged": round(inside / total, 4), "expected_fraction": round(expected / total, 4),
            "units": total}


def _model_info(units, model):
    return {
        "model_type": getattr(model.config, "model_type", None),
        "tower": units.tower_name,
        "num_layers": len(units),
        "hidden_size": units.hidden_size,
        "heads": units.widths("head"),
        "kv_heads": units.widths("kv_group"),
        "head_dim": [info.head_dim for info in units.layers],
        "ffn": units.widths("neuron"),
    }


# ---------------------------------------------------------------------------------------------- the stage


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def localise_inputs(recipe: Recipe) -> dict:
    from .profile import profile_inputs

    inputs = profile_inputs(recipe)
    inputs["options"] = recipe.stage(STAGE).model_dump(mode="json")
    profile = recipe.run_path / "profile" / "profile.json"
    inputs["profile"] = _digest(profile.read_text()) if profile.is_file() else None
    return inputs


def _profile_competence(recipe):
    path = recipe.run_path / "profile" / "profile.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("competent", {}) or {}
    except (OSError, ValueError):
        return {}


def plan_localise(recipe: Recipe):
    """Check everything that can be checked before a teacher loads; returns (references, per-teacher plan).

    The plan maps each teacher to ``(capabilities to localise, capabilities whose items it needs)``.
    """
    from transformers import AutoConfig

    from .teacher_source import load_tokenizer, resolve_teacher_folder

    _check_probes(recipe)
    references = reference_sets(recipe.capabilities)
    options = recipe.stage(STAGE)
    settings = ProbeSettings(max_items=options.max_items, seed=options.seed)
    probes = {}
    for i, cap in enumerate(recipe.capabilities):
        try:
            probes[cap.name] = probe_class(cap.probe)(cap.data, cap.options, settings).load()
        except ValueError as exc:
            raise LocaliseError(f"capability {cap.name!r} (capabilities[{i}].data): {exc}") from None
    plan = {}
    for teacher in recipe.teachers:
        folder = resolve_teacher_folder(teacher.source, teacher.allow_pickle, recipe.cache_dir)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=teacher.trust_remote_code)
        tokenizer = load_tokenizer(folder, trust_remote_code=teacher.trust_remote_code)
        # a capability is localised in this teacher when the teacher is eligible for it (its `teachers` list) and
        # its tokenizer can encode the data; any capability whose data it can encode serves as reference text (the
        # contrast set is not a claim about the teacher, so `teachers` does not restrict it)
        usable = {c.name for c in recipe.capabilities if probes[c.name].cannot_score(tokenizer, config) is None}
        targets = [c.name for c in recipe.capabilities if c.name in usable and teacher in recipe.eligible_teachers(c)]
        skipped = {}
        for name in list(targets):
            refs = [r for r in references[name] if r in usable]
            if not refs:
                skipped[name] = (f"none of its reference capabilities {references[name]} is encodable by this "
                                 "teacher's tokenizer")
                targets.remove(name)
        needed = sorted({n for t in targets for n in [t, *references[t]] if n in usable},
                        key=[c.name for c in recipe.capabilities].index)
        plan[teacher.name] = (targets, needed, skipped)
    if not any(p[0] for p in plan.values()):
        raise LocaliseError("no teacher has a capability to localise (each is ineligible, unscorable, or has no "
                            "scorable reference set)")
    return references, plan


def run_localise(recipe: Recipe, console=None, show_progress=True, force=False, on_teacher_loaded=None) -> dict:
    """Localise every capability in every eligible teacher; returns the feature map (also written to the run
    folder) with ``"_path"`` (the localise folder) and ``"_reused"`` added."""
    from .teacher_source import load_teacher

    options = recipe.stage(STAGE)
    references, plan = plan_localise(recipe)
    inputs = localise_inputs(recipe)
    # what gets localised against what: a rule change in `plan_localise` must not reuse a map made under the old one
    inputs["plan"] = {teacher: [targets, needed] for teacher, (targets, needed, _) in plan.items()}
    compute = {t.name: localise_compute(t.dtype, options.autocast) for t in recipe.teachers}
    inputs["compute"] = compute  # fp32 vs bf16 weights and autocast give (slightly) different maps
    run = recipe.run_path
    out = run / STAGE
    manifest = out / "manifest.json"
    if not force and manifest.is_file() and (out / "feature_map.json").is_file():
        try:
            previous = json.loads(manifest.read_text()).get("inputs_digest")
        except (OSError, ValueError):
            previous = None
        if previous == _digest(inputs):
            fm = json.loads((out / "feature_map.json").read_text())
            return {**fm, "_path": str(out), "_reused": True}
    competence = _profile_competence(recipe)
    caps = {c.name: c for c in recipe.capabilities}
    fm = {"_schema": SCHEMA, "_recipe": recipe.name, "_options": options.model_dump(mode="json"),
          "_capabilities": {c.name: {"probe": c.probe, "weight": c.weight, "reference": references[c.name]}
                            for c in recipe.capabilities}}
    run_existed = run.exists()
    try:
        with atomic_dir(out, overwrite=True, sources=recipe_sources(recipe)) as tmp, \
                stage_progress(console, show_progress) as progress:
            for teacher in recipe.teachers:
                targets, needed, skipped = plan[teacher.name]
                if not targets:
                    continue
                weights, autocast = compute[teacher.name]
                model, tokenizer = load_teacher(teacher.source, DTYPES[weights], teacher.allow_pickle,
                                                teacher.trust_remote_code, recipe.cache_dir)
                if on_teacher_loaded:
                    on_teacher_loaded(teacher.name, model)
                refs = {t: [r for r in references[t] if r in needed] for t in targets}
                entry = localise_model(
                    model, tokenizer, [caps[n] for n in needed], refs,
                    options.model_copy(update={"autocast": autocast}),
                    competent={c: competence.get(c, {}).get(teacher.name) for c in targets},
                    progress=progress, label=teacher.name)
                if skipped:
                    entry["_skipped"] = skipped
                fm[teacher.name] = entry
                del model, tokenizer
                gc.collect()  # freed before the next teacher loads
            write_feature_map(fm, tmp / "feature_map.json")
            write_heatmaps(fm, tmp)
            with atomic_file(tmp / "manifest.json") as m:
                m.write_text(json.dumps({"stage": STAGE, "inputs_digest": _digest(inputs), "inputs": inputs},
                                        indent=1, default=str))
        write_resolved_recipe(recipe, run)
    except BaseException:
        if not run_existed and run.is_dir() and not any(run.iterdir()):
            run.rmdir()
        raise
    return {**fm, "_path": str(out), "_reused": False}


def localise_table(fm):
    """A rich Table: one row per teacher x capability with the causal result and the stage confidences."""
    from rich.table import Table

    from .feature_map import capabilities_of, teachers_of

    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    table = Table(title=f"localisation of {fm.get('_recipe', '')}: selected units vs random same-size sets")
    for col in ("teacher", "capability", "flagged layers", "units (n/h)", "drop [95% CI]", "random drop", "ratio",
                "confidence p/a/s/c/agree"):
        table.add_column(col, justify="left" if col in ("teacher", "capability") else "right")
    for teacher in teachers_of(fm):
        for cap in capabilities_of(fm, teacher):
            e = fm[teacher][cap]
            if not e["present"]:
                table.add_row(teacher, cap, "[yellow]not present[/]", "", "", "", "", "")
                continue
            c, conf = e["causal"], e["confidence"]
            units = c.get("units") or {}
            drop = f"{f(c.get('drop'))} [{f((c.get('drop_ci') or [None])[0])}, {f((c.get('drop_ci') or [None, None])[1])}]"
            ratio = c.get("ratio")
            ratio_text = f(ratio, ".1f") + "x" if ratio is not None else ("inf" if c.get("drop") else "-")
            confs = "/".join(f(conf[k], ".2f") for k in ("perturbation", "activation", "spectral", "causal",
                                                           "agreement"))
            table.add_row(teacher, cap, ",".join(map(str, e["perturbation"]["flagged_layers"])) or "-",
                          f"{units.get('neuron', 0)}/{units.get('head', 0)}", drop, f(c.get("random_drop")),
                          ratio_text, confs)
    return table

"""The compress stage: which structures of a teacher to keep under a budget. One pruner, several scorers.

Pipeline (`compress_model`), on a one-tower Nexus copy of the teacher (`nexus_from_teacher`, exact weights):

1. **vocabulary** (`vocab_trim`): keep the tokens the capabilities' calibration text uses, every special/chat token,
   the byte fallbacks and the BPE merge paths; slice the embedding to them; write the reduced tokenizer;
2. **importance** (`importance`): the recipe's scorer (``capability`` by default, or a baseline: ``minitron``,
   ``magnitude``, ``weight_pca``, ``random``) scores every head, FFN unit, layer and hidden channel, from
   calibration statistics (`structure_statistics`, one forward/backward per window on each capability's training
   text) and, for ``capability``, the localisation feature map;
3. **budget** (`budget`): per-layer widths from the scores under the parameter (or memory) budget: dynamic
   (global ranking, each layer within ``max_deviation`` of the global keep fraction), uniform (Minitron), or
   ``auto`` (the capability scorer's default): `select_allocation` builds uniform and dynamic candidates
   (max_deviation 0.1, 0.25, 1.0) and keeps the one with the lowest capability-weighted loss on
   ``selection_tokens`` further *training* tokens per capability (never the held-out evaluation text); with
   ``select_mix`` (the default) the capability scorer's variants (its mix, activation alone, Taylor alone) are
   candidates too, each with every allocation;
4. **slicing** (`structured_prune.apply_prune_plan`): exact removal of what the plan drops;
5. optionally **low rank** (`low_rank`): rank-r reconstruction of every projection (activation-aware or plain SVD).

Writes ``runs/<name>/compress/``: the student's initial tower as a Nexus checkpoint (``config.json``,
``model.safetensors``, modeling files for ``trust_remote_code``, the trimmed tokenizer) and ``compress.json`` (kept
structures, parameter counts, notes, calibration sources, the safetensors size) — atomically; a rerun with the same
inputs is skipped.

Sample recipe section (every field optional)::

    stages:
      compress:
        teacher: gemma                 # default: the first teacher
        scorer: capability             # capability | minitron | magnitude | weight_pca | random
        allocation: auto               # auto | dynamic | uniform (default: the scorer's own)
        budget: {fraction: 0.5, counts: non_embedding}   # default: student.budget
        vocab: {trim: true}
        calibration_tokens: 4096       # per capability
        hidden_keep: 1.0               # fraction of residual channels kept
        drop_layers: 0                 # whole layers removed (lowest layer scores)

Sources: first-order Taylor importance (Molchanov et al. 2019; LLM-Pruner, Ma et al. 2023), Minitron (Muralidharan
et al. 2024), SliceGPT (Ashkboos et al. 2024), block influence (ShortGPT, Men et al. 2024), SVD-LLM (Wang et al. 2024).
"""

import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .atomic_output import atomic_dir, atomic_file, check_output_vs_sources
from .budget import AllocationOptions, Budget, BudgetError, allocate, config_parameter_count, resolve_budget
from .calibration import calibration_text, token_windows
from .decoder_units import DecoderUnits
from .importance import SCORERS, make_scorer
from .progress_bar import stage_progress
from .structure_statistics import collect_structure_statistics
from .structured_prune import PrunePlan, apply_prune_plan, parameter_count
from .vocab_trim import kept_vocabulary, trim_tokenizer

STAGE = "compress"
SCHEMA = "nexus.compress/1"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompressBudget(_Strict):
    params: int | None = Field(None, gt=0, description="at most this many parameters (counted as `counts` says)")
    fraction: float | None = Field(None, gt=0, le=1, description="at most this fraction of the teacher's parameters")
    memory_gb: float | None = Field(None, gt=0, description="weights must fit this many GB in bf16 (counts all)")
    counts: Literal["non_embedding", "total"] = Field(
        "non_embedding", description="whether the embedding (and an untied head) count toward params/fraction")

    @model_validator(mode="after")
    def _exactly_one(self):
        if sum(x is not None for x in (self.params, self.fraction, self.memory_gb)) != 1:
            raise ValueError("give exactly one of params, fraction or memory_gb")
        return self


class VocabOptions(_Strict):
    trim: bool = Field(True, description="keep only the tokens the capabilities use (plus specials and fallbacks)")
    drop_special: str | None = Field(r"^<unused\d+>$",
                                     description="special tokens matching this regex are dropped (reserved slots)")
    extra_tokens: list[str] = Field(default_factory=list, description="tokens to keep whatever the corpora use")


class LowRankOptions(_Strict):
    method: Literal["activation", "weight"] = Field(
        "activation", description="activation-aware SVD in the capabilities' input subspace, or plain weight SVD")
    keep: float = Field(0.5, gt=0, lt=1, description="each projection's factors hold about this share of its "
                                                    "parameters; with store: factors the tower is first pruned to "
                                                    "budget / keep, then factorised to fit the budget exactly")
    store: Literal["factors", "dense"] = Field(
        "factors", description="factors: each projection stored as its two factors (low_rank_linear.py), so the "
                               "option saves parameters and the budget is the factored model's size; dense: the "
                               "rank-r product written back (quality only, the pruned size)")


class CompressOptions(_Strict):
    teacher: str | None = Field(None, description="the teacher to compress (default: the recipe's first teacher)")
    scorer: str = Field("capability", description=f"importance scorer: one of {', '.join(sorted(SCORERS))}")
    scorer_options: dict[str, Any] = Field(default_factory=dict, description="the scorer's own options")
    budget: CompressBudget | None = Field(None, description="the tower's budget (default: student.budget)")
    allocation: Literal["auto", "dynamic", "uniform"] | None = Field(
        None, description="per-layer widths: global ranking (dynamic, within max_deviation), uniform, or auto: "
                          "the candidate with the lowest loss on held-aside calibration text (default: the scorer's)")
    hidden_keep: float = Field(1.0, gt=0, le=1, description="fraction of residual channels kept")
    drop_layers: int = Field(0, ge=0, description="how many whole layers to remove (lowest layer scores)")
    max_deviation: float = Field(1.0, ge=0, le=1, description="dynamic allocation: a layer's kept fraction stays "
                                                               "within this distance of the global one")
    vocab: VocabOptions = Field(default_factory=VocabOptions, description="vocabulary trimming")
    calibration_tokens: int = Field(4096, ge=16, description="calibration tokens per capability (training text)")
    selection_tokens: int = Field(1024, ge=16, description="further training-text tokens per capability on which "
                                                           "allocation=auto compares its candidates")
    selection_heal_steps: int = Field(0, ge=0, description="allocation=auto: train each candidate's decoder layers "
                                                          "this many steps on the calibration windows before its "
                                                          "held-aside loss is taken (heal.py); 0 = compare right "
                                                          "after the cut")
    selection_heal_lr: float = Field(1e-4, gt=0, description="learning rate of that healing")
    select_mix: bool = Field(True, description="allocation=auto also compares the scorer's variants (capability: "
                                               "its configured mix, activation alone, Taylor alone) on the same "
                                               "held-aside loss; false keeps the configured mix")
    window_tokens: int = Field(256, ge=8, description="tokens per calibration window")
    batch_size: int = Field(2, ge=1, description="windows per forward/backward pass")
    feature_map: Path | None = Field(
        None, description="localisation feature map (default: runs/<name>/localise/feature_map.json when present)")
    low_rank: LowRankOptions | None = Field(None, description="also factorise every projection (the manifold "
                                                              "option; its `store` says whether the checkpoint holds "
                                                              "the factors or their dense product)")
    autocast: bool = Field(False, description="bf16 autocast for the calibration passes (off by default: measured "
                                              "7.5x slower than fp32 on this AVX2-only CPU, see bench/compress_real)")

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, value):
        if value not in SCORERS:
            raise ValueError(f"unknown scorer {value!r}; registered scorers: {', '.join(sorted(SCORERS))}")
        return value


def _register():
    from .recipe import STAGE_OPTIONS, register_stage_options

    if STAGE not in STAGE_OPTIONS:
        register_stage_options(STAGE, CompressOptions)


_register()


class CompressError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- feature map


def feature_map_scores(fm, teacher, units):
    """``{cap: {"heads", "neurons", "layers", "confidence"}}`` from a feature map, for the capability scorer.

    Uses each present capability's first-order unit importance (``activation.<kind>.importance``) and its
    layer-ablation drop (``perturbation.layer.drop``), negative values clipped to 0; the term's weight is the
    localiser's overall confidence. The map must describe the same architecture as ``units``.
    """
    if teacher not in fm:
        return {}
    entry = fm[teacher]
    model = entry["_model"]
    if model["num_layers"] != len(units.layers) or model["heads"] != units.widths("head") or \
            model["ffn"] != units.widths("neuron"):
        raise CompressError(f"the feature map's {teacher!r} entry describes another architecture "
                            f"({model['num_layers']} layers) than the teacher being compressed")
    out = {}
    for cap, c in entry.items():
        if cap.startswith("_") or not c.get("present"):
            continue

        def per_layer(kind, c=c):
            values = c["activation"][kind]["importance"]
            return [None if v is None else torch.tensor([0.0 if x is None else max(0.0, float(x)) for x in v])
                    for v in values]

        drops = c["perturbation"]["layer"]["drop"]
        out[cap] = {"heads": per_layer("head"), "neurons": per_layer("neuron"),
                    "layers": torch.tensor([0.0 if d is None else max(0.0, float(d)) for d in drops]),
                    "confidence": float(c["confidence"].get("overall") or 0.0)}
    return out


# ---------------------------------------------------------------------------------------------- library


class Capability:
    """A capability as compression sees it: a name, a weight and its calibration text."""

    def __init__(self, name, text, weight=1.0, source=""):
        if not text or not text.strip():
            raise CompressError(f"capability {name!r}: empty calibration text")
        self.name, self.text, self.weight, self.source = name, text, float(weight), source


def compress_model(model, tokenizer, capabilities, options=None, budget=None, feature_map=None, out_dir=None,
                   console=None, show_progress=False, critical=None):
    """Compress the one-tower Nexus ``model``; returns ``(student, student_tokenizer, record)``.

    ``capabilities`` is a list of `Capability`; ``budget`` a `budget.Budget` (default: from ``options.budget``);
    ``feature_map`` the `feature_map_scores` dict; ``critical`` the units the localiser found causally necessary
    (`critical_units.critical_units`), kept ahead of every other unit. With ``out_dir`` the trimmed tokenizer is
    written there (the caller's staging folder); without it, vocabulary trimming works in a temporary folder.
    """
    import tempfile

    options = options or CompressOptions()
    if not capabilities:
        raise CompressError("compression needs at least one capability with calibration text")
    if len(model.config.towers) != 1:
        raise CompressError(f"compress expects a one-tower model (an imported teacher), got {len(model.config.towers)}")
    timings, t0 = {}, time.time()
    teacher_counts = config_parameter_count(model.config)
    if budget is None:
        if options.budget is None:
            raise CompressError("no budget: set stages.compress.budget or student.budget")
        b = options.budget
        budget = resolve_budget(b.params, b.fraction, b.memory_gb, b.counts, teacher_counts=teacher_counts)
    final_budget = budget
    if options.low_rank is not None and options.low_rank.store == "factors":  # prune to budget / keep, then factorise
        budget = Budget(min(int(budget.params / options.low_rank.keep), teacher_counts[budget.counts]),
                        budget.counts, f"{budget.source}; pruned to / keep {options.low_rank.keep:g} before the "
                                       "low-rank factorisation")
    scorer = make_scorer(options.scorer, **options.scorer_options)
    allocation = options.allocation or scorer.allocation
    weights = {c.name: c.weight for c in capabilities}
    record = {"schema": SCHEMA, "scorer": options.scorer, "scorer_options": options.scorer_options,
              "allocation": allocation, "budget": {"params": budget.params, "counts": budget.counts,
                                                   "source": budget.source},
              "params": {"teacher": teacher_counts}, "notes": [],
              "capabilities": {c.name: {"weight": c.weight, "calibration": c.source} for c in capabilities}}

    # 1. vocabulary
    student_tok = tokenizer
    if options.vocab.trim:
        trim = kept_vocabulary(tokenizer, [c.text for c in capabilities], options.vocab.drop_special,
                               options.vocab.extra_tokens)
        with tempfile.TemporaryDirectory(prefix="nexus-vocab-") as scratch:
            student_tok = trim_tokenizer(tokenizer, trim, Path(out_dir) if out_dir else Path(scratch),
                                         check_texts=[c.text for c in capabilities])
        model, notes = apply_prune_plan(model, PrunePlan(vocab=trim.kept_ids))
        record["vocab"] = {**trim.summary(), "kept_ids": trim.kept_ids}
        record["notes"] += notes
    else:
        record["vocab"] = {"original_size": model.config.vocab_size, "kept": model.config.vocab_size}
    record["params"]["after_vocab"] = config_parameter_count(model.config)
    timings["vocab"] = time.time() - t0

    # 2. importance
    units = DecoderUnits(model)
    statistics = None
    t1 = time.time()
    if scorer.needs:
        windows = {c.name: token_windows(student_tok, c.text, options.calibration_tokens, options.window_tokens)
                   for c in capabilities}
        statistics = {}
        with stage_progress(console, show_progress, transient=True) as progress:
            for c in capabilities:
                task = progress.add_task(f"importance: {c.name}", total=windows[c.name].shape[0])
                statistics[c.name] = collect_structure_statistics(
                    model, windows[c.name], gradients=scorer.needs == "gradients", autocast=options.autocast,
                    batch_size=options.batch_size, advance=lambda k, task=task: progress.advance(task, k))
        for c in capabilities:
            record["capabilities"][c.name]["calibration_tokens"] = statistics[c.name].tokens
    if feature_map and options.scorer == "capability":
        record["feature_map"] = {cap: {"confidence": v["confidence"]} for cap, v in feature_map.items()}
    elif options.scorer == "capability":
        record["notes"].append("no localisation feature map: capability importance = gradient-Taylor + activation")
    scorers = scorer.variants() if allocation == "auto" and options.select_mix else {"": scorer}
    scored = {}
    for mix, variant in scorers.items():
        scores = variant.score(units, statistics, weights, feature_map if options.scorer == "capability" else None)
        scores.check(units)
        if critical and any(critical.values()):
            from .critical_units import protect_scores

            scores = protect_scores(scores, critical)
        scored[mix] = scores
    timings["importance"] = time.time() - t1

    # 3. budget
    base = AllocationOptions(allocation="dynamic" if allocation == "auto" else allocation,
                             hidden_keep=options.hidden_keep, drop_layers=options.drop_layers,
                             max_deviation=options.max_deviation)
    if allocation == "auto":
        selection = {c.name: token_windows(student_tok, _after_tokens(student_tok, c.text, options.calibration_tokens),
                                           options.selection_tokens, options.window_tokens) for c in capabilities}
        with stage_progress(console, show_progress, transient=True) as progress:
            task = progress.add_task("allocation candidates", total=len(scored) * len(AUTO_CANDIDATES))
            heal = None
            if options.selection_heal_steps:
                heal = {"windows": windows if statistics is not None else {
                    c.name: token_windows(student_tok, c.text, options.calibration_tokens, options.window_tokens)
                    for c in capabilities}, "steps": options.selection_heal_steps, "lr": options.selection_heal_lr}
            alloc, record["allocation_candidates"] = select_allocation(
                model, scored, budget, base, selection, weights, options.autocast,
                advance=lambda: progress.advance(task, 1), heal=heal)
        record["allocation"] = f"auto -> {record['allocation_candidates']['chosen']}"
        if len(scored) > 1:
            record["scorer_mix"] = record["allocation_candidates"]["chosen_scores"]
    else:
        alloc = allocate(model.config, scored[""], budget, base)

    # 4. slicing
    student, notes = apply_prune_plan(model, alloc.plan)
    record["notes"] += notes
    counted = parameter_count(student)
    if counted != alloc.params["total"]:
        raise RuntimeError(f"planned {alloc.params['total']} parameters but the pruned model has {counted}")
    record["params"]["student"] = alloc.params
    record["keep_fraction"] = alloc.keep_fraction
    record["kept"] = _kept_record(alloc, units)
    if critical and any(critical.values()):
        from .critical_units import student_numbering

        record["critical"] = {"teacher_units": {k: len(v) for k, v in critical.items()},
                              **student_numbering(critical, record["kept"]["layers"])}
    timings["prune"] = time.time() - t1 - timings["importance"]

    # 5. low rank
    if options.low_rank is not None:
        from .low_rank import fit_keep, input_covariances, low_rank_model, weighted_covariances

        t2 = time.time()
        covs = None
        if options.low_rank.method == "activation":
            covs = weighted_covariances(
                {c.name: input_covariances(student, token_windows(student_tok, c.text, options.calibration_tokens,
                                                                  options.window_tokens), autocast=options.autocast)
                 for c in capabilities}, weights)
        keep = options.low_rank.keep
        if options.low_rank.store == "factors":
            counts = config_parameter_count(student.config)
            keep = fit_keep(student, final_budget.params + counts["total"] - counts[final_budget.counts])
        if keep is None:
            record["notes"].append("low rank: the pruned tower already fits the budget; not factorised")
        else:
            student, report = low_rank_model(student, keep, options.low_rank.method, covs,
                                             store=options.low_rank.store)
            record["low_rank"] = report
            if options.low_rank.store == "factors":
                record["params"]["pruned"] = record["params"]["student"]
                record["params"]["student"] = config_parameter_count(student.config)
                if record["params"]["student"]["total"] != parameter_count(student):
                    raise RuntimeError("the factored tower's parameter count does not match its config")
                record["budget"]["final"] = final_budget.params
            record["notes"].append(
                f"low rank ({report['method']}, keep {keep:.3f}): "
                + (f"stored as factors, {report['factored_params']:,} instead of {report['dense_params']:,} "
                   "projection params" if options.low_rank.store == "factors" else
                   f"stored dense; factored it would hold {report['factored_params']:,} of "
                   f"{report['dense_params']:,} projection params"))
        timings["low_rank"] = time.time() - t2
    timings["total"] = time.time() - t0
    record["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    return student, student_tok, record


AUTO_CANDIDATES = (("uniform", 0.0), ("dynamic", 0.1), ("dynamic", 0.25), ("dynamic", 1.0))


def _after_tokens(tokenizer, text, tokens):
    """The part of ``text`` after its first ``tokens`` tokens (the importance windows), for held-aside selection."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= tokens:
        raise CompressError(f"allocation=auto needs more calibration text than the {tokens} importance tokens")
    return text[offsets[tokens][0]:]


def calibration_loss(model, windows, weights, autocast=False, batch_size=4):
    """Capability-weighted mean next-token cross-entropy (nats/token) of ``model`` on ``{cap: windows}``."""
    losses = {}
    with torch.inference_mode():
        for cap, w in windows.items():
            total, count = 0.0, 0
            for start in range(0, w.shape[0], batch_size):
                ids = w[start:start + batch_size]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits = model(ids, use_cache=False).logits
                total += float(torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
                count += ids[:, 1:].numel()
            losses[cap] = total / count
    norm = sum(weights.get(c, 1.0) for c in losses)
    return sum(weights.get(c, 1.0) * v for c, v in losses.items()) / norm, losses


def select_allocation(model, scores, budget, base, selection_windows, weights, autocast=False,
                      candidates=AUTO_CANDIDATES, advance=None, heal=None):
    """The allocation (of ``candidates``: (kind, max_deviation)) whose pruned model has the lowest capability-weighted
    loss on ``selection_windows`` (training text held aside from the importance windows); ``(alloc, report)``.

    ``scores`` is one `StructureScores`, or ``{name: StructureScores}`` (a scorer's variants): then every
    (scores, allocation) pair is a candidate, and the report names the chosen scores (``chosen_scores``).
    ``heal`` ({"windows": {cap: rows}, "steps": n, "lr": lr}): each candidate is trained that long first
    (`heal.heal`), and its loss right after the cut is kept as ``loss_before_heal``."""
    import dataclasses

    from .heal import heal as heal_run

    scored = scores if isinstance(scores, dict) else {"": scores}
    best, report = None, {"candidates": []}
    for mix, s in scored.items():
        for kind, deviation in candidates:
            alloc = allocate(model.config, s, budget, dataclasses.replace(base, allocation=kind,
                                                                         max_deviation=deviation))
            pruned, _ = apply_prune_plan(model, alloc.plan)
            extra = {}
            if heal and heal["steps"]:
                extra["loss_before_heal"], _ = calibration_loss(pruned, selection_windows, weights, autocast)
                extra["heal_losses"] = heal_run(pruned, heal["windows"], heal["steps"], heal["lr"], autocast=autocast)
            loss, per_cap = calibration_loss(pruned, selection_windows, weights, autocast)
            name = kind if kind == "uniform" else f"dynamic (max_deviation {deviation:g})"
            entry = {"allocation": name, "loss": loss, "per_capability": per_cap, **extra}
            if mix:
                entry["scores"] = mix
            report["candidates"].append(entry)
            if best is None or loss < best[0]:
                best, report["chosen"], report["chosen_scores"] = (loss, alloc), name, mix
            del pruned
            if advance is not None:
                advance()
    if len(scored) == 1:
        report.pop("chosen_scores")
    return best[1], report


def _kept_record(alloc, units):
    layers = []
    for w in alloc.widths:
        info = units.layers[w["layer"]]
        group = info.group_size or 1
        tplan = alloc.plan.towers[0]
        neurons = tplan.neurons.get(w["layer"], list(range(info.ffn_size)) if not w["dropped"] else [])
        layers.append({"layer": w["layer"], "dropped": w["dropped"], "heads": w["heads"],
                       "kv_groups": sorted({h // group for h in w["heads"]}), "ffn": w["ffn"],
                       "neurons": neurons if w["ffn"] else []})
    return {"hidden_channels": alloc.plan.hidden_channels, "layers": layers}


def write_compressed(student, tokenizer, record, out, overwrite=True, sources=()):
    """Write the checkpoint + tokenizer + ``compress.json`` into ``out`` atomically; returns the record.

    ``sources``: paths the compression read (see `atomic_dir`); an ``out`` overlapping one is refused."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite, sources=sources) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(tmp.glob("*.safetensors"))
        record = dict(record, checkpoint={
            "files": [f.name for f in files], "safetensors_bytes": sum(f.stat().st_size for f in files),
            "dtype": str(next(student.parameters()).dtype).removeprefix("torch."),
            "params": parameter_count(student)})
        with atomic_file(tmp / "compress.json") as f:
            f.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


# ---------------------------------------------------------------------------------------------- stage


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def compress_inputs(recipe, options, teacher, fm_path):
    def stamp(path):
        path = Path(path)
        return [str(path), path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else [str(path)]

    return {"options": options.model_dump(mode="json"), "teacher": teacher.model_dump(mode="json"),
            "teacher_stamp": stamp(teacher.source),
            "capabilities": [c.model_dump(mode="json") for c in recipe.capabilities],
            "student": recipe.student.model_dump(mode="json"),
            "feature_map": stamp(fm_path) if fm_path else None}


def run_compress(recipe, console=None, show_progress=True, force=False) -> dict:
    """Run the compress stage of ``recipe``; returns ``compress.json``'s record with ``path`` and ``reused``."""
    from .feature_map import load_feature_map
    from .probes import probe_class
    from .recipe import write_resolved_recipe
    from .run_paths import recipe_sources
    from .teacher_import import nexus_from_teacher
    from .teacher_source import load_teacher

    options = recipe.stage(STAGE)
    names = [t.name for t in recipe.teachers]
    if options.teacher is not None and options.teacher not in names:
        raise CompressError(f"stages.compress.teacher: unknown teacher {options.teacher!r}; teachers: "
                            f"{', '.join(names)}")
    teacher = recipe.teacher(options.teacher or names[0])
    fm_path = options.feature_map
    if fm_path is None and options.scorer == "capability":
        default = recipe.run_path / "localise" / "feature_map.json"
        fm_path = default if default.is_file() else None
    capabilities = []
    for i, cap in enumerate(recipe.capabilities):
        kind = probe_class(cap.probe).data_kind
        if kind not in ("text", "jsonl"):
            continue
        text, source = calibration_text(cap.data, kind)
        capabilities.append(Capability(cap.name, text, cap.weight, source))
    if not capabilities:
        raise CompressError("no capability has text or JSONL data to calibrate compression on")
    out = recipe.run_path / STAGE
    sources = {**recipe_sources(recipe), "feature map": fm_path}
    check_output_vs_sources(out, sources)  # before loading anything
    inputs = compress_inputs(recipe, options, teacher, fm_path)
    manifest = out / "compress.json"
    if not force and manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("inputs_digest") == _digest(inputs):
            return {**previous, "path": str(out), "reused": True}
    run_existed = recipe.run_path.exists()
    try:
        hf, tokenizer = load_teacher(teacher.source, DTYPES[teacher.dtype], teacher.allow_pickle,
                                     teacher.trust_remote_code, recipe.cache_dir)
        model = nexus_from_teacher(hf, name=teacher.name, capabilities=[c.name for c in capabilities])
        del hf
        gc.collect()
        teacher_counts = config_parameter_count(model.config)
        b = options.budget or recipe.student.budget  # the student's budget counts every parameter
        try:
            budget = resolve_budget(getattr(b, "params", None), getattr(b, "fraction", None),
                                    getattr(b, "memory_gb", None), getattr(b, "counts", "total"),
                                    teacher_counts=teacher_counts)
        except BudgetError as exc:
            raise BudgetError(f"{'stages.compress.budget' if options.budget else 'student.budget'}: {exc}") from None
        feature_map = None
        if fm_path is not None:
            feature_map = feature_map_scores(load_feature_map(fm_path), teacher.name, DecoderUnits(model)) or None
        student, student_tok, record = compress_model(model, tokenizer, capabilities, options, budget, feature_map,
                                                      console=console, show_progress=show_progress)
        record["teacher"] = {"name": teacher.name, "source": str(teacher.source)}
        record["feature_map_path"] = str(fm_path) if fm_path else None
        record["inputs_digest"] = _digest(inputs)
        record = write_compressed(student, student_tok, record, out, sources=sources)
        write_resolved_recipe(recipe, recipe.run_path)
    except BaseException:
        if not run_existed and recipe.run_path.is_dir() and not any(recipe.run_path.iterdir()):
            recipe.run_path.rmdir()
        raise
    return {**record, "path": str(out), "reused": False}

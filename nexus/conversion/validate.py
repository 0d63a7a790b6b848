"""The validate stage: does the student keep every capability? Retention with CIs, layer CKA, interference, a gate.

Three scales, each measured on the recipe's own probes and items (the profile's probe settings, so the items are
the ones the teachers were profiled on):

- **task level**: for every capability, the student's score against every teacher scored on it, on the *same
  items*. Retention = student / teacher for higher-is-better metrics (accuracy, exact match) and teacher / student
  for bits per byte, so 1.0 = parity and > 1 = the student is better (DESIGN.md, "How a retention number is
  defined"). An ``lm`` capability is compared by next-token top-1 accuracy when the student and that teacher
  tokenise its text identically, else by bits per byte (``lm_metric: auto``); bits-per-byte retention is reported
  beside in both cases. Paired bootstrap 95% CIs (the same item resamples for student and teacher), then the minimum
  and the mean over capabilities against each capability's best teacher, with joint bootstrap CIs (`retention`).
  Teachers are scored one resident at a time; the per-item scores of a profile with the same inputs are reused.
- **layer level**: linear CKA (`cka`) between the student's and each teacher's hidden states on each capability's
  text, per layer (teacher layer at the same relative depth) plus the whole layer x layer matrix; only where the two
  tokenise the text identically (else ``"skipped: tokenizers differ"``).
- **interference**: given one checkpoint per training phase (in order), every capability's retention after each
  phase and its change from the previous phase (paired CIs), as a phase x capability matrix.
- **competence**: a capability no teacher is competent at (every teacher's CI not clear of the trivial baseline, or
  exact match 0: `profile.no_competent_teacher` on the same items) has no retention number: it is listed first, under
  ``no_competent_teacher`` (the teachers' and the student's scores beside the baseline), and the minimum, the means,
  the interference matrix and the gate are over the remaining capabilities. A capability with
  ``require_competent_teacher: false`` keeps its retention (in the minimum and means), named in
  ``competence_waived`` and in a note.
- **gate**: ``stages.validate.min_retention``; the gate fails when the minimum retention (its value, or its CI's
  lower end with ``gate_statistic: ci_low``) is below it. The report is written either way; ``nexus validate``
  exits 3 on a failed gate (2 is bad input).

Writes ``runs/<name>/validate/`` (or ``out``) atomically: ``report.json``, ``report.md``, ``retention.png`` (plus
feature-map heatmaps, ``lmc.png``, ``interference.png`` when there is data for them), ``model_card.md``,
``recipe.resolved.yaml``, ``items.json`` (the student's per-item scores, ``{"student": {CAP: [item, ...]}}``, in
the profile's item order: paired comparisons of two students on the same items) and ``manifest.json`` (a rerun with
the same inputs is reused). ``report.json``::

    {"no_competent_teacher": {CAP: {"teacher", "metric", "teacher_score", "teacher_score_ci", "baseline",
                                    "student_score", "teachers": {TEACHER: {"score", "ci", "competent"}}, "reason"}},
     "retention": {CAP: {"value", "ci": [lo, hi], "teacher", "metric", "lower_is_better", "student_score",
                         "teacher_score", "n", "competent", ...}},
     "min": {"value", "ci", "capability"}, "mean": {"value", "ci"}, "weighted_mean": {...},
     "student_params", "teacher_params": {TEACHER: n}, "params_ratio",
     "per_teacher": {CAP: {TEACHER: {same keys as retention[CAP]}}},
     "cka": {TEACHER: {CAP: {"per_layer", "layer_map", "matrix", "tokens"} | {"skipped": reason}}},
     "interference": {"phases", "capabilities", "retention": [[...]], "delta": [[...]], "delta_ci": [[[lo, hi]]]},
     "gate": {"threshold", "statistic", "passed", "failed", "requested"}, "undefined": {CAP: reason}, ...}

Sample recipe section::

    stages:
      validate: {min_retention: 0.95, gate_statistic: value, lm_metric: auto, student_dtype: bf16, cka_max_tokens: 1024}
"""

import contextlib
import functools
import gc
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .atomic_output import atomic_dir, atomic_file
from .cka import cka_matrix, depth_matched
from .json_finite import json_finite
from .load_check import checked_from_pretrained
from .memory_plan import safetensors_numel
from .probes.base import inference_context
from .probes.lm_eval_task import LMEvalTaskSpec
from .progress_bar import stage_progress
from .profile import (
    DTYPES,
    _digest,
    _is_competent,
    _sigterm_raises,
    _source_fingerprint,
    best_teachers,
    load_probes,
    no_competent_teacher,
    plan_profile,
    profile_inputs,
)
from .recipe import Recipe, register_stage_options, write_resolved_recipe
from .retention import (
    aggregate,
    clamp_ci,
    item_rows,
    percentile_ci,
    resample_indices,
    retention_samples,
    retention_value,
    score_of,
)
from .run_paths import recipe_sources
from .teacher_source import (
    PICKLE_SUFFIXES,
    load_teacher,
    load_tokenizer,
    resolve_teacher_folder,
)

STAGE = "validate"
CI_LEVEL = 0.95
DEFINITION = ("retention = student / teacher on the same items for higher-is-better metrics (accuracy, exact match) "
              "and teacher / student for bits per byte: 1.0 = parity, > 1 = the student is better; paired bootstrap "
              "95% CIs")
STAGE_FOLDERS = ("profile", "localise", "align", "compress", "distill", "refine")


class ValidateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_retention: float | None = Field(
        None, gt=0, description="the gate: the minimum retention over capabilities (vs each one's best teacher) "
                                "must reach this; unset = no gate")
    gate_statistic: Literal["value", "ci_low"] = Field(
        "value", description="what the gate compares with min_retention: the minimum's point value, or the lower "
                             "end of its 95% CI (stricter)")
    lm_metric: Literal["auto", "bpb", "accuracy"] = Field(
        "auto", description="lm capabilities: auto = top-1 accuracy when student and teacher tokenise the text "
                            "identically, else bits per byte; bpb / accuracy force one (accuracy falls back to bpb "
                            "with a note where tokenisations differ)")
    student_dtype: Literal["bf16", "fp32"] = Field("bf16", description="weights dtype of the student while scored")
    routing: Literal["router", "capability"] = Field(
        "router", description="router: score the student as deployed (its router picks the tower); capability: "
                              "force the tower that serves each capability (config capability names)")
    reuse_profile: bool = Field(True, description="reuse a profile's per-item teacher scores when its inputs match")
    cka: bool = Field(True, description="compute layer-level CKA against teachers with the same tokenisation")
    cka_max_tokens: int = Field(1024, ge=8, description="tokens per capability whose hidden states CKA compares")
    lm_eval_tasks: list[LMEvalTaskSpec] = Field(
        default_factory=list, description="local lm-eval tasks (YAML + local data, no download) run through lm-eval's "
                                          "HFLM on the student and every teacher; the report's `lm_eval` section "
                                          "gives each model's score with a bootstrap 95% CI and the stderr")


register_stage_options(STAGE, ValidateOptions)


class ValidateError(ValueError):
    pass


# ---------------------------------------------------------------- inputs (nothing loaded, nothing written)


def check_model_folder(path, what) -> Path:
    """A scorable model folder (config.json, safetensors, tokenizer) or a `ValidateError` naming ``what``."""
    path = Path(path)
    if not path.exists():
        raise ValidateError(f"{what} path {path} does not exist")
    if not path.is_dir():
        raise ValidateError(f"{what} path {path} is not a folder (give a checkpoint folder with config.json)")
    if not (path / "config.json").is_file():
        raise ValidateError(f"{what} folder {path} has no config.json (not a checkpoint folder)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        why = f"only pickle weights ({', '.join(pickles)}), which are refused" if pickles else "no *.safetensors"
        raise ValidateError(f"{what} folder {path} has {why}")
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((path / n).is_file() for n in names):
        raise ValidateError(f"{what} folder {path} has no tokenizer (expected one of {', '.join(names)})")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValidateError(f"{what} folder {path}: config.json is not valid JSON ({exc})") from None
    return path


def _checkpoint_list(checkpoints):
    """[(phase name, folder)] from paths or ``name=path`` strings; names are unique."""
    out, seen = [], set()
    for i, spec in enumerate(checkpoints or ()):
        spec = str(spec)
        name, _, raw = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        path = check_model_folder(raw, f"checkpoint {i + 1} ({spec})")
        name = name or path.name
        if name in seen:
            raise ValidateError(f"checkpoint {i + 1}: phase name {name!r} is used twice; name phases as NAME=PATH")
        seen.add(name)
        out.append((name, path))
    if len(out) == 1:
        raise ValidateError("interference needs at least two checkpoints (one per training phase, in order); got one")
    return out


def load_lmc(path):
    """An LMC path: ``{"alphas": [...], "scores": [...] | {NAME: [...]}, ...}`` (e.g. from the refine stage)."""
    path = Path(path)
    if not path.is_file():
        raise ValidateError(f"LMC file {path} does not exist")
    try:
        lmc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValidateError(f"LMC file {path}: not valid JSON ({exc})") from None
    if not isinstance(lmc, dict) or not isinstance(lmc.get("alphas"), list) or "scores" not in lmc:
        raise ValidateError(f"LMC file {path}: expected an object with 'alphas' (a list) and 'scores'")
    curves = lmc["scores"] if isinstance(lmc["scores"], dict) else {"score": lmc["scores"]}
    for name, values in curves.items():
        if not isinstance(values, list) or len(values) != len(lmc["alphas"]):
            raise ValidateError(f"LMC file {path}: scores[{name!r}] must be a list of {len(lmc['alphas'])} numbers "
                                "(one per alpha)")
    return lmc


def _model_config(folder):
    from transformers import AutoConfig

    raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") == "nexus":
        from ..modeling_nexus import NexusConfig

        return NexusConfig.from_pretrained(folder)
    if raw.get("auto_map"):
        raise ValidateError(f"{folder} needs remote code (auto_map in config.json) and is not a Nexus checkpoint; "
                            "refusing it")
    return AutoConfig.from_pretrained(folder)


def load_scored_model(folder, dtype):
    """(model, tokenizer) of a student or checkpoint: a Nexus folder through this project's own modeling code (no
    remote code runs), any other HF folder through AutoModelForCausalLM."""
    config = _model_config(folder)
    if config.model_type == "nexus":
        from ..modeling_nexus import NexusForCausalLM

        model = checked_from_pretrained(NexusForCausalLM, folder, what="student", dtype=dtype).eval()
        return model, load_tokenizer(folder)
    return load_teacher(folder, dtype)


# ---------------------------------------------------------------- tokenisation and CKA text


def _start_token(tokenizer):
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def _texts(probe):
    """The text each item of a probe shows a model (CKA input and the tokenisation comparison)."""
    if probe.name == "lm":
        return list(probe.chunks)
    if probe.name == "exact_match":
        return [p + a for p, a in zip(probe.prompts, probe.answers)]
    if probe.name == "multiple_choice":
        return [prompt + choices[answer] for prompt, choices, answer in probe.items]
    return []


def _token_strings(tokenizer, texts):
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [tokenizer.convert_ids_to_tokens(x) for x in ids]


def _cka_inputs(tokenizer, texts, window, max_tokens):
    """Token id lists (start token + the text, at most ``window`` long) until ``max_tokens`` tokens are covered."""
    start = _start_token(tokenizer)
    out, total = [], 0
    for ids in (tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []):
        seq = ([start] if start is not None else []) + list(ids)
        seq = seq[:min(window, max_tokens - total)]
        if len(seq) >= 2:
            out.append(seq)
            total += len(seq)
        if total >= max_tokens:
            break
    return out


def _capability_kwargs(model, cap, routing):
    if routing != "capability" or getattr(model.config, "model_type", None) != "nexus":
        return {}
    return {"capability": cap} if cap in model.config.capability_to_tower else {}


def hidden_states(model, sequences, settings, **kwargs):
    """Per layer (hidden_states entry), the stacked (tokens, width) fp32 states of ``sequences`` (one at a time, so
    a multi-tower router picks one tower per sequence)."""
    layers = None
    with inference_context(model, settings):
        for seq in sequences:
            out = model(input_ids=torch.tensor([seq]), output_hidden_states=True, use_cache=False, **kwargs)
            states = [h[0].float().numpy() for h in out.hidden_states]  # each (T, H)
            layers = [[s] for s in states] if layers is None else [acc + [s] for acc, s in zip(layers, states)]
    return [np.concatenate(chunks) for chunks in layers] if layers else []


@contextlib.contextmanager
def forced_capability(model, kwargs):
    """Every forward of ``model`` (probes, ``generate``) gets ``kwargs`` (e.g. ``capability=``) while inside."""
    if not kwargs:
        yield
        return
    model.forward = functools.partial(type(model).forward, model, **kwargs)
    try:
        yield
    finally:
        del model.forward


# ---------------------------------------------------------------- plan


def plan_validate(recipe: Recipe, student, checkpoints=(), feature_map=None, lmc=None, gate=None) -> dict:
    """Check every input and decide what to score; loads tokenizers and configs only. Raises on bad input."""
    from .profile import STAGE as PROFILE

    options = recipe.stage(STAGE)
    gate_on = options.min_retention is not None if gate is None else bool(gate)
    if gate_on and options.min_retention is None:
        raise ValidateError(f"the gate was requested but stages.validate.min_retention is not set in recipe "
                            f"{recipe.name!r}; set it (e.g. 0.95) or run without --gate")
    student = check_model_folder(student, "student")
    phases = _checkpoint_list(checkpoints)
    fm = None
    if feature_map is not None:
        from .feature_map import load_feature_map

        fm = load_feature_map(feature_map)
    lmc_data = load_lmc(lmc) if lmc is not None else None
    settings = recipe.stage(PROFILE).probe_settings()
    probes = load_probes(recipe, settings)
    plan, skipped = plan_profile(recipe, probes)
    models = {"student": student, **{f"checkpoint {name}": path for name, path in phases}}
    token_strings = {}
    for label, folder in models.items():
        config = _model_config(folder)
        tokenizer = load_tokenizer(folder)
        for cap, probe in probes.items():
            reason = probe.cannot_score(tokenizer, config)
            if reason:
                raise ValidateError(f"{label} ({folder}) cannot be scored on capability {cap!r}: {reason}")
        token_strings[label] = {cap: _token_strings(tokenizer, _texts(p)) for cap, p in probes.items()}
    teacher_tokens = {}
    for teacher in recipe.teachers:
        caps = plan.get(teacher.name) or []
        if not caps:
            continue
        folder = resolve_teacher_folder(teacher.source, teacher.allow_pickle, recipe.cache_dir)
        tokenizer = load_tokenizer(folder, trust_remote_code=teacher.trust_remote_code)
        teacher_tokens[teacher.name] = {cap: _token_strings(tokenizer, _texts(probes[cap])) for cap in caps}
        del tokenizer  # a 262k-token tokenizer holds ~320 MiB: gone before the models are scored
    from .peak_rss import release_freed_memory

    release_freed_memory()
    same = {cap: {t: bool(_texts(probes[cap])) and toks[cap] == token_strings["student"][cap]
                  for t, toks in teacher_tokens.items() if cap in toks} for cap in probes}
    phase_same = {name: {cap: {t: toks[cap] == token_strings[f"checkpoint {name}"][cap]
                               for t, toks in teacher_tokens.items() if cap in toks} for cap in probes}
                  for name, _ in phases}
    lm_eval = {}
    if options.lm_eval_tasks:
        from .probes.lm_eval_task import load_lm_eval_tasks

        lm_eval = load_lm_eval_tasks(options.lm_eval_tasks, settings)
    return {"options": options, "gate": gate_on, "student": student, "phases": phases, "feature_map": fm,
            "lm_eval": lm_eval,
            "feature_map_path": str(feature_map) if feature_map is not None else None, "lmc": lmc_data,
            "settings": settings, "probes": probes, "plan": plan, "skipped": skipped, "same_tokenization": same,
            "phase_same_tokenization": phase_same}


def validate_inputs(recipe, plan, feature_map=None, lmc=None) -> dict:
    """Everything the report depends on (a rerun with equal inputs reuses the previous report)."""
    def digest(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path is not None else None

    return {
        "profile_inputs": profile_inputs(recipe),
        "student": _source_fingerprint(plan["student"]),
        "phases": [[name, _source_fingerprint(path)] for name, path in plan["phases"]],
        "feature_map": digest(feature_map), "lmc": digest(lmc),
        "options": plan["options"].model_dump(mode="json"), "gate": plan["gate"],
        "lm_eval_tasks": {task: _lm_eval_fingerprint(probe) for task, probe in plan.get("lm_eval", {}).items()},
    }


def _lm_eval_fingerprint(probe):
    """sha256 of an lm-eval task's YAML and of every local data file it names."""
    path, config = probe._read_yaml()
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    names = [n for e in (files.values() if isinstance(files, dict) else [files])
             for n in (e if isinstance(e, list) else [e])]
    digest = hashlib.sha256(path.read_bytes())
    for name in names:
        digest.update((path.parent / name).read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- scoring


def _score_model(model, tokenizer, caps, plan, progress, label, kwargs_of):
    """{CAP: (summary, items)} of one resident model."""
    out = {}
    for cap in caps:
        probe = plan["probes"][cap]
        task = progress.add_task(f"[cyan]{label}[/] x {cap}", total=len(probe))
        with forced_capability(model, kwargs_of(cap)):
            result = probe.score(model, tokenizer, advance=lambda k, t=task: progress.advance(t, k))
        progress.update(task, completed=len(probe))
        out[cap] = (result.summary, result.items)
    return out


def _score_lm_eval(plan, model, tokenizer):
    """The recipe's extra lm-eval tasks on one resident model (the router picks a Nexus student's tower)."""
    if not plan.get("lm_eval"):
        return {}
    from .probes.lm_eval_task import score_lm_eval_tasks

    return score_lm_eval_tasks(plan["lm_eval"], model, tokenizer)


def _cka_caps(plan, teacher=None):
    if not plan["options"].cka:
        return []
    same = plan["same_tokenization"]
    return [c for c in same if (any(same[c].values()) if teacher is None else same[c].get(teacher))]


def profile_matches(recipe) -> bool:
    """True when ``runs/<name>/profile`` holds a profile whose inputs equal the recipe's now (its manifest only)."""
    try:
        manifest = json.loads((recipe.run_path / "profile" / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("inputs_digest") == _digest(profile_inputs(recipe))


def _load_profile_items(recipe):
    """(profile.json, items.json) of a profile whose inputs equal the recipe's now, else (None, None)."""
    folder = recipe.run_path / "profile"
    if not profile_matches(recipe):
        return None, None
    try:
        return json.loads((folder / "profile.json").read_text()), json.loads((folder / "items.json").read_text())
    except (OSError, ValueError):
        return None, None


def score_all(recipe, plan, console=None, show_progress=True, on_model_loaded=None):
    """Score the student, the teachers and every checkpoint, one resident at a time.

    Returns ``{"student": {...}, "teachers": {T: {CAP: (summary, items)}}, "teacher_info", "phases", "reused"}``.
    ``on_model_loaded(label, model)`` is called while a model is resident (tests check residency with it).
    """
    from transformers.utils import logging as hf_logging

    options, settings = plan["options"], plan["settings"]
    caps = list(plan["probes"])
    dtype = DTYPES[options.student_dtype]
    window = settings.window_tokens
    profile, profile_items = _load_profile_items(recipe) if options.reuse_profile else (None, None)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    out = {"teachers": {}, "teacher_info": {}, "phases": {}, "reused": {}}
    try:
        with stage_progress(console, show_progress) as progress:
            # the student, with its hidden states on every capability some teacher tokenises identically
            gc.collect()
            model, tokenizer = load_scored_model(plan["student"], dtype)
            if on_model_loaded:
                on_model_loaded("student", model)
            kwargs_of = functools.partial(_capability_kwargs, model, routing=options.routing)
            cka_seqs = {cap: _cka_inputs(tokenizer, _texts(plan["probes"][cap]), window, options.cka_max_tokens)
                        for cap in _cka_caps(plan)}
            student_states = {cap: hidden_states(model, seqs, settings, **kwargs_of(cap))
                              for cap, seqs in cka_seqs.items()}
            scores = _score_model(model, tokenizer, caps, plan, progress, "student", kwargs_of)
            lm_eval = {"student": _score_lm_eval(plan, model, tokenizer)}
            config = model.config
            out["student"] = {
                "scores": scores, "states": student_states,
                "params": sum(p.numel() for p in model.parameters()),
                "model_type": config.model_type, "dtype": options.student_dtype,
                "towers": [t.get("name") or f"tower{i}" for i, t in enumerate(config.towers)]
                if config.model_type == "nexus" else None,
                "capability_to_tower": dict(config.capability_to_tower) if config.model_type == "nexus" else None,
            }
            del model, tokenizer, kwargs_of
            gc.collect()
            # teachers: reuse the profile's per-item scores when they match, load only for what is missing
            for teacher in recipe.teachers:
                tcaps = plan["plan"].get(teacher.name) or []
                reused = {cap: (profile["capabilities"][cap][teacher.name], profile_items[cap][teacher.name])
                          for cap in tcaps if profile and teacher.name in profile_items.get(cap, {})}
                missing = [c for c in tcaps if c not in reused]
                cka_caps = _cka_caps(plan, teacher.name)
                folder = resolve_teacher_folder(teacher.source, teacher.allow_pickle, recipe.cache_dir)
                info = {"source": str(teacher.source), "params": safetensors_numel(folder)}
                scored, states = {}, {}
                if missing or cka_caps or plan.get("lm_eval"):
                    gc.collect()
                    model, tokenizer = load_teacher(teacher.source, DTYPES[teacher.dtype], teacher.allow_pickle,
                                                    teacher.trust_remote_code, recipe.cache_dir)
                    if on_model_loaded:
                        on_model_loaded(teacher.name, model)
                    info["params"] = sum(p.numel() for p in model.parameters())
                    for cap in cka_caps:
                        seqs = _cka_inputs(tokenizer, _texts(plan["probes"][cap]), window, options.cka_max_tokens)
                        states[cap] = hidden_states(model, seqs, settings)
                    scored = _score_model(model, tokenizer, missing, plan, progress, teacher.name, lambda c: {})
                    lm_eval[teacher.name] = _score_lm_eval(plan, model, tokenizer)
                    del model, tokenizer
                    gc.collect()  # the teacher is gone before the next model loads
                out["teachers"][teacher.name] = {**reused, **scored}
                out["teacher_info"][teacher.name] = {**info, "cka_states": states}
                out["reused"][teacher.name] = sorted(reused)
            out["lm_eval"] = {name: scores for name, scores in lm_eval.items() if scores}
            # one checkpoint per training phase
            for name, folder in plan["phases"]:
                gc.collect()
                model, tokenizer = load_scored_model(folder, dtype)
                if on_model_loaded:
                    on_model_loaded(f"checkpoint {name}", model)
                kwargs_of = functools.partial(_capability_kwargs, model, routing=options.routing)
                out["phases"][name] = _score_model(model, tokenizer, caps, plan, progress, f"phase {name}",
                                                   kwargs_of)
                del model, tokenizer, kwargs_of
                gc.collect()
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return out


# ---------------------------------------------------------------- retention, CKA, interference, gate


def _finite_or_none(x):
    return float(x) if x is not None and math.isfinite(x) else None


def _pair_metric(probe, summary, same_tokenization, lm_metric, notes, where):
    """(metric name, lower is better) for comparing a student with one teacher on one capability."""
    if probe.name != "lm":
        return summary["metric"], not summary["higher_is_better"]
    if lm_metric == "bpb" or (lm_metric == "auto" and not same_tokenization):
        return "bpb", True
    if not same_tokenization:
        notes.append(f"{where}: lm_metric accuracy needs the same tokenisation; compared by bits per byte instead")
        return "bpb", True
    return "accuracy", False


def _pair(probe, student, teacher, metric, lower, idx):
    """The retention entry of one (student, teacher) pair on one capability, plus its bootstrap samples."""
    s_rows, t_rows = item_rows(probe.name, student[1], metric), item_rows(probe.name, teacher[1], metric)
    value = _finite_or_none(retention_value(s_rows, t_rows, lower))
    samples = retention_samples(s_rows, t_rows, lower, idx)
    entry = {"value": value, "ci": clamp_ci(value, percentile_ci(samples)) if value is not None else None,
             "metric": metric, "lower_is_better": lower, "student_score": score_of(s_rows),
             "teacher_score": score_of(t_rows), "n": len(s_rows)}
    if probe.name == "lm" and metric != "bpb":  # bits per byte beside, always comparable
        b_s, b_t = item_rows("lm", student[1], "bpb"), item_rows("lm", teacher[1], "bpb")
        bpb = _finite_or_none(retention_value(b_s, b_t, True))
        entry.update(bpb_value=bpb, bpb_ci=clamp_ci(bpb, percentile_ci(retention_samples(b_s, b_t, True, idx))))
    if probe.name == "lm":
        entry.update(student_bpb=student[0]["bpb"], teacher_bpb=teacher[0]["bpb"],
                     student_perplexity=student[0]["perplexity"], teacher_perplexity=teacher[0]["perplexity"])
    return entry, samples


def retention_tables(recipe, plan, scored):
    """(per_teacher, retention vs best, samples vs best, best, baselines, notes)."""
    options, settings = plan["options"], plan["settings"]
    notes, per_teacher, best_entry, best_samples = [], {}, {}, {}
    teacher_summaries = {cap: {t: s[cap][0] for t, s in scored["teachers"].items() if cap in s}
                         for cap in plan["probes"]}
    best, separated = best_teachers(teacher_summaries)
    baselines = {cap: probe.baseline() for cap, probe in plan["probes"].items()}
    for k, (cap, probe) in enumerate(plan["probes"].items()):
        student = scored["student"]["scores"][cap]
        idx = resample_indices(len(student[1]), settings.n_bootstrap, settings.seed + k)
        per_teacher[cap] = {}
        for teacher, summaries in scored["teachers"].items():
            if cap not in summaries:
                continue
            same = plan["same_tokenization"][cap].get(teacher, False)
            metric, lower = _pair_metric(probe, summaries[cap][0], same, options.lm_metric, notes,
                                         f"{cap} vs {teacher}")
            entry, samples = _pair(probe, student, summaries[cap], metric, lower, idx)
            competent = _is_competent(summaries[cap][0], baselines[cap])
            entry.update(same_tokenization=same, competent=competent, teacher_score_ci=summaries[cap][0]["ci"],
                         teacher_primary=summaries[cap][0]["score"], primary_metric=summaries[cap][0]["metric"])
            if entry["value"] is None:
                entry["undefined"] = (f"the teacher's {metric} is 0" if not lower else f"the student's {metric} is 0")
            per_teacher[cap][teacher] = entry
            if teacher == best[cap]:
                best_entry[cap] = {**entry, "teacher": teacher, "best_separated": separated.get(cap)}
                best_samples[cap] = samples
    return per_teacher, best_entry, best_samples, best, baselines, notes


def cka_tables(plan, scored):
    """TEACHER -> CAP -> {"per_layer", "layer_map", "matrix", "tokens"} or {"skipped": reason}."""
    out = {}
    student_states = scored["student"]["states"]
    for teacher, info in scored["teacher_info"].items():
        out[teacher] = {}
        for cap in scored["teachers"][teacher]:
            if not plan["options"].cka:
                out[teacher][cap] = {"skipped": "cka: false in stages.validate"}
            elif not plan["same_tokenization"][cap].get(teacher):
                out[teacher][cap] = {"skipped": "skipped: tokenizers differ" if _texts(plan["probes"][cap])
                                     else "skipped: the probe has no text items"}
            else:
                s, t = student_states[cap], info["cka_states"][cap]
                matrix = cka_matrix(s, t)
                mapping = depth_matched(len(s), len(t))
                out[teacher][cap] = {
                    "per_layer": [_finite_or_none(matrix[i, j]) for i, j in enumerate(mapping)],
                    "layer_map": mapping,
                    "matrix": [[_finite_or_none(x) for x in row] for row in matrix],
                    "tokens": int(s[0].shape[0]) if s else 0,
                    "layers": "hidden_states entries: 0 = embeddings, i = after layer i (the last one final-normed)",
                }
    return out


def interference_matrix(plan, scored, best, caps=None):
    """Each phase's retention vs the best teacher and its change from the previous phase, with paired CIs, over
    ``caps`` (default: every capability)."""
    phases = [name for name, _ in plan["phases"]]
    if not phases:
        return None
    settings, options = plan["settings"], plan["options"]
    caps = list(plan["probes"]) if caps is None else list(caps)
    retention = [[None] * len(caps) for _ in phases]
    retention_ci = [[None] * len(caps) for _ in phases]
    delta = [[None] * len(caps) for _ in phases[1:]]
    delta_ci = [[None] * len(caps) for _ in phases[1:]]
    metrics = {}
    for j, cap in enumerate(caps):
        probe, teacher = plan["probes"][cap], best[cap]
        t_scores = scored["teachers"][teacher][cap]
        same = all(plan["phase_same_tokenization"][p][cap].get(teacher, False) for p in phases)
        metric, lower = _pair_metric(probe, t_scores[0], same, "bpb" if options.lm_metric == "bpb" else "auto",
                                     [], cap)
        metrics[cap] = {"metric": metric, "lower_is_better": lower, "teacher": teacher}
        t_rows = item_rows(probe.name, t_scores[1], metric)
        idx = resample_indices(len(t_rows), settings.n_bootstrap, settings.seed + 1000 + j)
        samples = []
        for i, phase in enumerate(phases):
            rows = item_rows(probe.name, scored["phases"][phase][cap][1], metric)
            value = _finite_or_none(retention_value(rows, t_rows, lower))
            samples.append(retention_samples(rows, t_rows, lower, idx))
            retention[i][j] = value
            retention_ci[i][j] = clamp_ci(value, percentile_ci(samples[-1])) if value is not None else None
            if i and value is not None and retention[i - 1][j] is not None:
                d = value - retention[i - 1][j]
                delta[i - 1][j] = d
                with np.errstate(invalid="ignore"):
                    delta_ci[i - 1][j] = clamp_ci(d, percentile_ci(samples[i] - samples[i - 1]))
    return {"phases": phases, "capabilities": caps, "metrics": metrics,
            "checkpoints": {name: str(path) for name, path in plan["phases"]},
            "retention": retention, "retention_ci": retention_ci,
            "delta_rows": phases[1:], "delta": delta, "delta_ci": delta_ci,
            "definition": "delta[i][c] = retention of phase i+1's checkpoint - retention of phase i's, on capability "
                          "c, vs its best teacher (paired bootstrap over the same items)"}


def gate_result(options, requested, summary, retention):
    """The gate's verdict; ``failed`` lists every capability whose retention is below the threshold."""
    threshold = options.min_retention
    out = {"requested": requested, "threshold": threshold, "statistic": options.gate_statistic}
    if not requested:
        return {**out, "passed": None, "failed": [], "reason": "no gate requested"}
    undefined = sorted(c for c, e in retention.items() if e["value"] is None)
    if summary is None:
        return {**out, "passed": False, "failed": undefined, "reason": "no capability has a defined retention"}

    def figure_of(entry):
        return entry["value"] if options.gate_statistic == "value" else (entry["ci"] or [None])[0]

    failed = sorted(c for c, e in retention.items() if figure_of(e) is not None and figure_of(e) < threshold)
    figure, cap = figure_of(summary["min"]), summary["min"]["capability"]
    if figure is None:
        return {**out, "passed": False, "failed": failed or [cap], "figure": None, "capability": cap,
                "reason": f"the minimum's CI is undefined ({cap})"}
    passed = figure >= threshold
    what = "min retention" if options.gate_statistic == "value" else "min retention's CI low end"
    return {**out, "passed": bool(passed), "failed": failed, "figure": figure, "capability": cap,
            "reason": f"{what} {figure:.4f} ({cap}) {'>=' if passed else '<'} threshold {threshold}"}


def _provenance(recipe, plan):
    stages = [{"stage": s, "artefact": str(recipe.run_path / s)} for s in STAGE_FOLDERS
              if (recipe.run_path / s).is_dir()]
    try:
        source = json.loads((plan["student"] / "config.json").read_text()).get("nexus_source")
    except (OSError, ValueError):
        source = None
    return {"stages": stages, "student_source": source}


def competence_split(recipe, plan, scored, per_teacher, retention, samples, best, baselines, notes):
    """Take the capabilities no teacher is competent at out of ``retention`` / ``samples`` / ``per_teacher`` (in
    place); returns ``(no_competent_teacher, waived)``: {CAP: entry} (recipe order) and the capabilities kept
    anyway (``require_competent_teacher: false``; their entries say ``"competent": false``)."""
    teacher_summaries = {cap: {t: s[cap][0] for t, s in scored["teachers"].items() if cap in s}
                         for cap in plan["probes"]}
    flagged = no_competent_teacher(teacher_summaries, baselines)
    required = {c.name for c in recipe.capabilities if c.require_competent_teacher}
    dropped, waived = {}, []
    for cap in flagged:
        if cap not in required:
            waived.append(cap)
            notes.append(f"{cap}: no teacher is competent (none is clear of the trivial baseline); its retention is "
                         "kept because it sets require_competent_teacher: false, but it compares the student with "
                         "a teacher that has not learnt the task")
            continue
        retention.pop(cap, None)
        samples.pop(cap, None)
        per_teacher.pop(cap, None)
        teacher = best.get(cap)
        top = teacher_summaries[cap].get(teacher) or {}
        base = baselines[cap]
        student = scored["student"]["scores"][cap][0]
        dropped[cap] = {
            "teacher": teacher, "metric": top.get("metric"), "higher_is_better": top.get("higher_is_better"),
            "teacher_score": top.get("score"), "teacher_score_ci": top.get("ci"),
            "baseline": {k: base.get(k) for k in ("metric", "score", "ci", "kind")},
            "student_score": student.get("score"), "student_metric": student.get("metric"),
            "teachers": {t: {"score": r["score"], "ci": r["ci"], "competent": _is_competent(r, base)}
                         for t, r in teacher_summaries[cap].items()},
            "reason": "no teacher's score is clear of the trivial baseline (or exact match is 0): retention of it "
                      "would mean nothing; left out of the minimum, the means and the gate",
        }
    return dropped, waived


def build_report(recipe, plan, scored, seconds=None) -> dict:
    options = plan["options"]
    per_teacher, retention, samples, best, baselines, notes = retention_tables(recipe, plan, scored)
    dropped, waived = competence_split(recipe, plan, scored, per_teacher, retention, samples, best, baselines, notes)
    undefined = {c: e["undefined"] for c, e in retention.items() if e["value"] is None}
    weights = {c.name: c.weight for c in recipe.capabilities}
    summary = aggregate(samples, {c: e["value"] for c, e in retention.items()}, weights)
    gate = gate_result(options, plan["gate"], summary, retention)
    teacher_params = {t: i["params"] for t, i in scored["teacher_info"].items()}
    total_teachers = sum(p for p in teacher_params.values() if p)
    student = scored["student"]
    report = {
        "recipe": recipe.name,
        "definition": DEFINITION,
        "ci_level": CI_LEVEL,
        "ci_percent": round(100 * CI_LEVEL),
        "no_competent_teacher": dropped,
        "competence_waived": waived,
        "retention": retention,
        "min": summary["min"] if summary else None,
        "mean": summary["mean"] if summary else None,
        "weighted_mean": summary["weighted_mean"] if summary else None,
        "undefined": undefined,
        "per_teacher": per_teacher,
        "best": best,
        "baselines": baselines,
        "student_params": student["params"],
        "teacher_params": teacher_params,
        "n_teachers": len(teacher_params),
        "teacher_params_total": total_teachers,
        "params_ratio": student["params"] / total_teachers if total_teachers else None,
        "student": {"path": str(plan["student"]), "model_type": student["model_type"], "dtype": student["dtype"],
                    "towers": student["towers"], "n_towers": len(student["towers"] or [None]),
                    "capability_to_tower": student["capability_to_tower"], "routing": options.routing,
                    "scores": {c: s for c, (s, _) in student["scores"].items()}},
        "teachers": {t: {"source": i["source"], "params": i["params"], "reused_profile_items": scored["reused"][t]}
                     for t, i in scored["teacher_info"].items()},
        "skipped": plan["skipped"],
        "cka": cka_tables(plan, scored),
        "interference": interference_matrix(plan, scored, best, [c for c in plan["probes"] if c not in dropped]),
        "gate": gate,
        "settings": {**options.model_dump(mode="json"), "n_bootstrap": plan["settings"].n_bootstrap,
                     "max_items": plan["settings"].max_items, "seed": plan["settings"].seed},
        "provenance": _provenance(recipe, plan),
        "notes": notes,
    }
    if plan.get("lm_eval"):
        from .probes.lm_eval_task import lm_eval_table

        report["lm_eval"] = lm_eval_table(plan["lm_eval"], scored.get("lm_eval", {}))
    if plan["lmc"] is not None:
        report["lmc"] = plan["lmc"]
    if seconds is not None:
        report["seconds"] = round(seconds, 1)
    return report


# ---------------------------------------------------------------- the stage


def _write_json(path, obj):
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(json_finite(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _write_into(folder, recipe, report, plan, inputs, student_items=None):
    from .report_render import render_model_card, render_report

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "report.json", report)
    if student_items is not None:
        _write_json(folder / "items.json", {"student": student_items})
    render_report(report, folder, feature_map=plan["feature_map"])
    with atomic_file(folder / "model_card.md") as tmp:
        tmp.write_text(render_model_card(report), encoding="utf-8")
    write_resolved_recipe(recipe, folder)
    _write_json(folder / "manifest.json", {"stage": STAGE, "inputs_digest": _digest(inputs), "inputs": inputs})


def run_validate(recipe: Recipe, student_path, checkpoints=(), feature_map=None, lmc=None, out=None, gate=None,
                 console=None, show_progress=True, force=False, on_model_loaded=None) -> dict:
    """Validate the student at ``student_path`` against the recipe's teachers; returns the report (also written).

    ``checkpoints``: one checkpoint folder per training phase, in order (``NAME=PATH`` names a phase) for the
    interference matrix; ``feature_map``: a localise ``feature_map.json`` to draw; ``lmc``: an LMC path JSON to
    draw; ``out``: the output folder (default ``runs/<name>/validate``); ``gate``: None = gate iff the recipe sets
    ``stages.validate.min_retention``, True = require it (an error when unset), False = no gate. Bad input raises
    before anything is written. The returned dict has ``"path"`` and ``"reused"`` besides the report.
    """
    start = time.perf_counter()
    plan = plan_validate(recipe, student_path, checkpoints, feature_map, lmc, gate)
    target = Path(out) if out is not None else recipe.run_path / STAGE
    inputs = validate_inputs(recipe, plan, feature_map, lmc)
    if not force and (target / "report.json").is_file():
        try:
            previous = json.loads((target / "manifest.json").read_text()).get("inputs_digest")
        except (OSError, ValueError):
            previous = None
        if previous == _digest(inputs):
            return {**json.loads((target / "report.json").read_text()), "path": str(target), "reused": True}
    with _sigterm_raises():
        scored = score_all(recipe, plan, console, show_progress, on_model_loaded)
        report = json_finite(build_report(recipe, plan, scored, time.perf_counter() - start))
        created = [p for p in [target, *target.parents] if not p.exists()]
        try:
            with atomic_dir(target, overwrite=True,
                            sources={**recipe_sources(recipe), "student": student_path}) as tmp:
                _write_into(tmp, recipe, report, plan, inputs,
                            {cap: items for cap, (_, items) in scored["student"]["scores"].items()})
        except BaseException:
            for folder in created[1:]:  # parents this call created and left empty
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise
    return {**report, "path": str(target), "reused": False}


__all__ = ["ValidateError", "ValidateOptions", "build_report", "check_model_folder", "load_lmc",
           "plan_validate", "run_validate", "score_all"]

"""The profile stage: which teacher is best at which capability, with bootstrap 95% CIs.

For each teacher in turn (ONE resident at a time: load in bf16, score every capability it is eligible for, free it
before the next loads), run each capability's probe. Before any teacher loads, every capability's data is read and
checked and every teacher's tokenizer is asked whether it can be scored at all (e.g. a character tokenizer that maps
prose to ``<unk>`` cannot) and, where it can, whether it decodes a sample of the text back unchanged
(`tokenizer_roundtrip`), so bad input fails in seconds and leaves nothing behind.

Writes ``runs/<name>/profile/``:

- ``profile.json``: ``{"capabilities": {CAP: {TEACHER: {"metric", "score", "ci": [lo, hi], "n", ...}}},
  "best": {CAP: TEACHER}, "baselines": {CAP: {...}}, "competent": {CAP: {TEACHER: bool}}, "no_competent_teacher":
  [CAP, ...], "skipped", "memory", ...}``. A capability in ``no_competent_teacher`` (no teacher's CI clear of its
  trivial baseline, or exact match 0) is shown in red by the profile table; the student build gives it no tower;
- ``items.json``: per-item scores (CAP -> TEACHER -> list), for paired retention intervals later;
- ``heatmap.png``: teacher x capability, each cell annotated with its score and CI;
- ``manifest.json``: fingerprints of the inputs; a rerun with the same inputs is skipped.

Sample recipe section::

    stages:
      profile: {n_bootstrap: 1000, max_items: 200, window_tokens: 256, seed: 0, batch_size: 8}

Everything is written under a temporary name and renamed into place; when the run folder did not exist before, a
failure removes it entirely. The bootstrap follows Efron & Tibshirani (1993); bits per byte follows the Pile /
"Language Models are Few-Shot Learners" convention (NLL over the UTF-8 bytes of the text).
"""

import contextlib
import gc
import hashlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .atomic_output import atomic_dir, atomic_file
from .peak_rss import current_rss, peak_rss, release_freed_memory, reset_peak_rss
from .probes import ProbeDataError, ProbeSettings, probe_class
from .probes.data_source import ARITHMETIC_HELDOUT_SEED, ARITHMETIC_ITEMS, BUNDLED_KINDS, is_bundled, parse_bundled
from .progress_bar import stage_progress
from .recipe import Recipe, register_stage_options, write_resolved_recipe
from .run_paths import recipe_sources
from .teacher_source import TeacherSourceError, load_teacher, load_tokenizer, resolve_teacher_folder
from .tokenizer_roundtrip import check_roundtrip

STAGE = "profile"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MEMORY_HEADROOM = 1.2  # the process may hold the largest teacher (bf16) + 20%


class ProfileOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_bootstrap: int = Field(1000, ge=1, le=100_000, description="bootstrap resamples for every 95% CI")
    max_items: int = Field(200, ge=1, description="at most this many items per capability (a seeded subset)")
    window_tokens: int = Field(256, ge=2, description="longest token window an lm probe feeds the model at once")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed for the item subset and the bootstrap")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    compute: Literal["auto", "bf16", "fp32", "native"] = Field(
        "auto", description="bf16: bf16 autocast; fp32: fp32 matmuls over the bf16-resident weights; native: the "
                            "weights' dtype; auto: bf16 where the CPU has native bf16 matmuls, else fp32")

    def probe_settings(self) -> ProbeSettings:
        return ProbeSettings(max_items=self.max_items, n_bootstrap=self.n_bootstrap, seed=self.seed,
                             batch_size=self.batch_size, window_tokens=self.window_tokens, compute=self.compute)


register_stage_options(STAGE, ProfileOptions)


class ProfileError(ValueError):
    pass


# ---------------------------------------------------------------- planning (no model loaded)


def load_probes(recipe: Recipe, settings: ProbeSettings) -> dict:
    """Every capability's probe with its data read and checked; errors name the capability and the file/line."""
    probes = {}
    for i, cap in enumerate(recipe.capabilities):
        probe = probe_class(cap.probe)(cap.data, cap.options, settings)
        try:
            probes[cap.name] = probe.load()
        except ProbeDataError as exc:
            raise ProbeDataError(f"capability {cap.name!r} (capabilities[{i}].data): {exc}") from None
    return probes


def plan_profile(recipe: Recipe, probes: dict) -> tuple[dict, dict]:
    """(teacher -> capabilities to score, capability -> {teacher: why it cannot be scored}).

    Loads only tokenizers and configs. A capability no teacher can be scored on is an error listing each reason.
    """
    from .checkpoint_config import read_hf_config

    plan = {t.name: [] for t in recipe.teachers}
    skipped = {c.name: {} for c in recipe.capabilities}
    for i, teacher in enumerate(recipe.teachers):
        caps = [c for c in recipe.capabilities if teacher in recipe.eligible_teachers(c)]
        if not caps:
            continue
        folder = resolve_teacher_folder(teacher.source, teacher.allow_pickle, recipe.cache_dir)
        try:
            config = read_hf_config(folder, trust_remote_code=teacher.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise TeacherSourceError(f"teacher {teacher.name!r} (teachers[{i}].source): cannot read its config: "
                                     f"{exc}") from None
        if getattr(config, "auto_map", None) and not teacher.trust_remote_code:
            raise TeacherSourceError(f"teacher {teacher.name!r} (teachers[{i}].source) needs remote code (auto_map "
                                     "in config.json); refusing it unless trust_remote_code is set")
        tokenizer = load_tokenizer(folder, trust_remote_code=teacher.trust_remote_code)
        for cap in caps:
            probe = probes[cap.name]
            reason = probe.cannot_score(tokenizer, config)
            if reason:
                skipped[cap.name][teacher.name] = reason
            else:  # a tokenizer that loses characters of the text would be scored on text it never saw
                check_roundtrip(tokenizer, probe.roundtrip_texts(), teacher.name, cap.name, probe.unk_tolerance())
                plan[teacher.name].append(cap.name)
        del tokenizer
        release_freed_memory()
    for i, cap in enumerate(recipe.capabilities):
        if not any(cap.name in caps for caps in plan.values()):
            why = "; ".join(f"{t}: {r}" for t, r in skipped[cap.name].items()) or "no eligible teacher"
            raise ProfileError(f"no teacher can be scored on capability {cap.name!r} (capabilities[{i}]): {why}")
    return plan, {c: s for c, s in skipped.items() if s}


# ---------------------------------------------------------------- fingerprints (rerun skipping)


def _file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_fingerprint(path):
    """Names, sizes and mtimes of a teacher's files (hashing gigabytes of weights would cost minutes)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path.parent if path.is_file() else path)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def _data_fingerprint(data):
    if is_bundled(data):
        name, split = parse_bundled(data)
        if BUNDLED_KINDS[name] == "jsonl":  # generated items
            return f"{data}:seed={ARITHMETIC_HELDOUT_SEED}:n={ARITHMETIC_ITEMS}"
        from .corpora import corpus_path
        return _file_digest(corpus_path(name, split))
    path = Path(data)
    if path.suffix in (".yaml", ".yml"):  # an lm-eval task: its YAML plus the files beside it
        return {p.name: _file_digest(p) for p in sorted(path.parent.iterdir()) if p.is_file()}
    return _file_digest(path)


def profile_inputs(recipe: Recipe) -> dict:
    """Everything the profile depends on; a rerun with equal inputs reuses the previous profile."""
    return {
        "teachers": [{**t.model_dump(mode="json"), "files": _source_fingerprint(t.source)} for t in recipe.teachers],
        # require_competent_teacher decides what later stages do with the scores, not the scores: left out, so
        # switching it reuses the profile (the build and validate key on it themselves)
        "capabilities": [{**c.model_dump(mode="json", exclude={"require_competent_teacher"}),
                          "data_digest": _data_fingerprint(c.data)} for c in recipe.capabilities],
        "options": recipe.stage(STAGE).model_dump(mode="json"),
    }


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- scoring


def _comparable(result, baseline):
    """(score, ci) of ``result`` in the baseline's metric, or None when it has no such figure."""
    metric = baseline["metric"]
    if result["metric"] == metric:
        return result["score"], result["ci"]
    if metric in result and f"{metric}_ci" in result:
        return result[metric], result[f"{metric}_ci"]
    return None


def _is_competent(result, baseline):
    """True when the teacher's whole CI is better than the trivial baseline's score."""
    figure = _comparable(result, baseline)
    if figure is None:
        return None
    _, (lo, hi) = figure
    return bool(lo > baseline["score"]) if baseline["higher_is_better"] else bool(hi < baseline["score"])


def _scores_zero(result):
    """A higher-is-better task score of exactly 0 (exact match 0: the teacher never solves an item)."""
    return bool(result.get("higher_is_better")) and result.get("score") == 0


def no_competent_teacher(capabilities: dict, baselines: dict) -> list:
    """The capabilities (in order) no teacher is competent at: every scored teacher's CI is not clear of the
    trivial baseline (`_is_competent` False) or its higher-is-better score is 0 (exact match 0). A teacher whose
    competence cannot be judged (no figure in the baseline's metric) counts as possibly competent."""
    out = []
    for cap, by_teacher in capabilities.items():
        if by_teacher and cap in baselines and all(
                _scores_zero(r) or _is_competent(r, baselines[cap]) is False for r in by_teacher.values()):
            out.append(cap)
    return out


def profile_no_competent_teacher(profile: dict) -> list:
    """``profile["no_competent_teacher"]``, or (a profile written before it was recorded) computed from its scores
    and baselines; a profile without baselines (written by hand) has none."""
    if "no_competent_teacher" in profile:
        return list(profile["no_competent_teacher"] or [])
    if profile.get("baselines") and profile.get("capabilities"):
        return no_competent_teacher(profile["capabilities"], profile["baselines"])
    return []


def dropped_capabilities(recipe: Recipe, profile: dict) -> list:
    """The recipe's capabilities (recipe order) that get no tower, no budget and no retention number: no teacher is
    competent at them and they keep ``require_competent_teacher`` (the default)."""
    flagged = set(profile_no_competent_teacher(profile))
    return [c.name for c in recipe.capabilities if c.name in flagged and c.require_competent_teacher]


def best_teachers(capabilities: dict) -> tuple[dict, dict]:
    """(CAP -> best teacher, CAP -> whether its CI is clear of the runner-up's)."""
    best, separated = {}, {}
    for cap, by_teacher in capabilities.items():
        if not by_teacher:
            continue
        higher = next(iter(by_teacher.values()))["higher_is_better"]
        ranked = sorted(by_teacher.items(), key=lambda kv: kv[1]["score"], reverse=higher)
        best[cap] = ranked[0][0]
        if len(ranked) > 1:
            (_, first), (_, second) = ranked[0], ranked[1]
            separated[cap] = bool(first["ci"][0] > second["ci"][1]) if higher else bool(first["ci"][1] < second["ci"][0])
        else:
            separated[cap] = None
    return best, separated


def _param_count(model):
    return sum(p.numel() for p in model.parameters())


def _score_one(teacher, caps, recipe, probes, progress, on_teacher_loaded):
    """Load one teacher, score its capabilities, free it; returns (results, items, info, memory)."""
    gc.collect()
    reset_peak_rss()
    loading = progress.add_task(f"[cyan]{teacher.name}[/]: loading", total=1)
    start = time.perf_counter()
    model, tokenizer = load_teacher(teacher.source, DTYPES[teacher.dtype], teacher.allow_pickle,
                                    teacher.trust_remote_code, recipe.cache_dir)
    load_seconds = time.perf_counter() - start
    progress.update(loading, completed=1, description=f"[cyan]{teacher.name}[/]: loaded")
    params = _param_count(model)
    if on_teacher_loaded:
        on_teacher_loaded(teacher.name, model)
    results, items = {}, {}
    for cap in caps:
        probe = probes[cap]
        task = progress.add_task(f"[cyan]{teacher.name}[/] x {cap}", total=len(probe))
        start = time.perf_counter()
        result = probe.score(model, tokenizer, advance=lambda k, t=task: progress.advance(t, k))
        result.summary["seconds"] = round(time.perf_counter() - start, 2)
        progress.update(task, completed=len(probe))
        results[cap], items[cap] = result.summary, result.items
    info = {"source": str(teacher.source), "dtype": teacher.dtype, "params": params,
            "model_type": getattr(model.config, "model_type", None), "vocab_size": len(tokenizer),
            "load_seconds": round(load_seconds, 2)}
    del model, tokenizer, result
    release_freed_memory()  # the teacher is gone (and its pages returned) before the next one loads
    memory = {"peak_rss_bytes": peak_rss(), "params": params, "bf16_bytes": 2 * params}
    return results, items, info, memory


def score_teachers(recipe: Recipe, probes: dict, plan: dict, console=None, show_progress=True,
                   on_teacher_loaded=None, rss_start=None, planning_peak=None) -> tuple[dict, dict, dict, dict]:
    """Load each planned teacher once, score its capabilities, free it. Returns (results, items, teachers, memory).

    ``on_teacher_loaded(name, model)`` is called while the teacher is resident (tests use it to check that the
    previous teacher is gone). ``rss_start`` / ``planning_peak``: the RSS before anything of a teacher was read and
    the peak while planning (tokenizers only), so the reported peak covers the whole stage.
    """
    from transformers.utils import logging as hf_logging

    results = {c.name: {} for c in recipe.capabilities}
    items = {c.name: {} for c in recipe.capabilities}
    info, per_teacher = {}, {}
    gc.collect()
    rss_start = rss_start if rss_start is not None else current_rss()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # rich draws the progress; transformers' own bars would interleave
    try:
        with stage_progress(console, show_progress) as progress:
            for teacher in recipe.teachers:
                caps = plan.get(teacher.name) or []
                if not caps:
                    continue
                res, its, info[teacher.name], per_teacher[teacher.name] = _score_one(
                    teacher, caps, recipe, probes, progress, on_teacher_loaded)
                for cap in caps:
                    results[cap][teacher.name], items[cap][teacher.name] = res[cap], its[cap]
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    peak = max([planning_peak or 0] + [t["peak_rss_bytes"] or 0 for t in per_teacher.values()]) or None
    largest = max(t["bf16_bytes"] for t in per_teacher.values())
    budget = int(MEMORY_HEADROOM * largest)
    memory = {
        "rss_before_teachers_bytes": rss_start,
        "planning_peak_rss_bytes": planning_peak,
        "peak_rss_bytes": peak,
        "peak_over_start_bytes": (peak - rss_start) if peak and rss_start else None,
        "largest_teacher_bf16_bytes": largest,
        "budget_bytes": budget,
        "within_budget": bool(peak and peak <= budget),
        "within_budget_over_start": bool(peak and rss_start and peak - rss_start <= budget),
        "per_teacher": per_teacher,
    }
    return results, items, info, memory


def _write_json(path, obj):
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _profile_into(folder, recipe, probes, plan, skipped, inputs, console, show_progress, on_teacher_loaded,
                  rss):
    from .profile_report import write_profile_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, items, teachers, memory = score_teachers(recipe, probes, plan, console, show_progress,
                                                      on_teacher_loaded, *rss)
    baselines = {name: probe.baseline() for name, probe in probes.items()}
    best, separated = best_teachers(results)
    profile = {
        "recipe": recipe.name,
        "capabilities": results,
        "best": best,
        "best_separated": separated,
        "baselines": baselines,
        "competent": {cap: {t: _is_competent(r, baselines[cap]) for t, r in by_t.items()}
                      for cap, by_t in results.items()},
        # no teacher is competent: a loud warning here; the build gives them no tower (unless the capability sets
        # require_competent_teacher: false) and validate lists them instead of a retention number
        "no_competent_teacher": no_competent_teacher(results, baselines),
        "skipped": skipped,
        "weights": {c.name: c.weight for c in recipe.capabilities},
        "teachers": teachers,
        "memory": memory,
        "settings": recipe.stage(STAGE).model_dump(mode="json"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    _write_json(folder / "profile.json", profile)
    _write_json(folder / "items.json", items)
    write_profile_heatmap(profile, folder / "heatmap.png")
    _write_json(folder / "manifest.json", {"stage": STAGE, "inputs_digest": _digest(inputs), "inputs": inputs})
    return profile


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM (``kill``, a timeout) into SystemExit while the stage runs, so its temporary folders are
    removed instead of left behind. Only when SIGTERM has its default action and we are on the main thread."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_profile(recipe: Recipe, console=None, show_progress=True, force=False, on_teacher_loaded=None) -> dict:
    """Profile every teacher on every capability; returns the profile dict (also written to the run folder).

    A previous profile with the same inputs is reused unless ``force``. The returned dict has ``"path"`` (the
    profile folder) and ``"reused"``.
    """
    options = recipe.stage(STAGE)
    gc.collect()
    reset_peak_rss()
    rss_start = current_rss()  # before any teacher file (tokenizer, config, weights) is read
    probes = load_probes(recipe, options.probe_settings())
    plan, skipped = plan_profile(recipe, probes)
    rss = (rss_start, peak_rss())
    inputs = profile_inputs(recipe)
    run = recipe.run_path
    out = run / STAGE
    manifest = out / "manifest.json"
    if not force and manifest.is_file() and (out / "profile.json").is_file():
        try:
            previous = json.loads(manifest.read_text()).get("inputs_digest")
        except (OSError, ValueError):
            previous = None
        if previous == _digest(inputs):
            write_resolved_recipe(recipe, run)
            profile = json.loads((out / "profile.json").read_text())
            return {**profile, "path": str(out), "reused": True}
    args = (recipe, probes, plan, skipped, inputs, console, show_progress, on_teacher_loaded, rss)
    with _sigterm_raises():
        return _write_run(run, out, recipe, args)


def _write_run(run, out, recipe, args):
    if not run.exists():
        parent_existed = run.parent.exists()
        try:
            with atomic_dir(run, sources=recipe_sources(recipe)) as tmp:  # a failure removes the new run folder
                write_resolved_recipe(recipe, tmp)
                profile = _profile_into(tmp / STAGE, *args)
        except BaseException:
            if not parent_existed and run.parent.is_dir() and not any(run.parent.iterdir()):
                run.parent.rmdir()
            raise
    else:
        with atomic_dir(out, overwrite=True, sources=recipe_sources(recipe)) as tmp:
            profile = _profile_into(tmp, *args)
        write_resolved_recipe(recipe, run)
    return {**profile, "path": str(out), "reused": False}


def load_profile(run_path) -> dict:
    """The profile written by a previous run (``runs/<name>``)."""
    path = Path(run_path) / STAGE / "profile.json"
    if not path.is_file():
        raise FileNotFoundError(f"no profile at {path}; run `nexus profile RECIPE` first")
    return json.loads(path.read_text())

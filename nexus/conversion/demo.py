"""`nexus demo`: the embedded default, on bundled data only (no downloads, no GPU). Every stage, end to end:

1. **specialists**: three tiny teachers with different architectures and tokenizers (Llama + characters for
   arithmetic, Gemma-3 + BPE for Python code, Qwen-3 + BPE for English prose), cached after the first run; each
   one's competence is printed against its trivial baseline (arithmetic exact match >= 0.9; code/prose bits per
   byte below a unigram model's);
2. **profile**: every teacher on every capability (scores with bootstrap 95% CIs, heatmap) -> the best teacher of
   each capability;
3. **student build** (`student_build`): a shared byte-level BPE-1024 trained on the three capabilities' text
   (``tokenizer: train_bpe``; measured on these specialists, ``tokenizer: base`` kept prose 0.836,
   code 0.978, arithmetic 0.000, because the arithmetic tower reads the code specialist's embedding); one tower per best teacher
   (three distinct specialists: one per capability), initialised from it (imported, compressed with the capability
   scorer), the whole student <= 1/3 of the specialists' summed parameters; a capability no teacher is competent at
   gets no tower and is reported as such (at ``scale="test"``, whose 3-step specialists are not meant to be
   competent, every capability is kept with ``require_competent_teacher: false``: flagged, not dropped);
4. **distill** (`distill`): teacher caches (one teacher at a time), token-aligned KD into the student vocabulary,
   router trained on capability labels, checkpoints, LMC init -> distilled;
5. **validate**: retention per capability against the best teacher (bits per byte for code/prose, exact match for
   arithmetic) with paired bootstrap 95% CIs, the minimum and the mean, printed as a table; the gate at 0.95;
6. **export**: a self-contained checkpoint folder with the model card rendered from ``report.json``.

Everything lands in ``<out>/demo/`` (the recipe is named ``demo``); ``demo.json`` sums it up. ``scale="test"`` runs
the same pipeline on tiny specialists and a few steps (for the test suite); the numbers it prints are measured like
the full ones, they are just not meaningful.
"""

import json
import time
from pathlib import Path

import torch
import yaml

from .atomic_output import atomic_file
from .corpora import corpus_text

SPECIALIST_CAPABILITY = {"arithmetic": "arithmetic", "code": "code", "prose": "prose"}
RETENTION_GOAL = 0.95

# Per scale: profile/validation items and bootstrap, student build, distillation. "full" is what `nexus demo` runs.
SCALES = {
    "full": {
        "profile": {"n_bootstrap": 1000, "max_items": 200, "seed": 0, "window_tokens": 128},
        "student_build": {"tokenizer": "train_bpe", "budget_fraction": 1 / 3, "allocation": "dynamic",
                          "calibration_tokens": 2048},
        "distill": {"steps": 500, "batch_size": 8, "lr": 2e-3, "checkpoint_every": 100, "lmc_points": 5,
                    "top_k": 32, "loss": {"kd": 1.0, "ce": 0.2, "router": 0.1}},
        "validate": {"min_retention": RETENTION_GOAL, "student_dtype": "fp32", "cka": False},
        "interference": True,
        "verify_export": True,
    },
    "test": {
        "profile": {"n_bootstrap": 50, "max_items": 6, "seed": 0, "window_tokens": 64},
        "student_build": {"tokenizer": "train_bpe", "budget_fraction": 1 / 3, "allocation": "dynamic",
                          "calibration_tokens": 64,
                          "window_tokens": 32, "arithmetic_items": 60, "chunk_chars": 120},
        "distill": {"steps": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 1, "lmc_points": 2, "top_k": 4,
                    "tokens": 600, "chunk_chars": 120, "arithmetic_items": 60, "seq_len": 48,
                    "loss": {"kd": 1.0, "ce": 0.2, "router": 0.1}},
        "validate": {"min_retention": RETENTION_GOAL, "student_dtype": "fp32", "cka": False},
        "interference": False,
        "verify_export": False,
    },
}


def tiny_specialist_recipes():
    """Tiny variants of the three registered specialists (same families and tokenizers), for ``scale="test"``."""
    from ..training.specialists import SPECIALISTS, SpecialistRecipe

    tiny = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                steps=3, warmup_steps=1, batch_size=4)
    out = {}
    for name in SPECIALIST_CAPABILITY:
        base = SPECIALISTS[name].model_dump()
        extra = {"seq_len": 64} if base["data"] != "arithmetic" else {
            "train_items": 200, "eval_items": 10, "stop_exact_match": None, "validation_items": 10}
        out[name] = SpecialistRecipe(**{**base, **tiny, **extra})
    return out


def demo_recipe(teachers: dict, run_dir: Path, max_items=200, scale="full") -> dict:
    preset = SCALES[scale]
    # the test scale's specialists train for 3 steps: keep every capability (flagged) so every stage runs on all three
    keep = {"require_competent_teacher": False} if scale == "test" else {}
    return {
        "name": "demo",
        "run_dir": str(run_dir),
        "teachers": [{"name": f"{name}-specialist", "source": str(path), "dtype": "fp32"}
                     for name, path in teachers.items()],
        "capabilities": [
            {"name": "prose", "probe": "lm", "data": "bundled:prose", "reference": True, **keep},
            {"name": "code", "probe": "lm", "data": "bundled:code", "reference": True, **keep},
            {"name": "arithmetic", "probe": "exact_match", "data": "bundled:arithmetic", **keep},
        ],
        "student": {"budget": {"memory_gb": 16}},
        "stages": {"profile": {**preset["profile"], "max_items": max_items},
                   "student_build": dict(preset["student_build"]),
                   "distill": dict(preset["distill"]),
                   "validate": dict(preset["validate"])},
    }


def import_is_lossless(folder, n_tokens=256):
    """Max |logit difference| between a teacher and its Nexus import on held-out prose, in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .load_check import checked_from_pretrained
    from .teacher_import import nexus_from_teacher

    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = checked_from_pretrained(AutoModelForCausalLM, folder, what="teacher", dtype=torch.float32).eval()
    student = nexus_from_teacher(teacher)
    n_tokens = min(n_tokens, teacher.config.max_position_embeddings)
    ids = tokenizer(corpus_text("prose", "heldout")[:4 * n_tokens], return_tensors="pt").input_ids[:, :n_tokens]
    with torch.no_grad():
        diff = (teacher(ids).logits - student(ids).logits).abs().max().item()
    return {"max_abs_logit_diff": diff, "tokens": int(ids.shape[1]), "architecture": teacher.config.model_type}


def competence_table(competence):
    from rich.table import Table

    table = Table("specialist", "metric", "score [95% CI]", "trivial baseline", "goal", "competent",
                  title="specialist competence (held-out)")
    for name, c in competence.items():
        b = c["baseline"]
        goal = f">= {c['target']}" if c["metric"] == "exact_match" else "below the unigram bpb"
        table.add_row(name, c["metric"], f"{c['score']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]",
                      f"{b['score']:.3f} ({b.get('kind', b['metric'])})", goal,
                      "[green]yes[/]" if c["competent"] else "[red]NO[/]")
    return table


def _stage(console, n, title):
    console.rule(f"[bold]{n}. {title}")
    return time.perf_counter()


def run_demo(out_dir="runs", teachers_dir=None, steps=None, max_items=None, console=None, show_progress=True,
             scale="full"):
    """Run the demo; returns a summary dict (also written to ``<out_dir>/demo/demo.json``).

    ``steps`` overrides the specialists' training steps (part of their cache key); ``max_items`` the items per
    capability in profile and validation; ``scale``: ``"full"`` or ``"test"`` (tiny specialists, a few steps).
    """
    from rich.console import Console

    from ..training.specialists import load_competence, train_specialist
    from ..stages.pipeline import run_consolidate
    from .recipe import validate_recipe

    if scale not in SCALES:
        raise ValueError(f"scale: {scale!r} is not one of {sorted(SCALES)}")
    preset = SCALES[scale]
    console = console or Console()
    started = time.perf_counter()
    seconds = {}
    out_dir = Path(out_dir).resolve()
    teachers_dir = Path(teachers_dir) if teachers_dir else out_dir / "demo-teachers"
    run = out_dir / "demo"

    t = _stage(console, 1, "specialist teachers (cached after the first run)")
    recipes = tiny_specialist_recipes() if scale == "test" else {n: n for n in SPECIALIST_CAPABILITY}
    teachers = {name: train_specialist(recipes[name], teachers_dir / name, steps=steps, progress=show_progress)
                for name in SPECIALIST_CAPABILITY}
    competence = {name: load_competence(path) for name, path in teachers.items()}
    console.print(competence_table(competence))
    imports = {name: import_is_lossless(path) for name, path in teachers.items()}
    console.print("lossless import into Nexus (max |logit diff|, fp32): "
                  + ", ".join(f"{n} ({r['architecture']}) {r['max_abs_logit_diff']:.1e}" for n, r in imports.items()))
    seconds["specialists"] = time.perf_counter() - t

    raw = demo_recipe(teachers, out_dir, max_items=max_items or preset["profile"]["max_items"], scale=scale)
    recipe = validate_recipe(raw, base_dir=out_dir)
    done = run_consolidate(recipe, console=console, show_progress=show_progress, first_stage_number=2,
                           force_distill=scale == "test", interference=preset["interference"],
                           verify_export=preset["verify_export"], force_validate=True)
    profile, build, distill, report, exported = (done[k] for k in ("profile", "build", "distill", "report", "export"))
    init_path = Path(build["init_path"])
    seconds.update(done["seconds"])
    seconds["total"] = time.perf_counter() - started

    retention = {cap: {k: e.get(k) for k in ("value", "ci", "teacher", "metric", "student_score", "teacher_score")}
                 for cap, e in report["retention"].items()}
    below = [cap for cap, e in report["retention"].items() if e["value"] is None or e["value"] < RETENTION_GOAL]
    no_competent = list(report.get("no_competent_teacher") or {})
    summary = {
        "scale": scale,
        "competence": competence, "imports": imports, "profile_path": profile["path"], "best": profile.get("best"),
        "student_build": {k: build[k] for k in ("params", "params_ratio", "teacher_params_total", "budget",
                                                "embedding_rows", "hidden_size")} | {"path": str(init_path)},
        "distill": {k: distill.get(k) for k in ("student", "bytes_per_token", "router_accuracy", "heldout_ce", "train",
                                                "alignment", "lmc")},
        "report_path": str(Path(report["path"]) / "report.json"),
        "retention": retention, "min": report["min"], "mean": report["mean"], "gate": report["gate"],
        "below_goal": below, "no_competent_teacher": no_competent, "student_params": report["student_params"], "params_ratio": report["params_ratio"],
        "export": exported, "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    with atomic_file(run / "demo.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    with atomic_file(run / "recipe.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(raw, sort_keys=False))

    console.rule("[bold]result")
    router = distill["router_accuracy"]
    console.print(f"student {report['student_params']:,} params ({report['params_ratio']:.3f} of the teachers' sum); "
                  f"router accuracy on held-out rows {router['overall']:.3f}; cache bytes/token "
                  + ", ".join(f"{k.split('--')[-1]} {v:.0f}" for k, v in distill["bytes_per_token"].items()))
    m = report["min"]
    if m is not None:
        console.print(f"minimum retention {m['value']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}] ({m['capability']}); "
                      f"mean {report['mean']['value']:.3f} [{report['mean']['ci'][0]:.3f}, "
                      f"{report['mean']['ci'][1]:.3f}]")
    if below:
        console.print(f"[yellow]below the {RETENTION_GOAL} retention goal: {', '.join(below)}[/] (measured, not "
                      "adjusted)")
    if no_competent:
        console.print(f"[bold red]no competent teacher for {', '.join(no_competent)}[/]: no tower, no retention "
                      "number (left out of the minimum and the mean)")
    not_competent = [n for n, c in competence.items() if not c["competent"]]
    if not_competent:
        console.print(f"[yellow]specialists not competent at their capability: {', '.join(not_competent)}[/] — their "
                      "retention compares the student with a teacher that has not learnt the task")
    console.print(f"wall time {seconds['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()
                                                                    if k != "total") + ")")
    console.print(f"wrote {run} (report {summary['report_path']}, export {run / 'export'})")
    return summary

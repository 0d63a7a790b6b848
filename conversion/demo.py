"""`nexus demo`: the embedded default, on bundled data only (no downloads, no GPU).

What it runs today (the NIWT stages that exist):
1. trains three tiny specialist teachers with different architectures and tokenizers (Llama + characters for
   arithmetic, Gemma-3 + BPE for Python code, Qwen-3 + BPE for English prose), cached after the first run, and
   prints each one's competence against its trivial baseline;
2. imports each into a one-tower Nexus checkpoint and measures the import is lossless (max |logit difference|);
3. profiles every teacher on every capability (teacher × capability scores with bootstrap 95% CIs, heatmap PNG).

Consolidation into one student (distillation, validation, retention table) comes with the distillation and
validation stages; the demo says so at its end rather than print a number it did not measure.
"""

import json
from pathlib import Path

import torch
import yaml

from .atomic_output import atomic_file
from .corpora import corpus_text

SPECIALIST_CAPABILITY = {"arithmetic": "arithmetic", "code": "code", "prose": "prose"}


def demo_recipe(teachers: dict, run_dir: Path, max_items=200) -> dict:
    return {
        "name": "demo",
        "run_dir": str(run_dir),
        "teachers": [{"name": f"{name}-specialist", "source": str(path), "dtype": "fp32"}
                     for name, path in teachers.items()],
        "capabilities": [
            {"name": "prose", "probe": "lm", "data": "bundled:prose", "reference": True},
            {"name": "code", "probe": "lm", "data": "bundled:code", "reference": True},
            {"name": "arithmetic", "probe": "exact_match", "data": "bundled:arithmetic"},
        ],
        "student": {"budget": {"memory_gb": 16}},
        "stages": {"profile": {"n_bootstrap": 1000, "max_items": max_items, "seed": 0}},
    }


def import_is_lossless(folder, n_tokens=256):
    """Max |logit difference| between a teacher and its Nexus import on held-out prose, in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .teacher_import import nexus_from_teacher

    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    student = nexus_from_teacher(teacher)
    n_tokens = min(n_tokens, teacher.config.max_position_embeddings)
    ids = tokenizer(corpus_text("prose", "heldout")[:4 * n_tokens], return_tensors="pt").input_ids[:, :n_tokens]
    with torch.no_grad():
        diff = (teacher(ids).logits - student(ids).logits).abs().max().item()
    return {"max_abs_logit_diff": diff, "tokens": int(ids.shape[1]), "architecture": teacher.config.model_type}


def run_demo(out_dir="runs", teachers_dir=None, steps=None, max_items=200, console=None, show_progress=True):
    """Run the demo; returns a summary dict (also written to ``<out_dir>/demo/demo.json``)."""
    from rich.console import Console
    from rich.table import Table

    from ..training.specialists import load_competence, train_specialist
    from .profile import run_profile
    from .profile_report import profile_table
    from .recipe import validate_recipe

    console = console or Console()
    out_dir = Path(out_dir).resolve()
    teachers_dir = Path(teachers_dir) if teachers_dir else out_dir / "demo-teachers"
    console.rule("[bold]1. specialist teachers")
    teachers = {}
    for name in SPECIALIST_CAPABILITY:
        teachers[name] = train_specialist(name, teachers_dir / name, steps=steps, progress=show_progress)
    competence = {name: load_competence(path) for name, path in teachers.items()}

    console.rule("[bold]2. lossless import into Nexus")
    imports = {name: import_is_lossless(path) for name, path in teachers.items()}
    table = Table("teacher", "architecture", "tokens", "max |logit diff| (fp32)")
    for name, row in imports.items():
        table.add_row(name, row["architecture"], str(row["tokens"]), f"{row['max_abs_logit_diff']:.2e}")
    console.print(table)

    console.rule("[bold]3. profile: teacher x capability (95% bootstrap CIs)")
    raw = demo_recipe(teachers, out_dir, max_items=max_items)
    recipe = validate_recipe(raw, base_dir=out_dir)
    profile = run_profile(recipe, console=console, show_progress=show_progress, force=steps is not None)
    console.print(profile_table(profile))
    summary = {"competence": competence, "imports": imports, "profile_path": profile["path"],
               "best": profile.get("best"), "not_built": ["distill", "validate", "export", "consolidate"]}
    with atomic_file(out_dir / "demo" / "demo.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    with atomic_file(out_dir / "demo" / "recipe.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    console.rule("[bold]next")
    console.print("Consolidating these teachers into one student (distill -> validate -> export) is not built yet; "
                  "no retention figure is printed because none was measured.")
    console.print(f"wrote {out_dir / 'demo'} and {profile['path']}")
    return summary

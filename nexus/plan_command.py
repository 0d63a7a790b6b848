"""`nexus plan RECIPE --gpu-gb 16`: the planned peak GPU memory of every stage and of the student's inference."""

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import clean_errors


def plan(
    recipe: str = typer.Argument(..., help="recipe YAML (teachers may be folders holding only config.json)"),
    gpu_gb: float = typer.Option(16.0, "--gpu-gb", help="memory of the one GPU to plan for, GiB"),
    context: int = typer.Option(4096, "--context", help="tokens of context for the inference plan"),
    json_out: str = typer.Option(None, "--json", help="also write the plans (every component, bytes) here"),
):
    """Per stage and for inference: the planned peak on one GPU of --gpu-gb GiB, its largest parts, whether it fits."""
    from .conversion.gpu_plan import plan_gpu
    from .conversion.recipe import load_recipe

    with clean_errors():
        if gpu_gb <= 0:
            raise ValueError(f"--gpu-gb must be positive, got {gpu_gb}")
        plans = plan_gpu(load_recipe(recipe, check_paths=False), gpu_gb, context)
    table = Table(title=f"{recipe}: planned peak GPU memory on one {gpu_gb:g} GiB GPU (context {context} for "
                        "inference)")
    for col in ("stage", "planned GiB", "largest parts (GiB)", "fits"):
        table.add_column(col, justify="left" if col in ("stage", "largest parts (GiB)") else "right")
    for name, p in plans.items():
        parts = sorted(p["components"].items(), key=lambda kv: -kv[1])[:3]
        peak = p["assumptions"].get("peak")
        text = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts) + (f"; peak: {peak}" if peak else "")
        text = text or p["assumptions"].get("note", "")
        fits = "yes" if p["fits"] else f"no (over by {-p['headroom_bytes'] / 2**30:.2f})"
        table.add_row(name, f"{p['total_bytes'] / 2**30:.2f}", text, fits)
    Console(width=160).print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(plans, indent=1, default=str) + "\n")
        typer.echo(f"wrote {json_out}")

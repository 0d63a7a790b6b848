"""The align stage on a real same-family pair (issue 17, item 3): Gemma-3-270M and its code fine-tune.

    python bench/train_gemma_specialist.py     # once: /work/cache/gemma-code
    python bench/align_real.py [--method ot linear ties]

Profiles the three teachers of ``bench/recipes/gemma_pair.yaml`` (Gemma, the fine-tune, the arithmetic specialist),
then runs the align stage once per merge method into ``bench/out/runs/gemma_pair/align-<method>/``. Written to
``bench/results/align_gemma_pair.json`` and printed: which tower teachers were grouped, how many FFN units and heads
OT moved, and each served capability's held-out next-token loss under its own teacher, the merge and the plain
average: what merging costs before any pruning or distillation. The student-level comparison at equal parameters is
``python bench/compare_methods.py --scale gemma-pair --only nexus --only align_ot --only align_linear --only align_ties``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

from nexus.conversion.align import run_align
from nexus.conversion.atomic_output import atomic_file
from nexus.conversion.profile import run_profile
from nexus.conversion.recipe import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import RESULTS  # noqa: E402

RECIPE = Path(__file__).resolve().parent / "recipes" / "gemma_pair.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", nargs="+", default=["ot", "linear", "ties"], choices=["ot", "linear", "ties"])
    parser.add_argument("--out", type=Path, default=RESULTS / "align_gemma_pair.json")
    args = parser.parse_args()
    console = Console(width=160)
    recipe = load_recipe(RECIPE)
    profile = run_profile(recipe, console=console, show_progress=False)
    console.print(f"best teachers: {profile['best']}")
    result = {"recipe": str(RECIPE.relative_to(RECIPE.parents[2])), "best": profile["best"], "methods": {}}
    for method in args.method:
        recipe.stages["align"] = type(recipe.stage("align")).model_validate(
            {**recipe.stage("align").model_dump(), "method": method})
        started = time.perf_counter()
        record = run_align(recipe, profile, out=recipe.run_path / f"align-{method}", console=console)
        result["methods"][method] = {"merged": [{k: v for k, v in m.items() if k != "folder"}
                                                for m in record["merged"]],
                                     "signatures": record["signatures"], "reused": record["reused"],
                                     "seconds": record.get("seconds"),
                                     "wall_seconds_this_run": round(time.perf_counter() - started, 1)}
        if not record["merged"]:
            console.print(f"{method}: nothing merged (tower teachers: {', '.join(record['signatures'])})")
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

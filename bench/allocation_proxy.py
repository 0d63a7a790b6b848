"""Which pruned candidate should the student build keep? Does the loss right after the cut, or after a short healing,
predict retention after distillation? (issue 16: the 0.25 point; issue 17: the stages earn their place.)

    python bench/allocation_proxy.py [--point 0.25] [--heal-steps 10]

For the Gemma-3-270M tower of the size sweep at ``--point`` (its layer budget and training text exactly as the
sweep's student build), prunes every candidate that ``allocation: auto`` compares -- the capability scorer's mixes
(Taylor + activation, activation, Taylor) x (uniform, dynamic within 0.1 / 0.25 / 1.0) -- and Minitron's activation
scorer x the same widths. For each it records the capability-weighted held-aside loss right after the cut and after
``--heal-steps`` steps of healing (`nexus/conversion/heal.py`), and, where the size sweep distilled that very
candidate, the minimum retention it reached (read from the sweep's JSON). Writes
``bench/results/allocation_proxy.json``; a table is printed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_methods  # noqa: E402
import size_sweep  # noqa: E402
from paths import RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402

OUT = RESULTS / "allocation_proxy.json"
TOWER = "gemma-3-270m"
# size-sweep runs that distilled one fixed candidate: (scorer, mix, allocation) -> the run's JSON name
DISTILLED = {("capability", "taylor+activation", "dynamic (max_deviation 1)"): "no_allocation_selection",
             ("capability", "taylor+activation", "uniform"): "no_dynamic_allocation",
             ("minitron", "", "uniform"): "minitron_kd"}


def tower_inputs(point):
    """(teacher folder, {cap: TrainingText}, {cap: weight}, tower layer budget, StudentBuildOptions) of the sweep's
    Gemma tower at ``point``, from the recipe and the sweep's NEXUS run at that point."""
    from nexus.conversion.recipe import validate_recipe
    from nexus.conversion.student_build import STAGE, student_training_texts

    record = json.loads((size_sweep.point_folder(point) / "nexus.json").read_text())
    build = json.loads((Path(record["paths"]["student_build"]) / "student_build.json").read_text())
    tower = next(t for t in build["towers"] if t["teacher"] == TOWER)
    raw = compare_methods.recipe_file_raw(size_sweep.RECIPE, size_sweep.RUNS / f"{point:g}")
    raw["stages"]["student_build"] = compare_methods.merge(raw["stages"]["student_build"],
                                                           size_sweep.POINTS[point]["student_build"])
    recipe = validate_recipe(raw, base_dir=size_sweep.RUNS)
    texts = student_training_texts(recipe)
    caps = tower["capabilities"]
    weights = {c.name: c.weight for c in recipe.capabilities if c.name in caps}
    folder = compare_methods.recipe_teacher_folders(recipe)[TOWER]
    return folder, {c: texts[c] for c in caps}, weights, tower["layer_budget"], recipe.stage(STAGE)


def distilled_min(point, name):
    path = size_sweep.point_folder(point) / f"{name}.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    return {"run": name, "min": r["min"], "allocation": r["student"].get("allocation")} if r.get("status") == "done" \
        else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", type=float, default=0.25, choices=sorted(size_sweep.POINTS))
    parser.add_argument("--heal-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    from nexus.conversion.student_build import _compress_tower

    console = Console(width=160)
    folder, texts, weights, budget, options = tower_inputs(args.point)
    rows = []
    for scorer in ("capability", "minitron"):
        opts = options.model_copy(update={"scorer": scorer, "allocation": "auto", "select_mix": True,
                                          "selection_heal_steps": args.heal_steps})
        t0 = time.time()
        info = _compress_tower(TOWER, TOWER, folder, torch.float32, texts, budget, opts, console, True,
                               weights=weights)
        report = info["record"]["allocation_candidates"]
        for c in report["candidates"]:
            key = (scorer, c.get("scores", ""), c["allocation"])
            rows.append({"scorer": scorer, "mix": key[1], "allocation": key[2],
                         "loss_after_cut": c.get("loss_before_heal", c["loss"]), "loss_after_heal": c["loss"],
                         "heal_losses": c.get("heal_losses"),
                         "distilled": distilled_min(args.point, DISTILLED[key]) if key in DISTILLED else None})
        console.print(f"{scorer}: {len(report['candidates'])} candidates in {time.time() - t0:.0f} s")
    for key in ("loss_after_cut", "loss_after_heal"):
        order = sorted(range(len(rows)), key=lambda i: rows[i][key])
        for rank, i in enumerate(order, 1):
            rows[i][f"rank_{key}"] = rank
    table = Table(title=f"Gemma tower at {args.point:g}: {budget:,} layer params; heal {args.heal_steps} steps")
    for col in ("scorer", "mix", "allocation", "loss after cut (rank)", "after heal (rank)", "distilled min"):
        table.add_column(col)
    for r in rows:
        d = r["distilled"]
        table.add_row(r["scorer"], r["mix"] or "–", r["allocation"],
                      f"{r['loss_after_cut']:.3f} ({r['rank_loss_after_cut']})",
                      f"{r['loss_after_heal']:.3f} ({r['rank_loss_after_heal']})",
                      f"{d['min']['value']:.3f} [{d['min']['ci'][0]:.3f}, {d['min']['ci'][1]:.3f}] ({d['run']})"
                      if d else "–")
    console.print(table)
    out = {"point": args.point, "tower": TOWER, "layer_budget": budget, "heal_steps": args.heal_steps,
           "heal_lr": options.selection_heal_lr,
           "selection_tokens": options.selection_tokens, "calibration_tokens": options.calibration_tokens,
           "threads": torch.get_num_threads(), "candidates": rows}
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(out, indent=1, allow_nan=False))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

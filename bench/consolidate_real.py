"""Issue 5's real two-teacher consolidation: Gemma-3-270M + the arithmetic specialist -> one Nexus student, with
in-process preservation off and on.

    python bench/consolidate_real.py [--recipe bench/recipes/consolidate_real.yaml] [--modes off lr_scale]
                                     [--steps N] [--out bench/results/consolidate_real.json]
                                     [--reports bench/out/consolidate_real]

For each preservation mode, in order, `run_consolidate` runs the recipe (profile -> student build -> distill ->
validate -> export) in the SAME run folder with only ``stages.distill.preservation.mode`` changed, so the second
mode reuses the profile and the student build (their input hashes did not change) and redoes distill and validate.
The student build is the "Gemma-pruned student": its prose and code towers are Gemma-3-270M compressed with the
capability scorer to the recipe's parameter budget; its arithmetic tower comes from the specialist.

Per mode it records, from the validation report: retention per capability vs the best teacher **before**
distillation (the student-build init) and **after** (the distilled student, after LMC), with paired bootstrap 95%
CIs, the minimum and the mean; the token budget (distill ``tokens`` per capability, steps x batch x seq_len); the
router accuracy, cache bytes per token, the stage timings and this process's peak RSS. Writes
``bench/results/consolidate_real.json`` (each mode's validation report folder is also copied under
``--reports``, default ``bench/out/consolidate_real/<mode>/``; the run folder is the recipe's, under bench/out/runs/)
and prints a table. Asserts nothing.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml
from nexus.conversion.atomic_output import atomic_file
from nexus.stages.pipeline import run_consolidate
from nexus.conversion.peak_rss import peak_rss
from nexus.conversion.recipe import validate_recipe
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import ARTEFACTS, RESULTS  # noqa: E402

HERE = Path(__file__).resolve().parent
MB = 2**20


def _fmt(value, ci):
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def summarise(result, mode, seconds):
    report, distill = result["report"], result["distill"]
    inter = report.get("interference") or {}
    caps = list(report["retention"])
    before = {}
    if inter.get("phases"):
        row = inter["phases"].index("init")
        for c, cap in enumerate(inter["capabilities"]):
            before[cap] = {"value": inter["retention"][row][c], "ci": inter["retention_ci"][row][c]}
    after = {cap: {"value": r["value"], "ci": r["ci"], "teacher": r["teacher"], "metric": r["metric"],
                   "student_score": r["student_score"], "teacher_score": r["teacher_score"]}
             for cap, r in report["retention"].items()}
    return {
        "mode": mode,
        "capabilities": caps,
        "before": before,
        "after": after,
        "min": report["min"], "mean": report["mean"],
        "student_params": report["student_params"], "teacher_params": report["teacher_params"],
        "params_ratio": report.get("params_ratio"),
        "distill": {k: distill.get(k) for k in ("steps", "tokens", "cache_bytes_per_token", "router", "lmc",
                                               "first_loss", "final_loss", "preservation", "reused")
                    if k in distill},
        "stage_seconds": result.get("seconds"),
        "wall_seconds": seconds,
        "peak_rss_mib": peak_rss() / MB,
        "report": report.get("path"),
    }


def table(rows):
    t = Table("preservation", "capability", "teacher", "before (init)", "after (distilled)",
              title="retention vs the best teacher, paired bootstrap 95% CIs")
    for row in rows:
        for cap in row["capabilities"]:
            b = row["before"].get(cap)
            a = row["after"][cap]
            t.add_row(row["mode"], cap, a["teacher"], _fmt(b["value"], b["ci"]) if b else "-",
                      _fmt(a["value"], a["ci"]))
        before = [row["before"][c]["value"] for c in row["capabilities"] if c in row["before"]]
        t.add_row(row["mode"], "[bold]min / mean", "",
                  f"{min(before):.3f} / {sum(before) / len(before):.3f}" if before else "-",
                  f"{_fmt(row['min']['value'], row['min']['ci'])} / {_fmt(row['mean']['value'], row['mean']['ci'])}")
    return t


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(HERE / "recipes" / "consolidate_real.yaml"))
    parser.add_argument("--modes", nargs="+", default=["off", "lr_scale"], choices=["off", "lr_scale", "anchor"])
    parser.add_argument("--steps", type=int, default=None, help="override stages.distill.steps")
    parser.add_argument("--out", default=str(RESULTS / "consolidate_real.json"), help="the result JSON")
    parser.add_argument("--reports", default=str(ARTEFACTS / "consolidate_real"),
                        help="each mode's validation report folder is copied to REPORTS/<mode>")
    args = parser.parse_args()
    console = Console()
    recipe_path = Path(args.recipe).resolve()
    raw = yaml.safe_load(recipe_path.read_text())
    if args.steps:
        raw["stages"]["distill"]["steps"] = args.steps
    rows = []
    for mode in args.modes:
        raw["stages"]["distill"].setdefault("preservation", {})["mode"] = mode
        recipe = validate_recipe(raw, base_dir=recipe_path.parent)
        console.rule(f"[bold]preservation: {mode}")
        t = time.perf_counter()
        result = run_consolidate(recipe, console=console)
        row = summarise(result, mode, time.perf_counter() - t)
        keep = Path(args.reports) / mode
        if keep.exists():
            shutil.rmtree(keep)
        shutil.copytree(Path(result["report"]["path"]), keep)
        rows.append(row)
    out = {"recipe": str(recipe_path), "modes": rows,
           "token_budget": {k: raw["stages"]["distill"].get(k) for k in ("tokens", "steps", "batch_size", "seq_len")}}
    with atomic_file(Path(args.out)) as tmp:
        Path(tmp).write_text(json.dumps(out, indent=1, default=str))
    console.print(table(rows))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The memory planner against measured peak RSS, per stage and per run, from what the comparison runs recorded.

    python bench/memory_plan_stages.py [--compare-dir bench/results/compare-gemma] [--compare-dir bench/results/compare]
                                       [--fresh distill validate]

`compare_methods.py` plans each stage of each variant just before it runs (`stage_ram_guard.guard_stage_ram`: the
same plan `nexus consolidate` and the stand-alone commands make, from the real inputs) and records it with the
stage's measured peak RSS in the same process (VmHWM reset before the stage) under ``memory`` in the variant's JSON.
This script reads those records (nothing is run), prints one row per (run, stage) with the plan, the measurement and
plan / measured, and a summary per stage (min, median, max of the ratio; how many are within 15%), and writes
``bench/results/memory_plan_stages.json``. A stage that reused its output (nothing computed) is listed but left out of
the summary: its peak is not the stage's. The export (not part of a comparison run) is measured here: each folder's
NEXUS student exported by `export_checkpoint` in a fresh child, against the recipe-less export plan made in that
child just before. ``--fresh distill validate`` also redoes those stages of each folder's NEXUS run in a fresh child
(into a temporary folder; distill rebuilds the teacher caches), so a stage is measured from a clean process rather
than after the stages before it in the comparison's process. The export and ``--fresh`` find a run's folders through
the ``paths`` its JSON records (the stage artefacts under bench/out/compare-runs/, not tracked), so they need the
machine that ran the comparison (without its student the export row is skipped, with a note). Asserts nothing.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import RESULTS  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = RESULTS / "memory_plan_stages.json"
GOAL = 0.15  # issue 8: the plan within 15% of the measured peak
MB = 2**20


def rows_from(folder: Path) -> list:
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        record = json.loads(path.read_text())
        for stage, m in (record.get("memory") or {}).items():
            if "measured_peak_bytes" not in m:
                continue
            rows.append({"scale": record.get("scale"), "variant": record.get("variant"), "stage": stage,
                         "planned_bytes": m["planned_bytes"], "measured_peak_bytes": m["measured_peak_bytes"],
                         "ratio": m["planned_bytes"] / m["measured_peak_bytes"], "reused": m.get("reused", False),
                         "peak_from": m.get("peak_from"), "peak_reset": m.get("peak_reset"),
                         "largest_components_mib": {k: round(v / MB, 1) for k, v in sorted(
                             m["components"].items(), key=lambda kv: -kv[1])[:4]}})
    return rows


def export_row(student: Path, variant: str, scale: str) -> dict:
    """`export_checkpoint` of ``student`` in a fresh child process (1 thread): the recipe-less export plan made there
    just before it, and its peak RSS (VmHWM reset before the export)."""
    import subprocess
    import sys

    code = f"""
import json, tempfile
from pathlib import Path
from nexus.conversion.peak_rss import current_rss, peak_rss, reset_peak_rss
from nexus.conversion.stage_memory import plan_checkpoint_export_ram
from nexus.hub.export import export_checkpoint
import nexus.modeling_nexus  # as `nexus export` does before it plans (stage_ram_guard.guard_export_ram)
plan = plan_checkpoint_export_ram({str(student)!r}, current_rss())
reset_peak_rss()
with tempfile.TemporaryDirectory() as d:
    export_checkpoint({str(student)!r}, Path(d) / "export", verify=False)
print(json.dumps({{"plan": plan, "peak": peak_rss()}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    got = json.loads(done.stdout.strip().splitlines()[-1])
    plan = got["plan"]
    return {"scale": scale, "variant": variant, "stage": "export", "planned_bytes": plan["total_bytes"],
            "measured_peak_bytes": got["peak"], "ratio": plan["total_bytes"] / got["peak"], "reused": False,
            "peak_from": None, "peak_reset": True,
            "largest_components_mib": {k: round(v / MB, 1) for k, v in sorted(plan["components"].items(),
                                                                                key=lambda kv: -kv[1])[:4]}}


STAGE_CHILD = """
import json, sys, tempfile, shutil
from pathlib import Path
sys.path.insert(0, {bench!r})
import compare_methods as cm
from rich.console import Console
from nexus.conversion.peak_rss import current_rss, peak_rss, reset_peak_rss
from nexus.conversion.profile import load_profile
from nexus.conversion.stage_memory import STAGE_RAM_PLANS
run_dir = Path({runs!r})
teachers = cm.specialist_folders({scale!r}, cm.DEFAULT_TEACHERS, run_dir, False)  # {{}} for a recipe-file scale
recipe = cm.variant_recipe(cm.base_raw_recipe(teachers, run_dir, {scale!r}, {steps}), cm.VARIANTS[{variant!r}],
                           run_dir)
vdir = recipe.run_path / "variants" / {variant!r}
profile = load_profile(recipe.run_path)
stage = {stage!r}
student = vdir / ("student_build" if stage == "distill" else "distill/student")
plan = STAGE_RAM_PLANS[stage](recipe, current_rss(), profile=profile, student=student)
out = Path(tempfile.mkdtemp(prefix="nexus-stage-memory-"))
reset_peak_rss()
try:
    if stage == "distill":  # a fresh folder: the teacher caches are built again, as in a first run
        from nexus.conversion.distill import run_distill
        run_distill(recipe, student, profile=profile, out=out / "d", console=Console(quiet=True), show_progress=False,
                    force=True)
    else:
        from nexus.conversion.validate import run_validate
        run_validate(recipe, student, out=out / "v", console=Console(quiet=True), show_progress=False, force=True)
    peak = peak_rss()
finally:
    shutil.rmtree(out, ignore_errors=True)
print(json.dumps({{"plan": plan, "peak": peak}}))
"""


def fresh_stage_row(folder: Path, stage: str, variant="nexus") -> dict | None:
    """``stage`` (distill or validate) of ``variant``'s comparison run redone in a fresh child process (1 thread)
    into a temporary folder: the plan made there just before it and its peak RSS. None when the variant has not run."""
    import subprocess
    import sys

    path = Path(folder) / f"{variant}.json"
    if not path.is_file() or json.loads(path.read_text()).get("status") != "done":
        return None
    record = json.loads(path.read_text())
    runs = Path(record["paths"]["student_build"]).parents[3]  # <runs>/compare/variants/<variant>/student_build
    code = STAGE_CHILD.format(bench=str(HERE), runs=str(runs), scale=record["scale"], steps=record["train"]["steps"],
                              variant=variant, stage=stage)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"{stage} of {path} in a fresh child failed:\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    plan = got["plan"]
    return {"scale": record["scale"], "variant": f"{variant} (fresh child)", "stage": stage,
            "planned_bytes": plan["total_bytes"], "measured_peak_bytes": got["peak"],
            "ratio": plan["total_bytes"] / got["peak"], "reused": False, "peak_from": plan["assumptions"].get("peak"),
            "peak_reset": True, "largest_components_mib": {k: round(v / MB, 1) for k, v in sorted(
                plan["components"].items(), key=lambda kv: -kv[1])[:4]}}


def summary(rows) -> dict:
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        ratios = [r["ratio"] for r in rows if r["stage"] == stage and not r["reused"]]
        if ratios:
            out[stage] = {"n": len(ratios), "min": min(ratios), "median": statistics.median(ratios),
                          "max": max(ratios), "within_goal": sum(abs(x - 1) <= GOAL for x in ratios)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare-dir", type=Path, action="append",
                        help="folders of compare_methods.py JSON (default: bench/results/compare-gemma and "
                             "bench/results/compare)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--fresh", nargs="*", default=[], choices=["distill", "validate"],
                        help="also redo these stages of each folder's NEXUS run in a fresh child and measure them "
                             "(distill rebuilds the teacher caches: minutes on Gemma-3-270M)")
    args = parser.parse_args(argv)
    folders = args.compare_dir or [RESULTS / "compare-gemma", RESULTS / "compare"]
    rows = [r for f in folders for r in rows_from(f)]
    console = Console(width=200)
    for folder in folders:  # the export of each folder's NEXUS student, measured here in a child
        nexus = Path(folder) / "nexus.json"
        if nexus.is_file():
            record = json.loads(nexus.read_text())
            if record.get("status") == "done":
                student = Path(record["paths"]["student"])
                if student.is_dir():
                    rows.append(export_row(student, "nexus", record.get("scale")))
                else:  # committed JSON without the run's artefacts (another machine, or bench/out/ cleared)
                    console.print(f"[yellow]{nexus}: its student {student} is not here: export not measured[/]")
        for stage in args.fresh:
            row = fresh_stage_row(folder, stage)
            if row is not None:
                rows.append(row)
    table = Table(title="memory plan vs measured peak RSS, per stage (plan made just before the stage)")
    for col in ("scale", "variant", "stage", "planned MiB", "measured MiB", "plan / measured", "largest planned parts"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["scale"], r["variant"], r["stage"], f"{r['planned_bytes'] / MB:,.0f}",
                      f"{r['measured_peak_bytes'] / MB:,.0f}", f"{r['ratio']:.3f}" + (" (reused)" if r["reused"] else ""),
                      ", ".join(f"{k} {v:,.0f}" for k, v in r["largest_components_mib"].items()))
    console.print(table)
    agg = summary(rows)
    stable = Table(title=f"plan / measured per stage (stages that ran; goal within {GOAL:.0%})")
    for col in ("stage", "runs", "min", "median", "max", f"within {GOAL:.0%}"):
        stable.add_column(col)
    for stage, s in agg.items():
        stable.add_row(stage, str(s["n"]), f"{s['min']:.3f}", f"{s['median']:.3f}", f"{s['max']:.3f}",
                       f"{s['within_goal']}/{s['n']}")
    console.print(stable)
    from nexus.conversion.atomic_output import atomic_file

    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps({"goal": GOAL, "folders": [str(f) for f in folders], "rows": rows,
                                   "summary": agg}, indent=1))
    console.print(f"wrote {args.out}")
    return rows, agg


if __name__ == "__main__":
    main()

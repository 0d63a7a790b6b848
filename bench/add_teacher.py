"""Adding a teacher against consolidating again (issue 19, items 4-5): cost side by side, and the no-regression proof.

    python bench/add_teacher.py            # base student, add-teacher, full consolidate; reuses what is done
    python bench/add_teacher.py --force    # measure add-teacher and the full consolidate again

1. **Base student**: ``nexus consolidate`` of `recipes/add_teacher.yaml` (Gemma-3-270M + the arithmetic specialist,
   serving prose and arithmetic). Reused when its export exists.
2. **(a) add-teacher**: ``nexus add-teacher BASE recipes/add_teacher_fragment.yaml`` adds the reversal specialist
   (Qwen 2, character tokenizer; string reversal, which neither other teacher can do).
3. **(b) full consolidate**: ``nexus consolidate`` of the base recipe plus the fragment's teacher and capability
   (same stage options), from an empty run folder.

(a) and (b) each run as a child process with ``OMP_NUM_THREADS=1``; wall time is measured around it and peak RAM is
the child's peak RSS as ``bench/child_process.py`` measures it (its ``VmHWM`` sampled while it runs, since the
pipeline resets the high-water mark per stage and ``ru_maxrss`` alone would be the last stage's peak). Both
start after the GGUF teacher was converted once (by the base run), so neither pays that import.

Writes ``bench/results/add_teacher.json``: the costs and their ratio add / full (goal <= 0.25), the RAM floor any
add-teacher of this case has (a child that only imports NEXUS, plus the student's weights), the proof (old
tensors bit-identical, each old capability's score before / after with its paired CI, router accuracy before /
after, interference with the new tower forced), and the retention of every capability for the base student, the
student after add-teacher and the full consolidate of three (with the teachers' scores on reversal from the full
run's profile). Run folders and logs go to ``bench/out/add-teacher/``.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import child_process  # noqa: E402
from paths import ARTEFACTS, RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "recipes" / "add_teacher.yaml"
FRAGMENT = HERE / "recipes" / "add_teacher_fragment.yaml"
WORK = ARTEFACTS / "add-teacher"
RESULT = RESULTS / "add_teacher.json"
SPECIALISTS = ("arithmetic", "reversal")  # trained by bench/train_specialists.py into /work/cache/specialists
GOAL = 0.25
RUN = {"base": WORK / "base" / "add_teacher_base", "full": WORK / "full" / "add_teacher_full"}  # run_dir / name


def _absolute_sources(raw, base):
    for teacher in raw["teachers"]:
        teacher["source"] = str((base / teacher["source"]).resolve())
    return raw


def write_recipes():
    """The resolved base recipe, fragment and full recipe under WORK; returns their paths."""
    WORK.mkdir(parents=True, exist_ok=True)
    base = _absolute_sources(yaml.safe_load(RECIPE.read_text()), RECIPE.parent)
    base["run_dir"] = str(WORK / "base")
    base["cache_dir"] = str((RECIPE.parent / base["cache_dir"]).resolve())
    fragment = _absolute_sources(yaml.safe_load(FRAGMENT.read_text()), FRAGMENT.parent)
    fragment["student_recipe"] = str(WORK / "base.yaml")
    full = json.loads(json.dumps(base))
    full.update(name="add_teacher_full", run_dir=str(WORK / "full"))
    full["stages"]["distill"].update(fragment["stages"]["distill"])  # top_k 16: the reversal teacher has 16 tokens
    for cap in full["capabilities"]:  # the reversal teacher's 12-character tokenizer cannot encode prose or arithmetic
        cap.setdefault("teachers", [t["name"] for t in base["teachers"]])
    full["teachers"] += fragment["teachers"]
    full["capabilities"] += fragment["capabilities"]
    paths = {"base": WORK / "base.yaml", "fragment": WORK / "fragment.yaml", "full": WORK / "full.yaml"}
    for name, raw in (("base", base), ("fragment", fragment), ("full", full)):
        paths[name].write_text(yaml.safe_dump(raw, sort_keys=False))
    return paths


def measured(name, cmd, console):
    """``child_process.measured`` with its log in ``bench/out/add-teacher/``."""
    return child_process.measured(name, cmd, console, WORK)


def run_step(name, cmd, done_marker, console, force=False, fresh=None):
    """``measured`` once: a record beside a finished output is reused unless ``force``; ``fresh`` is removed first."""
    record_path = WORK / f"{name}.measure.json"
    if not force and record_path.is_file() and done_marker.exists():
        console.print(f"[green]{name}[/]: reusing {done_marker} (measured {record_path})")
        return json.loads(record_path.read_text())
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
    record = measured(name, cmd, console)
    ok = done_marker.exists() and record["exit_code"] in (0, 3)  # 3: the validation gate failed (still exported)
    if not ok:
        raise SystemExit(f"{name} failed (exit {record['exit_code']}); see {record['log']}")
    record_path.write_text(json.dumps(record, indent=1))
    return record


def memory_floor(nexus, student, costs, console):
    """What any add-teacher must hold: the process after importing what it imports (measured as a child that only
    imports) plus one fp32 copy of the student's weights (its safetensors size); and that floor over the full
    consolidate's peak, the lowest RAM ratio this case allows."""
    code = ("import nexus.cli, nexus.modeling_nexus, nexus.conversion.add_teacher, nexus.conversion.distill, "
            "nexus.conversion.validate")
    imports = measured("import_floor", [nexus[0], "-c", code], console)
    weights = sum(p.stat().st_size for p in Path(student).glob("*.safetensors")) / 2**20
    floor = imports["peak_rss_mb"] + weights
    full = costs["full_consolidate"]["peak_rss_mb"]
    return {"import_only_peak_rss_mb": imports["peak_rss_mb"], "student_weights_mb": round(weights, 1),
            "floor_mb": round(floor, 1), "floor_over_full": floor / full,
            "add_teacher_over_floor": costs["add_teacher"]["peak_rss_mb"] / floor}


def retention_of(report_path):
    report = json.loads(Path(report_path).read_text())
    return {cap: {"value": r.get("value"), "ci": r.get("ci"), "teacher": r.get("teacher"), "metric": r.get("metric")}
            for cap, r in report["retention"].items()}


def summarise(costs, paths):
    """The result dict from the run folders."""
    add = json.loads((WORK / "added" / "add_teacher_report.json").read_text())
    proof = add["proof"]
    tensors = proof["tensors"]
    before = retention_of(RUN["base"] / "validate" / "report.json")
    full = retention_of(RUN["full"] / "validate" / "report.json")
    after = {}
    for cap, entry in proof["retention"].items():
        orig = entry.get("original_report") or {}
        after[cap] = {"value": orig.get("retention_after"), "teacher": orig.get("teacher"), "metric": entry["metric"],
                      "note": "old capability: after-add score / the base report's teacher score (same items)"}
    for cap, entry in add["new_capabilities"].items():
        after[cap] = {"value": entry["value"], "ci": entry["ci"], "teacher": entry["teacher"],
                      "metric": entry["metric"], "router_accuracy": entry["router_accuracy"]}
    profile = json.loads((RUN["full"] / "profile" / "profile.json").read_text())
    competence = {cap: {t: {"score": r.get("score"), "ci": r.get("ci"), "metric": r.get("metric")}
                        for t, r in profile["capabilities"][cap].items()} for cap in profile["capabilities"]}
    ratio = {k: costs["add_teacher"][k] / costs["full_consolidate"][k] for k in ("wall_seconds", "peak_rss_mb")}
    return {
        "schema": "nexus.bench.add_teacher/1",
        "recipes": {"base": str(RECIPE.relative_to(HERE.parent)), "fragment": str(FRAGMENT.relative_to(HERE.parent))},
        "threads": 1, "cost": costs, "ratio_add_over_full": ratio, "goal": GOAL,
        "goal_met": {k: v <= GOAL for k, v in ratio.items()},
        "proof": {
            "passed": proof["passed"], "tensors_compared": tensors["n"],
            "tensors_bit_identical": tensors["n"] - len(tensors["changed"]), "changed": tensors["changed"],
            "retention": {cap: {k: e.get(k) for k in ("metric", "n", "before", "after", "after_over_before",
                                                      "after_over_before_ci", "unchanged_within_ci")}
                          for cap, e in proof["retention"].items()},
            "router": proof["router"], "interference": proof["interference"],
        },
        "new_tower": {k: add["build"]["new_tower"].get(k) for k in ("name", "params", "layer_budget",
                                                                    "teacher_layer_params")},
        "retention": {"base": before, "after_add": after, "full_consolidate": full},
        "teacher_scores": competence,
        "add_teacher_seconds_reported": add.get("seconds"),
    }


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(ci):
    return "" if not ci else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def print_tables(result, console):
    cost = Table(title="cost: (a) add-teacher vs (b) full consolidate of the three teachers (1 thread)")
    for col in ("run", "wall s", "peak RSS MB", "CPU s", "exit"):
        cost.add_column(col)
    for name in ("base_consolidate", "add_teacher", "full_consolidate"):
        c = result["cost"][name]
        cost.add_row(name, f"{c['wall_seconds']:.0f}", f"{c['peak_rss_mb']:.0f}", _fmt(c.get("cpu_seconds"), 0),
                     str(c["exit_code"]))
    r = result["ratio_add_over_full"]
    cost.add_row("add / full", f"{r['wall_seconds']:.3f}", f"{r['peak_rss_mb']:.3f}", "", "")
    console.print(cost)
    f = result.get("memory_floor")
    if f:
        console.print(f"RAM floor of any add-teacher here: imports {f['import_only_peak_rss_mb']:.0f} MB + the "
                      f"student's weights {f['student_weights_mb']:.0f} MB = {f['floor_mb']:.0f} MB = "
                      f"{f['floor_over_full']:.3f} of the full consolidate's peak; add-teacher peaked at "
                      f"{f['add_teacher_over_floor']:.2f}x that floor")

    p = result["proof"]
    console.print(f"proof passed: {p['passed']}; old tensors bit-identical: {p['tensors_bit_identical']} / "
                  f"{p['tensors_compared']}")
    proof = Table(title="old capabilities: before / after add-teacher (same items), router, interference")
    for col in ("capability", "metric", "n", "before", "after", "after/before [95% CI]", "within CI",
                "router before [CI]", "router after", "new tower forced"):
        proof.add_column(col)
    for cap, e in p["retention"].items():
        router, inter = p["router"][cap], p["interference"][cap]
        proof.add_row(cap, e["metric"], str(e["n"]), _fmt(e["before"]), _fmt(e["after"]),
                      _fmt(e["after_over_before"]) + _ci(e["after_over_before_ci"]),
                      "yes" if e["unchanged_within_ci"] else "NO",
                      _fmt(router.get("before")) + _ci(router.get("before_ci")), _fmt(router.get("after")),
                      _fmt(inter.get("new_tower_forced")))
    console.print(proof)

    ret = Table(title="retention of every capability (student / its best teacher, 95% CI)")
    for col in ("capability", "base (2 teachers)", "after add-teacher", "full consolidate (3 teachers)"):
        ret.add_column(col)
    caps = list(result["retention"]["full_consolidate"])
    for cap in caps:
        cells = []
        for key in ("base", "after_add", "full_consolidate"):
            e = result["retention"][key].get(cap)
            cells.append("-" if e is None else _fmt(e.get("value")) + _ci(e.get("ci")))
        ret.add_row(cap, *cells)
    console.print(ret)
    scores = result["teacher_scores"].get("reversal", {})
    console.print("teachers on reversal (exact match, full run's profile): " + "; ".join(
        f"{t} {_fmt(s['score'])}{_ci(s['ci'])}" for t, s in scores.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="measure add-teacher and the full consolidate again")
    args = parser.parse_args()
    console = Console(width=180)
    for name in SPECIALISTS:
        if not (Path("/work/cache/specialists") / name / "competence.json").is_file():
            raise SystemExit(f"specialist {name} is missing: "
                             f"python bench/train_specialists.py --threads 1 --only {name}")
    paths = write_recipes()
    nexus = [sys.executable, "-m", "nexus.cli"]
    costs = {}
    console.rule("[bold]1. base student: Gemma-3-270M + arithmetic specialist (prose, arithmetic)")
    base_export = RUN["base"] / "export"
    costs["base_consolidate"] = run_step("base_consolidate", nexus + ["consolidate", str(paths["base"]), "--quiet"],
                                         base_export / "nexus_hashes.json", console)
    console.rule("[bold]2. (a) add-teacher: + reversal specialist")
    added = WORK / "added"
    costs["add_teacher"] = run_step(
        "add_teacher", nexus + ["add-teacher", str(base_export), str(paths["fragment"]), "--out", str(added),
                                "--overwrite", "--quiet"],
        added / "add_teacher_report.json", console, force=args.force)
    console.rule("[bold]3. (b) full consolidate of the three teachers, from an empty run folder")
    costs["full_consolidate"] = run_step("full_consolidate", nexus + ["consolidate", str(paths["full"]), "--quiet"],
                                         RUN["full"] / "export" / "nexus_hashes.json", console, force=args.force,
                                         fresh=WORK / "full")
    result = summarise(costs, paths)
    result["memory_floor"] = memory_floor(nexus, base_export, costs, console)
    print_tables(result, console)
    with atomic_file(RESULT) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()

"""Issue 17's acceptance run: ``nexus consolidate`` with the optional stages ON, on the same-family case.

    python bench/acceptance_gemma_pair.py            # reuses a finished run; --force runs it again

Runs ``nexus consolidate bench/recipes/gemma_pair_acceptance.yaml`` as a child process (``--threads``, default one;
wall time and peak RSS measured around it): Gemma-3-270M (prose), its code fine-tune (code,
`bench/train_gemma_specialist.py`) and the arithmetic specialist, with the pipeline ``profile, localise, align,
student_build, distill (LMC refine), validate, export``. Then reads what each stage wrote in
``bench/out/runs/gemma_pair_acceptance/`` and writes
``bench/results/gemma_pair_acceptance.json``: the stages run with their seconds and RAM (plan vs measured), what
localise selected per teacher and capability (units, causal drop against the random control), what align merged
(the held-out loss of each capability under its own teacher, the merge and the plain average), the LMC path (chosen
α, barrier), the student's size and its retention per capability with 95% CIs, its per-item rows, and (when it was
validated on the same items) its paired difference from the align_ot comparison run (the same pair, budget and
distillation without localise): localise's own effect on this pair. Prints a summary; asserts nothing.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
import child_process  # noqa: E402
from paths import ARTEFACTS, RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "recipes" / "gemma_pair_acceptance.yaml"
RESULT = RESULTS / "gemma_pair_acceptance.json"


def run_folder(recipe_path: Path) -> Path:
    raw = yaml.safe_load(recipe_path.read_text())
    return (recipe_path.parent / raw["run_dir"]).resolve() / raw["name"]


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def localise_summary(feature_map: dict | None) -> dict | None:
    """Per teacher and capability: present or not, the units selected, the causal drop of the selection against its
    random same-size control (ratio with CI), and the teacher's localisation seconds."""
    if feature_map is None:
        return None
    out = {}
    for teacher, caps in feature_map.items():
        if teacher.startswith("_") or not isinstance(caps, dict):
            continue
        entry_t = {"seconds": (caps.get("_seconds") or {}).get("total"), "capabilities": {}}
        for cap, e in caps.items():
            if cap.startswith("_") or not isinstance(e, dict):
                continue
            causal = e.get("causal") or {}
            entry_t["capabilities"][cap] = {
                "present": e.get("present"), "units": causal.get("units"),
                **{k: causal.get(k) for k in ("drop", "drop_ci", "random_drop", "ratio", "ratio_ci")},
                "overall_confidence": (e.get("confidence") or {}).get("overall")}
        out[teacher] = entry_t
    return out


def student_items(run: Path, report: dict) -> dict | None:
    """Per capability, the student's and the teacher's per-item rows with the validate stage's bootstrap seed
    (`compare_methods.item_block`), so that this run pairs item by item with a comparison record."""
    from compare_methods import item_block

    from nexus.conversion.recipe import load_recipe

    items, profile_items = run / "validate" / "items.json", run / "profile" / "items.json"
    if not report or not items.is_file() or not profile_items.is_file():
        return None
    recipe = load_recipe(RECIPE)
    return item_block(recipe, report, json.loads(profile_items.read_text()),
                      json.loads(items.read_text())["student"])


def against(record: dict, other_path: Path) -> dict | None:
    """This run minus ``other_path``'s compare record (the same pair, budget and distillation without the localise
    stage), per capability and on the minimum, paired bootstrap 95% CIs; None when not on the same items."""
    import results as results_md

    if record.get("items") is None or not other_path.is_file():
        return None
    other = json.loads(other_path.read_text())
    if other.get("status") != "done":
        return None
    mine = {"retention": record["retention"], "items": record["items"], "min": record["min"]}
    # pairing rests on the items: the same teacher rows and bootstrap seeds (paired_delta checks both), not on the
    # base recipe's hash, which differs by the pipeline line
    theirs = {**other, "base_recipe_sha256": None, "resolved_recipe_sha256": None}
    delta = results_md.paired_delta(mine, theirs)
    if delta is None:
        return None
    return {"record": str(other_path.relative_to(HERE.parent)), "label": other.get("label"),
            "other_min": other.get("min"), "delta": delta}


def summarise(run: Path, cost: dict) -> dict:
    memory = _json(run / "memory_plan.json") or {}
    align = _json(run / "align" / "align.json") or {}
    lmc = _json(run / "distill" / "lmc" / "lmc.json") or {}
    report = _json(run / "validate" / "report.json") or {}
    return {
        "recipe": str(RECIPE.relative_to(HERE.parent)),
        "cost": cost,
        "stages": list((memory.get("plans") or {}).keys()),
        "memory": {"plans_bytes": {k: v.get("total_bytes") for k, v in (memory.get("plans") or {}).items()},
                   "measured_peak_rss_bytes": memory.get("measured_peak_rss_bytes")},
        "localise": localise_summary(_json(run / "localise" / "feature_map.json")),
        "align": {"merged": [{k: m.get(k) for k in ("name", "members", "method", "capabilities", "heldout_loss",
                                                     "steps")} for m in align.get("merged", [])],
                  "seconds": align.get("seconds")},
        "lmc": {k: lmc.get(k) for k in ("alphas", "scores", "best_alpha", "best_score", "barrier", "barrier_alpha")
                if k in lmc},
        "student_params": report.get("student_params"),
        "teacher_params_total": report.get("teacher_params_total"),
        "params_ratio": report.get("params_ratio"),
        "retention": {cap: {k: e.get(k) for k in ("value", "ci", "teacher", "metric", "n")}
                      for cap, e in (report.get("retention") or {}).items()},
        "min": report.get("min"),
        "items": student_items(run, report),
        "gate": report.get("gate"),
        "export": (run / "export").is_dir(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--force", action="store_true", help="delete the run folder and run consolidate again")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the consolidate child (default 1)")
    args = parser.parse_args(argv)
    console = Console()
    run = run_folder(args.recipe)
    work = ARTEFACTS / "acceptance-gemma-pair"
    measure = work / "consolidate.measure.json"
    if args.force or not measure.is_file() or not (run / "export").is_dir():
        if args.force:
            shutil.rmtree(run, ignore_errors=True)
        cost = child_process.measured("consolidate", [sys.executable, "-m", "nexus.cli", "consolidate", args.recipe],
                                      console, work, threads=args.threads)
        if cost["exit_code"] not in (0, 3):  # 3: the validation gate failed; the student is still exported
            raise SystemExit(f"consolidate failed (exit {cost['exit_code']}); see {cost['log']}")
        work.mkdir(parents=True, exist_ok=True)
        measure.write_text(json.dumps(cost, indent=1))
    else:
        cost = json.loads(measure.read_text())
        console.print(f"reusing the finished run {run} (measured {measure}; --force runs it again)")
    result = summarise(run, cost)
    result["localise_effect"] = against(result, RESULTS / "gemma_pair" / "align_ot.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1, allow_nan=False))
    console.print(f"stages: {', '.join(result['stages'])}; {cost['wall_seconds']:.0f} s, peak RSS "
                  f"{cost['peak_rss_mb']:.0f} MB, exit {cost['exit_code']}")
    for m in result["align"]["merged"]:
        console.print(f"align: {m['name']} ({m['method']}) serves {', '.join(m['capabilities'])}")
    if result["lmc"]:
        console.print(f"LMC: best alpha {result['lmc'].get('best_alpha')}, barrier {result['lmc'].get('barrier')}")
    for cap, e in result["retention"].items():
        console.print(f"{cap}: retention {e['value']} {e['ci']} (vs {e['teacher']}, {e['metric']}, n={e['n']})")
    effect = result["localise_effect"]
    if effect is not None:
        d = effect["delta"]
        console.print(f"localise ON minus {effect['record']} (align ON, no localise): min {d['min']['value']:+.3f} "
                      f"[{d['min']['ci'][0]:+.3f}, {d['min']['ci'][1]:+.3f}]; "
                      + "; ".join(f"{c} {e['value']:+.3f} [{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}]"
                                  for c, e in d["per_capability"].items()))
    else:
        console.print("localise effect: not paired with bench/results/gemma_pair/align_ot.json (other items)")
    console.print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

"""Kill and resume at 10 points (issue 8): `nexus consolidate` SIGKILLed, rerun with the same command, compared with an
uninterrupted run.

Two tiny random teachers with different tokenizers (tests/test_distill_stage.py's ``llama_char`` and ``qwen_bpe``)
and the tests' tiny consolidate recipe, with more distillation (``--steps``, ``--tokens``) so that training is a
larger share of the run. One uninterrupted run gives the reference weights and the wall time T; then, for each of 10
kill points spread over T (5%, 15%, ..., 95%), a fresh run folder is started, killed with SIGKILL at that point, and
the same command is rerun to the end. Per point it records the stage the run was in when killed (from its
unbuffered output; in distillation also the last logged engine step), the temporaries the kill left, which stages
the rerun reused and where distillation resumed, whether the rerun's distilled weights and exported weights are
bit-identical to the uninterrupted run's, and the temporaries left after the rerun (must be none).

Prints a table and writes bench/results/kill_resume.json. Asserts nothing. Uses the tests' harness (tests/ on sys.path,
as bench/import_lossless_tiny.py does).

    OMP_NUM_THREADS=1 python bench/kill_resume.py [--steps 300] [--tokens 600] [--points 10]
"""

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import RESULTS  # noqa: E402
from test_distill_stage import consolidate_recipe_file, save_two_teachers  # noqa: E402
from test_kill_resume import final_weights, kill_after, leftovers, rerun, same_weights  # noqa: E402

OUT = RESULTS / "kill_resume.json"
# what the run prints as it goes (rich rules and lines), last one seen = where the run was
MARKERS = (
    (r"memory plan: peak RAM per stage", "planning"),
    (r"\d+\. profile:", "profile"),
    (r"\d+\. student:", "student_build"),
    (r"\d+\. distill:", "distill (plan)"),
    (r"distill: teacher caches", "distill: teacher caches"),
    (r"distill: \d+ steps", "distill: training"),
    (r"LMC init -> distilled", "distill: after LMC"),
    (r"\d+\. validate:", "validate"),
    (r"\d+\. export:", "export"),
    (r"^wrote ", "finished"),
)


def stage_at_kill(log):
    """The last stage marker in a killed run's output ("startup" before any)."""
    stage = "startup (imports)"
    for line in Path(log).read_text(errors="replace").splitlines():
        for pattern, name in MARKERS:
            if re.search(pattern, line):
                stage = name
    return stage


def engine_step(root):
    """The last optimizer step the engine logged (None before training started)."""
    log = root / "runs" / "tiny" / "distill" / "engine" / "run_log.jsonl"
    if not log.is_file():
        return None
    steps = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if "loss" in record:
            steps.append(record["step"])
    return max(steps, default=None)


def reused_on_rerun(output):
    return [s for s in ("profile", "student build", "distill", "validate") if f"{s}: inputs unchanged" in output]


def export_weights(root):
    from safetensors.torch import load_file

    return load_file(str(root / "runs" / "tiny" / "export" / "model.safetensors"))


def make_recipe(teachers, root, steps, tokens):
    path = consolidate_recipe_file(teachers, root, steps=steps)
    raw = yaml.safe_load(path.read_text())
    raw["stages"]["distill"]["tokens"] = tokens
    path.write_text(yaml.safe_dump(raw))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300,
                        help="distill steps (checkpoint every step; 300 put 4 of the 10 kill points in training)")
    parser.add_argument("--tokens", type=int, default=600, help="distill training tokens per capability")
    parser.add_argument("--points", type=int, default=10, help="kill points, evenly spread over the run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from nexus.conversion.atomic_output import atomic_file

    console = Console(width=160)
    work = Path(tempfile.mkdtemp(prefix="nexus-kill-resume-"))
    try:
        teachers = save_two_teachers(work / "teachers")
        reference_root = work / "uninterrupted"
        done, seconds = rerun(make_recipe(teachers, reference_root, args.steps, args.tokens))
        if done.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{done.stderr[-3000:]}")
        reference, reference_export = final_weights(reference_root), export_weights(reference_root)
        distill = json.loads((reference_root / "runs" / "tiny" / "distill" / "distill.json").read_text())
        console.print(f"uninterrupted run: {seconds:.1f} s; distill {distill['train']['steps']} steps, "
                      f"{distill['params']:,} student params")
        fractions = [(i + 0.5) / args.points for i in range(args.points)]
        rows = []
        for k, fraction in enumerate(fractions):
            root = work / f"killed-{k}"
            recipe = make_recipe(teachers, root, args.steps, args.tokens)
            log = root / "killed.log"
            killed = kill_after(recipe, fraction * seconds, log)
            row = {"fraction": fraction, "kill_after_seconds": round(fraction * seconds, 2), "killed": killed,
                   "stage": stage_at_kill(log), "engine_step": engine_step(root),
                   "temporaries_after_kill": len(leftovers(root))}
            again, rerun_seconds = rerun(recipe)
            row["rerun_exit_code"] = again.returncode
            row["rerun_seconds"] = round(rerun_seconds, 2)
            if again.returncode == 0:
                summary = json.loads((root / "runs" / "tiny" / "distill" / "distill.json").read_text())
                row["reused_on_rerun"] = reused_on_rerun(again.stdout)
                row["distill_resumed_from"] = summary["train"]["resumed_from"]
                row["bit_identical"] = same_weights(final_weights(root), reference)
                row["export_bit_identical"] = same_weights(export_weights(root), reference_export)
            else:
                row["error"] = again.stderr[-2000:]
            row["leftovers_after_rerun"] = [str(p.relative_to(root)) for p in leftovers(root)]
            rows.append(row)
            console.print(f"  {k + 1}/{len(fractions)}: killed at {fraction:.0%} ({row['stage']}): rerun exit "
                          f"{again.returncode}, bit-identical {row.get('bit_identical')}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"nexus consolidate: SIGKILL at {len(rows)} points of an uninterrupted {seconds:.1f} s run, "
                        f"then rerun (distill {args.steps} steps)")
    for col in ("kill at", "stage when killed", "engine step", "temps after kill", "resumed ok", "reused on rerun",
                "distill resumed from", "bit-identical (distilled / export)", "leftovers"):
        table.add_column(col, justify="left" if col in ("stage when killed", "reused on rerun") else "right")
    for r in rows:
        table.add_row(f"{r['fraction']:.0%} ({r['kill_after_seconds']:.1f} s)" + ("" if r["killed"] else " (done)"),
                      r["stage"], "-" if r["engine_step"] is None else str(r["engine_step"]),
                      str(r["temporaries_after_kill"]), "yes" if r["rerun_exit_code"] == 0 else "NO",
                      ", ".join(r.get("reused_on_rerun", [])) or "-",
                      "-" if r.get("distill_resumed_from") is None else str(r["distill_resumed_from"]),
                      f"{r.get('bit_identical')} / {r.get('export_bit_identical')}",
                      str(len(r["leftovers_after_rerun"])))
    console.print(table)
    ok = sum(1 for r in rows if r.get("bit_identical") and r.get("export_bit_identical")
             and not r["leftovers_after_rerun"])
    console.print(f"{ok}/{len(rows)} points resumed to bit-identical weights with no temporaries left")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(OUT) as tmp:
        tmp.write_text(json.dumps({"uninterrupted_seconds": seconds, "steps": args.steps, "tokens": args.tokens,
                                   "points": rows, "ok": ok}, indent=1))
    console.print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

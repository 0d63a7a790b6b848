"""The real localisation (issue 9): Gemma-3-270M plus the arithmetic specialist, and the cost against depth.

    python bench/localise_real.py [--recipe bench/recipes/localise_real.yaml] [--force] [--teacher NAME ...]
                                  [--skip-real] [--skip-scaling] [--threads N]

1. A matmul microbenchmark (fp32 vs bf16) on this CPU, which is why the recipe runs the teachers in fp32.
2. Runs the localise stage (the library behind `nexus localise`) on the recipe, one teacher per run folder
   (``<name>-<teacher>``, so a teacher's result is reused when only another changes; the specialist is trained by
   `nexus.training.specialists` when its folder is missing): for each teacher x capability, the
   causal drop of the selected units as a multiple of the random same-size control (target >= 3x), with CIs, and
   the wall and CPU seconds of every sub-stage. The recipe's header says how the cost was limited.
3. Cost against depth: planted Llama models (tests/planted_model.py, hidden 128, FFN 512, 8 heads) of 2, 4 and 8
   layers, localised with every block and head ablated; seconds per stage and the growth exponent
   (log(t8 / t2) / log 4: 1 = linear in depth, 2 = quadratic).

Writes bench/results/localise_real.json (the run folders are the recipe's, under bench/out/runs/). Prints figures;
asserts nothing.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from nexus.conversion.atomic_output import atomic_file
from nexus.conversion.feature_map import capabilities_of, teachers_of
from nexus.conversion.localise import (
    LocaliseOptions,
    localise_model,
    localise_table,
    run_localise,
)
from nexus.conversion.recipe import validate_recipe
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from paths import RESULTS  # noqa: E402

DEFAULT_RECIPE = HERE / "recipes" / "localise_real.yaml"
SPECIALIST_TEACHER = "arith-specialist"  # trained here when missing; any other non-GGUF teacher must exist
STAGES = ("base", "perturbation", "activation", "spectral", "causal", "total")
# The recipe's limits are sized for Gemma; the specialists are ~100x cheaper per pass, so they get more items (and
# every block and head ablated), which their presence test needs: a small model's margin over chance is small.
SMALL_TEACHER_OPTIONS = {"max_items": 32, "lm_scored_tokens": 48, "blocks": "all", "heads": "all", "random_sets": 8}


def matmul_speed():
    """GFLOPS of a (512 x 640) @ (640 x 2048) linear in fp32 and bf16, with the current thread count."""
    a, w = torch.randn(512, 640), torch.randn(2048, 640)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dtype), w.to(dtype)
        torch.nn.functional.linear(x, y)
        start = time.perf_counter()
        for _ in range(5):
            torch.nn.functional.linear(x, y)
        seconds = (time.perf_counter() - start) / 5
        out[name] = round(2 * 512 * 640 * 2048 / seconds / 1e9, 1)
    return out


def _ratio_text(control):
    if not control:
        return "-"
    ratio, ci = control.get("ratio"), control.get("ratio_ci")
    text = f"{ratio:.1f}x" if ratio is not None else "unbounded"
    return text + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def real_run(args, console, teacher_name):
    """Localise one teacher of the recipe (its own run folder, so each teacher's result is reused on its own)."""
    from profile_real import ensure_gguf_cache, ensure_specialist

    recipe_path = Path(args.recipe).resolve()
    raw = yaml.safe_load(recipe_path.read_text())
    base = recipe_path.parent
    cache_dir = (base / raw.get("cache_dir", "/work/cache/gguf")).resolve()
    notes = []
    raw["teachers"] = [t for t in raw["teachers"] if t["name"] == teacher_name]
    raw["name"] = f"{raw['name']}-{teacher_name}"
    for teacher in raw["teachers"]:
        teacher["source"] = str((base / teacher["source"]).resolve())
        if teacher["name"] == SPECIALIST_TEACHER:
            if ensure_specialist(teacher["source"], console) is None:
                return None
        elif teacher["source"].endswith(".gguf"):
            ensure_gguf_cache(teacher, cache_dir)
        elif not (Path(teacher["source"]) / "config.json").is_file():
            console.print(f"[yellow]skipping {teacher_name}: no model at {teacher['source']}[/]")
            return None
    if not raw["teachers"][0]["source"].endswith(".gguf"):
        raw["stages"]["localise"] = {**raw["stages"]["localise"], **SMALL_TEACHER_OPTIONS}
    recipe = validate_recipe(raw, base_dir=base, source=recipe_path)
    start = time.perf_counter()
    fm = run_localise(recipe, console=console, force=args.force)
    seconds = time.perf_counter() - start
    console.print(localise_table(fm))
    rows = []
    table = Table(title="causal drop of the selected units vs random same-size sets (target >= 3x)")
    for col in ("teacher", "capability", "score vs chance", "units n/h", "drop [95% CI]", "random drop [95% CI]",
                "ratio [95% CI]", ">= 3x", "layer-matched ratio [95% CI]", "flagged layers"):
        table.add_column(col)
    for teacher in teachers_of(fm):
        for cap in capabilities_of(fm, teacher):
            e = fm[teacher][cap]
            p = e["presence"]
            row = {"teacher": teacher, "capability": cap, "present": e["present"], "score": p["score"],
                   "chance": p["chance"], "margin_ci": p["margin_ci"]}
            if not e["present"]:
                table.add_row(teacher, cap, f"{p['score']:.2f} vs {p['chance']:.2f}", "not present", "", "", "",
                              "", "", "")
                rows.append(row)
                continue
            c = e["causal"]
            ratio = c.get("ratio")
            meets = ratio is not None and ratio >= 3 or (ratio is None and (c.get("drop") or 0) > 0)
            ci = c.get("ratio_ci")
            flagged = e["perturbation"]["flagged_layers"]
            matched = c.get("layer_matched") or {}
            row.update({"layer_matched": matched, "reference_drop": c.get("reference_drop"),
                        "units": c["units"], "drop": c["drop"], "drop_ci": c.get("drop_ci"),
                        "random_drop": c.get("random_drop"), "random_drop_ci": c.get("random_drop_ci"),
                        "ratio": ratio, "ratio_ci": ci, "meets_3x": bool(meets), "confidence": e["confidence"],
                        "flagged_layers": flagged, "spectral": {k: e["spectral"].get(k) for k in ("write", "read")}})
            rows.append(row)
            table.add_row(
                teacher, cap, f"{p['score']:.2f} vs {p['chance']:.2f}",
                f"{c['units'].get('neuron', 0)}/{c['units'].get('head', 0)}",
                f"{c['drop']:.3f} [{c['drop_ci'][0]:.3f}, {c['drop_ci'][1]:.3f}]" if c.get("drop") is not None else "-",
                f"{c['random_drop']:.4f} [{c['random_drop_ci'][0]:.4f}, {c['random_drop_ci'][1]:.4f}]"
                if c.get("random_drop") is not None else "-",
                (f"{ratio:.1f}x" if ratio is not None else "unbounded") +
                (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""),
                "yes" if meets else "[red]no[/]", _ratio_text(matched), ",".join(map(str, flagged)) or "-")
    console.print(table)
    timing = Table(title="seconds per sub-stage: wall / CPU (this process, all threads)")
    timing.add_column("teacher")
    for stage in STAGES:
        timing.add_column(stage, justify="right")
    timing.add_column("passes", justify="right")
    for teacher in teachers_of(fm):
        wall, cpu = fm[teacher]["_seconds"], fm[teacher]["_cpu_seconds"]
        timing.add_row(teacher, *[f"{wall.get(s, 0):.0f} / {cpu.get(s, 0):.0f}" for s in STAGES],
                       str(fm[teacher]["_forwards"]))
    console.print(timing)
    for note in notes:
        console.print(f"[yellow]note: {note}[/]")
    return {"recipe": str(recipe_path), "path": fm["_path"], "reused": fm["_reused"], "seconds": round(seconds, 1),
            "notes": notes, "rows": rows,
            "timing": {t: {"wall": fm[t]["_seconds"], "cpu": fm[t]["_cpu_seconds"], "passes": fm[t]["_forwards"]}
                       for t in teachers_of(fm)}}


def scaling_run(console, depths=(2, 4, 8)):
    from nexus.conversion.recipe import CapabilitySpec
    from planted_model import planted_model, write_data

    options = LocaliseOptions(max_items=24, blocks="all", heads="all", autocast=False, random_sets=5,
                              test_both_selections=False, max_neuron_fraction=0.05)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_data(Path(tmp))
        caps = [CapabilitySpec(name="digits", probe="exact_match", data=str(folder / "digits.jsonl")),
                CapabilitySpec(name="markers", probe="exact_match", data=str(folder / "markers.jsonl")),
                CapabilitySpec(name="general", probe="lm", data=str(folder / "general.txt"),
                               options={"chunk_chars": 64})]
        refs = {"digits": ["markers", "general"], "markers": ["digits", "general"]}
        for depth in depths:
            model, tok, planted = planted_model(layers=depth, hidden=128, ffn=512, heads=8)
            entry = localise_model(model, tok, caps, refs, options, label=f"{depth} layers")
            found = {c: {(k, tuple(u)) for k in ("neuron", "head") for u in entry[c]["activation"]["selected"][k]}
                     for c in refs if entry[c]["present"]}
            truth = {c: {(k, tuple(u)) for k in ("neuron", "head") for u in planted[c][k]} for c in refs}
            results[depth] = {"wall": entry["_seconds"], "cpu": entry["_cpu_seconds"], "passes": entry["_forwards"],
                              "params": sum(p.numel() for p in model.parameters()),
                              "ratios": {c: entry[c]["causal"]["ratio"] for c in refs if entry[c]["present"]},
                              "selected": {c: len(v) for c, v in found.items()},
                              "precision_recall": {c: [round(len(v & truth[c]) / max(1, len(v)), 3),
                                                       round(len(v & truth[c]) / len(truth[c]), 3)]
                                                   for c, v in found.items()}}
    table = Table(title="cost against depth (planted Llama, hidden 128, FFN 512, 8 heads; every block and head)")
    table.add_column("stage")
    for depth in depths:
        table.add_column(f"{depth} layers: wall / CPU s", justify="right")
    table.add_column(f"growth exponent (CPU, {depths[0]}->{depths[-1]})", justify="right")
    for stage in STAGES:
        cells = [f"{results[d]['wall'].get(stage, 0):.2f} / {results[d]['cpu'].get(stage, 0):.2f}" for d in depths]
        lo, hi = results[depths[0]]["cpu"].get(stage, 0), results[depths[-1]]["cpu"].get(stage, 0)
        exponent = math.log(hi / lo) / math.log(depths[-1] / depths[0]) if lo > 0 and hi > 0 else float("nan")
        table.add_row(stage, *cells, f"{exponent:.2f}")
    table.add_row("passes over the items", *[str(results[d]["passes"]) for d in depths], "")
    table.add_row("planted units: precision/recall", *[
        " ".join(f"{c} {p:.2f}/{r:.2f}" for c, (p, r) in results[d]["precision_recall"].items()) for d in depths], "")
    console.print(table)
    return {str(d): r for d, r in results.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    parser.add_argument("--force", action="store_true", help="re-localise even if the inputs did not change")
    parser.add_argument("--teacher", action="append", help="localise only these recipe teachers (repeatable)")
    parser.add_argument("--skip-real", action="store_true", help="only the depth scaling")
    parser.add_argument("--skip-scaling", action="store_true", help="only the real teachers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    report = {"threads": torch.get_num_threads(), "matmul_gflops": matmul_speed()}
    console.print(f"matmul GFLOPS on this CPU ({report['threads']} threads): {report['matmul_gflops']}")
    out = RESULTS / "localise_real.json"
    if not args.skip_real:
        names = args.teacher or [t["name"] for t in yaml.safe_load(Path(args.recipe).read_text())["teachers"]]
        report["real"] = {}
        for name in names:
            result = real_run(args, console, name)
            if result is not None:
                report["real"][name] = result
    if not args.skip_scaling:
        report["scaling"] = scaling_run(console)
    latest = json.loads(out.read_text()) if out.is_file() else {}  # another run may have written meanwhile
    if "real" in report:
        report["real"] = {**(latest.get("real") or {}), **report["real"]}
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps({**latest, **report}, indent=2, default=str) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()

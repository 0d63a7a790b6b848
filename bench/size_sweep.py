"""Retention against student size (issue 16, item 4): Gemma-3-270M + the arithmetic and code specialists folded at
several fractions of the tower teachers' parameters, NEXUS and the baselines on the same items.

    python bench/size_sweep.py                                  # every point, NEXUS and the baselines
    python bench/size_sweep.py --points 0.25 --methods nexus    # one arm
    python bench/size_sweep.py --points 0.25 --methods nexus --long   # the issue's >= 1M-token budget
    python bench/size_sweep.py --plot-only                      # re-read the JSON, redraw the plot

Each point is `bench/compare_methods.py` on `recipes/size_sweep.yaml` with that point's ``budget_fraction`` and
``keep_top_tokens`` (POINTS below: how many of Gemma's most frequent tokens the trimmed vocabulary keeps beyond the
training text; smaller students keep fewer, since every token costs a row of the shared embedding and of each
own-vocabulary tower). Methods are compare_methods' variants: ``nexus`` and the baselines (a) ``random_init_kd``,
(b) ``magnitude_kd``, (c) ``minitron_kd``, (d) ``weight_pca_kd``, (f) ``fusellm_dense_kd``; (e) mergekit is recorded
as not applicable (no two of these teachers share an architecture). All share the point's budget, the distill
options (steps, batch, rows: the token budget is recorded per run) and the validate items.

Beside prose, code and arithmetic, every student is scored on **general text** that no training source holds
(Debian's license texts, `heldout_text.py`), against Gemma-3-270M, paired item by item: what consolidation costs
outside the capability corpora.

Writes one JSON per point and method under ``bench/results/size_sweep/<point>/`` (compare_methods' format, plus
``general_text``), the summary ``bench/results/size_sweep.json`` and the plot ``bench/RESULTS_size_sweep.png``
(retention vs parameters: the minimum over the three capabilities per method, and NEXUS per capability, with 95%
CIs). A finished (point, method) is reused unless ``--force``; stage folders under ``bench/out/size-sweep-runs/``.

``--distill-tokens all`` (or a count) replaces the recipe's ``distill.tokens`` cap for every arm, a change of the base
recipe: its runs go to a ``--results-dir`` of their own and pair only with each other (RESULTS.md renders each
baseline there against that folder's NEXUS, and each switched-on option against each baseline):

    python bench/size_sweep.py --points 0.25 --methods nexus minitron_kd manifold_on --distill-tokens all \
        --results-dir bench/results/size_sweep_all_text

``--long`` runs the arm with ``LONG_STEPS`` distill steps (issue 16's budget: >= 1M student training tokens at the two
larger points; each run records the tokens it saw) into ``bench/results/size_sweep/<point>/long/``, beside the
default-budget runs, so paired comparisons stay between runs of one budget.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_methods  # noqa: E402
from heldout_text import general_text_retention  # noqa: E402
from paths import ARTEFACTS, RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "recipes" / "size_sweep.yaml"
OUT = RESULTS / "size_sweep"
SUMMARY = RESULTS / "size_sweep.json"
PLOT = HERE / "RESULTS_size_sweep.png"
RUNS = ARTEFACTS / "size-sweep-runs"
BASE_TEACHER = "gemma-3-270m"
CAPABILITIES = ("prose", "code", "arithmetic")
METHODS = ("nexus", "random_init_kd", "magnitude_kd", "minitron_kd", "weight_pca_kd", "fusellm_dense_kd")
# issue 17, item 5: one NIWT part switched at a time against NEXUS at the same point (compare_methods' ablations;
# the ones that are not a switch in the pipeline are recorded with the reason)
ABLATIONS = ("no_dynamic_allocation", "no_allocation_selection", "no_teacher_embedding", "vocab_by_id",
             "preservation_on", "no_lmc", "no_localisation", "localisation_on", "no_ot_alignment", "no_manifold",
             "manifold_on", "distill_all_text")
# point (fraction of the tower teachers' parameters) -> student build overrides and distill steps
POINTS = {
    0.5: {"student_build": {"budget_fraction": 0.5, "keep_top_tokens": 40000}, "steps": 100},
    0.25: {"student_build": {"budget_fraction": 0.25, "keep_top_tokens": 16000}, "steps": 100},
    0.1: {"student_build": {"budget_fraction": 0.1, "keep_top_tokens": 0}, "steps": 100},
}


LONG_STEPS = 700  # ~1.04M training tokens on size_sweep.yaml (1,490.6 tokens per step measured at every point)
LONG = "long"  # sub-folder of a point holding its long-budget runs


def scale_name(point, long=False):
    return f"sweep-{point:g}" + ("-long" if long else "")


def point_folder(point, long=False):
    return OUT / f"{point:g}" / (LONG if long else "")


def register_point(point, steps, long=False, distill=None):
    """``distill``: options over the recipe's distill section for every arm (``--distill-tokens``); they change the
    base recipe, so such runs pair only with each other (their own ``--results-dir``)."""
    overrides = {"student_build": POINTS[point]["student_build"]}
    if distill:
        overrides["distill"] = distill
    compare_methods.SCALES[scale_name(point, long)] = {
        "recipe": RECIPE, "steps": steps, "out": point_folder(point, long),
        "runs": RUNS / (f"{point:g}-{LONG}" if long else f"{point:g}"),
        "groups": ("nexus", "baseline", "ablation"), "overrides": overrides}


def distill_tokens(value):
    """``--distill-tokens``: ``all`` (every chunk of each capability's training text) or a positive token count."""
    if value == "all":
        return None
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive token count, got {value!r}")
    return tokens


def add_general_text(point, method, force=False, long=False):
    """Score the (point, method) student on general text (once) and store it in its JSON."""
    path = point_folder(point, long) / f"{method}.json"
    record = json.loads(path.read_text())
    if record.get("status") != "done" or (record.get("general_text") and not force):
        return record
    from nexus.conversion.recipe import validate_recipe

    raw = compare_methods.recipe_file_raw(RECIPE, compare_methods.SCALES[scale_name(point, long)]["runs"])
    teacher = compare_methods.recipe_teacher_folders(validate_recipe(raw, base_dir=RUNS))[BASE_TEACHER]
    record["general_text"] = general_text_retention(record["paths"]["student"], teacher, scratch=RUNS)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, allow_nan=False))
    return record


def summary():
    """{point: {method: figures}} from every per-point JSON on disk; long-budget runs as ``<method>@long``."""
    out = {}
    for folder in sorted((p for p in OUT.glob("*") if p.is_dir()), key=lambda p: float(p.name)):
        for path in sorted(folder.glob("*.json")) + sorted((folder / LONG).glob("*.json")):
            r = json.loads(path.read_text())
            entry = {"status": r.get("status"), "reason": r.get("reason")}
            if r.get("status") == "done":
                g = r.get("general_text")
                entry.update({
                    "params": r["params"]["student"], "params_ratio": r["params"]["ratio"],
                    "budget": r["params"]["budget"], "budget_source": r["params"]["budget_source"],
                    "retention": {c: {"value": e["value"], "ci": e["ci"], "metric": e["metric"]}
                                  for c, e in r["retention"].items()},
                    "min": r["min"], "mean": r["mean"],
                    "general_text": ({"value": g["retention"], "ci": g["retention_ci"], "items": g["items"],
                                      "student_bpb": g["student_bpb"], "teacher_bpb": g["teacher_bpb"]}
                                     if g else None),
                    "train": {k: r["train"][k] for k in ("steps", "tokens", "wall_seconds")},
                    "router_accuracy": r.get("router_accuracy")})
            key = r["variant"] + (f"@{LONG}" if path.parent.name == LONG else "")
            out.setdefault(folder.name, {})[key] = entry
    return out


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = dict(zip(METHODS + (f"nexus@{LONG}",), "os^vDP*"))
    for method in markers:  # the ablations are a table, not lines on this plot
        pts = [(e["params_ratio"], e["min"]["value"], e["min"]["ci"]) for p in data.values()
               for m, e in p.items() if m == method and e["status"] == "done"]
        if not pts:
            continue
        pts.sort()
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        err = [[max(0.0, p[1] - p[2][0]) for p in pts], [max(0.0, p[2][1] - p[1]) for p in pts]]
        label = f"nexus, {LONG_STEPS} steps" if method == f"nexus@{LONG}" else method
        left.errorbar(x, y, yerr=err, marker=markers[method], capsize=3, label=label)
    left.set(xlabel="student parameters / teachers' parameters", ylabel="minimum retention (prose, code, arithmetic)",
             title="minimum retention vs size (95% CI)", ylim=(-0.05, 1.1))
    left.axhline(0, color="grey", lw=0.5)
    left.legend(fontsize=8)
    for cap in CAPABILITIES + ("general_text",):
        pts = []
        for p in data.values():
            e = p.get("nexus")
            if not e or e["status"] != "done":
                continue
            r = e["general_text"] if cap == "general_text" else e["retention"].get(cap)
            if r:
                pts.append((e["params_ratio"], r["value"], r["ci"]))
        if pts:
            pts.sort()
            right.errorbar([p[0] for p in pts], [p[1] for p in pts],
                           yerr=[[max(0.0, p[1] - p[2][0]) for p in pts], [max(0.0, p[2][1] - p[1]) for p in pts]],
                           marker="o", capsize=3, label=cap.replace("_", " "))
    right.set(xlabel="student parameters / teachers' parameters", ylabel="retention vs the best teacher",
              title="NEXUS per capability (95% CI)", ylim=(-0.05, 1.1))
    right.axhline(0, color="grey", lw=0.5)
    right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=float, nargs="+", default=list(POINTS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + ABLATIONS,
                        help="compare_methods variants: the baselines (default: all of them) or the ablations "
                             f"({', '.join(ABLATIONS)})")
    parser.add_argument("--steps", type=int, default=None, help="distill steps at every point (default: POINTS)")
    parser.add_argument("--long", action="store_true",
                        help=f"the >= 1M-token budget: {LONG_STEPS} steps, results under <point>/{LONG}/")
    parser.add_argument("--distill-tokens", type=distill_tokens, default=False, metavar="N|all",
                        help="every arm's distill.tokens (training text per capability; the recipe caps it): 'all' "
                             "or a count. A base-recipe change: use it with --results-dir")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="write the JSON (and this sweep's summary and plot) under DIR instead of "
                             "bench/results/size_sweep: a re-measurement on another machine, whose teacher scores "
                             "differ in the last digits and so cannot pair with the committed records")
    args = parser.parse_args()
    global OUT, SUMMARY, PLOT
    if args.results_dir is not None:
        OUT, SUMMARY, PLOT = args.results_dir, args.results_dir / "size_sweep.json", args.results_dir / "size_sweep.png"
    if args.distill_tokens is not False and args.results_dir is None:
        parser.error("--distill-tokens changes the base recipe: give it a --results-dir of its own (its runs pair "
                     "only with each other)")
    unknown = [p for p in args.points if p not in POINTS]
    if unknown:
        raise SystemExit(f"error: --points {unknown}: not in {list(POINTS)} (add a row to POINTS)")
    if not args.plot_only:
        from rich.console import Console

        for point in args.points:
            steps = args.steps or (LONG_STEPS if args.long else POINTS[point]["steps"])
            register_point(point, steps, args.long,
                           None if args.distill_tokens is False else {"tokens": args.distill_tokens})
            compare_methods.run_comparison(scale_name(point, args.long), only=args.methods, force=args.force,
                                           steps=steps, console=Console(width=200),
                                           show_progress=not args.no_progress)
            for method in args.methods:
                if (point_folder(point, args.long) / f"{method}.json").is_file():
                    add_general_text(point, method, force=args.force, long=args.long)
    data = summary()
    with atomic_file(SUMMARY) as tmp:
        tmp.write_text(json.dumps({"schema": "nexus.bench.size_sweep/1", "points": data}, indent=1, allow_nan=False))
    plot(data, PLOT)
    for point, methods in data.items():
        for method, e in methods.items():
            if e["status"] != "done":
                print(f"{point} {method}: {e['status']}")
                continue
            g = e["general_text"]
            print(f"{point} {method}: {e['params']:,} params ({e['params_ratio']:.3f}); "
                  + ", ".join(f"{c} {r['value']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
                              for c, r in e["retention"].items())
                  + f"; min {e['min']['value']:.3f}"
                  + (f"; general text {g['value']:.3f} [{g['ci'][0]:.3f}, {g['ci'][1]:.3f}]" if g else "")
                  + f"; {e['train']['tokens']:,} train tokens")
    print(f"wrote {SUMMARY} and {PLOT}")


if __name__ == "__main__":
    main()

"""The RESULTS.md section of the size sweep (issue 16), rendered from the committed JSON alone.

Reads ``bench/results/size_sweep/<point>/<method>.json`` (compare_methods' format, with ``general_text``) and the
long-budget runs in ``<point>/long/`` (``size_sweep.py --long``, shown as ``<method> (long)``): one row per point and
method (parameters, training tokens, retention per capability with CIs, minimum, general text), the
paired difference of each baseline's minimum from NEXUS's at the same point (same items, same resamples), and the
issue's goals with the measured figure beside each.

    python bench/results.py --committed-sections    # rewrites §5-§7 of bench/RESULTS.md in place
"""

from pathlib import Path

from ablation_section import UNPAIRED, ablation_lines, ablation_rows, remeasured_lines

TITLE = "## 5. Size sweep: Gemma-3-270M + the arithmetic and code specialists"
CAPABILITIES = ("prose", "code", "arithmetic")
# issue 16's goals: point -> (minimum over the three capabilities, general text or None)
GOALS = {"0.5": (0.97, 0.90), "0.25": (0.92, None)}
TOKEN_FLOOR = 1_000_000  # student training tokens at the two larger points
MEMORY_SLACK = 1.15  # measured peak within the planner's figure + 15%


def _points(folder):
    return sorted((p for p in Path(folder).glob("*") if p.is_dir()), key=lambda p: float(p.name))


def size_sweep_section(folder, load_compare, paired_delta, verdict, fmt_ci, md_table, png_name=None,
                       remeasured=()) -> list:
    """The section's lines (title excluded); the helpers are results.py's, passed in so there is one of each."""
    points = _points(folder)
    if not points:
        return [f"No size-sweep JSON in `{folder}`: run `python bench/size_sweep.py`."]
    rows, deltas, goals, missing, ablations, ablations_not_run, memory = [], [], [], [], [], [], []
    budgets = []  # NEXUS at the long budget minus NEXUS at the default one, same items
    for point in points:
        records = load_compare(point)
        long_records = load_compare(point / "long")
        nexus, long_nexus = (rs.get("nexus") if rs.get("nexus", {}).get("status") == "done" else None
                             for rs in (records, long_records))
        runs = [(n, r, "") for n, r in records.items()] + [(n, r, " (long)") for n, r in long_records.items()]
        for name, r, budget in runs:
            reference = long_nexus if budget else nexus
            if r.get("group") == "ablation":
                continue
            if r.get("status") != "done":
                missing.append(f"{point.name} {name}{budget}: {r.get('status')} ({r.get('reason', '')})")
                continue
            for stage in ("student_build", "distill"):
                m = (r.get("memory") or {}).get(stage)
                if m and m.get("planned_bytes") and m.get("measured_peak_bytes") and not m.get("reused"):
                    ratio = m["measured_peak_bytes"] / m["planned_bytes"]
                    memory.append([point.name, name + budget, stage, f"{m['planned_bytes'] / 2**20:,.0f}",
                                   f"{m['measured_peak_bytes'] / 2**20:,.0f}", f"{ratio:.3f}",
                                   "within" if ratio <= MEMORY_SLACK else "**over**"])
            g = r.get("general_text")
            general = {"value": g["retention"], "ci": g["retention_ci"]} if g else None
            rows.append([point.name, name + budget, f"{r['params']['student']:,} ({r['params']['ratio']:.3f})",
                         f"{r['train']['tokens']:,} ({r['train']['steps']} steps)",
                         *[fmt_ci(r["retention"].get(c)) for c in CAPABILITIES], fmt_ci(r["min"]),
                         fmt_ci(general) if general else "not scored"])
            if reference is not None and name != "nexus":
                d = paired_delta(r, reference)
                deltas.append([point.name, name + budget, fmt_ci(d and d["min"], signed=True),
                               verdict(d["min"]) if d else UNPAIRED])
        rows_a, not_run_a = ablation_rows(point.name, records, paired_delta, verdict, fmt_ci)
        ablations += rows_a
        ablations_not_run += not_run_a
        stale_long = False
        if long_nexus is not None and nexus is not None:
            d = paired_delta(long_nexus, nexus)
            stale_long = d is None
            budgets.append([point.name, f"{long_nexus['train']['tokens']:,} vs {nexus['train']['tokens']:,}",
                            *[fmt_ci(d and d["per_capability"].get(c), signed=True) for c in CAPABILITIES],
                            fmt_ci(d and d["min"], signed=True),
                            {"**NEXUS better**": "**long worse**", "**NEXUS worse**": "**long better**"}.get(
                                verdict(d["min"]), verdict(d["min"])) if d else UNPAIRED])
        if long_nexus is not None and not stale_long and (nexus is None or long_nexus["train"]["tokens"]
                                                          > nexus["train"]["tokens"]):
            nexus = long_nexus  # the goals are read off the run with the most training tokens (of this recipe)
        elif stale_long and point.name in GOALS:
            goals.append([point.name, "run the goals are read off", "the default-budget NEXUS run: the long run "
                          "predates its base recipe (re-run `size_sweep.py --long`)", "–"])
        if nexus is not None and point.name in GOALS:
            floor, general_floor = GOALS[point.name]
            m = nexus["min"]
            goals.append([point.name, f"min ≥ {floor}", fmt_ci(m), "met" if m["value"] >= floor else "**missed**"])
            tokens = nexus["train"]["tokens"]
            goals.append([point.name, f"train tokens ≥ {TOKEN_FLOOR:,}", f"{tokens:,}",
                          "met" if tokens >= TOKEN_FLOOR else "**missed**"])
            g = nexus.get("general_text")
            if general_floor is not None and g:
                goals.append([point.name, f"general text ≥ {general_floor}",
                              fmt_ci({"value": g["retention"], "ci": g["retention_ci"]}),
                              "met" if g["retention"] >= general_floor else "**missed**"])
    out = ["Generated from `bench/results/size_sweep/<point>/<method>.json` (`python bench/size_sweep.py`). Point = "
           "the student's budget as a fraction of the tower teachers' summed parameters; retention vs each "
           "capability's best teacher with paired bootstrap 95% CIs; general text = Debian's license texts, held out "
           "from every training source, scored against Gemma-3-270M (bits per byte).", "",
           md_table(["point", "method", "params (ratio)", "train tokens", *CAPABILITIES, "min", "general text"], rows)]
    if png_name:
        out += ["", f"![size sweep]({png_name})"]
    if deltas:
        out += ["", "Baseline minus NEXUS, minimum retention, same items and resamples:", "",
                md_table(["point", "method", "Δ min vs NEXUS [95% CI]", "verdict"], deltas)]
    if budgets:
        out += ["", "NEXUS at the long budget minus NEXUS at the default budget (same items and resamples):", "",
                md_table(["point", "train tokens", *[f"Δ {c}" for c in CAPABILITIES], "Δ min", "verdict"], budgets)]
    if goals:
        out += ["", "Issue 16's goals:", "", md_table(["point", "goal", "NEXUS", ""], goals)]
    if memory:
        out += ["", f"Peak RSS of each stage against the plan made just before it (issue 16 item 5: within the plan "
                    f"+{MEMORY_SLACK - 1:.0%}):", "",
                md_table(["point", "method", "stage", "planned MiB", "measured peak MiB", "measured / plan", ""],
                         memory)]
    if ablations or ablations_not_run:
        out += ["", "### Ablations on the Gemma case (issue 17, item 5): one NIWT part switched at a time", "",
                *ablation_lines(ablations, ablations_not_run, md_table)]
    for extra in remeasured:  # ablations re-run with their own NEXUS arm elsewhere (size_sweep.py --results-dir)
        lines = remeasured_lines(extra, load_compare, paired_delta, verdict, fmt_ci, md_table, reference=folder)
        if lines:
            out += ["", *lines]
    measured = {(p.name, n) for p in points for n, r in load_compare(p).items() if r.get("status") == "done"}
    import size_sweep

    not_run = [f"{p:g} {m}" for p in size_sweep.POINTS for m in size_sweep.METHODS if (f"{p:g}", m) not in measured]
    if not_run or missing:
        out += ["", "Not measured yet: " + ", ".join(not_run + missing) + "."]
    return out

"""Ablation tables rendered from compare_methods JSON: one NIWT part switched at a time against NEXUS on the same
items, the paired difference per capability and of the minimum (issue 17, item 5).

Used by the size sweep's section (the Gemma case, per point, and its re-measurements in a folder of their own,
``size_sweep.py --results-dir``) and by the localisation section (the demo specialists,
``bench/results/compare-localisation/``)."""

from pathlib import Path

CAPABILITIES = ("prose", "code", "arithmetic")
TITLE_LOCALISATION = "## 7. Localisation driving the student (demo specialists)"
HEADER = ["point", "ablation", "min [95% CI]", *(f"Δ {c}" for c in CAPABILITIES), "Δ min", "verdict (min)"]
UNPAIRED = "not paired with this NEXUS run (another base recipe or other items): re-run it"
INTRO = ("Ablation minus NEXUS at the same point, same items and resamples (a CI below 0: the part NEXUS runs helps, "
         "or the switched-on option hurts; above 0: the switched-on option helps).")


def ablation_rows(point, records, paired_delta, verdict, fmt_ci) -> tuple[list, list]:
    """(table rows, "not measured" lines) of the ablation records among ``records`` at ``point``."""
    nexus = records.get("nexus") if records.get("nexus", {}).get("status") == "done" else None
    rows, not_run = [], []
    for name, r in records.items():
        if r.get("group") != "ablation":
            continue
        if r.get("status") != "done":
            not_run.append(f"- {point} **{r.get('label', name)}**: {r.get('status')} — {r.get('reason', '')}")
        elif nexus is not None:
            d = paired_delta(r, nexus)
            rows.append([point, r.get("label", name), fmt_ci(r["min"]),
                         *[fmt_ci((d or {}).get("per_capability", {}).get(c), signed=True) for c in CAPABILITIES],
                         fmt_ci((d or {}).get("min"), signed=True), verdict(d["min"]) if d else UNPAIRED])
    return rows, not_run


def ablation_lines(rows, not_run, md_table) -> list:
    out = [INTRO, ""]
    if rows:
        out += [md_table(HEADER, rows)]
    if not_run:
        out += ["", "Not measured (with the reason):", "", *not_run]
    return out


def localisation_section(folder, load_compare, paired_delta, verdict, fmt_ci, md_table) -> list:
    """The demo-specialist localisation ablations (`bench/compare_methods.py --scale bench --out FOLDER`)."""
    records = load_compare(Path(folder)) if Path(folder).is_dir() else {}
    nexus = records.get("nexus")
    if not nexus or nexus.get("status") != "done":
        name = Path(folder).name
        return [f"No NEXUS run in `bench/results/{name}/` yet: run `python bench/compare_methods.py --scale bench "
                f"--out bench/results/{name} --only nexus --only localisation_on --only preservation_critical`."]
    rows, not_run = ablation_rows("demo", records, paired_delta, verdict, fmt_ci)
    tr = nexus["train"]
    return ([f"Generated from `{Path(folder).name}/*.json` (`python bench/compare_methods.py --scale bench --out "
             f"bench/results/{Path(folder).name} --only nexus --only localisation_on --only preservation_critical "
             "--only preservation_on`): the three demo specialists (prose, code, arithmetic), NEXUS at "
             f"{nexus['params']['student']:,} params ({nexus['params']['ratio']:.3f} of the teachers), "
             f"{tr['steps']} distill steps, {tr['tokens']:,} student training tokens; NEXUS min "
             f"{fmt_ci(nexus['min'])}. 'localisation ON' adds the localise stage: the student build keeps the units "
             "whose selection beat random units in the causal check; 'preservation ON, critical units' also "
             "protects exactly those units while distilling.", ""]
            + ablation_lines(rows, not_run, md_table))


def _distill_flag(record) -> str:
    """The ``size_sweep.py --distill-tokens`` a record's base recipe was run with ('' when none)."""
    distill = (record.get("base_overrides") or {}).get("distill") or {}
    if "tokens" not in distill:
        return ""
    return f" --distill-tokens {'all' if distill['tokens'] is None else distill['tokens']}"


def option_verdict(delta, verdict) -> str:
    """Who wins on a difference (option - baseline) with its CI, in the words of `results.verdict` (which reads a
    difference variant - NEXUS): a CI above 0 means the option is better, below 0 the baseline."""
    said = verdict(delta)
    return {"**NEXUS better**": "**baseline better**", "**NEXUS worse**": "**option better**"}.get(said, said)


def remeasured_lines(folder, load_compare, paired_delta, verdict, fmt_ci, md_table, reference=None) -> list:
    """Ablations and baselines re-measured with their own NEXUS run in ``folder`` (``size_sweep.py --points P
    --methods nexus ABLATION --results-dir folder``): both arms ran on one machine with the same code and teachers, so
    they pair with each other and not with the committed sweep (whose teachers were trained, and teacher rows scored,
    elsewhere). When that NEXUS run used another distill step count than ``reference``'s (the committed sweep) at its
    point and the two pair item by item (`paired_delta`: equal teacher rows and base recipe), the step count's effect
    is given too. Baselines in the folder get their difference from NEXUS, and each ablation its difference from each
    baseline (does the switched-on option close a gap to a baseline?)."""
    folder = Path(folder)
    points = sorted((p for p in folder.glob("*") if p.is_dir()), key=lambda p: float(p.name)) if folder.is_dir() else []
    rows, not_run, nexus_lines, baselines, versus = [], [], [], [], []
    for point in points:
        records = load_compare(point)
        nexus = records.get("nexus")
        if not nexus or nexus.get("status") != "done":
            continue
        r_rows, r_not_run = ablation_rows(point.name, records, paired_delta, verdict, fmt_ci)
        rows += r_rows
        not_run += r_not_run
        names = [n for n, r in records.items() if r.get("group") in ("baseline", "ablation")]
        done = {n: r for n, r in records.items() if n in names and r.get("status") == "done"}
        for name, r in done.items():
            if r.get("group") != "baseline":
                continue
            d = paired_delta(r, nexus)
            baselines.append([point.name, name, fmt_ci(r["min"]), fmt_ci(d and d["min"], signed=True),
                              verdict(d["min"]) if d else UNPAIRED])
            for a_name, a in done.items():
                if a.get("group") == "ablation":
                    d = paired_delta(a, r)
                    versus.append([point.name, a.get("label", a_name), name, fmt_ci(d and d["min"], signed=True),
                                   option_verdict(d["min"], verdict) if d else UNPAIRED])
        tr = nexus["train"]
        nexus_lines.append(f"- {point.name}: NEXUS {nexus['params']['student']:,} params "
                           f"({nexus['params']['ratio']:.3f}), {tr['steps']} distill steps, {tr['tokens']:,} "
                           f"student tokens, min {fmt_ci(nexus['min'])} (`python bench/size_sweep.py --points "
                           f"{point.name} --methods nexus {' '.join(names)} --steps {tr['steps']}"
                           f"{_distill_flag(nexus)} --results-dir bench/results/{folder.name}`;"
                           f" torch {nexus.get('torch', '?')}, {nexus.get('threads', '?')} thread(s))")
        base = load_compare(Path(reference) / point.name).get("nexus") if reference else None
        delta = paired_delta(nexus, base) if base and base["train"]["steps"] != tr["steps"] else None
        if delta:
            caps = ", ".join(f"{c} {fmt_ci(d, signed=True)}" for c, d in delta["per_capability"].items())
            nexus_lines.append(f"  - against the committed sweep's NEXUS at {base['train']['steps']} steps "
                               f"({base['train']['tokens']:,} tokens, min {fmt_ci(base['min'])}): paired Δ min "
                               f"{fmt_ci(delta['min'], signed=True)} ({caps})")
    if not rows and not not_run and not baselines:
        return []
    out = [f"Re-measured in `bench/results/{folder.name}/`: NEXUS and the other arms ran again on one machine with "
           "the same code and teachers, so they pair with each other; they pair with the table above only where a "
           "line below gives that paired Δ (the same teacher rows: same machine, same teachers):", "", *nexus_lines, ""]
    if rows or not_run:
        out += ablation_lines(rows, not_run, md_table)
    while out[-1] == "":
        out.pop()
    if baselines:
        out += ["", "Baseline minus NEXUS in this re-measurement, minimum retention, same items and resamples:", "",
                md_table(["point", "baseline", "min [95% CI]", "Δ min vs NEXUS", "verdict"], baselines)]
    if versus:
        out += ["", "Switched-on option minus baseline in this re-measurement (minimum retention, paired):", "",
                md_table(["point", "option", "baseline", "Δ min [95% CI]", "verdict"], versus)]
    return out

"""RESULTS.md §11 from ``bench/results/gemma_pair_acceptance.json`` (`bench/acceptance_gemma_pair.py`, issue 17's
acceptance run): ``nexus consolidate`` with localise + align + LMC refine on the same-family pair. Per stage its wall
seconds and its planned vs measured peak RAM; what localise selected per teacher and capability (units, the causal
drop against random units of the same size); what align merged; the LMC path's chosen α and barrier; the student's
retention per capability; and, when the run was validated on the same items as the comparison's align_ot run (the
same pair, budget and distillation without localise), the paired difference: localise's own effect on this pair."""

import json
from pathlib import Path

TITLE = "## 11. Every optional stage on: consolidate with localise + align + LMC on the same-family pair (issue 17)"
COMMAND = "python bench/acceptance_gemma_pair.py"
MIB = 1024 * 1024


def _mib(value):
    return "–" if value is None else f"{value / MIB:,.0f}"


def _ratio(entry):
    if not entry or entry.get("ratio") is None:
        return "–"
    ci = entry.get("ratio_ci")
    return f"{entry['ratio']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def acceptance_section(path, fmt_ci, md_table, verdict) -> list:
    path = Path(path)
    if not path.is_file():
        return [f"Not run yet: `{COMMAND}` (writes `bench/results/{path.name}`)."]
    d = json.loads(path.read_text())
    cost = d["cost"]
    plans, measured = d["memory"]["plans_bytes"], d["memory"]["measured_peak_rss_bytes"] or {}
    if cost.get("peak_rss_source") or not measured:
        peak = f"peak RSS {cost['peak_rss_mb']:,.0f} MiB"
    else:  # a record from before bench/child_process.py sampled the child: its figure is the last stage's peak only
        peak = (f"peak RSS {max(measured.values()) / 2**20:,.0f} MiB (the largest stage peak below; the process-level "
                f"figure this record holds, {cost['peak_rss_mb']:,.0f} MiB, is its last stage's only: the pipeline "
                "resets the kernel's high-water mark before each stage)")
    lines = [f"From `bench/results/{path.name}` (`{COMMAND}`; recipe `{d['recipe']}`): `nexus consolidate` ran the "
             f"stages {', '.join(d['stages'])} end to end; its last invocation (a run resumes the stages an "
             f"interrupted one finished) took {cost['wall_seconds']:,.0f} s with {cost['threads']} thread(s); "
             f"{peak}; exit code {cost['exit_code']} (3: the validation gate failed, the student is still exported). "
             f"Student {d['student_params']:,} params ({d['params_ratio']:.3f} of the teachers).", ""]
    lines += [md_table(["stage", "planned peak RAM (MiB)", "measured peak RSS (MiB)"],
                       [[s, _mib(plans.get(s)), _mib(measured.get(s))] for s in d["stages"]]), ""]
    if d.get("localise"):
        rows = []
        for teacher, entry in d["localise"].items():
            for cap, e in entry["capabilities"].items():
                units = e.get("units")
                size = "–" if units is None else ", ".join(f"{v} {k}s" for k, v in units.items() if v) or "none"
                rows.append([teacher, cap, "yes" if e.get("present") else "no", size, _ratio(e),
                             "–" if entry.get("seconds") is None else f"{entry['seconds']:,.0f}"])
        lines += ["What localise selected (units; causal drop of the selection ÷ that of random units of the same "
                  "size, 95% CI; the teacher's localisation seconds):", "",
                  md_table(["teacher", "capability", "present", "selected", "drop ratio vs random", "seconds"], rows),
                  ""]
    merged = d["align"]["merged"]
    lines += ["align: " + ("; ".join(f"{m['name']} ({m['method']}) merged into one tower serving "
                                     f"{', '.join(m['capabilities'])}" for m in merged) if merged else
                         "nothing merged") + ".", ""]
    lmc = d.get("lmc") or {}
    if lmc:
        lines += [f"LMC refine: α = {lmc.get('best_alpha')} chosen on held-out data, barrier "
                  f"{lmc.get('barrier'):.4f}." if lmc.get("barrier") is not None else
                  f"LMC refine: α = {lmc.get('best_alpha')}.", ""]
    rows = [[cap, e["teacher"], e["metric"], e["n"], fmt_ci(e)] for cap, e in d["retention"].items()]
    lines += [md_table(["capability", "teacher", "metric", "items", "retention [95% CI]"], rows), "",
              f"Minimum retention {fmt_ci(d['min'])}.", ""]
    effect = d.get("localise_effect")
    if effect:
        delta = effect["delta"]
        caps = ", ".join(f"{c} {fmt_ci(e, signed=True)}" for c, e in delta["per_capability"].items())
        lines += [f"Localise's own effect on this pair: this run minus `{effect['record']}` (align ON without "
                  f"localise, min {fmt_ci(effect['other_min'])}), same items and resamples: min "
                  f"{fmt_ci(delta['min'], signed=True)}, {verdict(delta['min']).replace('NEXUS', 'without localise')}"
                  f"; per capability {caps}."]
    else:
        lines += ["Localise's own effect: not paired with the align_ot comparison run (other items)."]
    return lines

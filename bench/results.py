"""Render bench/RESULTS.md (+ bench/RESULTS_retention.png) purely from the result JSON under bench/results/
(committed; issue 7).

    python bench/results.py [--compare-dir bench/results/compare] [--gemma-dir bench/results/compare-gemma]
                            [--results-dir bench/results] [--md bench/RESULTS.md]

Sections: (1) quality at equal budget and (2) ablations from ``<compare-dir>/*.json`` (written by
`compare_methods.py`), (1b) the same on Gemma-3-270M + the arithmetic specialist from ``<gemma-dir>/*.json``
(`compare_methods.py --scale gemma`; figure ``RESULTS_retention_gemma.png``), (3) throughput and memory from
``<results-dir>/throughput_compare.json`` and (4) inference from ``<results-dir>/inference_speed.json`` when they
exist (rendered generically: whatever keys they hold). Every number is read from those files or computed from the
per-item rows they hold: the difference from NEXUS of a variant's retention is a paired bootstrap over the same items
with the same resamples the validate stage drew (student and teacher rows resampled together), so its 95% CI says
whether NEXUS wins, loses or cannot be told apart. Nothing is run here except that bootstrap.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py, also when a test loads this by file path
from paths import RESULTS  # noqa: E402
import ablation_section as ablation_md  # noqa: E402
import add_teacher_section as add_teacher_md  # noqa: E402
import acceptance_section as acceptance_md  # noqa: E402
import align_section as align_md  # noqa: E402
import allocation_proxy_section as proxy_md  # noqa: E402
import claims_section as claims_md  # noqa: E402
import size_sweep_section as size_sweep_md  # noqa: E402
import speech_section as speech_md  # noqa: E402

HERE = Path(__file__).resolve().parent
CAPS_ORDER = ("prose", "code", "arithmetic")
MAX_LIST = 8  # lists of scalars longer than this are summarised, not printed
MAX_LEVEL = 5  # generic JSON: nested entries below #####-headings are named, not printed


# ------------------------------------------------------------------------------------------------ loading


def load_compare(folder: Path) -> dict:
    """{variant: record} of every comparison JSON, in registry order."""
    records = {}
    for path in sorted(Path(folder).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("schema", "").startswith("nexus.bench.compare/"):
            records[record["variant"]] = record
    return dict(sorted(records.items(), key=lambda kv: kv[1].get("order", 0)))


def resolved(records: dict, name: str) -> dict | None:
    """The record holding ``name``'s numbers (following ``same_as``), or None when it has none yet."""
    record = records.get(name)
    seen = set()
    while record is not None and record.get("status") == "same_run" and name not in seen:
        seen.add(name)
        name = record["same_as"]
        record = records.get(name)
    return record if record is not None and record.get("status") == "done" else None


# ------------------------------------------------------------------------------------------------ paired deltas


def _retention_samples(block, rows_key="student"):
    from nexus.conversion.retention import resample_indices, retention_samples

    s, t = np.asarray(block[rows_key], dtype=np.float64), np.asarray(block["teacher_rows"], dtype=np.float64)
    idx = resample_indices(len(s), block["n_bootstrap"], block["bootstrap_seed"])
    return retention_samples(s, t, block["lower_is_better"], idx)


def _ci(samples):
    from nexus.conversion.retention import percentile_ci

    return percentile_ci(samples)


TEACHER_ROWS_RTOL = 1e-4


def same_teacher_rows(a, b) -> bool:
    """The same items scored by the same teacher: equal shapes, values within TEACHER_ROWS_RTOL."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=TEACHER_ROWS_RTOL, atol=0.0))


def unpaired_reason(a: dict, b: dict) -> str | None:
    """Why two records must not be compared item by item (None: they may): built from different base recipes
    (`compare_methods.base_recipe_sha256`; records from before the hash was recorded carry none, and pair only with
    each other), or, when both record it, resolved with other code defaults (`compare_methods.resolved_recipe_sha256`)."""
    ha, hb = a.get("base_recipe_sha256"), b.get("base_recipe_sha256")
    if ha != hb:
        return ("built from another base recipe: re-run" if ha and hb else
                "one run predates the current base recipe: re-run it")
    ra, rb = a.get("resolved_recipe_sha256"), b.get("resolved_recipe_sha256")
    if ra and rb and ra != rb:  # (records from before this hash was recorded pair by the file's hash alone)
        return "built with other code defaults (the resolved recipe differs): re-run"
    return None


def paired_delta(variant: dict, nexus: dict) -> dict | None:
    """Variant minus NEXUS retention per capability, and of the minimum and the mean, with paired bootstrap CIs.

    The same items and resample indices serve both students (the bootstrap seed and the teacher rows must match, else
    None: they were not validated on the same items), and both come from one base recipe (`unpaired_reason`).
    Teacher rows match within TEACHER_ROWS_RTOL: the teacher scored
    in two runs (bf16 autocast) differs in the last digits on the same items."""
    if unpaired_reason(variant, nexus):
        return None
    caps = [c for c in nexus["items"] if c in variant["items"]]
    if not caps:
        return None
    per, v_stack, n_stack = {}, [], []
    for cap in caps:
        a, b = variant["items"][cap], nexus["items"][cap]
        if (a["bootstrap_seed"], a["n_bootstrap"], a["metric"]) != (b["bootstrap_seed"], b["n_bootstrap"], b["metric"]) \
                or not same_teacher_rows(a["teacher_rows"], b["teacher_rows"]):
            return None
        va, vb = _retention_samples(a), _retention_samples(b)
        value = variant["retention"][cap]["value"], nexus["retention"][cap]["value"]
        if None in value:
            continue
        per[cap] = {"value": value[0] - value[1], "ci": _ci(va - vb)}
        v_stack.append(va)
        n_stack.append(vb)
    if not per:
        return None
    va, vb = np.stack(v_stack), np.stack(n_stack)  # (C, B): capabilities resampled independently, jointly paired
    values_v = [variant["retention"][c]["value"] for c in per]
    values_n = [nexus["retention"][c]["value"] for c in per]
    out = {"per_capability": per,
           "min": {"value": min(values_v) - min(values_n), "ci": _ci(va.min(0) - vb.min(0))},
           "mean": {"value": float(np.mean(values_v) - np.mean(values_n)), "ci": _ci(va.mean(0) - vb.mean(0))}}
    return out


def verdict(delta) -> str:
    """Who wins on a difference (variant - NEXUS) with its CI."""
    if delta is None or delta.get("ci") is None:
        return "n/a"
    lo, hi = delta["ci"]
    if delta["value"] == lo == hi == 0:
        return "identical scores"
    if hi < 0:
        return "**NEXUS better**"
    if lo > 0:
        return "**NEXUS worse**"
    return "no clear difference"


# ------------------------------------------------------------------------------------------------ formatting


def fmt_ci(entry, digits=3, signed=False):
    if entry is None or entry.get("value") is None:
        return "–"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    ci = entry.get("ci")
    return f.format(entry["value"]) + (f" [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else "")


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _caps(records):
    seen = []
    for r in records.values():
        for c in r.get("retention", {}):
            if c not in seen:
                seen.append(c)
    return sorted(seen, key=lambda c: CAPS_ORDER.index(c) if c in CAPS_ORDER else len(CAPS_ORDER))


def quality_rows(records, group_names, nexus, caps):
    rows, notes = [], []
    for name in group_names:
        record = records[name]
        data = resolved(records, name)
        if data is None:
            status = record.get("status")
            reason = record.get("reason") or "not run yet"
            rows.append([record["label"], f"*{status.replace('_', ' ')}*"] + [""] * (len(caps) + 5))
            notes.append((record["label"], status, reason, record.get("evidence")))
            continue
        delta = paired_delta(data, nexus) if nexus is not None and data is not nexus else None
        p = data["params"]
        row = [record["label"] + (f" (= {record['same_as']})" if record.get("same_as") else ""),
               f"{p['student']:,} ({p['ratio']:.3f})", f"{data['train']['tokens']:,} / {data['train']['steps']}"]
        row += [fmt_ci(data["retention"].get(c)) for c in caps]
        row += [fmt_ci(data["min"]), fmt_ci(data["mean"])]
        if data is nexus:
            row += ["(reference)", ""]
        else:
            row += [fmt_ci(delta["min"], signed=True) if delta else "n/a", verdict(delta["min"]) if delta else "n/a"]
        rows.append(row)
    return rows, notes


def deltas_from_nexus(records, names, nexus):
    """(name, paired_delta or None) of every variant in ``names`` that has numbers and is not NEXUS itself."""
    for name in names:
        data = resolved(records, name)
        if data is not None and nexus is not None and data is not nexus:
            yield name, paired_delta(data, nexus)


def delta_rows(records, names, nexus, caps):
    rows = []
    for name, delta in deltas_from_nexus(records, names, nexus):
        if delta is None:
            rows.append([records[name]["label"]] + ["n/a (not validated on the same items)"] * (len(caps) + 2))
            continue
        rows.append([records[name]["label"]]
                    + [fmt_ci(delta["per_capability"].get(c), signed=True) + " " + verdict(delta["per_capability"].get(c))
                       if c in delta["per_capability"] else "–" for c in caps]
                    + [fmt_ci(delta["min"], signed=True) + " " + verdict(delta["min"]),
                       fmt_ci(delta["mean"], signed=True) + " " + verdict(delta["mean"])])
    return rows


def notes_block(notes):
    lines = []
    for label, status, reason, evidence in notes:
        lines.append(f"- **{label}** — {status.replace('_', ' ')}: {reason}")
        if evidence and evidence.get("teachers"):
            shapes = "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for t, s in
                               evidence["teachers"].items())
            lines.append(f"  - evidence (from the teachers' configs): {shapes}; groups sharing an architecture: "
                         f"{evidence.get('groups_sharing_an_architecture') or 'none'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ figure


def retention_figure(records, names, caps, path: Path):
    """Horizontal bars: retention per capability and the minimum, with 95% CI whiskers, one group per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nexus.conversion.atomic_output import atomic_file

    shown = [(records[n]["label"], resolved(records, n)) for n in names if resolved(records, n) is not None]
    if not shown:
        return None
    series = list(caps) + ["min"]
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(shown) * len(series) / 2 + 1.5))
    try:
        for j, key in enumerate(series):
            ys, xs, lo, hi = [], [], [], []
            for i, (_, data) in enumerate(shown):
                entry = data["min"] if key == "min" else data["retention"].get(key)
                if entry is None or entry.get("value") is None:
                    continue
                ys.append(i + j * height)
                xs.append(entry["value"])
                ci = entry.get("ci") or [entry["value"], entry["value"]]
                lo.append(entry["value"] - ci[0])
                hi.append(ci[1] - entry["value"])
            ax.barh(ys, xs, height=height, xerr=[lo, hi], capsize=2, label=key)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(shown))])
        ax.set_yticklabels([label for label, _ in shown], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("retention vs the best teacher (1.0 = parity), 95% CI")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=len(series))
        ax.set_title("quality at equal parameter budget and training steps")
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ generic JSON


def _scalar(v):
    return isinstance(v, (str, int, float, bool)) or v is None


def _fmt_scalar(v):
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "–" if v is None else str(v)


def _fmt_list(values):
    if all(_scalar(x) for x in values):
        if len(values) <= MAX_LIST:
            return ", ".join(_fmt_scalar(x) for x in values)
        nums = [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if nums:
            return f"{len(values)} values, median {_fmt_scalar(float(np.median(nums)))}"
        return f"{len(values)} values"
    return f"{len(values)} entries"


def where_nexus_loses(records, names, nexus) -> list:
    """(label, capability or min/mean, delta) wherever a variant's paired difference from NEXUS has its CI above 0."""
    out = []
    for name, delta in deltas_from_nexus(records, names, nexus):
        if delta is None:
            continue
        for what, d in [*delta["per_capability"].items(), ("min", delta["min"]), ("mean", delta["mean"])]:
            if d["ci"] is not None and d["ci"][0] > 0:
                out.append((records[name]["label"], what, d))
    return out


def under_budget(records, names, slack=0.02) -> list:
    """Variants whose student uses less than (1 - slack) of the parameter budget."""
    out = []
    for name in names:
        data = resolved(records, name)
        if data is not None and data["params"]["student"] < (1 - slack) * data["params"]["budget"]:
            out.append((records[name]["label"], data["params"]["student"] / data["params"]["budget"]))
    return out


def group_section(records, names, nexus, caps, header, delta_intro, not_run_title, png_path=None) -> list:
    """The lines of one table section: retention table, (figure), paired differences, not-run reasons, row notes."""
    rows, notes = quality_rows(records, names, nexus, caps)
    parts = ["", md_table(header, rows)]
    losses = where_nexus_loses(records, names, nexus)
    parts += ["", "**Where NEXUS loses** (a paired difference whose 95% CI lies above 0): "
              + ("; ".join(f"{label} on {what}: {fmt_ci(d, signed=True)}" for label, what, d in losses)
                 if losses else "nowhere in this table.")]
    small = under_budget(records, names)
    if small:
        parts += ["", "Below the parameter budget (the allocator left part of it unused; these students are "
                      "smaller than the others): " + "; ".join(f"{label}: {r:.3f} of the budget" for label, r in small)
                  + "."]
    if png_path is not None and retention_figure(records, list(records), caps, png_path):
        parts += ["", f"![retention per variant]({png_path.name})"]
    drows = delta_rows(records, [n for n in names if n != "nexus"], nexus, caps)
    if drows:
        parts += ["", delta_intro, "", md_table(["variant"] + [f"Δ {c}" for c in caps] + ["Δ min", "Δ mean"], drows)]
    if notes:
        parts += ["", not_run_title, "", notes_block(notes)]
    parts += ["", "What each row is:", ""]
    parts += [f"- **{records[n]['label']}**: {records[n]['method']}"
              + (f" (switches: `{json.dumps(records[n]['switches'])}`)" if any(records[n]["switches"].values()) else "")
              for n in names if records[n].get("method")]
    return parts



def throughput_section(d) -> list:
    """`bench/throughput_compare.py`'s JSON: tokens/s per method, ratios with their per-round range, memory."""
    cfg = d.get("config", {})
    per_step = cfg.get("per_step", {})
    out = [(f"Teacher `{cfg.get('teacher')}` ({_fmt_scalar(cfg.get('teacher_params'))} params), student "
           f"{_fmt_scalar(cfg.get('student_params'))} params; {cfg.get('rounds')} rounds x {cfg.get('steps')} steps of "
           f"{cfg.get('batch')} x {cfg.get('seq_len')} tokens, {cfg.get('threads')} thread(s), {cfg.get('dtype')}, "
           f"trl {cfg.get('trl')}."), "",
           md_table(["method", "tokens/s (median)", "what one step does"],
                    [[k, _fmt_scalar(v), per_step.get(k, "")] for k, v in d.get("tokens_per_s", {}).items()])]
    ranges = d.get("ratio_ranges", {})
    out += ["", md_table(["ratio", "median", "range over rounds"],
                         [[k, _fmt_scalar(v), _fmt_list(ranges.get(k, []))] for k, v in d.get("ratios", {}).items()])]
    if d.get("amortised_by_epochs"):
        out += ["", ("NEXUS incl. its cache build when each cached token is trained on this many times (derived from "
                    "the medians above):"), "",
                md_table(["epochs", "tokens/s", "ratio to GKD"],
                         [[k, _fmt_scalar(v.get("tokens_per_s")), _fmt_scalar(v.get("ratio_to_gkd"))]
                          for k, v in d["amortised_by_epochs"].items()])]
    check = d.get("objective_check")
    if check:
        out += ["", "Objectives on the same batch: " + "; ".join(f"{k} {_fmt_scalar(v)}" for k, v in check.items()
                                                             if not isinstance(v, dict)) + "."]
    mem = d.get("memory") or {}
    peaks = mem.get("peak_rss_mib") or d.get("peak_rss_mib") or {}
    if peaks:
        above = mem.get("above_floor_mib", {})
        out += ["", "Peak RSS (VmHWM), each in a fresh child process:", "",
                md_table(["measurement", "peak MiB", "above the import floor (MiB)"],
                         [[k, _fmt_scalar(v), _fmt_scalar(above.get(k, "–"))] for k, v in peaks.items()])]
        if "ratio_all_resident_to_one_at_a_time" in mem:
            out += ["", (f"All teachers resident ÷ one at a time: {mem['ratio_all_resident_to_one_at_a_time']:.3f} "
                        f"(above the floor: {_fmt_scalar(mem.get('ratio_above_floor'))}).")]
    return out


def inference_section(d) -> list:
    """`bench/inference_speed.py`'s JSON: Nexus vs the HF class of the same dims, forward and generate."""
    out = [f"{d.get('note', '')}; threads {d.get('threads')}, torch {d.get('torch')}.", ""]
    rows = []
    for shape, r in d.get("results", {}).items():
        dims = ", ".join(f"{k} {v}" for k, v in r.get("dims", {}).items())
        for row in r.get("rows", []):
            rows.append([f"{shape} vs {r.get('baseline')} ({dims})", row["kind"], row["precision"],
                         _fmt_scalar(row["hf_tokens_per_s"]), _fmt_scalar(row["nexus_tokens_per_s"]),
                         _fmt_scalar(row["ratio_nexus_over_hf"]), _fmt_scalar(row.get("ratio_nexus_over_hf_cpu_time")),
                         _fmt_scalar(r.get("fp32_max_abs_logit_diff"))])
    out.append(md_table(["shape", "call", "precision", "HF tok/s", "Nexus tok/s", "Nexus ÷ HF (wall)",
                         "Nexus ÷ HF (CPU time)", "max abs logit diff (fp32)"], rows))
    return out


def quality_section(records, title, png_path, expected_scale) -> list:
    """Sections 1 (and 2 when there are ablations) for one folder of comparison JSON."""
    scales = sorted({r.get("scale") for r in records.values()})
    nexus = resolved(records, "nexus")
    caps = _caps(records)
    done = [r for r in records.values() if r.get("status") == "done"]
    steps = sorted({r["train"]["steps"] for r in done})
    tokens = sorted({r["train"]["tokens"] for r in done})
    budgets = sorted({r["params"]["budget"] for r in done})
    parts = ["", title, ""] if title else []
    if scales != [expected_scale]:
        parts.append(f"**Scale: {', '.join(map(str, scales))} (expected {expected_scale}): a smoke run on tiny "
                     "specialists or a mixed folder; these numbers are measured but say nothing about the methods.**\n")
    parts.append(f"Every run: one shared profile and validation item set; student budget {budgets} params; "
                 f"distill steps {steps}, student training tokens {tokens}"
                 + ("" if len(steps) <= 1 and len(tokens) <= 1 else
                    " — **the runs do NOT share one training budget; compare with care**")
                 + f"; threads {sorted({r.get('threads') for r in done})}. Params column: the student's count "
                   "(its ratio to the teachers' sum).")
    if nexus is not None:
        teachers_intro = ("The teachers each retention is measured against (the profile's best per capability, "
                          "scored on the same held-out items; a teacher that is not competent makes retention "
                          "meaningless):")
        parts += ["", teachers_intro, "", md_table(["capability", "best teacher", "metric", "teacher score", "competent",
                                                    "items"],
                                                   [[c, e["teacher"], e["metric"], _fmt_scalar(e["teacher_score"]),
                                                     _fmt_scalar(e.get("competent")), _fmt_scalar(e["n"])]
                                                    for c, e in nexus["retention"].items()])]
        if nexus.get("undefined"):
            parts += ["", "Retention undefined (shown as –): " + "; ".join(f"{c}: {why}" for c, why in
                                                                      nexus["undefined"].items()) + "."]
    header = ["variant", "params (ratio)", "train tokens / steps"] + caps + ["min [95% CI]", "mean [95% CI]",
                                                                             "Δ min vs NEXUS", "verdict (min)"]
    groups = {g: [n for n, r in records.items() if r["group"] == g] for g in ("nexus", "baseline", "ablation")}
    parts += group_section(records, groups["nexus"] + groups["baseline"], nexus, caps, header,
                           "Paired differences from NEXUS (variant − NEXUS), per capability:", "Not run:",
                           png_path)
    if groups["ablation"]:
        parts += ["", "## 2. Ablations: one NIWT part switched at a time"]
        parts += group_section(records, groups["ablation"], nexus, caps, header,
                               "Contribution of each part = NEXUS − ablation, i.e. minus these differences "
                               "(variant − NEXUS, paired 95% CIs):", "Not measured (with the reason):")

    time_rows = [[r["label"], *(f"{r['seconds'].get(k, 0):.0f}" for k in ("student_build", "distill", "validate")),
                  f"{sum(r['seconds'].values()):.0f}", f"{r['train']['tokens_per_second']:.0f}"]
                 for r in done]
    parts += ["", "### Time per variant (seconds, as each stage recorded it)", "",
              md_table(["variant", "student build", "distill", "validate", "total", "train tok/s"], time_rows)]
    return parts


def render(compare_dir: Path, out_dir: Path, md_path: Path, png_path: Path, gemma_dir: Path | None = None,
           gemma_png_path: Path | None = None) -> str:
    records = load_compare(compare_dir)
    intro = ("Generated by `python bench/results.py` from the JSON files under `bench/results/` (nothing here is "
             "typed by hand). Retention = student ÷ best teacher on the same held-out items (bits per byte for prose and "
             "code, exact match for arithmetic), 1.0 = parity, with paired bootstrap 95% CIs. \"Δ vs NEXUS\" is the "
             "variant's retention minus NEXUS's on the same items and resamples: a CI below 0 means NEXUS is "
             "better, above 0 that the variant is better (the table then says **NEXUS worse**).")
    parts = ["# NEXUS benchmarks", "", intro]
    if records:
        parts += quality_section(records, "## 1. Quality at equal budget (demo specialists)", png_path,
                                 expected_scale="bench")
    else:
        parts += ["", "## 1–2. Quality at equal budget, ablations", "",
                  f"No comparison JSON in `{compare_dir}`: run `python bench/compare_methods.py`."]
    gemma = load_compare(gemma_dir) if gemma_dir is not None else {}
    parts += ["", "## 1b. Quality at equal budget: Gemma-3-270M + the arithmetic specialist", ""]
    if gemma:
        parts += quality_section(gemma, None, gemma_png_path, expected_scale="gemma")
    else:
        parts += [f"No comparison JSON in `{gemma_dir}`: run `python bench/compare_methods.py --scale gemma`."]

    for n, (name, title, renderer) in enumerate((
            ("throughput_compare.json", "Throughput and memory", throughput_section),
            ("inference_speed.json", "Inference: Nexus vs HF of the same dims", inference_section)), start=3):
        path = Path(out_dir) / name
        parts += ["", f"## {n}. {title}", ""]
        if path.is_file():
            parts += [f"From `{path.name}` (speeds are ratios measured in one run, never compared across runs).", "",
                      *renderer(json.loads(path.read_text()))]
        else:
            parts += [f"`{path.name}` not found in `{out_dir}`: not measured yet."]
    parts += ["", size_sweep_md.TITLE, "", *sweep_lines(Path(out_dir))]
    parts += ["", claims_md.TITLE, "", *claims_lines(Path(out_dir))]
    parts += ["", ablation_md.TITLE_LOCALISATION, "", *localisation_lines(Path(out_dir))]
    parts += ["", proxy_md.TITLE, "", *proxy_md.allocation_proxy_section(Path(out_dir) / "allocation_proxy.json",
                                                                         fmt_ci, md_table)]
    parts += ["", add_teacher_md.TITLE, "", *add_teacher_md.add_teacher_section(Path(out_dir) / "add_teacher.json",
                                                                                fmt_ci, md_table)]
    parts += ["", align_md.TITLE, "", *align_lines(Path(out_dir))]
    parts += ["", acceptance_md.TITLE, "", *acceptance_lines(Path(out_dir))]
    parts += ["", speech_md.TITLE, "", *speech_md.speech_section(Path(out_dir) / "speech_encoder.json", md_table)]
    text = "\n".join(parts) + "\n"
    from nexus.conversion.atomic_output import atomic_file

    with atomic_file(md_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return text


def sweep_lines(out_dir: Path) -> list:
    return size_sweep_md.size_sweep_section(out_dir / "size_sweep", load_compare, paired_delta, verdict, fmt_ci,
                                            md_table, png_name="RESULTS_size_sweep.png",
                                            remeasured=[out_dir / "size_sweep_localise", out_dir / "size_sweep_300",
                                                        out_dir / "size_sweep_all_text"])


def claims_lines(out_dir: Path) -> list:
    return claims_md.claims_section(out_dir / "size_sweep", load_compare, paired_delta, fmt_ci, md_table,
                                    pair_folder=out_dir / "gemma_pair")


def align_lines(out_dir: Path) -> list:
    return align_md.align_section(out_dir / "gemma_pair", load_compare, paired_delta, verdict, fmt_ci, md_table,
                                  align_json=out_dir / "align_gemma_pair.json",
                                  identity_json=out_dir / "align_merge_identity.json", unpaired_reason=unpaired_reason)


def acceptance_lines(out_dir: Path) -> list:
    return acceptance_md.acceptance_section(out_dir / "gemma_pair_acceptance.json", fmt_ci, md_table, verdict)


def localisation_lines(out_dir: Path) -> list:
    return ablation_md.localisation_section(out_dir / "compare-localisation", load_compare, paired_delta, verdict,
                                            fmt_ci, md_table)


def replace_section(md_path: Path, title: str, lines: list) -> str:
    """Rewrite one ``## `` section of an existing RESULTS.md (appended when absent), leaving the others as they are:
    the sections whose JSON is not on this machine are not wiped by a re-render of one."""
    from nexus.conversion.atomic_output import atomic_file

    old = md_path.read_text(encoding="utf-8").rstrip("\n").split("\n") if md_path.is_file() else []
    start = old.index(title) if title in old else len(old)
    end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
    text = "\n".join(old[:start] + ([""] if start == len(old) else []) + [title, ""] + lines
                     + ([""] + old[end:] if end < len(old) else [])) + "\n"
    with atomic_file(md_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-dir", type=Path, default=RESULTS / "compare")
    parser.add_argument("--gemma-dir", type=Path, default=RESULTS / "compare-gemma",
                        help="compare_methods.py --scale gemma's JSON")
    parser.add_argument("--results-dir", "--out-dir", dest="out_dir", metavar="DIR", type=Path, default=RESULTS,
                        help="where the other benches' result JSON are (--out-dir: the old name)")
    parser.add_argument("--md", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--png", type=Path, default=None, help="default: RESULTS_retention.png beside --md")
    parser.add_argument("--committed-sections", action="store_true",
                        help="rewrite only §5 (size sweep), §6 (claims), §7 (localisation), §8 (allocation "
                             "proxy), §9 (add-teacher), §10 (same-family merge), §11 (every optional stage on) and §12 (speech), the "
                             "sections whose JSON is committed, in --md (the other sections' JSON may not be on this machine)")
    args = parser.parse_args(argv)
    if args.committed_sections:
        replace_section(args.md, size_sweep_md.TITLE, sweep_lines(args.out_dir))
        replace_section(args.md, claims_md.TITLE, claims_lines(args.out_dir))
        replace_section(args.md, ablation_md.TITLE_LOCALISATION, localisation_lines(args.out_dir))
        replace_section(args.md, proxy_md.TITLE, proxy_md.allocation_proxy_section(
            args.out_dir / "allocation_proxy.json", fmt_ci, md_table))
        replace_section(args.md, add_teacher_md.TITLE, add_teacher_md.add_teacher_section(
            args.out_dir / "add_teacher.json", fmt_ci, md_table))
        replace_section(args.md, align_md.TITLE, align_lines(args.out_dir))
        replace_section(args.md, acceptance_md.TITLE, acceptance_lines(args.out_dir))
        text = replace_section(args.md, speech_md.TITLE, speech_md.speech_section(
            args.out_dir / "speech_encoder.json", md_table))
        print(text)
        return text
    png = args.png or args.md.with_name("RESULTS_retention.png")
    text = render(args.compare_dir, args.out_dir, args.md, png, args.gemma_dir,
                  png.with_name(png.stem + "_gemma" + png.suffix))
    print(text)
    return text


if __name__ == "__main__":
    main()

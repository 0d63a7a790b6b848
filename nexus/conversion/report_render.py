"""How a validation report is shown: ``report.json`` -> ``report.md`` + PNGs, and the checkpoint's ``model_card.md``.

Figures (each only when the report has its data):

- ``retention.png``: retention per capability against its best teacher (the one the gate uses), a bar and a dot
  with the 95% CI whisker and the value written above (a 0 stays visible); a dashed line at parity (1.0) and a red
  one at the gate's threshold. Retention against the other teachers is in ``report.md``'s table;
- ``feature_map.png``: teacher x capability heatmap of the localiser's overall confidence (from a
  ``feature_map.json``), plus the localiser's own per-teacher layer heatmaps (``heatmap-<teacher>.png``);
- ``lmc.png``: the score along a linear-mode-connectivity path (``report["lmc"]``: ``alphas`` and ``scores``);
- ``interference.png``: phase x capability change in retention.

`render_model_card` fills a template whose every number comes from the report: the template itself may hold no
digit outside its ``{placeholders}`` (checked), and every value is formatted from a report field.
"""

import math
import re
from pathlib import Path

from .atomic_output import atomic_file

DIGITS = 3

MODEL_CARD_TEMPLATE = """\
---
library_name: transformers
pipeline_tag: text-generation
tags: [nexus, niwt, multi-teacher-distillation, custom_code]
---

# {model_name}

A NEXUS student: {n_towers} tower(s) behind a router, consolidated from {n_teachers} teacher(s) by NIWT.
It has {student_params} parameters, {params_ratio} of its teachers' summed {teacher_params_total}.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
# the folder `nexus export` wrote (the path below), or its Hub id once pushed
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
```

Force a tower with `capability="..."` or `tower=...` in `forward` / `generate`; by default the router picks one
tower per sequence and only that tower runs.

## Teachers

{teachers_table}

## Retention (student ÷ teacher on the same items, bootstrap {ci_percent}% CI)

{no_competent_teacher}{retention_table}

Minimum over capabilities: {retention_min}. Mean: {retention_mean}.

{gate}

## How it was made

{stages_table}
"""


# ---------------------------------------------------------------- formatting (every number passes through here)


def fmt(x, digits=DIGITS):
    """A report number as text: ints as they are, floats rounded to ``digits`` decimals, None as n/a."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def fmt_ci(ci, digits=DIGITS):
    return "n/a" if not ci else f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def _with_ci(entry):
    return "n/a" if not entry else f"{fmt(entry.get('value'))} {fmt_ci(entry.get('ci'))}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _arrow(lower):
    return "↓" if lower else "↑"


# ---------------------------------------------------------------- tables


NO_COMPETENT = "no competent teacher"


def _no_competent(report):
    return report.get("no_competent_teacher") or {}


def no_competent_line(report):
    """The warning a report opens with when some capability has no competent teacher ("" when none)."""
    caps = _no_competent(report)
    if not caps:
        return ""
    parts = []
    for cap, e in caps.items():
        base = e.get("baseline") or {}
        parts.append(f"{cap} (best teacher {e.get('teacher')}: {e.get('metric')} {fmt(e.get('teacher_score'))} "
                     f"{fmt_ci(e.get('teacher_score_ci'))} vs trivial baseline {fmt(base.get('score'))}"
                     + (f", {base['kind']}" if base.get("kind") else "") + ")")
    return (f"**⚠ {NO_COMPETENT.capitalize()}**: " + "; ".join(parts) + ". No teacher is clear of the trivial "
            "baseline, so no retention number is given for it; the minimum and the means are over the remaining "
            "capabilities.")


def retention_rows(report):
    """Header and rows of the retention table: capabilities with no competent teacher first (no retention number),
    then every capability's retention against its best teacher."""
    ci = f"{report['ci_percent']}% CI"
    header = ["capability", "vs teacher", "metric", "retention", ci, "student", "teacher", "teacher competent"]
    rows = []
    for cap, e in _no_competent(report).items():
        arrow = "" if e.get("higher_is_better") is None else " " + _arrow(not e["higher_is_better"])
        rows.append([cap, e.get("teacher"), f"{e.get('metric')}{arrow}", f"**{NO_COMPETENT}**", "-",
                     fmt(e.get("student_score")), fmt(e.get("teacher_score")), "no"])
    for cap, e in report["retention"].items():
        rows.append([cap, e["teacher"], f"{e['metric']} {_arrow(e['lower_is_better'])}", fmt(e["value"]),
                     fmt_ci(e["ci"]), fmt(e["student_score"]), fmt(e["teacher_score"]),
                     {True: "yes", False: "no", None: "n/a"}[e.get("competent")]])
    return header, rows


def per_teacher_rows(report):
    header = ["capability", "teacher", "metric", "retention", f"{report['ci_percent']}% CI", "bpb retention",
              "same tokenisation"]
    rows = []
    for cap, by_teacher in report["per_teacher"].items():
        for teacher, e in by_teacher.items():
            bpb = (f"{fmt(e['bpb_value'])} {fmt_ci(e['bpb_ci'])}" if "bpb_value" in e
                   else (f"{fmt(e['value'])} {fmt_ci(e['ci'])}" if e["metric"] == "bpb" else "-"))
            rows.append([cap, teacher, e["metric"], fmt(e["value"]), fmt_ci(e["ci"]), bpb,
                         "yes" if e.get("same_tokenization") else "no"])
    return header, rows


def _summary_line(report):
    if report.get("min") is None:
        return "No capability has a defined retention."
    m = report["min"]
    return (f"Minimum retention {_with_ci(m)} ({m['capability']}); mean {_with_ci(report['mean'])}; "
            f"weighted mean {_with_ci(report['weighted_mean'])}.")


def _gate_line(report):
    gate = report["gate"]
    if not gate.get("requested"):
        return "Gate: not requested."
    verdict = "PASSED" if gate["passed"] else "FAILED"
    failed = f" Below the threshold: {', '.join(gate['failed'])}." if gate.get("failed") else ""
    return f"Gate ({gate['statistic']} of the minimum ≥ {fmt(gate['threshold'])}): **{verdict}**.{failed}"


def report_markdown(report, figures=None):
    """The whole report as Markdown (figures: name -> file name relative to the report)."""
    figures = figures or {}
    parts = [f"# Validation of {report['recipe']}", ""]
    if _no_competent(report):  # first: these capabilities have no retention number at all
        parts += [no_competent_line(report), ""]
    parts += [f"Student: `{report['student']['path']}` "
              f"({report['student_params']} parameters; teachers: "
              + ", ".join(f"{t} {n}" for t, n in report["teacher_params"].items()) + ").", "",
              report["definition"] + ".", "", _summary_line(report), "", _gate_line(report), ""]
    if report.get("competence_waived"):
        parts += ["Kept although no teacher is competent (require_competent_teacher: false; retention compares "
                  "with a teacher that has not learnt the task): " + ", ".join(report["competence_waived"]) + ".", ""]
    parts += ["## Retention against each capability's best teacher", "", _table(*retention_rows(report)), ""]
    if "retention" in figures:
        parts += [f"![retention]({figures['retention']})", ""]
    if report.get("undefined"):
        parts += ["Undefined (left out of the minimum and mean): "
                  + "; ".join(f"{c}: {why}" for c, why in report["undefined"].items()), ""]
    parts += ["## Retention against every teacher", "", _table(*per_teacher_rows(report)), ""]
    parts += ["## Layer-level CKA (student vs teacher hidden states)", ""]
    rows = []
    for teacher, by_cap in report["cka"].items():
        for cap, e in by_cap.items():
            if "skipped" in e:
                rows.append([teacher, cap, e["skipped"], "-", "-"])
            else:
                layers = " ".join(fmt(x) for x in e["per_layer"])
                rows.append([teacher, cap, layers, fmt(min((x for x in e["per_layer"] if x is not None),
                                                            default=None)), e["tokens"]])
    parts += [_table(["teacher", "capability", "CKA per layer (embeddings first)", "min", "tokens"], rows), ""]
    inter = report.get("interference")
    if inter:
        parts += ["## Interference (change in retention after each phase)", "", inter["definition"] + ".", ""]
        header = ["phase"] + list(inter["capabilities"])
        rows = [[phase] + [f"{fmt(d)} {fmt_ci(ci)}" for d, ci in zip(deltas, cis)]
                for phase, deltas, cis in zip(inter["delta_rows"], inter["delta"], inter["delta_ci"])]
        parts += [_table(header, rows), ""]
        rows = [[phase] + [f"{fmt(v)} {fmt_ci(ci)}" for v, ci in zip(vals, cis)]
                for phase, vals, cis in zip(inter["phases"], inter["retention"], inter["retention_ci"])]
        parts += ["Retention of each phase's checkpoint:", "", _table(header, rows), ""]
        if "interference" in figures:
            parts += [f"![interference]({figures['interference']})", ""]
    if report.get("lm_eval"):
        parts += lm_eval_section(report["lm_eval"])
    for key, title in (("feature_map", "Feature map (localiser confidence)"), ("lmc", "LMC path")):
        if key in figures:
            parts += [f"## {title}", "", f"![{key}]({figures[key]})", ""]
    for name in figures.get("feature_map_layers", []):
        parts += [f"![layers]({name})", ""]
    if report.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(parts)


def lm_eval_section(tasks):
    """The report's lm-eval tasks as Markdown: one row per task and model, score with its CI and stderr."""
    rows = []
    for task, t in tasks.items():
        for name, e in t["models"].items():
            rows.append([task, t["metric"] + " " + _arrow(not t["higher_is_better"]), name,
                         f"{fmt(e.get('score'))} {fmt_ci(e.get('ci'))}", fmt(e.get("stderr")), e.get("n", t["n"])])
    note = next(iter(tasks.values()))["ci"]
    return ["## lm-eval tasks", "", f"Local lm-eval tasks through HFLM ({note}).", "",
            _table(["task", "metric", "model", "score [95% CI]", "stderr", "n"], rows), ""]


# ---------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    plt = _plt()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def write_retention_plot(report, path):
    """Per capability, the student's retention against its best teacher: a bar, a dot at the value (so a retention
    of 0 shows), its CI whisker and the value written above; the y-axis spans these values only (0 to a little over
    max(1, the highest CI bound)), so a teacher the student is not compared with for the gate cannot stretch it."""
    plt = _plt()
    caps = list(report["per_teacher"])
    xs, ys, lo, hi, labels, missing = [], [], [], [], [], []
    for i, cap in enumerate(caps):
        teacher = report["best"].get(cap)
        e = report["per_teacher"][cap].get(teacher) if teacher is not None else None
        labels.append(f"{cap} ({e['metric']})\nvs {teacher}" if e is not None else cap)
        if e is None or e["value"] is None:
            missing.append(i)
            continue
        ci = e["ci"] or [e["value"], e["value"]]
        xs.append(i)
        ys.append(e["value"])
        lo.append(max(0.0, e["value"] - ci[0]))
        hi.append(max(0.0, ci[1] - e["value"]))
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(caps), 3.6))
    ax.bar(xs, ys, 0.6, color="tab:blue", alpha=0.55, label="best teacher")
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color="black", capsize=4, markersize=5,
                label=f"{report['ci_percent']}% CI")
    for x, y, up in zip(xs, ys, hi):
        ax.text(x, y + up + 0.02, fmt(y), ha="center", va="bottom", fontsize=8)
    for i in missing:
        ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="parity")
    threshold = report["gate"].get("threshold")
    if threshold is not None:
        ax.axhline(threshold, color="red", linewidth=1, label="gate")
    top = max([1.0] + [y + up for y, up in zip(ys, hi)])
    ax.set_ylim(-0.05, top + 0.15)  # below 0, so a point at 0 sits clear of the axis
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(caps)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(caps) - 0.4)
    ax.set_ylabel("retention (student ÷ best teacher)")
    ax.set_title(f"retention vs the best teacher per capability, {report['ci_percent']}% CI", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def write_feature_map_heatmap(fm, path):
    """Teacher x capability heatmap of the localiser's overall confidence (grey: capability not present)."""
    import numpy as np

    from .feature_map import capabilities_of, teachers_of

    plt = _plt()
    teachers = teachers_of(fm)
    caps = []
    for t in teachers:
        caps += [c for c in capabilities_of(fm, t) if c not in caps]
    data = np.full((len(teachers), len(caps)), np.nan)
    for i, t in enumerate(teachers):
        for j, c in enumerate(caps):
            entry = fm[t].get(c)
            if entry and entry.get("present"):
                value = entry["confidence"].get("overall")
                data[i, j] = np.nan if value is None else value
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(caps), 1.4 + 0.5 * len(teachers)))
    im = ax.imshow(np.ma.masked_invalid(data), vmin=0.0, vmax=1.0, aspect="auto",
                   cmap=plt.get_cmap("viridis").with_extremes(bad="#dddddd"))
    for i in range(len(teachers)):
        for j in range(len(caps)):
            ax.text(j, i, "not present" if np.isnan(data[i, j]) else fmt(float(data[i, j]), 2),
                    ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(caps)), caps)
    ax.set_yticks(range(len(teachers)), teachers)
    ax.set_title("feature map: localisation confidence (overall)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def write_lmc_plot(lmc, path):
    """Score along the interpolation path (alpha 0 -> 1), one line per curve, the endpoints' chord dashed, the
    chosen alpha marked. Reads nexus/training/lmc.py's ``lmc.json`` (``alphas``, ``scores``, ``chord``, ``best_alpha``,
    ``barrier``, ``score_name``) or ``{"alphas", "scores": {NAME: [...]}, "chosen_alpha"}``."""
    plt = _plt()
    curves = lmc["scores"] if isinstance(lmc["scores"], dict) else {lmc.get("score_name", "score"): lmc["scores"]}
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for name, values in curves.items():
        ax.plot(lmc["alphas"], [math.nan if v is None else v for v in values], marker="o", label=name)
    if lmc.get("chord"):
        ax.plot(lmc["alphas"], lmc["chord"], "--", color="gray", label="chord of the endpoints")
    chosen = lmc.get("chosen_alpha", lmc.get("best_alpha"))
    if chosen is not None:
        ax.axvline(chosen, color="red", linestyle=":", label="chosen α")
    labels = lmc.get("labels") or ["A", "B"]
    ax.set_xlabel(f"α: {labels[0]} (0) → {labels[-1]} (1)")
    ax.set_ylabel(lmc.get("score_name", lmc.get("metric", "score")))
    barrier = f"; barrier {fmt(lmc['barrier'])}" if lmc.get("barrier") is not None else ""
    ax.set_title(f"linear mode connectivity path{barrier}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def write_interference_plot(inter, path):
    import numpy as np

    plt = _plt()
    data = np.array([[math.nan if d is None else d for d in row] for row in inter["delta"]], dtype=float)
    bound = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(inter["capabilities"]), 1.4 + 0.5 * len(inter["delta_rows"])))
    im = ax.imshow(data, cmap="RdBu", vmin=-bound or -1, vmax=bound or 1, aspect="auto")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, fmt(None if np.isnan(data[i, j]) else float(data[i, j])), ha="center", va="center",
                    fontsize=8)
    ax.set_xticks(range(len(inter["capabilities"])), inter["capabilities"])
    ax.set_yticks(range(len(inter["delta_rows"])), [f"after {p}" for p in inter["delta_rows"]])
    ax.set_title("interference: change in retention per phase (blue = better)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def render_report(report, folder, feature_map=None):
    """Write ``report.md`` and its PNGs into ``folder``; ``feature_map`` is a feature-map dict or a path to one.
    Returns {name: path} of everything written."""
    folder = Path(folder)
    written, figures = {}, {}
    written["retention"] = write_retention_plot(report, folder / "retention.png")
    figures["retention"] = "retention.png"
    if feature_map is not None:
        from .feature_map import load_feature_map, write_heatmaps

        fm = load_feature_map(feature_map) if isinstance(feature_map, (str, Path)) else feature_map
        written["feature_map"] = write_feature_map_heatmap(fm, folder / "feature_map.png")
        figures["feature_map"] = "feature_map.png"
        layers = write_heatmaps(fm, folder)
        figures["feature_map_layers"] = [p.name for p in layers]
        written.update({f"feature_map_{p.stem}": p for p in layers})
    if report.get("lmc"):
        written["lmc"] = write_lmc_plot(report["lmc"], folder / "lmc.png")
        figures["lmc"] = "lmc.png"
    if report.get("interference") and report["interference"]["delta_rows"]:
        written["interference"] = write_interference_plot(report["interference"], folder / "interference.png")
        figures["interference"] = "interference.png"
    with atomic_file(folder / "report.md") as tmp:
        tmp.write_text(report_markdown(report, figures), encoding="utf-8")
    written["markdown"] = folder / "report.md"
    return written


# ---------------------------------------------------------------- model card


def _check_template(template):
    literal = re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", "", template)
    found = re.search(r"\d+", literal)
    if found:
        start = max(0, found.start() - 30)
        raise ValueError(f"model card template holds a literal number {found.group()!r} (near "
                         f"{literal[start:found.end() + 10]!r}); every number must come from the report: use a "
                         "{placeholder}")


def _run_relative(artefact):
    """A stage's artefact folder as the card shows it: ``<run>/<stage>``, never an absolute local path."""
    parts = Path(str(artefact)).parts
    return Path(*parts[-2:]).as_posix() if Path(str(artefact)).is_absolute() and len(parts) > 2 else str(artefact)


def card_fields(report, model_name=None, repo_id=None):
    """Every placeholder's text, formatted from the report only."""
    name = model_name or f"{report['recipe']}-nexus"
    best_of = {}
    for cap, teacher in report["best"].items():
        best_of.setdefault(teacher, []).append(cap + (f" ({NO_COMPETENT})" if cap in _no_competent(report) else ""))
    teachers = _table(["teacher", "parameters", "best at"],
                      [[t, fmt(n), ", ".join(best_of.get(t, [])) or "-"] for t, n in report["teacher_params"].items()])
    header, rows = retention_rows(report)
    stages = report.get("provenance", {}).get("stages") or []
    stage_rows = [[s["stage"], f"`{_run_relative(s['artefact'])}`"] for s in stages]
    stage_rows.append(["validate", "this card's report"])
    total = sum(n for n in report["teacher_params"].values() if n)
    gate = report["gate"]
    return {
        "model_name": name,
        "repo_id": repo_id or name,
        "n_towers": fmt(report["student"]["n_towers"]),
        "n_teachers": fmt(report["n_teachers"]),
        "student_params": fmt(report["student_params"]),
        "teacher_params_total": fmt(report["teacher_params_total"]) if "teacher_params_total" in report
        else fmt(total),
        "params_ratio": fmt(report["params_ratio"]),
        "ci_percent": fmt(report["ci_percent"]),
        "teachers_table": teachers,
        "retention_table": _table(header, rows),
        "no_competent_teacher": (no_competent_line(report) + "\n\n") if _no_competent(report) else "",
        "retention_min": (_with_ci(report["min"]) + f" ({report['min']['capability']})") if report.get("min")
        else "n/a",
        "retention_mean": _with_ci(report.get("mean")),
        "gate": _gate_line(report) if gate.get("requested") else "",
        "stages_table": _table(["stage", "artefact"], stage_rows),
    }


def render_model_card(report, template=None, model_name=None, repo_id=None):
    """``model_card.md`` text for the validated checkpoint. ``template``: its text or a path (default:
    `MODEL_CARD_TEMPLATE`); it may hold no literal digit, so every number in the card comes from ``report``."""
    if template is None:
        template = MODEL_CARD_TEMPLATE
    elif isinstance(template, Path) or ("\n" not in template and Path(template).is_file()):
        template = Path(template).read_text(encoding="utf-8")
    _check_template(template)
    fields = card_fields(report, model_name, repo_id)
    try:
        return template.format(**fields)
    except KeyError as exc:
        raise ValueError(f"model card template uses an unknown field {exc}; fields: {', '.join(sorted(fields))}") \
            from None


# ---------------------------------------------------------------- terminal


def validation_table(report):
    """A rich renderable for the terminal: retention vs the best and every teacher, min/mean, CKA, interference,
    gate."""
    from rich.console import Group
    from rich.table import Table

    teachers = list(report["teacher_params"])
    table = Table(title=f"retention of {report['recipe']}: student ÷ teacher [{report['ci_percent']}% CI]")
    table.add_column("capability", style="cyan", no_wrap=True)
    table.add_column("metric")
    table.add_column("vs best", justify="right")
    for t in teachers:
        table.add_column(f"vs {t}", justify="right")
    for cap, e in _no_competent(report).items():
        table.add_row(f"[bold red]{cap}[/]", f"{e.get('metric')}", f"[bold red]{NO_COMPETENT}[/] ({e.get('teacher')})",
                      *["-" for _ in teachers])
    for cap, e in report["retention"].items():
        cells = [f"{cap}", f"{e['metric']} {_arrow(e['lower_is_better'])}",
                 f"[bold]{fmt(e['value'])} {fmt_ci(e['ci'])}[/] ({e['teacher']})"]
        for t in teachers:
            p = report["per_teacher"][cap].get(t)
            cells.append("-" if p is None else f"{fmt(p['value'])} {fmt_ci(p['ci'])} {p['metric']}")
        table.add_row(*cells)
    table.caption = _summary_line(report)
    parts = [table]
    cka = []
    for teacher, by_cap in report["cka"].items():
        for cap, e in by_cap.items():
            cka.append(f"CKA {teacher} x {cap}: " + (e["skipped"] if "skipped" in e
                                                      else " ".join(fmt(x) for x in e["per_layer"])))
    parts += cka
    inter = report.get("interference")
    if inter:
        t = Table(title="interference: change in retention after each phase [CI]")
        t.add_column("phase", style="cyan")
        for cap in inter["capabilities"]:
            t.add_column(cap, justify="right")
        for phase, deltas, cis in zip(inter["delta_rows"], inter["delta"], inter["delta_ci"]):
            t.add_row(phase, *[f"{fmt(d)} {fmt_ci(ci)}" for d, ci in zip(deltas, cis)])
        parts.append(t)
    parts.append(f"student {report['student_params']} params; teachers "
                 + ", ".join(f"{t} {n}" for t, n in report["teacher_params"].items())
                 + f" (ratio {fmt(report['params_ratio'])})")
    parts.append(_gate_line(report).replace("**", ""))
    return Group(*parts)

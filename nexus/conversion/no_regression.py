"""The no-regression proof of ``add-teacher``: nothing the student could do before got worse.

Four parts, each on the same probe items (the recipe's profile settings pick a seeded subset, the items the original
validation scored):

- **tensors**: sha256 (`student_hashes`) of every old tower's tensors and every shared weight, before and after: all
  must be equal (the router's weight grows a row by design and is reported apart);
- **retention**: each old capability's student score before and after, with the paired bootstrap CI of after /
  before (bits per byte: before / after), which must contain 1; when the original validation report is found
  beside the student, the retention after (student after vs that report's teacher score) must lie within the
  report's CI;
- **router**: accuracy on each old capability's items (the tower the router picks is the one that serves it),
  before and after, with bootstrap CIs; after must not fall below before's CI;
- **interference**: each old capability scored with the new tower forced, beside its score through the router.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

from .bootstrap import bootstrap_ci
from .retention import (
    clamp_ci,
    item_rows,
    percentile_ci,
    resample_indices,
    retention_samples,
    retention_value,
    score_of,
)

LEVEL = 0.95


def probe_texts(probe):
    from .validate import _texts

    return _texts(probe)


def _metric(probe, summary, original=None):
    """(metric, lower is better): the original report's for this capability, else bpb for lm probes."""
    if original is not None and original.get("metric"):
        return original["metric"], bool(original.get("lower_is_better"))
    if probe.name == "lm":
        return "bpb", True
    return summary["metric"], not summary["higher_is_better"]


@torch.no_grad()
def router_hits(model, tokenizer, probe, expected_tower, max_items):
    """Per item 1/0: does the router send the item's text to ``expected_tower`` (one tower: always 1)."""
    texts = probe_texts(probe)[:max_items]
    if model.model.router is None:
        return [1.0] * len(texts)
    hits = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]])
        logits = model.model.router(model.model.embed_tokens(ids))
        hits.append(float(int(logits.argmax(-1)) == expected_tower))
    return hits


def measure_student(folder, recipe, caps, dtype, kwargs_of, router_items=200, router_caps=()):
    """Score the student at ``folder`` on ``caps`` (probes of ``recipe``; ``kwargs_of(model, cap)`` -> forward kwargs,
    e.g. a forced tower). Returns {"scores": {cap: (summary, items)}, "router": {cap: [hit, ...]}}."""
    from .peak_rss import release_freed_memory
    from .profile import load_probes
    from .validate import forced_capability, load_scored_model

    sub = recipe.model_copy(update={"capabilities": [c for c in recipe.capabilities if c.name in caps]})
    probes = load_probes(sub, recipe.stage("profile").probe_settings())
    release_freed_memory()  # the heap freed by the last scored model goes back first: one model resident at a time
    model, tokenizer = load_scored_model(folder, dtype)
    out = {"scores": {}, "router": {}, "probes": probes}
    for cap in caps:
        with forced_capability(model, kwargs_of(model, cap)):
            result = probes[cap].score(model, tokenizer)
        out["scores"][cap] = (result.summary, result.items)
    mapping = model.config.capability_to_tower
    for cap in router_caps:
        out["router"][cap] = router_hits(model, tokenizer, probes[cap], mapping[cap], router_items)
    del model, tokenizer
    release_freed_memory()
    return out


def paired_ratio(num_rows, den_rows, n_bootstrap, seed):
    """num/den on the same items with its paired percentile CI (``retention_value`` with rows as given)."""
    value = retention_value(num_rows, den_rows, False)
    idx = resample_indices(len(num_rows), n_bootstrap, seed)
    ci = percentile_ci(retention_samples(num_rows, den_rows, False, idx), LEVEL)
    return _finite(value), clamp_ci(_finite(value), ci)


def _finite(x):
    return float(x) if x is not None and math.isfinite(x) else None


def retention_change(probe, before, after, original, n_bootstrap, seed):
    """The entry of one old capability: scores before / after, their paired ratio (1 = unchanged; > 1 better),
    and the retention after against the original report's teacher score and CI when there is one."""
    metric, lower = _metric(probe, before[0], original)
    b_rows, a_rows = item_rows(probe.name, before[1], metric), item_rows(probe.name, after[1], metric)
    num, den = (b_rows, a_rows) if lower else (a_rows, b_rows)
    ratio, ci = paired_ratio(num, den, n_bootstrap, seed)
    unchanged = bool(ci is not None and ci[0] <= 1.0 <= ci[1]) or ratio == 1.0
    entry = {"metric": metric, "lower_is_better": lower, "n": len(b_rows), "before": score_of(b_rows),
             "after": score_of(a_rows), "after_over_before": ratio, "after_over_before_ci": ci,
             "unchanged_within_ci": unchanged}
    if original is not None and original.get("teacher_score") is not None:
        t = float(original["teacher_score"])

        def retention(s):
            return _finite((t / s if s else float("nan")) if lower else (s / t if t else float("nan")))

        r_before, r_after = retention(entry["before"]), retention(entry["after"])
        oci = original.get("ci")
        entry["original_report"] = {
            "retention": original.get("value"), "ci": oci, "teacher": original.get("teacher"),
            "teacher_score": t, "student_score": original.get("student_score"), "n": original.get("n"),
            "same_items": original.get("n") == len(b_rows),
            "retention_before_here": r_before, "retention_after": r_after,
            "after_within_original_ci": bool(oci and r_after is not None and oci[0] <= r_after <= oci[1]),
        }
        entry["unchanged_within_ci"] = unchanged and entry["original_report"]["after_within_original_ci"]
    return entry


def router_entry(before_hits, after_hits, n_bootstrap, seed):
    def acc(hits):
        hits = np.asarray(hits, dtype=np.float64)
        if not hits.size:
            return None, None
        lo, hi = bootstrap_ci(hits, n=n_bootstrap, seed=seed)
        return float(hits.mean()), [float(lo), float(hi)]

    b, bci = acc(before_hits)
    a, aci = acc(after_hits)
    return {"n": len(after_hits), "before": b, "before_ci": bci, "after": a, "after_ci": aci,
            "not_below_before_ci": bool(a is not None and bci is not None and a >= bci[0])}


def interference_entry(probe, routed, forced, original_metric=None):
    metric, lower = _metric(probe, routed[0], original_metric)
    r = score_of(item_rows(probe.name, routed[1], metric))
    f = score_of(item_rows(probe.name, forced[1], metric))
    return {"metric": metric, "lower_is_better": lower, "through_router": r, "new_tower_forced": f,
            "forced_vs_router": _finite((r / f if f else float("nan")) if lower else (f / r if r else float("nan")))}


def tensor_proof(before_hashes, after_hashes, old_keys):
    """Per old tensor: sha256 before and after; ``all_equal``."""
    rows = {k: {"before": before_hashes[k], "after": after_hashes.get(k)} for k in sorted(old_keys)}
    changed = [k for k, v in rows.items() if v["before"] != v["after"]]
    return {"n": len(rows), "all_equal": not changed, "changed": changed, "sha256": rows}


def find_original_report(student, extra=()):
    """The validation report beside the student (``report.json`` in it, in ``../validate/``, or ``extra``)."""
    student = Path(student)
    for path in [student / "report.json", student.parent / "validate" / "report.json", *extra]:
        path = Path(path)
        if path.is_file():
            try:
                report = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(report.get("retention"), dict):
                return path, report
    return None, None


def proof_lines(report) -> list[str]:
    """The CLI's summary of a report (one line per fact)."""
    proof = report["proof"]
    t = proof["tensors"]
    verdict = "all equal" if t["all_equal"] else "CHANGED: " + ", ".join(t["changed"][:3])
    lines = [f"tensors: {t['n']} old tower / shared tensors, sha256 before == after: {verdict}"]
    for cap, e in proof["retention"].items():
        ci = e["after_over_before_ci"]
        line = (f"{cap}: {e['metric']} before {e['before']:.4f} after {e['after']:.4f}; after/before "
                f"{e['after_over_before']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{cap}: no CI")
        if "original_report" in e:
            o = e["original_report"]
            line += (f"; retention (report) {o['retention']:.4f} [{o['ci'][0]:.4f}, {o['ci'][1]:.4f}] -> after "
                     f"{o['retention_after']:.4f}")
        lines.append(line + (" (unchanged)" if e["unchanged_within_ci"] else " (CHANGED)"))
    for cap, e in proof["router"].items():
        lines.append(f"router on {cap}: {e['before']:.3f} [{e['before_ci'][0]:.3f}, {e['before_ci'][1]:.3f}] -> "
                     f"{e['after']:.3f} [{e['after_ci'][0]:.3f}, {e['after_ci'][1]:.3f}]")
    for cap, e in proof["interference"].items():
        lines.append(f"interference {cap}: {e['metric']} through the router {e['through_router']:.4f}, new tower "
                     f"forced {e['new_tower_forced']:.4f}")
    for cap, e in report.get("new_capabilities", {}).items():
        ci = e.get("ci") or [float("nan")] * 2
        lines.append(f"new {cap}: retention vs {e['teacher']} {e['value']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] "
                     f"({e['metric']})" if e.get("value") is not None else f"new {cap}: retention undefined")
    lines.append(f"verdict: {'no regression' if proof['passed'] else 'REGRESSION'}")
    return lines


def proof_markdown(report) -> str:
    caps = ", ".join(report["new_capabilities"])
    lines = ["# add-teacher: no-regression proof", "",
             f"Student `{report['student']}` + teacher `{report['teacher']}` serving {caps}.", ""]
    lines += [f"- {line}" for line in proof_lines(report)]
    lines += ["", "Per-tensor sha256 before and after: `add_teacher_report.json` (`proof.tensors.sha256`)."]
    return "\n".join(lines) + "\n"

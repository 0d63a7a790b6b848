"""RESULTS.md §10 from ``bench/results/gemma_pair/*.json`` (`bench/compare_methods.py --scale gemma-pair`, issue 17
item 3): two same-family tower teachers (Gemma-3-270M for prose, its code fine-tune for code) as two towers (NEXUS)
or merged into ONE tower by the align stage (OT unit matching, the plain linear average, TIES), at the same
parameter budget and the same distillation. Per variant: its retention per capability and the paired difference
from the two-tower student. Per merge method, from ``bench/results/align_gemma_pair.json`` (`bench/align_real.py`):
each capability's held-out next-token loss under its own teacher, under the merged teacher and under the plain
average, before any pruning (the merge's own cost), and how many units OT moved. A method whose merged teacher is
bit-identical to OT's (``bench/results/align_merge_identity.json``, `bench/merge_identity.py`) is said to share
align_ot's student instead of being listed as not run."""

import json
from pathlib import Path

TITLE = "## 10. One tower from a same-family pair: align (OT / linear / TIES) vs two towers (issue 17)"
ORDER = ("nexus", "align_ot", "align_linear", "align_ties")
# the comparison's "nexus" variant runs no align stage; since align is in the default pipeline, that is NEXUS with
# align left out (one tower per teacher), and the OT row is what the default pipeline builds
TWO_TOWERS = "two towers: the pipeline with align left out (one tower per teacher)"
COMMAND = "python bench/compare_methods.py --scale gemma-pair --only nexus --only align_ot --only align_linear " \
          "--only align_ties"


def merge_cost_lines(path, md_table) -> list:
    """The merge's own cost per method, from ``align_gemma_pair.json`` (`bench/align_real.py`)."""
    if path is None or not path.is_file():
        return []
    d = json.loads(path.read_text())
    rows = []
    for method, r in d["methods"].items():
        for merged in r["merged"]:
            moved = next((f"{s['neurons_moved']:,} of {s['neurons']:,} FFN units, {s['heads_moved']} heads"
                          for s in merged["steps"] if "neurons_moved" in s), "–")
            for cap, lo in merged["heldout_loss"].items():
                rows.append([method, cap, lo["teacher"], f"{lo['own_teacher']:.4f}", f"{lo['merged']:.4f}",
                             f"{lo['plain_average']:.4f}", lo["tokens"], moved])
    if not rows:
        return ["", f"`{path.name}`: nothing merged (tower teachers: "
                    f"{', '.join(next(iter(d['methods'].values()))['signatures'])})."]
    return ["", f"The merge's own cost, before pruning and distillation (`{path.name}`, `python bench/align_real.py`): "
                "next-token loss (nats) on held-out text of each capability under its own teacher, the merged teacher "
                "and the plain average, and the units OT moved:", "",
            md_table(["method", "capability", "own teacher", "own teacher loss", "merged", "plain average", "tokens",
                      "OT moved"], rows)]


def identity_lines(path, missing) -> list:
    """A merge method not run at the student level whose merged teacher is bit-identical to OT's
    (``align_merge_identity.json``, `bench/merge_identity.py`): its student would be align_ot's."""
    if "align_linear" not in missing or path is None or not path.is_file():
        return []
    pairs = json.loads(path.read_text())["pairs"]
    r = pairs.get("ot vs linear (align_real)")
    if not r or not r["identical"]:
        return []
    return ["", f"align_linear is not run at the student level: its merged teacher is bit-identical to OT's "
                f"({r['tensors']} tensors, {r['differing_tensors']} differ, max |OT − linear| = "
                f"{r['max_abs_diff']:g}; the align_ot student's merge is that same model: "
                f"`python bench/merge_identity.py`, `{path.name}`), and the build and distillation are deterministic "
                "functions of it, so its student is the align_ot row."]


def align_section(folder, load_compare, paired_delta, verdict, fmt_ci, md_table, align_json=None,
                  identity_json=None, unpaired_reason=None) -> list:
    folder = Path(folder)
    records = load_compare(folder) if folder.is_dir() else {}
    done = {n: records[n] for n in ORDER if records.get(n, {}).get("status") == "done"}
    if "nexus" not in done:
        return ([f"No two-tower NEXUS run in `bench/results/{folder.name}/` yet: run `{COMMAND}`."]
                + merge_cost_lines(Path(align_json) if align_json is not None else None, md_table))
    nexus = done["nexus"]
    caps = list(nexus["retention"])
    teachers = ", ".join(f"{c}: {e['teacher']}" for c, e in nexus["retention"].items())
    lines = [(f"From `bench/results/{folder.name}/` (`{COMMAND}`; `bench/recipes/gemma_pair.yaml`). Teachers per "
              f"capability ({teachers}); the recipe pins prose to Gemma and code to its fine-tune "
              "(`bench/train_gemma_specialist.py`), since the profile alone ranks the fine-tune first at both. "
              f"Every variant: budget {nexus['params']['budget']:,} params, {nexus['train']['steps']} distill steps, "
              f"{nexus['train']['tokens']:,} student tokens; retention with paired bootstrap 95% CIs."), ""]
    rows = []
    for name, r in done.items():
        d = paired_delta(r, nexus) if name != "nexus" else None
        towers = len(r["student"]["towers"])
        label = TWO_TOWERS if name == "nexus" else r["label"]
        rows.append([label, f"{r['params']['student']:,}", towers,
                     *(fmt_ci(r["retention"].get(c)) for c in caps), fmt_ci(r["min"]), fmt_ci(r["mean"]),
                     "–" if name == "nexus" else fmt_ci(d["min"], signed=True) if d else "not paired",
                     "–" if name == "nexus" else verdict(d["min"]).replace("NEXUS", "two towers") if d else "–"])
    lines += [md_table(["variant", "params", "towers", *caps, "min [95% CI]", "mean [95% CI]",
                        "Δ min vs two towers", "verdict"], rows), ""]
    unpaired = [(r["label"], unpaired_reason(r, nexus)) for n, r in done.items()
                if n != "nexus" and unpaired_reason is not None and unpaired_reason(r, nexus)]
    if unpaired:
        lines += ["Not paired with the two-tower run, so only their own CIs compare: "
                  + "; ".join(f"{label}: {reason}" for label, reason in unpaired) + ".", ""]
    lines += merge_cost_lines(Path(align_json) if align_json is not None else None, md_table)
    missing = [n for n in ORDER if n not in done]
    same = identity_lines(Path(identity_json) if identity_json is not None else None, missing)
    lines += same
    if same:
        missing.remove("align_linear")
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return lines

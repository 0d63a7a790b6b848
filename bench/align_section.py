"""RESULTS.md §10 from ``bench/results/gemma_pair/*.json`` (`bench/compare_methods.py --scale gemma-pair`, issue 17
item 3): two same-family tower teachers (Gemma-3-270M for prose, its code fine-tune for code) as two towers (NEXUS)
or merged into ONE tower by the align stage (OT unit matching, the plain linear average, TIES), at the same
parameter budget and the same distillation. Per variant: its retention per capability and the paired difference
from the two-tower student; per merge: each capability's held-out next-token loss under its own teacher, under the
merged teacher and under the plain average, before any pruning (the merge's own cost)."""

from pathlib import Path

TITLE = "## 10. One tower from a same-family pair: align (OT / linear / TIES) vs two towers (issue 17)"
ORDER = ("nexus", "align_ot", "align_linear", "align_ties")
COMMAND = "python bench/compare_methods.py --scale gemma-pair --only nexus --only align_ot --only align_linear " \
          "--only align_ties"


def align_section(folder, load_compare, paired_delta, verdict, fmt_ci, md_table) -> list:
    folder = Path(folder)
    records = load_compare(folder) if folder.is_dir() else {}
    done = {n: records[n] for n in ORDER if records.get(n, {}).get("status") == "done"}
    if "nexus" not in done:
        return [f"No two-tower NEXUS run in `bench/results/{folder.name}/` yet: run `{COMMAND}`."]
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
        rows.append([r["label"], f"{r['params']['student']:,}", towers,
                     *(fmt_ci(r["retention"].get(c)) for c in caps), fmt_ci(r["min"]), fmt_ci(r["mean"]),
                     "–" if name == "nexus" else fmt_ci(d["min"], signed=True) if d else "not paired",
                     "–" if name == "nexus" else verdict(d["min"]).replace("NEXUS", "two towers") if d else "–"])
    lines += [md_table(["variant", "params", "towers", *caps, "min [95% CI]", "mean [95% CI]",
                        "Δ min vs two towers", "verdict"], rows), ""]
    loss_rows = []
    for name, r in done.items():
        for merged in (r.get("align") or {}).get("merged", []):
            for cap, lo in merged["heldout_loss"].items():
                loss_rows.append([name, cap, lo["teacher"], f"{lo['own_teacher']:.4f}", f"{lo['merged']:.4f}",
                                  f"{lo['plain_average']:.4f}", lo["tokens"]])
    if loss_rows:
        lines += ["The merge's own cost, before pruning and distillation: next-token loss (nats) on held-out text of "
                  "each capability, under its own teacher, the merged teacher and the plain average:", "",
                  md_table(["variant", "capability", "own teacher", "own teacher loss", "merged", "plain average",
                            "tokens"], loss_rows)]
    missing = [n for n in ORDER if n not in done]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return lines

"""RESULTS.md §8 from ``bench/results/allocation_proxy.json`` (`bench/allocation_proxy.py`): every pruning candidate
of the size sweep's Gemma tower with its held-aside loss right after the cut and after a short healing, their
ranks, and the minimum retention after distillation where the sweep distilled that candidate."""

from pathlib import Path

TITLE = "## 8. Which pruned candidate to keep: loss after the cut vs after healing (Gemma tower)"
HEADER = ["scorer", "mix", "widths", "loss after cut (rank)", "loss after healing (rank)",
          "min retention after distillation"]


def _rank_agreement(rows, key):
    """How many pairs of distilled candidates ``key`` orders as distillation does, of how many pairs."""
    done = [r for r in rows if r.get("distilled")]
    pairs = [(a, b) for i, a in enumerate(done) for b in done[i + 1:]
             if a["distilled"]["min"]["value"] != b["distilled"]["min"]["value"]]
    agree = sum((a[key] < b[key]) == (a["distilled"]["min"]["value"] > b["distilled"]["min"]["value"])
                for a, b in pairs)
    return agree, len(pairs)


def allocation_proxy_section(path, fmt_ci, md_table) -> list:
    import json

    path = Path(path)
    if not path.is_file():
        return [f"No `{path.name}` yet: run `python bench/allocation_proxy.py --point 0.25`."]
    d = json.loads(path.read_text())
    rows = d["candidates"]
    table = [[r["scorer"], r["mix"] or "–", r["allocation"],
              f"{r['loss_after_cut']:.3f} ({r['rank_loss_after_cut']})",
              f"{r['loss_after_heal']:.3f} ({r['rank_loss_after_heal']})",
              f"{fmt_ci(r['distilled']['min'])} (`{r['distilled']['run']}`)" if r.get("distilled") else "–"]
             for r in rows]
    cut, heal = _rank_agreement(rows, "loss_after_cut"), _rank_agreement(rows, "loss_after_heal")
    best_cut = min(rows, key=lambda r: r["loss_after_cut"])
    best_heal = min(rows, key=lambda r: r["loss_after_heal"])

    def name(r):
        return f"{r['scorer']} {r['mix'] or ''} {r['allocation']}".replace("  ", " ")

    return [f"Generated from `{path.name}` (`python bench/allocation_proxy.py --point {d['point']:g} --heal-steps "
            f"{d['heal_steps']}`): the size sweep's {d['tower']} tower at the {d['point']:g} point "
            f"({d['layer_budget']:,} layer parameters), every candidate `allocation: auto` compares (and Minitron's "
            f"scorer), held-aside capability-weighted loss in nats/token on {d['selection_tokens']} training tokens "
            f"per capability, right after the cut and after {d['heal_steps']} healing steps (decoder layers only, "
            f"lr {d['heal_lr']:g}). The last column is the size sweep's distilled student built from that very "
            "candidate, where the sweep ran one.", "",
            md_table(HEADER, table), "",
            f"- Lowest loss after the cut: **{name(best_cut)}**; after healing: **{name(best_heal)}**.",
            f"- Pairs of distilled candidates ordered as distillation orders them: after the cut {cut[0]} of {cut[1]}, "
            f"after healing {heal[0]} of {heal[1]}."]

"""The RESULTS.md table of the method's claims (issue 17, item 6), each checked against the committed sweep JSON.

The method's description came with percentages that nobody had measured. Each is a hypothesis here: the row gives
the figure NEXUS measured (with its 95% CI), the verdict and the command that made it. The figures come from
``bench/results/size_sweep/<point>/<method>.json`` (the Gemma-3-270M + arithmetic + code specialists case), so a
claim is checked at every point of the sweep that has the runs it needs. The OT claim needs two teachers of one
family, which the sweep does not have: it is checked on ``bench/results/gemma_pair/`` (Gemma-3-270M + its code
fine-tune + the arithmetic specialist, `bench/compare_methods.py --scale gemma-pair`), where the align stage's OT
merge (one tower) is compared with two towers (NEXUS) and with the plain linear merge.

Verdicts (on retention r, loss = 1 - r, with CIs):
- **confirmed**: the measured CI overlaps the claimed range;
- **better than claimed** / **refuted (worse)**: the whole CI lies above / below the claimed range
  (for a claimed *loss*: below / above it);
- **not measured**: the runs are missing or the stage is not a switch (the reason is given).

    python bench/results.py --committed-sections    # rewrites §5-§7 of bench/RESULTS.md (their JSON is committed)
"""

from dataclasses import dataclass

TITLE = "## 6. The method's claims, checked"
SWEEP = "python bench/size_sweep.py --points {point} --methods {methods}"
PAIR = "python bench/compare_methods.py --scale gemma-pair --only {methods}"


@dataclass(frozen=True)
class Claim:
    text: str  # as the method's description words it
    kind: str  # "retention" (of each capability), "mean_loss" (1 - mean retention), "stage"
    low: float
    high: float
    method: str  # the sweep variant whose figure checks it
    stage_ablation: str | None = None  # the ablation that switches the stage off, for a stage's claim
    source: str = "size_sweep"  # "size_sweep" (every point) or "gemma_pair" (the same-family pair)
    also_against: str | None = None  # a second run the stage's effect is measured against (gemma_pair)


CLAIMS = (
    Claim("NIWT keeps 93–97% of each capability", "retention", 0.93, 0.97, "nexus"),
    Claim("LMC 90–95%", "stage", 0.90, 0.95, "nexus", stage_ablation="no_lmc"),
    # OT merges two teachers of one family into one tower: off = two towers (NEXUS); also against the plain average
    Claim("OT 90–95%", "stage", 0.90, 0.95, "align_ot", stage_ablation="nexus", source="gemma_pair",
          also_against="align_linear"),
    # the manifold option is off in NEXUS (not a switch to turn off): its claim reads the run that switches it on,
    # against NEXUS (the stage off) at the same budget
    Claim("manifold-aware compression 93–97%", "stage", 0.93, 0.97, "manifold_on", stage_ablation="nexus"),
    Claim("traditional KD loses 15–20%", "mean_loss", 0.15, 0.20, "random_init_kd"),
    Claim("NIWT 4.7% loss (vs KD 15%)", "mean_loss", 0.047, 0.047, "nexus"),
    Claim("KD 15% loss (vs NIWT 4.7%)", "mean_loss", 0.15, 0.15, "random_init_kd"),
)


def _verdict(ci, low, high, loss=False) -> str:
    if not ci:
        return "undefined (no competent teacher or no CI)"
    lo, hi = ci
    if hi < low:
        return "**better than claimed**" if loss else "**refuted (worse)**"
    if lo > high:
        return "**refuted (worse)**" if loss else "**better than claimed**"
    return "confirmed"


def _loss(entry):
    if entry.get("value") is None or not entry.get("ci"):
        return {"value": None, "ci": None}
    return {"value": 1.0 - entry["value"], "ci": [1.0 - entry["ci"][1], 1.0 - entry["ci"][0]]}


def _check(claim, point, records, fmt_ci, paired_delta):
    """(figure, verdict) for one claim at one point, or None when the runs it needs are not there."""
    r = records.get(claim.method)
    if r is None or r.get("status") != "done":
        return None
    if claim.kind == "retention":
        parts = [f"{c} {fmt_ci(e)}" for c, e in r["retention"].items()]
        verdicts = {_verdict(e["ci"], claim.low, claim.high) for e in r["retention"].values() if e.get("ci")}
        worst = ("**refuted (worse)**" if "**refuted (worse)**" in verdicts
                 else "confirmed" if "confirmed" in verdicts else "**better than claimed**" if verdicts
                 else _verdict(None, 0, 0))
        return "; ".join(parts), worst
    if claim.kind == "mean_loss":
        loss = _loss(r["mean"])
        return f"mean loss {fmt_ci(loss)} (mean retention {fmt_ci(r['mean'])})", _verdict(
            loss["ci"], claim.low, claim.high, loss=True)
    ablation = records.get(claim.stage_ablation)
    if ablation is None:
        return None
    if ablation.get("status") != "done":
        return f"not measured: {ablation.get('reason', ablation.get('status'))}", "not measured"
    d = paired_delta(ablation, r)
    effect = d and {"value": -d["min"]["value"], "ci": [-d["min"]["ci"][1], -d["min"]["ci"][0]]}
    on = "NEXUS" if claim.method == "nexus" else claim.method
    figure = (f"{on} (the stage on): min {fmt_ci(r['min'])}; its own effect ({on} − {claim.stage_ablation}) on the "
              f"minimum: {fmt_ci(effect, signed=True)}")
    extra = r.get("lmc") if claim.stage_ablation == "no_lmc" else None
    if extra:
        figure += f"; chosen α {extra.get('best_alpha')}"
    other = records.get(claim.also_against) if claim.also_against else None
    if other is not None and other.get("status") == "done":
        d2 = paired_delta(other, r)
        e2 = d2 and {"value": -d2["min"]["value"], "ci": [-d2["min"]["ci"][1], -d2["min"]["ci"][0]]}
        figure += f"; {on} − {claim.also_against}: {fmt_ci(e2, signed=True)}"
    return figure, _verdict(r["min"].get("ci"), claim.low, claim.high)


def claims_section(folder, load_compare, paired_delta, fmt_ci, md_table, pair_folder=None) -> list:
    """The section's lines (title excluded); results.py's helpers are passed in so there is one of each.
    ``folder``: the size sweep's; ``pair_folder``: the same-family pair's comparison (the OT claim)."""
    from pathlib import Path

    points = sorted((p for p in Path(folder).glob("*") if p.is_dir()), key=lambda p: float(p.name))
    rows = []
    for claim in CLAIMS:
        checked = False
        if claim.source == "gemma_pair":
            where = [(Path(pair_folder), "gemma-pair")] if pair_folder is not None and Path(pair_folder).is_dir() \
                else []
        else:
            where = [(point, point.name) for point in points]
        for path, label in where:
            records = load_compare(path)
            got = _check(claim, label, records, fmt_ci, paired_delta)
            if got is None:
                continue
            checked = True
            if claim.source == "gemma_pair":
                names = [claim.method] + [n for n in (claim.stage_ablation, claim.also_against) if n]
                command = PAIR.format(methods=" --only ".join(names))
            else:
                methods = claim.method + (f" {claim.stage_ablation}" if claim.stage_ablation else "")
                command = SWEEP.format(point=label, methods=methods)
            rows.append([claim.text, label, got[0], got[1], f"`{command}`"])
        if not checked:
            place = "the sweep" if claim.source == "size_sweep" else f"`{claim.source}`"
            rows.append([claim.text, "–", f"the runs it needs are not in {place} yet", "not measured", ""])
    return ["Each percentage the method's description gives, checked on the size sweep (§5: Gemma-3-270M + the "
            "arithmetic and code specialists; retention vs the best teacher, paired bootstrap 95% CIs; KD = KD into "
            "a random-init student of the same shape). A claim is checked at every point that has its runs. "
            "A stage's claim gives NEXUS's retention with the stage on, and the stage's own effect measured by "
            "switching it off (NEXUS minus the ablation). The OT claim is checked on the same-family pair of §10 "
            "(point `gemma-pair`): the OT-merged one-tower student, its effect against two towers and against the "
            "plain linear merge.", "",
            md_table(["claim", "point", "measured", "verdict", "command"], rows)]

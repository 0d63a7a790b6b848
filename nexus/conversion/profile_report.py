"""How a profile is shown: a rich table for the terminal and a teacher x capability heatmap PNG.

Capabilities use different metrics (bits per byte: lower is better; accuracy: higher is better), so each column is
coloured on its own scale, from its worst to its best entry, the trivial baseline included as the last row: a bright
cell is the best in its column, and a teacher no brighter than the baseline row is not competent.
"""

import math

BASELINE_ROW = "(baseline)"


def _fmt(x):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    ax = abs(x)
    return f"{x:.0f}" if ax >= 100 else f"{x:.1f}" if ax >= 10 else f"{x:.3f}"


def _cell(result):
    lo, hi = result["ci"]
    return f"{_fmt(result['score'])} [{_fmt(lo)}, {_fmt(hi)}]"


def _column_metric(profile, cap):
    """(metric name, higher is better) of a capability's column: the teachers' metric."""
    first = next(iter(profile["capabilities"][cap].values()), None) or profile["baselines"][cap]
    return first["metric"], first["higher_is_better"]


def _rows(profile):
    teachers = list(profile.get("teachers") or [])
    for by_teacher in profile["capabilities"].values():
        teachers += [t for t in by_teacher if t not in teachers]
    return teachers


def competence_warning(profile):
    """The loud line for capabilities no teacher is competent at (rich markup), or None when every capability has
    one."""
    from .profile import profile_no_competent_teacher

    caps = profile_no_competent_teacher(profile)
    if not caps:
        return None
    return (f"[bold red]WARNING: no competent teacher for {', '.join(caps)}[/][red]: no teacher's score is clear of "
            "the trivial baseline (or exact match is 0), so retention of it would mean nothing; the student build "
            "gives it no tower and no budget, and validate lists it as 'no competent teacher' (unless the "
            "capability sets require_competent_teacher: false)[/]")


def profile_table(profile):
    """A rich Table: one row per teacher plus the baseline, one column per capability, best cells starred. A
    capability no teacher is competent at has a red column, and the table comes back as a Group with a red warning
    line under it (either prints with ``console.print``)."""
    from rich.table import Table

    from .profile import profile_no_competent_teacher

    caps = list(profile["capabilities"])
    incompetent = set(profile_no_competent_teacher(profile))
    table = Table(title=f"profile of {profile.get('recipe', '')}: score [95% CI]", show_lines=False)
    table.add_column("teacher", style="cyan", no_wrap=True)
    for cap in caps:
        metric, higher = _column_metric(profile, cap)
        head = f"{cap}\n{metric} {'↑' if higher else '↓'}"
        table.add_column(f"[bold red]{head}\nNO COMPETENT TEACHER[/]" if cap in incompetent else head,
                         justify="right")
    for teacher in _rows(profile):
        cells = []
        for cap in caps:
            result = profile["capabilities"][cap].get(teacher)
            if result is None:
                reason = (profile.get("skipped") or {}).get(cap, {}).get(teacher)
                cells.append("[dim]skipped[/]" if reason else "[dim]-[/]")
                continue
            text = _cell(result)
            if profile["best"].get(cap) == teacher:
                text = f"[bold red]{text} *[/]" if cap in incompetent else f"[bold green]{text} *[/]"
            elif profile.get("competent", {}).get(cap, {}).get(teacher) is False:
                text = f"[yellow]{text}[/]"
            cells.append(text)
        table.add_row(teacher, *cells)
    table.add_row(BASELINE_ROW, *[f"[dim]{_cell(profile['baselines'][c])}[/]" for c in caps], end_section=True)
    table.caption = ("* best teacher; yellow: CI not clear of the trivial baseline; "
                     "baseline: unigram-over-bytes (lm), chance (multiple choice), majority answer (exact match)")
    warning = competence_warning(profile)
    if warning:  # printed under the table at full width, not in the caption's dim style: it has to be seen
        from rich.console import Group
        from rich.text import Text

        return Group(table, Text.from_markup(warning))
    return table


def write_profile_heatmap(profile, path):
    """Write a teacher x capability heatmap PNG (plus a baseline row), each cell annotated with score and CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .profile import profile_no_competent_teacher

    caps = list(profile["capabilities"])
    rows = _rows(profile) + [BASELINE_ROW]
    shade = np.full((len(rows), len(caps)), np.nan)
    labels = [["" for _ in caps] for _ in rows]
    for j, cap in enumerate(caps):
        base = profile["baselines"][cap]
        entries = {t: r for t, r in profile["capabilities"][cap].items()}
        entries[BASELINE_ROW] = base
        scores = {t: r["score"] for t, r in entries.items() if r["metric"] == base["metric"] or t == BASELINE_ROW}
        lo, hi = min(scores.values()), max(scores.values())
        for i, row in enumerate(rows):
            result = entries.get(row)
            if result is None:
                skipped = (profile.get("skipped") or {}).get(cap, {}).get(row)
                labels[i][j] = "skipped" if skipped else "-"
                continue
            labels[i][j] = f"{_fmt(result['score'])}\n[{_fmt(result['ci'][0])}, {_fmt(result['ci'][1])}]"
            if row in scores:
                frac = 0.5 if hi == lo else (scores[row] - lo) / (hi - lo)
                shade[i, j] = frac if base["higher_is_better"] else 1.0 - frac
    fig, ax = plt.subplots(figsize=(1.9 * len(caps) + 2.2, 0.75 * len(rows) + 1.6))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    ax.imshow(np.ma.masked_invalid(shade), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(caps)):
            bright = not np.isnan(shade[i, j]) and shade[i, j] > 0.6
            star = " *" if profile["best"].get(caps[j]) == rows[i] else ""
            ax.text(j, i, labels[i][j] + star, ha="center", va="center", fontsize=8,
                    color="black" if bright or np.isnan(shade[i, j]) else "white")
    heads = [_column_metric(profile, c) for c in caps]
    incompetent = set(profile_no_competent_teacher(profile))
    ax.set_xticks(range(len(caps)), [f"{c}\n{m} {'↑' if h else '↓'}" + ("\nno competent teacher" if c in incompetent
                                                                        else "")
                                     for c, (m, h) in zip(caps, heads)])
    for label, cap in zip(ax.get_xticklabels(), caps):
        if cap in incompetent:
            label.set_color("red")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(f"profile {profile.get('recipe', '')}: score [95% CI]; colour per column, bright = better; * best",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

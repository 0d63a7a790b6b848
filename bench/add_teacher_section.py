"""RESULTS.md §9 from ``bench/results/add_teacher.json`` (`bench/add_teacher.py`, issue 19): the cost of
``nexus add-teacher`` against a full ``consolidate`` of the same three teachers (wall time and peak RAM, one thread,
measured side by side), the RAM floor any add-teacher of this case has, the no-regression proof and the retention of
every capability before / after / with a full consolidate."""

import json
from pathlib import Path

TITLE = "## 9. Adding a teacher to a student vs consolidating again (issue 19)"


def _f(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def add_teacher_section(path, fmt_ci, md_table) -> list:
    path = Path(path)
    if not path.is_file():
        return [f"No `{path.name}` yet: run `python bench/add_teacher.py`."]
    d = json.loads(path.read_text())
    cost, ratio = d["cost"], d["ratio_add_over_full"]
    lines = [(f"From `{path.name}` (`python bench/add_teacher.py`; each run a child process with one thread). "
              f"Goal: add-teacher costs <= {d['goal']} of the full consolidate."), ""]
    rows = [[name.replace("_", " "), _f(c["wall_seconds"], 0), _f(c["peak_rss_mb"], 0)]
            for name, c in ((n, cost[n]) for n in ("base_consolidate", "add_teacher", "full_consolidate"))]
    met = {k: "met" if v else "missed" for k, v in d["goal_met"].items()}
    rows.append(["**add / full**", f"{_f(ratio['wall_seconds'])} ({met['wall_seconds']})",
                 f"{_f(ratio['peak_rss_mb'])} ({met['peak_rss_mb']})"])
    lines += [md_table(["run", "wall s", "peak RSS MB"], rows), ""]
    if not all(cost[n].get("peak_rss_source") for n in ("base_consolidate", "add_teacher", "full_consolidate")):
        lines += ["**These peak RSS figures are not the runs' peaks**: they predate the sampled measurement "
                  "(`bench/child_process.py`), so each is the peak of the run's last stage only (the pipeline resets "
                  "the kernel's high-water mark before each stage); the RAM ratio and floor below are not measured "
                  "until `python bench/add_teacher.py --force` is run again.", ""]
    floor = d.get("memory_floor")
    if floor:
        lines += [(f"RAM floor of any add-teacher here: the process after its imports "
                  f"({_f(floor['import_only_peak_rss_mb'], 0)} MB, a child that only imports NEXUS) plus one copy of "
                  f"the student's weights ({_f(floor['student_weights_mb'], 0)} MB) = {_f(floor['floor_mb'], 0)} MB, "
                  f"**{_f(floor['floor_over_full'])}** of the full consolidate's peak: the lowest RAM ratio this "
                  f"case allows. add-teacher peaked at {_f(floor['add_teacher_over_floor'], 2)}x that floor."), ""]
    p = d["proof"]
    lines += [(f"Proof {'passed' if p['passed'] else 'FAILED'}: {p['tensors_bit_identical']} / "
               f"{p['tensors_compared']} old tensors bit-identical (sha256)."), ""]
    rows = []
    for cap, e in p["retention"].items():
        r, i = p["router"][cap], p["interference"][cap]
        rows.append([cap, e["metric"], e["n"], _f(e["before"]), _f(e["after"]),
                     fmt_ci({"value": e["after_over_before"], "ci": e["after_over_before_ci"]}),
                     "yes" if e["unchanged_within_ci"] else "NO", _f(r.get("before")), _f(r.get("after")),
                     _f(i.get("new_tower_forced"))])
    lines += [md_table(["old capability", "metric", "n", "before", "after", "after / before [95% CI]",
                        "unchanged within CI", "router before", "router after", "score with the new tower forced"],
                       rows), ""]
    ret = d["retention"]
    rows = [[cap, *(fmt_ci(ret[k].get(cap)) if ret[k].get(cap) else "–"
                    for k in ("base", "after_add", "full_consolidate"))] for cap in ret["full_consolidate"]]
    lines += [md_table(["capability (retention, 95% CI)", "base (2 teachers)", "after add-teacher",
                        "full consolidate (3 teachers)"], rows)]
    return lines

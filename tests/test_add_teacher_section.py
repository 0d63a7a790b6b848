"""RESULTS.md §9 is rendered from add_teacher.json: the cost ratios with the goal verdict, the RAM floor, the proof."""

import json

from conftest import load_bench


def record():
    entry = {"metric": "bpb", "n": 3, "before": 2.0, "after": 2.0, "after_over_before": 1.0,
             "after_over_before_ci": [0.99, 1.01], "unchanged_within_ci": True}
    return {
        "goal": 0.25, "cost": {n: {"wall_seconds": w, "peak_rss_mb": m} for n, w, m in
                               (("base_consolidate", 500, 1700), ("add_teacher", 100, 1100),
                                ("full_consolidate", 600, 2000))},
        "ratio_add_over_full": {"wall_seconds": 100 / 600, "peak_rss_mb": 1100 / 2000},
        "goal_met": {"wall_seconds": True, "peak_rss_mb": False},
        "memory_floor": {"import_only_peak_rss_mb": 440.0, "student_weights_mb": 260.0, "floor_mb": 700.0,
                         "floor_over_full": 0.35, "add_teacher_over_floor": 1100 / 700},
        "proof": {"passed": True, "tensors_compared": 9, "tensors_bit_identical": 9, "changed": [],
                  "retention": {"prose": entry}, "router": {"prose": {"before": 1.0, "after": 1.0}},
                  "interference": {"prose": {"new_tower_forced": 3.5}}},
        "retention": {"base": {"prose": {"value": 0.5, "ci": [0.4, 0.6]}},
                      "after_add": {"prose": {"value": 0.5}, "rev": {"value": 0.9, "ci": [0.8, 1.0]}},
                      "full_consolidate": {"prose": {"value": 0.55, "ci": [0.5, 0.6]},
                                           "rev": {"value": 1.0, "ci": [1.0, 1.0]}}},
    }


def test_add_teacher_section_renders_the_json(tmp_path):
    results = load_bench("results")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "add_teacher.json").write_text(json.dumps(record()))
    md = tmp_path / "RESULTS.md"
    md.write_text("# NEXUS benchmarks\n\n## 1. Kept\n\nkept text\n")
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    text = md.read_text()
    assert "## 1. Kept\n\nkept text\n" in text and text.count("## 9. Adding a teacher") == 1
    assert "| **add / full** | 0.167 (met) | 0.550 (missed) |" in text
    assert "| add teacher | 100 | 1100 |" in text
    assert "= 700 MB, **0.350** of the full consolidate's peak" in text and "1.57x that floor" in text
    assert "Proof passed: 9 / 9 old tensors bit-identical" in text
    assert "not the runs' peaks" in text  # records without peak_rss_source hold the last stage's peak only
    sampled = record()
    for c in sampled["cost"].values():
        c["peak_rss_source"] = "max(VmHWM sampled, ru_maxrss)"
    (tmp_path / "results" / "add_teacher.json").write_text(json.dumps(sampled))
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    assert "not the runs' peaks" not in md.read_text() and "| add teacher | 100 | 1100 |" in md.read_text()
    assert "| rev | – | 0.900 [0.800, 1.000] | 1.000 [1.000, 1.000] |" in text
    # no JSON yet: the section says how to make it
    (tmp_path / "results" / "add_teacher.json").unlink()
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    assert "No `add_teacher.json` yet: run `python bench/add_teacher.py`." in md.read_text()

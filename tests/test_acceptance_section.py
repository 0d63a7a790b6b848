"""RESULTS.md §11 is rendered from the acceptance run's JSON (`bench/acceptance_gemma_pair.py`): the stages that ran
with their RAM, what localise selected, what align merged, the LMC choice, the retention, and localise's own paired
effect against the align_ot run; a missing file says how to make it."""

import json

from conftest import load_bench

MIB = 1024 * 1024


def _acceptance(path, effect=True):
    record = {
        "recipe": "bench/recipes/gemma_pair_acceptance.yaml",
        "cost": {"wall_seconds": 4321.0, "threads": 2, "peak_rss_mb": 6100.0, "exit_code": 3},
        "stages": ["profile", "localise", "align", "student_build", "distill", "validate", "export"],
        "memory": {"plans_bytes": {"localise": 4362 * MIB, "align": 3000 * MIB},
                   "measured_peak_rss_bytes": {"localise": 4000 * MIB}},
        "localise": {"gemma": {"seconds": 612.4, "capabilities": {
            "prose": {"present": True, "units": {"neuron": 12, "head": 0}, "ratio": 3.5, "ratio_ci": [2.1, 5.0]},
            "arithmetic": {"present": False, "units": None}}}},
        "align": {"merged": [{"name": "gemma+gemma-code", "method": "ot", "capabilities": ["prose", "code"]}]},
        "lmc": {"best_alpha": 0.5, "barrier": 0.0123},
        "student_params": 80_500_000, "params_ratio": 0.15,
        "retention": {"prose": {"value": 0.9, "ci": [0.88, 0.92], "teacher": "gemma", "metric": "bpb", "n": 100}},
        "min": {"value": 0.9, "ci": [0.88, 0.92]},
        "localise_effect": ({"record": "bench/results/gemma_pair/align_ot.json", "other_min": {"value": 0.84,
                                                                                              "ci": [0.82, 0.86]},
                             "delta": {"min": {"value": -0.02, "ci": [-0.03, -0.01]},
                                       "per_capability": {"prose": {"value": -0.02, "ci": [-0.03, -0.01]}}}}
                            if effect else None),
    }
    path.write_text(json.dumps(record))
    return path


def test_the_acceptance_section_shows_stages_selection_merge_lmc_retention_and_the_localise_effect(tmp_path):
    results, section = load_bench("results"), load_bench("acceptance_section")
    text = "\n".join(section.acceptance_section(_acceptance(tmp_path / "a.json"), results.fmt_ci, results.md_table,
                                                results.verdict))
    assert "ran the stages profile, localise, align, student_build, distill, validate, export end to end; its last " \
        "invocation (a run resumes the stages an interrupted one finished) took 4,321 s with 2 thread(s)" in text
    # a record from before the child's peak was sampled: its process figure is the last stage's; the largest stage
    # peak is shown instead, and says why
    assert "peak RSS 4,000 MiB (the largest stage peak below; the process-level figure this record holds, 6,100 MiB" \
        in text
    sampled = json.loads((tmp_path / "a.json").read_text())
    sampled["cost"]["peak_rss_source"] = "max(VmHWM sampled, ru_maxrss)"
    (tmp_path / "s.json").write_text(json.dumps(sampled))
    assert "; peak RSS 6,100 MiB; exit code 3" in "\n".join(section.acceptance_section(
        tmp_path / "s.json", results.fmt_ci, results.md_table, results.verdict))
    assert "| localise | 4,362 | 4,000 |" in text and "| align | 3,000 | – |" in text
    assert "| gemma | prose | yes | 12 neurons | 3.50 [2.10, 5.00] | 612 |" in text
    assert "| gemma | arithmetic | no | – | – | 612 |" in text
    assert "gemma+gemma-code (ot) merged into one tower serving prose, code" in text
    assert "α = 0.5 chosen on held-out data, barrier 0.0123" in text
    assert "| prose | gemma | bpb | 100 | 0.900 [0.880, 0.920] |" in text
    assert "min -0.020 [-0.030, -0.010], **without localise better**" in text
    text = "\n".join(section.acceptance_section(_acceptance(tmp_path / "b.json", effect=False), results.fmt_ci,
                                                results.md_table, results.verdict))
    assert "not paired with the align_ot comparison run" in text


def test_without_the_run_the_section_says_how_to_make_it(tmp_path):
    results, section = load_bench("results"), load_bench("acceptance_section")
    lines = section.acceptance_section(tmp_path / "gemma_pair_acceptance.json", results.fmt_ci, results.md_table,
                                       results.verdict)
    assert lines == ["Not run yet: `python bench/acceptance_gemma_pair.py` (writes "
                     "`bench/results/gemma_pair_acceptance.json`)."]

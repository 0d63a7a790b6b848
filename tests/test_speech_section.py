"""RESULTS.md §12 renders bench/results/speech_encoder.json: word accuracies, retention with its CI, the encoder's
size against Whisper's, the copy check and the goal verdict."""

import json

from conftest import load_bench


def record(retention=0.5, goal_met=False):
    return {
        "teacher": "faster-whisper-base", "clips": {"train": 800, "heldout": 50, "voice": "espeak-ng en-us",
                                                    "text": "train: a; held-out: b"},
        "unpruned_copy_check": {"clips": 2, "max_abs_feature_diff": 0.0, "max_abs_logit_diff": 1.5e-5},
        "standalone_check": {"clips": 3, "same_text_as_in_process": True, "module": "modeling_nexus", "loader": "L"},
        "whisper_word_accuracy": 0.8, "whisper_word_accuracy_ci95": [0.75, 0.85],
        "student_word_accuracy": 0.8 * retention, "student_word_accuracy_ci95": [0.3, 0.5],
        "retention": retention, "retention_ci95": [0.4, 0.6], "whisper_encoder_params": 20_590_592,
        "student_encoder_params_with_projector": 5_147_173, "params_ratio_with_projector": 0.24998,
        "student_total_params": 60_000_000, "student_encoder_widths_heads_ffn": [[1, 700], [2, 300]],
        "tower": "whisper_decoder (frozen)", "pruning": "capability-weighted",
        "heldout_hidden_relative_error": 0.123,
        "hidden_state_distillation": {"steps": 600}, "distillation": {"steps": 300, "clips_per_step": 4,
                                                                      "encoder_lr": 5e-4},
        "seconds": {"teacher_pass": 700.4, "transcription_kd": 60.0}, "threads": 2,
        "goal": ">= 0.90 retention at <= 0.25 of Whisper's encoder parameters", "goal_met": goal_met,
        "samples": [{"reference": "A cat sat.", "whisper": "A cat sat.", "student": ""}],
    }


def test_speech_section_renders_the_json(tmp_path):
    results = load_bench("results")
    (tmp_path / "results").mkdir()
    md = tmp_path / "RESULTS.md"
    md.write_text("# NEXUS benchmarks\n\n## 1. Kept\n\nkept text\n")
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    assert "No `speech_encoder.json` yet: run `python bench/speech_encoder.py`." in md.read_text()
    (tmp_path / "results" / "speech_encoder.json").write_text(json.dumps(record()))
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    text = md.read_text()
    assert "## 1. Kept\n\nkept text\n" in text and text.count("## 12. Speech") == 1
    assert "| Whisper-base | 0.800 [0.750, 0.850] | – | 20,590,592 | 1.000 |" in text
    assert "| Nexus student | 0.400 [0.300, 0.500] | **0.500 [0.400, 0.600]** | 5,147,173 | 0.250 |" in text
    assert "its logits by at most 1.5e-05 (fp32)" in text
    assert "**missed** by the point estimate (the CI's lower end, 0.400, is below 0.90)" in text
    assert "cannot import NEXUS (L), it transcribed 3 held-out clips to the same text as" in text
    assert "1/700, 2/300" in text and "teacher pass 700 s" in text and "| A cat sat. | A cat sat. | (empty) |" in text
    (tmp_path / "results" / "speech_encoder.json").write_text(json.dumps(record(0.95, True)))
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    assert "**met**" in md.read_text() and md.read_text().count("## 12. Speech") == 1


def test_other_arms_get_a_paired_delta(tmp_path):
    results = load_bench("results")
    (tmp_path / "results").mkdir()
    main = dict(record(retention=17 / 19), items=[[1, 0, 10], [2, 1, 10]])
    arm = dict(record(retention=1.0), items=[[0, 0, 10], [1, 1, 10]])
    arm["distillation"] = dict(arm["distillation"], train_tower=True)
    other = dict(record(retention=0.5), items=[[0, 1, 10]])  # other clips: never paired
    for name, rec in (("speech_encoder", main), ("speech_encoder_train_tower", arm), ("speech_encoder_x", other)):
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps(rec))
    md = tmp_path / "RESULTS.md"
    results.main(["--committed-sections", "--results-dir", str(tmp_path / "results"), "--md", str(md)])
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `speech_encoder_train_tower.json`"))
    assert "train_tower True" in row and "| +0.105 [" in row
    assert "| `speech_encoder_x.json` | – | 0.500 [0.400, 0.600] | not paired (other clips) |" in text


def test_ram_plan_and_attached_checkpoint_render(tmp_path):
    section = load_bench("speech_section")
    (tmp_path / "speech_encoder.json").write_text(json.dumps(record(0.9, True)))
    mib = 2**20
    plan = {"plan": {"phases": {"convert": 100 * mib, "teacher": 300 * mib, "prune": 400 * mib, "train": 200 * mib},
                     "peak_phase": "prune", "total_bytes": 400 * mib,
                     "assumptions": {"clips": 10, "per_example_bytes": 2 * mib}},
            "command": "python bench/speech_encoder.py --memory-check",
            "measured_phase_peak_mib": {"convert": 125.0, "teacher": 300.0, "prune": 500.0, "train": 250.0},
            "peak_plan_over_measured": 0.8, "note": "N"}
    (tmp_path / "speech_ram_plan.json").write_text(json.dumps(plan))
    attach = {"attach": {"towers": ["gemma", "arith", "speech"], "params": {"text_student": 10, "speech_student": 5,
                                                                            "total": 16},
                         "added_params": 1, "shared_hidden_size": 640, "speech_tower": {"vocab_size": 51865}},
              "text": {"windows": 4, "tokens_per_window": 8, "max_abs_logit_diff": 0.0, "same_router_picks": True},
              "speech": {"clips": 7, "identical_transcripts": 6, "student_word_accuracy": 0.7,
                         "student_word_accuracy_ci95": [0.6, 0.8], "retention": 0.95, "retention_ci95": [0.9, 1.0]},
              "standalone_check": {"clips": 3, "same_text_as_in_process": False, "loader": "L2"}, "peak_rss_mb": 99.0}
    (tmp_path / "speech_attach.json").write_text(json.dumps(attach))
    table = load_bench("results").md_table
    text = "\n".join(section.speech_section(tmp_path / "speech_encoder.json", table))
    assert "| prune (peak) | 400 | 500 | 0.80 |" in text and "| convert | 100 | 125 | 0.80 |" in text
    assert "plan's peak is 0.80× the largest measured phase" in text
    assert "6/7 transcripts identical to the speech student's" in text
    assert "towers gemma, arith)" in text and "**different text from**" in text


def test_a_full_run_with_per_phase_peaks_gets_columns_of_its_own(tmp_path):
    """The full run's phases beside its own plan: a phase measured above its plan is marked **under**, and a measured
    phase the plan does not have is listed as not planned."""
    section = load_bench("speech_section")
    mib = 2**20
    phases = {"convert": 100 * mib, "teacher": 300 * mib, "prune": 400 * mib, "train": 200 * mib}
    main = {**record(0.9, True), "peak_rss_mb": 520.0,
            "ram_plan": {"phases": phases, "total_bytes": 400 * mib, "peak_phase": "prune"},
            "measured_phase_peak_mib": {"convert": 90.0, "teacher": 250.0, "prune": 380.0, "train": 260.0,
                                        "evaluate_and_save": 520.0}}
    plan = {"plan": {"phases": phases, "peak_phase": "prune", "total_bytes": 400 * mib,
                     "assumptions": {"clips": 10, "per_example_bytes": 2 * mib}},
            "command": "python bench/speech_encoder.py --memory-check",
            "measured_phase_peak_mib": {"convert": 125.0, "teacher": 300.0, "prune": 500.0, "train": 250.0},
            "peak_plan_over_measured": 0.8, "note": "N"}
    text = "\n".join(section.ram_lines(plan, load_bench("results").md_table, main))
    assert "| train | 200 | 250 | 0.80 | 200 | 260 | 0.77 **under** |" in text
    assert "| prune (peak) | 400 | 500 | 0.80 | 400 | 380 | 1.05 |" in text
    assert "| evaluate_and_save | not planned | – | – | not planned | 520 | – |" in text
    assert "(600 + 300 training steps, then evaluation and saving): plan 400 MiB, whole-process peak 520 MiB" in text
    # a phase the check's plan lacks but the full run's own plan has gets that plan; the whole run's peak is its
    # largest phase (ru_maxrss is reset with the per-phase high-water mark: 333 here is the last phase's)
    main["ram_plan"]["phases"] = {**phases, "evaluate": 500 * mib}
    main["measured_phase_peak_mib"] = {"convert": 90.0, "teacher": 250.0, "prune": 380.0, "train": 260.0,
                                       "evaluate": 530.0}
    main["peak_rss_mb"] = 333.0
    text = "\n".join(section.ram_lines(plan, load_bench("results").md_table, main))
    assert "| evaluate | not planned | – | – | 500 | 530 | 0.94 **under** |" in text
    assert "whole-process peak 530 MiB" in text and "333" not in text

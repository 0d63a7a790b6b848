"""The speech path's RAM plan (issue 21, item 5): five phases from the Whisper config and the run's settings, the
peak the largest; each term grows with what it counts, and a plan over the budget is refused with its parts."""

import pytest
from transformers import WhisperConfig

from nexus.conversion.memory_plan import MemoryPlanError
from nexus.conversion.speech_memory import example_bytes, plan_speech_ram, whisper_parameter_counts
from nexus.conversion.stage_memory import check_stage_plan

CONFIG = WhisperConfig(vocab_size=500, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                       max_source_positions=1500, max_target_positions=448, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, decoder_start_token_id=3)


def test_parameter_counts_match_the_model():
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(CONFIG)
    counts = whisper_parameter_counts(CONFIG)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # proj_out is tied: counted once
    assert counts["encoder"] == sum(p.numel() for p in model.model.encoder.parameters())


def test_phases_and_peak():
    plan = plan_speech_ram(CONFIG, n_clips=100, runtime=10**8, ct2_file_bytes=10**6)
    assert set(plan["phases"]) == {"convert", "teacher", "prune", "train", "evaluate"}
    assert plan["total_bytes"] == max(plan["phases"].values()) == plan["phases"][plan["peak_phase"]]
    assert sum(plan["components"].values()) == plan["total_bytes"]
    assert all(k.startswith(plan["peak_phase"] + ":") for k in plan["components"])
    # the prune phase is the teacher phase without its batch, plus one full-width calibration backward
    teacher, prune = plan["phase_components"]["teacher"], plan["phase_components"]["prune"]
    assert set(prune) == set(teacher) - {"teacher_batch_activations"} | {"calibration_backward"}
    assert all(prune[k] == teacher[k] for k in prune if k in teacher) and prune["calibration_backward"] > 0


def test_terms_grow_with_what_they_count():
    small = plan_speech_ram(CONFIG, n_clips=100, runtime=0)
    more = plan_speech_ram(CONFIG, n_clips=300, runtime=0)
    per = example_bytes(CONFIG)
    assert more["phases"]["train"] - small["phases"]["train"] == 200 * per
    assert per == small["assumptions"]["per_example_bytes"]
    tower = plan_speech_ram(CONFIG, n_clips=100, runtime=0, train_tower=True)
    counts = whisper_parameter_counts(CONFIG)
    assert tower["assumptions"]["trained_params"] - small["assumptions"]["trained_params"] == counts["decoder_layers"]
    assert tower["phases"]["train"] - small["phases"]["train"] == 12 * counts["decoder_layers"]
    half = plan_speech_ram(CONFIG, n_clips=100, runtime=0, budget=0.5)
    assert half["assumptions"]["student_params"] > small["assumptions"]["student_params"]


def test_a_plan_over_the_budget_is_refused_with_its_parts():
    plan = plan_speech_ram(CONFIG, n_clips=10_000, runtime=0)
    refused = r"stage speech: planned peak RAM .* exceeds the budget .*examples.*--ram-gb"
    with pytest.raises(MemoryPlanError, match=refused):
        check_stage_plan(plan, plan["total_bytes"] - 1, "--ram-gb",
                         hint="pass --ram-gb, or fewer --train clips")
    assert check_stage_plan(plan, plan["total_bytes"], "--ram-gb") is plan


def test_training_counts_autocast_copies_and_the_tower_side_of_kd():
    from nexus.conversion.speech_memory import encoder_activation_bytes, tower_kd_bytes

    plain = encoder_activation_bytes(CONFIG, 1, 1500, 4, layers=2, ffn=32, heads=1)
    mixed = encoder_activation_bytes(CONFIG, 1, 1500, 4, layers=2, ffn=32, heads=1, autocast=True)
    assert mixed - plain == 2 * (1500 * (5 * 64 + 32) * 2 + 1500 * 1500 * 4)
    plan = plan_speech_ram(CONFIG, n_clips=100, runtime=0)
    train = plan["phase_components"]["train"]
    assert train["tower_kd_backward"] == tower_kd_bytes(CONFIG, 1500, 64)
    # the frozen tower's bf16 weight copies (decoder layers + the tied embedding) are part of it
    counts = whisper_parameter_counts(CONFIG)
    assert train["tower_kd_backward"] > 2 * (counts["decoder_layers"] + CONFIG.vocab_size * CONFIG.d_model)
    longer = plan_speech_ram(CONFIG, n_clips=100, runtime=0, max_new_tokens=128)
    assert longer["phase_components"]["train"]["tower_kd_backward"] > train["tower_kd_backward"]
    evaluate = plan["phase_components"]["evaluate"]
    assert evaluate["serialised_weights"] == evaluate["student_fp32_weights"] == train["student_fp32_weights"]

"""`nexus speech-student` (speech_build.py) end to end on a tiny random Whisper saved as an HF folder and a folder of
synthetic clips: the pruned, distilled student is written with its processor and record, loads and transcribes;
bad clip folders, teachers and budgets are refused by name with nothing written."""

import json

import pytest
import torch
from test_audio_input import sine, write_wav
from test_ctranslate2_whisper import tiny_whisper, tiny_whisper_tokenizer
from transformers import WhisperFeatureExtractor
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.speech_build import (
    SpeechBuildError,
    SpeechBuildOptions,
    build_speech_student,
    read_clips,
)

TINY = {"budget": 0.95, "heldout": 2, "calibration": 2, "encoder_steps": 2, "steps": 2, "accumulate": 1,
        "max_new_tokens": 6}


def whisper_folder(folder):
    """A tiny random Whisper with the standard 30 s window (a saved feature extractor always has it)."""
    tok = tiny_whisper_tokenizer()
    whisper = tiny_whisper(len(tok), max_source_positions=1500).float()
    with torch.no_grad():  # an EOS logit of 0: the random tiny Whisper writes a few letters before it stops
        whisper.model.decoder.embed_tokens.weight[tok.eos_token_id] = 0
    whisper.save_pretrained(folder)
    tok.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def clip_folder(folder, n=6, references=True):
    folder.mkdir(parents=True)
    for i in range(n):
        write_wav(folder / f"{i:02d}.wav", sine(150 + 40 * i, 16000, seconds=0.1), 16000)
        if references:
            (folder / f"{i:02d}.txt").write_text("the cat sat" if i % 2 else "a dog ran")
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return whisper_folder(tmp_path_factory.mktemp("whisper") / "whisper")


@pytest.fixture(scope="module")
def built(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("speech-build")
    clips = clip_folder(root / "clips")
    out = root / "student"
    return build_speech_student(teacher, clips, out, SpeechBuildOptions(**TINY)), out, clips


def test_the_student_is_pruned_distilled_scored_and_written_with_its_processor(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor

    record, out, clips = built
    assert record["clips"] == {"folder": str(clips), "train": 4, "heldout": 2, "reference": "NAME.txt transcripts"}
    assert record["student_encoder_params_with_projector"] <= 0.95 * record["whisper_encoder_params"]
    assert 0 <= record["student_word_accuracy"] <= 1 and len(record["items"]) == 2
    if record["whisper_word_accuracy"] == 0:  # the random tiny Whisper gets no reference word right
        assert record["retention"] is None and record["retention_note"].startswith("undefined")
    assert record["hidden_state_distillation"]["steps"] == 2 and record["distillation"]["steps"] == 2
    # every planned phase is measured (evaluate: scoring and saving), and the file holds those measurements
    assert set(record["measured_phase_peak_mib"]) == set(record["ram_plan"]["phases_mib"]) == {
        "convert", "teacher", "prune", "train", "evaluate"}
    on_disk = json.loads((out / "speech_student.json").read_text())
    assert on_disk["retention"] == record["retention"]
    assert on_disk["measured_phase_peak_mib"] == record["measured_phase_peak_mib"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.model.encoders[0].parameters()) == \
        record["student_encoder_params_with_projector"]
    text = model.transcribe(str(clips / "05.wav"), WhisperFeatureExtractor.from_pretrained(out),
                            AutoTokenizer.from_pretrained(out), max_new_tokens=6)
    assert text == record["samples"][-1]["student"]  # the saved student transcribes as the scored one did


def test_the_speech_student_attaches_to_a_text_student(built, tmp_path):
    """The command's output is what `nexus attach-speech` takes: hashes recorded, processor beside the weights."""
    from test_speech_attach import text_student

    from nexus.conversion.speech_attach import attach_speech

    record, out, _ = built
    assert (out / "nexus_hashes.json").is_file()
    attached = attach_speech(text_student(tmp_path / "text"), out, tmp_path / "both")
    assert attached["exactness"]["speech_max_abs_logit_diff"] <= 1e-4
    assert attached["student_hashes"]["speech"]


def test_without_references_the_clips_are_scored_against_whisper(teacher, tmp_path):
    clips = clip_folder(tmp_path / "clips", n=4, references=False)
    assert read_clips(clips)[1] is None
    record = build_speech_student(teacher, clips, tmp_path / "out", SpeechBuildOptions(**{**TINY, "steps": 0}))
    assert record["clips"]["reference"] == "Whisper's own transcripts (agreement)"
    assert record["whisper_word_accuracy"] == 1.0  # Whisper against itself
    assert record["retention"] == pytest.approx(record["student_word_accuracy"])
    lo, hi = record["retention_ci95"]
    assert lo <= record["retention"] <= hi


def test_bad_inputs_are_refused_by_name_and_nothing_is_written(teacher, tmp_path):
    options = SpeechBuildOptions(**TINY)
    out = tmp_path / "out"
    clips = clip_folder(tmp_path / "clips", n=3)
    cases = [
        (teacher, tmp_path / "nowhere", "clip folder .*nowhere does not exist"),
        (teacher, tmp_path, r"holds no \.wav file"),
        (tmp_path / "no-whisper", clips, "does not exist"),
        (clips, clips, "neither a CTranslate2 Whisper folder"),
    ]
    for whisper, folder, message in cases:
        with pytest.raises(SpeechBuildError, match=message):
            build_speech_student(whisper, folder, out, options)
    with pytest.raises(SpeechBuildError, match="heldout=2 leaves no training clip"):
        build_speech_student(teacher, clip_folder(tmp_path / "two", n=2), out, options)
    (clips / "01.txt").unlink()
    with pytest.raises(SpeechBuildError, match="01.txt is missing.*2 of 3 clips"):
        build_speech_student(teacher, clips, out, options)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(SpeechBuildError, match="only pickle files, refused: pytorch_model.bin"):
        build_speech_student(pickled, clip_folder(tmp_path / "ok", n=4), out, options)
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SpeechBuildError, match="'llama' model, not a Whisper one"):
        build_speech_student(pickled, tmp_path / "ok", out, options)
    from nexus.conversion.memory_plan import MemoryPlanError

    with pytest.raises(MemoryPlanError, match="ram_gb"):
        build_speech_student(teacher, tmp_path / "ok", out, SpeechBuildOptions(**{**TINY, "ram_gb": 0.001}))
    assert not out.exists() and not list(tmp_path.glob("out*"))
    out.mkdir()
    with pytest.raises(SpeechBuildError, match="exists; pass overwrite"):
        build_speech_student(teacher, tmp_path / "ok", out, options)


def test_the_command_prints_the_score_and_refuses_bad_input_in_one_line(teacher, tmp_path):
    clips = clip_folder(tmp_path / "clips")
    out = tmp_path / "student"
    args = ["speech-student", str(teacher), str(clips), "--out", str(out), "--budget", "0.95", "--heldout", "2",
            "--encoder-steps", "1", "--steps", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "speech_student.json").read_text())
    shown = "retention " + (f"{record['retention']:.3f}" if record["retention"] is not None
                            else record["retention_note"])
    assert shown in result.output and f"wrote {out}" in result.output
    train = record["ram_plan"]["phases_mib"]["train"], record["measured_phase_peak_mib"]["train"]
    assert f"train {train[0]:,.0f} / {train[1]:,.0f}" in result.output  # each phase: planned / measured
    bad = CliRunner().invoke(app, args[:4] + [str(tmp_path / "other"), "--budget", "1.5"])
    assert bad.exit_code == 2 and not (tmp_path / "other").exists()
    # pydantic's several-line message, as one line naming the model, the field, the rule and the value
    assert bad.output.strip().splitlines() == [
        "error: SpeechBuildOptions: budget: Input should be less than or equal to 1 (got 1.5)"]

"""The speech student's build, capability-weighted pruning and distillation steps, on a tiny random Whisper."""

import shutil

import pytest
import torch
from test_ctranslate2_whisper import tiny_whisper, tiny_whisper_tokenizer

from nexus.conversion.speech_distill import (
    SpeechExample,
    distil_speech,
    spoken_sentences,
    word_accuracy,
    word_errors,
)
from nexus.conversion.speech_prune import (
    allocate_units,
    audio_encoder_parameter_count,
    prune_audio_encoder,
    speech_unit_scores,
)
from nexus.conversion.speech_student import (
    speech_student_from_whisper,
    whisper_prompt_ids,
)


@pytest.fixture()
def whisper_and_tokenizer():
    tokenizer = tiny_whisper_tokenizer()
    return tiny_whisper(len(tokenizer)).float(), tokenizer


def test_build_prune_distil(whisper_and_tokenizer):
    whisper, tok = whisper_and_tokenizer
    student = speech_student_from_whisper(whisper, tok)
    enc = student.model.encoders[0]
    feats = torch.randn(1, 80, 16)
    with torch.no_grad():  # the encoder is Whisper's, copied exactly
        ours = enc.encode(feats)[0]
        theirs = whisper.model.encoder(feats).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    prompt = whisper_prompt_ids(tok)
    assert prompt == [1, 2, 5, 9]
    labels = torch.tensor([prompt + [12, 13, 0]])
    scores = speech_unit_scores(enc, whisper, [(feats, labels), (torch.randn(1, 80, 16), labels)])
    assert [s.shape for s in scores["heads"]] == [torch.Size([2])] * 2
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores["neurons"])
    full = audio_encoder_parameter_count(student.config.encoders[0], student.config.hidden_size)
    keep = allocate_units(enc, scores, int(full * 0.9), hidden_size=student.config.hidden_size)
    student = prune_audio_encoder(student, keep)
    n = sum(p.numel() for p in student.model.encoders[0].parameters())
    assert n <= 0.9 * full

    ex = SpeechExample(features=torch.randn(1, 80, 16), teacher_states=torch.randn(8, 16).half(),
                       input_ids=torch.tensor(prompt + [12, 13]), topk_values=torch.randn(3, 4).half(),
                       topk_indices=torch.randint(0, len(tok), (3, 4)), transcript="lm", reference="lm")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    log = distil_speech(student, [ex], steps=2, accumulate=1, progress=None, bf16=False)
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in log)
    after = student.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(after["model.encoders.0.conv1.weight"], before["model.encoders.0.conv1.weight"])
    assert not torch.equal(after["model.towers.0.layers.1.encoder_attn.q_proj.weight"],
                           before["model.towers.0.layers.1.encoder_attn.q_proj.weight"])
    frozen = distil_speech(student, [ex], steps=1, accumulate=1, progress=None, train_tower=False, bf16=False)
    assert frozen[0]["ce"] > 0  # the transcription loss ran through the tower, which stayed as it was
    assert all(torch.equal(v, after[k]) for k, v in student.state_dict().items() if k.startswith("model.towers."))
    enc_only = distil_speech(student, [ex], steps=1, accumulate=1, progress=None, weights=(1.0, 0.0, 0.0), bf16=False)
    assert enc_only[0]["ce"] == 0.0


def test_distil_speech_hands_freed_memory_back_every_few_steps(whisper_and_tokenizer, monkeypatch):
    import nexus.conversion.speech_distill as speech_distill

    whisper, tok = whisper_and_tokenizer
    student = speech_student_from_whisper(whisper, tok)
    ex = SpeechExample(features=torch.randn(1, 80, 16), teacher_states=torch.randn(8, 16).half(),
                       input_ids=torch.tensor(whisper_prompt_ids(tok) + [12]), topk_values=torch.randn(2, 4).half(),
                       topk_indices=torch.randint(0, len(tok), (2, 4)), transcript="l", reference="l")
    calls = []
    monkeypatch.setattr(speech_distill, "release_freed_memory", lambda: calls.append(1))
    log = distil_speech(student, [ex], steps=5, accumulate=1, progress=None, bf16=False, release_every=2,
                        weights=(1.0, 0.0, 0.0))
    assert len(log) == 5 and len(calls) == 3  # after steps 2 and 4, and at the end


def test_word_errors_and_accuracy():
    assert word_errors("The cat, sat.", "the cat sat") == (0, 3)
    assert word_errors("a b c", "a x c d") == (2, 3)
    assert word_errors("well-known words", "well known words") == (0, 3)
    import numpy as np
    assert word_accuracy(np.array([[1, 4], [0, 6]])) == pytest.approx(0.9)
    assert word_accuracy(np.array([[9, 3]])) == 0.0  # floored


def test_spoken_sentences_are_plain_and_disjoint():
    text = "Hello there my good friend. Use foo_bar() now please ok. Numbers like 42 are out here too.\n" \
           "Another plain sentence is right here today."
    first = spoken_sentences(text, 10, min_words=3)
    assert "Hello there my good friend." in first and not any("_" in s or "42" in s for s in first)
    second = spoken_sentences(text, 10, min_words=3, exclude=first)
    assert not set(first) & set(second)


def test_teacher_pass_examples_round_trip(tmp_path):
    from test_audio_input import sine, write_wav
    from transformers import WhisperFeatureExtractor

    from nexus.conversion.speech_distill import load_examples, save_examples

    spec = {"sampling_rate": 16000, "downsample": 1, "max_source_positions": 8, "fixed_window": True}
    fe = WhisperFeatureExtractor(feature_size=80)
    wavs = []
    for i in range(2):
        wavs.append(tmp_path / f"{i}.wav")
        write_wav(wavs[-1], sine(200 + 100 * i, 16000, seconds=0.05), 16000)
    examples = [SpeechExample(features=torch.zeros(1), teacher_states=torch.randn(8, 16).half(),
                              input_ids=torch.tensor([1, 2, 3 + i]), topk_values=torch.randn(2, 4).half(),
                              topk_indices=torch.randint(0, 9, (2, 4)), transcript=f"t{i}", reference=f"r{i}")
                for i in range(2)]
    save_examples(examples, tmp_path / "cache" / "train.safetensors")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train.json", "train.safetensors"]
    back = load_examples(tmp_path / "cache" / "train.safetensors", wavs, fe, spec)
    for a, b in zip(examples, back):
        for name in ("teacher_states", "input_ids", "topk_values", "topk_indices"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert (a.transcript, a.reference) == (b.transcript, b.reference)
        assert b.features.shape == (1, 80, 16)  # recomputed from the WAV: the full (tiny) window
    with pytest.raises(ValueError, match="2 cached examples for 1 clips"):
        load_examples(tmp_path / "cache" / "train.safetensors", wavs[:1], fe, spec)


def test_hidden_state_loss_weights_speech_and_padding_apart():
    from nexus.conversion.speech_distill import HiddenStateLoss, speech_positions

    assert speech_positions(16000) == 50 and speech_positions(16001) == 51  # 20 ms per encoder position
    teacher = torch.ones(10, 4)
    teacher[:2] *= 3.0  # the speech: 2 positions
    student = teacher.clone()
    student[:2] += 1.0  # all the error is on the speech
    plain = HiddenStateLoss()(student, teacher, 2)
    assert plain == pytest.approx(8 / (2 * 4 * 9 + 8 * 4))  # one relative error over the window
    weighted = HiddenStateLoss(speech_weight=0.75)(student, teacher, 2)
    assert weighted == pytest.approx(0.75 * 8 / 72)  # the padding is exact: only the speech term remains
    assert HiddenStateLoss(speech_weight=0.75)(student, teacher, 0) == pytest.approx(plain)  # unknown: plain


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (setup.sh installs it)")
def test_synthesized_clips_are_named_by_their_words(tmp_path):
    from nexus.conversion.speech_distill import synthesize

    first = synthesize(["one two three", "four five six"], tmp_path)
    again = synthesize(["one two three", "seven eight nine"], tmp_path)  # index 1 now holds other words
    assert first[0] == again[0] and first[1] != again[1]
    assert first[1].read_bytes() != again[1].read_bytes()  # a new clip, not the stale one
    assert [p.name[:5] for p in again] == ["0000-", "0001-"]


def test_distil_student_runs_both_parts_and_calls_between_them(whisper_and_tokenizer, monkeypatch):
    """`speech_build.distil_student`: hidden-state steps, then ``between()``, then the KD steps, each part logged."""
    from nexus.conversion.speech_build import SpeechBuildOptions, distil_student

    whisper, tok = whisper_and_tokenizer
    student = speech_student_from_whisper(whisper, tok)
    prompt = whisper_prompt_ids(tok)
    ex = SpeechExample(features=torch.randn(1, 80, 16), teacher_states=torch.randn(8, 16).half(),
                       input_ids=torch.tensor(prompt + [12, 13]), topk_values=torch.randn(3, 4).half(),
                       topk_indices=torch.randint(0, len(tok), (3, 4)), transcript="lm", reference="lm")
    calls, released = [], []
    import nexus.conversion.speech_distill as speech_distill

    monkeypatch.setattr(speech_distill, "release_freed_memory", lambda: released.append(len(calls)))
    logs = distil_student(student, [ex], SpeechBuildOptions(encoder_steps=2, steps=1, accumulate=1), progress=None,
                          between=lambda: calls.append(len(calls)))
    assert calls == [0]
    # freed memory goes back to the OS at the end of each part (before between()) -- the RAM plan counts one part
    assert released == [0, 1]
    assert logs["hidden_state_distillation"]["steps"] == 2 and logs["hidden_state_distillation"]["last"][-1]["ce"] == 0
    assert logs["distillation"]["last"][-1]["step"] == 1 and logs["distillation"]["last"][-1]["ce"] > 0

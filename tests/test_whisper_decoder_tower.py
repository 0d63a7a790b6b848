"""The ``whisper_decoder`` tower: Whisper's decoder inside a Nexus student, weight for weight, with its KV cache, its
transcription, a checkpoint that loads without NEXUS code, and clear errors for bad specs."""

import pytest
import torch
from test_ctranslate2_whisper import tiny_whisper, tiny_whisper_tokenizer
from transformers import AutoModelForCausalLM, WhisperFeatureExtractor

from nexus.conversion.speech_student import speech_student_from_whisper, whisper_prompt_ids
from nexus.modeling_nexus import NexusConfig, registered


@pytest.fixture()
def pair():
    tokenizer = tiny_whisper_tokenizer()
    whisper = tiny_whisper(len(tokenizer)).float()
    return whisper, speech_student_from_whisper(whisper, tokenizer), tokenizer


def test_tower_type_is_registered():
    assert "whisper_decoder" in registered("tower")


def test_student_logits_equal_whisper(pair):
    whisper, student, tok = pair
    assert student.config.encoders[0]["fixed_window"] and student.config.towers[0]["type"] == "whisper_decoder"
    feats = torch.randn(2, 80, 16)  # the tiny Whisper's full window: 8 positions after the stride-2 conv
    ids = torch.tensor([whisper_prompt_ids(tok) + [12, 13, 14]] * 2)
    with torch.no_grad():
        ref = whisper(input_features=feats, decoder_input_ids=ids).logits
        full = student(input_ids=ids, input_features=feats, use_cache=False).logits  # (B, 8 prefix + 7 text, V)
        assert full.shape == (2, 8 + 7, ref.shape[-1])
        assert torch.equal(full[:, :8], student.lm_head(torch.zeros(2, 8, 16)))  # the prefix holds zeros
        torch.testing.assert_close(full[:, 8:], ref, rtol=0, atol=1e-4)
        out = student(input_ids=ids[:, :4], input_features=feats, use_cache=True)  # cached decoding, step by step
        steps = [out.logits[:, -1]]
        for t in range(4, ids.shape[1]):
            cache = out.past_key_values if "past_key_values" in out else out.cache
            out = student(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), ref[:, 3:], rtol=0, atol=1e-4)


def test_transcribe_is_whispers_greedy_decode(pair):
    whisper, _, tok = pair
    with torch.no_grad():  # an EOS logit of 0: the random tiny Whisper then writes letters before it stops
        whisper.model.decoder.embed_tokens.weight[tok.eos_token_id] = 0
    student = speech_student_from_whisper(whisper, tok)
    fe = WhisperFeatureExtractor(feature_size=80)
    fe.n_samples, fe.nb_max_frames = 16 * 160, 16  # the tiny Whisper's window: 16 frames of 10 ms
    torch.manual_seed(1)
    wave = torch.randn(1500) * 0.1  # shorter than the window: padded to it, as Whisper pads
    text = student.transcribe(wave, fe, tok, max_new_tokens=6)
    feats = fe([wave.numpy()], sampling_rate=16000, return_tensors="pt").input_features
    ids = whisper_prompt_ids(tok)
    with torch.no_grad():
        for _ in range(6):
            token = int(whisper(input_features=feats, decoder_input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            ids.append(token)
    assert text and text == tok.decode(ids[4:], skip_special_tokens=True).strip()
    # transformers' generate() gives the same tokens (it counts text positions only; the model adds the prefix)
    out = student.generate(input_ids=torch.tensor([ids[:4]]), input_features=feats, max_new_tokens=len(ids) - 4,
                           do_sample=False)
    assert out[0].tolist()[:len(ids)] == ids
    beams = [student.generate(input_ids=torch.tensor([ids[:4]]), input_features=feats, max_new_tokens=5,
                              do_sample=False, num_beams=3, use_cache=cached) for cached in (True, False)]
    assert torch.equal(*beams)  # beam search reorders the cross-attention cache slots with the rest


def test_checkpoint_round_trip(pair, tmp_path):
    _, student, _ = pair
    student.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"whisper_decoder_tower.py", "whisper_attention.py", "model.safetensors"} <= names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    ids, feats = torch.tensor([[1, 2, 5, 9, 12]]), torch.randn(1, 80, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, input_features=feats).logits,
                                   student(input_ids=ids, input_features=feats).logits, rtol=0, atol=1e-6)


def test_cache_slots_count_two_per_layer(pair):
    _, student, _ = pair
    assert student.config.num_hidden_layers == 1 + 2 * 2  # the routing record, then self + cross per layer
    slots = [(layer.self_slot, layer.cross_slot) for layer in student.model.towers[0].layers]
    assert slots == [(1, 2), (3, 4)]


@pytest.mark.parametrize("layer, match", [
    ({"num_attention_heads": 2, "head_dim": 8, "intermediate_size": 16}, r"towers\[0\]\.layers\[0\] must be a dict"),
    ({"num_attention_heads": 2, "head_dim": 0, "cross_attention_heads": 2, "intermediate_size": 16},
     r"towers\[0\]\.layers\[0\]\.head_dim"),
    ({"num_attention_heads": -1, "head_dim": 8, "cross_attention_heads": 2, "intermediate_size": 16},
     r"towers\[0\]\.layers\[0\]\.num_attention_heads"),
])
def test_bad_layer_names_the_field(layer, match):
    with pytest.raises(ValueError, match=match):
        NexusConfig(vocab_size=40, hidden_size=16, towers=[{"type": "whisper_decoder", "layers": [layer]}])


def test_width_must_match_the_shared_hidden_size():
    layer = {"num_attention_heads": 2, "head_dim": 8, "cross_attention_heads": 2, "intermediate_size": 16}
    with pytest.raises(ValueError, match=r"towers\[0\]\.hidden_size \(32\) must equal the shared hidden_size \(16\)"):
        NexusConfig(vocab_size=40, hidden_size=16, towers=[{"type": "whisper_decoder", "hidden_size": 32,
                                                            "layers": [layer]}])
    with pytest.raises(ValueError, match=r"towers\[0\]: unknown field\(s\) \['rope_theta'\]"):
        NexusConfig(vocab_size=40, hidden_size=16, towers=[{"type": "whisper_decoder", "rope_theta": 1.0,
                                                            "layers": [layer]}])


def test_speech_checkpoint_transcribes_in_a_process_without_nexus(pair, tmp_path):
    from test_audio_input import sine, write_wav

    from nexus.hub.fresh_load import fresh_process_transcripts

    whisper, _, tok = pair
    with torch.no_grad():  # as above: letters before EOS
        whisper.model.decoder.embed_tokens.weight[tok.eos_token_id] = 0
    student = speech_student_from_whisper(whisper, tok)
    fe = WhisperFeatureExtractor(feature_size=80)
    fe.n_samples, fe.nb_max_frames = 16 * 160, 16
    folder = tmp_path / "ckpt"
    for part in (student, tok, fe):
        part.save_pretrained(folder)
    wav = tmp_path / "clip.wav"
    write_wav(wav, sine(300, 22050, seconds=0.1), 22050)  # espeak-ng's rate: resampled to 16 kHz
    here = student.transcribe(str(wav), fe, tok, max_new_tokens=6)
    texts, module = fresh_process_transcripts(folder, [wav], max_new_tokens=6)
    assert here and texts == [here] and "transformers_modules" in module

"""`nexus attach-speech` (issue 21): a text student and a speech student become one checkpoint. Text logits stay the
text student's, audio-prefixed logits and transcripts stay the speech student's, the router never sends text to the
speech tower (its own token space), the speech processor loads from the subfolder, and bad pairs are refused with
nothing written."""

import json
import shutil

import pytest
import torch
from conftest import small_bpe_tokenizer
from test_ctranslate2_whisper import tiny_whisper, tiny_whisper_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor
from typer.testing import CliRunner

from nexus.cli import app
from nexus.conversion.speech_attach import RECORD_FILE, AttachSpeechError, attach_speech
from nexus.conversion.speech_student import speech_student_from_whisper, whisper_prompt_ids
from nexus.conversion.student_hashes import write_student_hashes
from nexus.modeling_nexus import NexusConfig, NexusForCausalLM

LAYER = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 24}


def text_student(folder, towers=2, hidden=32, speech_capability=False):
    """Towers t0 (a, b) and, with ``towers=2``, t1 (own vocabulary, width 16) serving c."""
    tok = small_bpe_tokenizer()
    specs = [{"type": "decoder", "name": "t0", "capabilities": ["a", "b"] + (["speech"] if speech_capability else []),
              "layers": [LAYER] * 2}]
    if towers == 2:
        specs.append({"type": "decoder", "name": "t1", "capabilities": ["c"], "hidden_size": 16, "vocabulary": "own",
                      "vocabulary_ids": list(range(0, 200, 2)), "layers": [LAYER]})
    config = NexusConfig(vocab_size=len(tok), hidden_size=hidden, towers=specs, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = NexusForCausalLM(config).eval()
    if towers == 2:  # a router that does route: class 1 for rows whose mean embedding leans one way
        with torch.no_grad():
            model.model.router.proj.weight.normal_()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_student_hashes(folder)
    return folder


def feature_extractor():
    fe = WhisperFeatureExtractor(feature_size=80)
    fe.n_samples, fe.nb_max_frames = 16 * 160, 16  # the tiny Whisper's window: 16 frames of 10 ms
    return fe


def speech_folder(folder):
    tok = tiny_whisper_tokenizer()
    whisper = tiny_whisper(len(tok)).float()
    with torch.no_grad():  # an EOS logit of 0: the random tiny Whisper then writes letters before it stops
        whisper.model.decoder.embed_tokens.weight[tok.eos_token_id] = 0
    model = speech_student_from_whisper(whisper, tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    feature_extractor().save_pretrained(folder)
    write_student_hashes(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("attach")
    return text_student(root / "text"), speech_folder(root / "speech")


@pytest.fixture(scope="module")
def attached(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("attached") / "student"
    return attach_speech(*sources, out), out


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def test_record_and_layout(attached):
    record, out = attached
    assert record["towers"] == ["t0", "t1", "speech"] and record["encoders"] == ["speech"]
    assert record["capability_to_tower"] == {"a": 0, "b": 0, "c": 1, "speech": 2}
    assert record["exactness"]["text_max_abs_logit_diff"] == 0.0
    assert record["exactness"]["speech_max_abs_logit_diff"] <= 1e-5
    assert record["added_params"] > 0  # the projector's and cross-attention's zero padding, the router class
    assert json.loads((out / RECORD_FILE).read_text())["schema"] == "nexus.attach_speech/1"
    assert {"preprocessor_config.json", "tokenizer.json"} <= {p.name for p in (out / "speech").iterdir()}
    assert {"tokenizer.json", "whisper_decoder_tower.py", "nexus_hashes.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["towers"][2]["vocab_size"] == record["speech_tower"]["vocab_size"]


def test_text_logits_and_generation_are_the_text_students(sources, attached):
    text, _ = sources
    model, before = _load(attached[1]), _load(text)
    ids = torch.randint(0, before.config.vocab_size, (6, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, ref = model(input_ids=ids), before(input_ids=ids)
    assert torch.equal(got.tower_index, ref.tower_index) and set(ref.tower_index.tolist()) == {0, 1}
    assert torch.equal(got.logits, ref.logits)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids[:2], **kwargs), before.generate(ids[:2], **kwargs))


def test_router_never_picks_the_speech_tower(attached):
    model = _load(attached[1])
    with torch.no_grad():
        model.model.router.proj.bias[2] = 1e6  # the speech class would win every row
        out = model(input_ids=torch.randint(0, 300, (4, 8)))
    assert 2 not in out.tower_index.tolist() and out.logits.shape[-1] == model.config.vocab_size


def test_speech_logits_and_transcripts_are_the_speech_students(sources, attached):
    _, speech = sources
    model, before = _load(attached[1]), _load(speech)
    tok = AutoTokenizer.from_pretrained(attached[1], subfolder="speech")
    fe = WhisperFeatureExtractor.from_pretrained(attached[1], subfolder="speech")
    ids = torch.tensor([whisper_prompt_ids(tok) + [12, 13]])
    feats = torch.randn(1, 80, 16)
    with torch.no_grad():
        got = model(input_ids=ids, input_features=feats).logits
        ref = before(input_ids=ids, input_features=feats).logits
    assert got.shape[-1] == before.config.vocab_size != model.config.vocab_size  # Whisper's token space
    torch.testing.assert_close(got[:, -ids.shape[1]:], ref[:, -ids.shape[1]:], rtol=0, atol=1e-5)
    torch.manual_seed(1)
    wave = torch.randn(1500) * 0.1
    text = model.transcribe(wave, fe, tok, max_new_tokens=6)
    assert text and text == before.transcribe(wave, fe, tok, max_new_tokens=6)
    kwargs = dict(input_features=feats, max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id)
    assert torch.equal(model.generate(ids, **kwargs), before.generate(ids, **kwargs))


def test_own_token_space_needs_input_ids(attached):
    model = _load(attached[1])
    with pytest.raises(ValueError, match="own token space: pass input_ids"):
        model(inputs_embeds=torch.randn(1, 3, model.config.hidden_size), tower="speech")


def test_one_tower_text_student_gets_a_router(sources, tmp_path):
    text = text_student(tmp_path / "one", towers=1)
    record = attach_speech(text, sources[1], tmp_path / "out")
    assert record["towers"] == ["t0", "speech"] and record["exactness"]["text_max_abs_logit_diff"] == 0.0
    model = _load(tmp_path / "out")
    with torch.no_grad():
        assert model(input_ids=torch.randint(0, 300, (3, 5))).tower_index.tolist() == [0, 0, 0]


@pytest.mark.parametrize("case, match", [
    ("narrow", r"hidden_size 8, narrower than the speech student's 16"),
    ("no_encoder", r"needs exactly one whisper_audio encoder"),
    ("already", r"already has encoder\(s\) \['speech'\]"),
    ("clash", r"capability 'speech' is served by both students"),
    ("no_processor", r"no processor \(preprocessor_config.json and a tokenizer\)"),
])
def test_bad_pairs_are_refused_and_nothing_is_written(case, match, sources, attached, tmp_path):
    text, speech = sources
    if case == "narrow":
        text = text_student(tmp_path / "narrow", towers=1, hidden=8)
    elif case == "no_encoder":
        speech = text
    elif case == "already":
        text = attached[1]
    elif case == "no_processor":
        speech = tmp_path / "bare-speech"
        shutil.copytree(sources[1], speech)
        (speech / "preprocessor_config.json").unlink()
    else:
        text = text_student(tmp_path / "clash", towers=1, speech_capability=True)
    with pytest.raises(AttachSpeechError, match=match):
        attach_speech(text, speech, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli(sources, tmp_path):
    result = CliRunner().invoke(app, ["attach-speech", str(sources[0]), str(sources[1]), "--out",
                                      str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "towers: t0, t1, speech" in result.output and (tmp_path / "cli" / RECORD_FILE).is_file()
    again = CliRunner().invoke(app, ["attach-speech", str(sources[0]), str(sources[1]), "--out",
                                     str(tmp_path / "cli")])
    assert again.exit_code != 0 and "exists" in again.output


def test_remove_capability_keeps_speech_and_refuses_the_speech_tower(sources, attached, tmp_path):
    from nexus.conversion.remove_capability import RemoveCapabilityError, remove_capability

    with pytest.raises(RemoveCapabilityError, match="served by the speech tower"):
        remove_capability(attached[1], "speech", tmp_path / "no-speech")
    assert not (tmp_path / "no-speech").exists()
    record = remove_capability(attached[1], "c", tmp_path / "no-c")  # t1 goes; the speech tower moves to index 1
    assert record["towers_after"] == ["t0", "speech"]
    model, before = _load(tmp_path / "no-c"), _load(sources[1])
    ids, feats = torch.tensor([[1, 2, 5, 9]]), torch.randn(1, 80, 16)
    with torch.no_grad():
        got = model(input_ids=ids, input_features=feats).logits[:, -4:]
        ref = before(input_ids=ids, input_features=feats).logits[:, -4:]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)

"""The CTranslate2 Whisper reader, on a tiny synthetic model.bin written here in CTranslate2's layout (no download).

The writer below mirrors CTranslate2's own converter (`converters/transformers.py::WhisperLoader` and
`specs/model_spec.py::_serialize`): fused self-attention q/k/v with a zero k bias, fused cross-attention k/v, the
output projection as an alias of the embeddings, scalars as 0-d int8/int16 variables.
"""

import json
import struct

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from nexus.conversion.ctranslate2_whisper import (
    CTranslate2FormatError, is_ctranslate2_model, read_ctranslate2_model, whisper_from_ctranslate2)
from nexus.conversion.teacher_source import TeacherSourceError, check_teacher_source

DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


def tiny_whisper_tokenizer():
    """Whisper's special tokens, then one token per letter and space (``tiny_whisper(len(tokenizer))``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = SPECIALS + list("abcdefghijklmnopqrstuvwxyz ")
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_whisper(vocab_size, max_source_positions=8):
    """A tiny random Whisper (fp16); ``max_source_positions=1500`` gives it the standard 30 s window."""
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=vocab_size, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=max_source_positions,
                           max_target_positions=16,
                           decoder_start_token_id=1, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial LayerNorms and biases
            p.add_(torch.randn_like(p) * 0.1)
    return model.half()


def ct2_variables(model):
    """CTranslate2 WhisperSpec variables for a transformers Whisper (as CTranslate2's converter writes them)."""
    s = {k: v.detach() for k, v in model.state_dict().items()}
    out = {}

    def ln(dst, src):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = s[f"{src}.weight"], s[f"{src}.bias"]

    def lin(dst, src):
        out[f"{dst}/weight"], out[f"{dst}/bias"] = s[f"{src}.weight"], s[f"{src}.bias"]

    def fused(dst, src, names):
        out[f"{dst}/weight"] = torch.cat([s[f"{src}.{n}.weight"] for n in names])
        out[f"{dst}/bias"] = torch.cat([s.get(f"{src}.{n}.bias", torch.zeros_like(s[f"{src}.{n}.weight"][:, 0]))
                                        for n in names])

    for side, n_layers in (("encoder", model.config.encoder_layers), ("decoder", model.config.decoder_layers)):
        for i in range(n_layers):
            src, dst = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", ("q_proj", "k_proj", "v_proj"))
            lin(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            ln(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            if side == "decoder":
                lin(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
                fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", ("k_proj", "v_proj"))
                lin(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
                ln(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
            lin(f"{dst}/ffn/linear_0", f"{src}.fc1")
            lin(f"{dst}/ffn/linear_1", f"{src}.fc2")
            ln(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
        ln(f"{side}/layer_norm", f"model.{side}.layer_norm")
        out[f"{side}/position_encodings/encodings"] = s[f"model.{side}.embed_positions.weight"]
        out[f"{side}/num_heads"] = torch.tensor(2, dtype=torch.int16)
    for conv in ("conv1", "conv2"):
        lin(f"encoder/{conv}", f"model.encoder.{conv}")
    out["decoder/embeddings/weight"] = s["model.decoder.embed_tokens.weight"]
    out["decoder/activation"] = torch.tensor(3, dtype=torch.int8)  # GELU
    out["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    out["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    return out


def write_ct2(path, variables, aliases=(("decoder/projection/weight", "decoder/embeddings/weight"),),
              spec="WhisperSpec"):
    def string(fh, text):
        fh.write(struct.pack("<H", len(text) + 1) + text.encode() + b"\0")

    with open(path, "wb") as fh:
        fh.write(struct.pack("<I", 6))
        string(fh, spec)
        fh.write(struct.pack("<II", 3, len(variables)))
        for name, value in sorted(variables.items()):
            string(fh, name)
            fh.write(struct.pack("<B", value.dim()) + b"".join(struct.pack("<I", d) for d in value.shape))
            raw = value.contiguous().view(torch.uint8).numpy().tobytes() if value.dim() else value.reshape(1).view(torch.uint8).numpy().tobytes()
            fh.write(struct.pack("<BI", DTYPE_IDS[value.dtype], len(raw)) + raw)
        fh.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases:
            string(fh, alias)
            string(fh, target)


def tiny_tokenizer_json(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = SPECIALS + list("abcdefghijklmnopqrstuvwxyz ")
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return chars


@pytest.fixture()
def ct2_folder(tmp_path):
    folder = tmp_path / "ct2"
    folder.mkdir()
    vocab = tiny_tokenizer_json(folder / "tokenizer.json")
    model = tiny_whisper(len(vocab))
    write_ct2(folder / "model.bin", ct2_variables(model))
    (folder / "vocabulary.txt").write_text("\n".join(vocab))
    (folder / "config.json").write_text(json.dumps({"suppress_ids": [3], "suppress_ids_begin": [0],
                                                    "lang_ids": [2, 3], "alignment_heads": [[1, 0]]}))
    return folder, model


def test_reader_parses_every_variable_exactly(ct2_folder):
    folder, model = ct2_folder
    assert is_ctranslate2_model(folder / "model.bin")
    name, revision, variables, aliases = read_ctranslate2_model(folder / "model.bin")
    assert (name, revision) == ("WhisperSpec", 3)
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    expected = ct2_variables(model)
    assert set(variables) == set(expected)
    for key, value in expected.items():
        assert variables[key].dtype == value.dtype and torch.equal(variables[key], value), key


def test_converted_whisper_equals_the_original(ct2_folder):
    folder, original = ct2_folder
    model, tokenizer, _ = whisper_from_ctranslate2(folder)
    assert model.dtype == torch.float16  # the stored dtype is kept
    ours, theirs = model.state_dict(), original.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:  # every tensor bit for bit, q/k/v split back from the fused weights
        assert torch.equal(ours[key], theirs[key]), key
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    feats = torch.randn(2, 80, 16)
    ids = torch.tensor([[1, 2, 5, 9, 12]])
    with torch.no_grad():
        a = model.float()(feats[:1], decoder_input_ids=ids).logits
        b = original.float()(feats[:1], decoder_input_ids=ids).logits
    assert torch.equal(a, b)
    gen = model.generation_config
    assert gen.lang_to_id == {"<|en|>": 2, "<|de|>": 3} and gen.task_to_id == {"transcribe": 5, "translate": 4}
    assert gen.no_timestamps_token_id == 9 and gen.decoder_start_token_id == 1
    assert tokenizer.convert_tokens_to_ids("<|transcribe|>") == 5


def test_import_writes_safetensors_only(ct2_folder, tmp_path):
    from nexus.conversion.teacher_import import import_teacher

    folder, original = ct2_folder
    assert check_teacher_source(folder) == "ctranslate2"
    out = import_teacher(folder, tmp_path / "hf")
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "preprocessor_config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    loaded = WhisperForConditionalGeneration.from_pretrained(out)
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_truncated_or_foreign_file_is_a_clear_error(ct2_folder, tmp_path):
    folder, _ = ct2_folder
    data = (folder / "model.bin").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CTranslate2FormatError, match=r"bad/model.bin is truncated"):
        read_ctranslate2_model(bad / "model.bin")
    assert not (tmp_path / "out").exists()
    other = tmp_path / "other.bin"
    write_ct2(other, {"x": torch.zeros(2)}, aliases=(), spec="TransformerSpec")
    with pytest.raises(CTranslate2FormatError, match="not a WhisperSpec"):
        whisper_from_ctranslate2(other)


def test_a_pickle_model_bin_is_still_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "model.bin")  # a PyTorch pickle named like CTranslate2's file
    (folder / "config.json").write_text("{}")
    assert not is_ctranslate2_model(folder / "model.bin")
    with pytest.raises(TeacherSourceError, match="pickle"):
        check_teacher_source(folder)

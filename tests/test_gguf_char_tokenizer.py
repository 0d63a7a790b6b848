"""Issue 18 item 5: a student with a character-level tokenizer exports a GGUF whose vocabulary llama.cpp's byte-level
BPE tokenizer (``gpt2``) reads into the same ids as the HF tokenizer; a tokenizer no llama.cpp tokenizer expresses is
refused with one line naming the file and why (it used to be written as ``no_vocab``)."""

from itertools import pairwise

import pytest
from conftest import tiny_teacher

from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.hub.gguf_export import GGUFExportError, byte_level_alphabet, export_gguf
from nexus.hub.standard_export import export_standard

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TEXT = "def add(a, b):\n    return a + b  # café, 5€\n"


def _word_level(tokens, split_chars=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated") if split_chars else pre_tokenizers.Whitespace()
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _student(tmp_path, tokenizer):
    model = nexus_from_teacher(tiny_teacher("llama", seed=1, vocab_size=len(tokenizer)))
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    return src


def _field(reader, key):
    f = reader.fields[key]
    return [f.contents(i) for i in range(len(f.data))] if len(f.data) > 1 else f.contents()


def _llama_cpp_bpe(text, tokens, merges):
    """What llama.cpp's gpt2 tokenizer does with no pre-tokenizer merges across characters: byte-level symbols,
    merged by rank, then looked up (symbols not in the vocabulary are dropped byte by byte, as llama.cpp does)."""
    alphabet = byte_level_alphabet()
    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = [alphabet[b] for b in text.encode("utf-8")]
    while True:
        pairs = [(ranks[(a, b)], i) for i, (a, b) in enumerate(pairwise(symbols)) if (a, b) in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [ids[s] for s in symbols if s in ids]


def test_a_character_tokenizer_becomes_a_byte_level_vocabulary_llama_cpp_reads(tmp_path):
    printable = [chr(c) for c in range(33, 127)]
    tokenizer = _word_level(SPECIALS + [" ", "\n"] + printable + ["é", "€"])  # 2- and 3-byte UTF-8 characters
    std = tmp_path / "std"
    info = export_standard(_student(tmp_path, tokenizer), std, gguf="f32")
    assert info["gguf"]["tokenizer"] == "gpt2 (character-level)"
    reader = gguf.GGUFReader(std / "model-f32.gguf")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens, merges = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.merges")
    assert len(tokens) == len(tokenizer) and tokens[4] == "Ġ" and tokens[5] == "Ċ"  # ' ' and '\n', byte-level
    assert {"Ã ©", "â Ĥ", "âĤ ¬"} <= set(merges)  # é = C3 A9; € = E2 82 AC
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    want = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert _llama_cpp_bpe(TEXT, tokens, merges) == want
    assert tokenizer.unk_token_id not in want  # every character of the text is in the vocabulary


def test_ascii_only_character_tokenizer_still_writes_the_merges_key(tmp_path):
    tokenizer = _word_level(SPECIALS + [" ", "\n"] + list("abcdefghij"))
    out = tmp_path / "std"
    export_standard(_student(tmp_path, tokenizer), out)
    export_gguf(out, out / "m.gguf")
    reader = gguf.GGUFReader(out / "m.gguf")
    merges = _field(reader, "tokenizer.ggml.merges")
    merges = [merges] if isinstance(merges, str) else merges
    assert _llama_cpp_bpe("abc ja\n", _field(reader, "tokenizer.ggml.tokens"), merges) == \
        tokenizer("abc ja\n", add_special_tokens=False).input_ids


def test_a_tokenizer_llama_cpp_cannot_express_is_refused_in_one_line(tmp_path):
    tokenizer = _word_level(SPECIALS + ["hello", "world", "a"], split_chars=False)
    out = tmp_path / "std"
    export_standard(_student(tmp_path, tokenizer), out)
    with pytest.raises(GGUFExportError) as err:
        export_gguf(out, out / "m.gguf")
    message = str(err.value)
    assert "\n" not in message and "tokenizer.json" in message and "multi-character tokens" in message
    assert not (out / "m.gguf").exists()

"""Vocabulary trimming writes a working reduced HF tokenizer: kept-domain text encodes to the same tokens (modulo the
id remap) and decodes identically; other text still round-trips; specials and chat tokens survive."""

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_teacher
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nexus.conversion.corpora import corpus_text
from nexus.conversion.structured_prune import PrunePlan, apply_prune_plan
from nexus.conversion.teacher_import import nexus_from_teacher
from nexus.conversion.vocab_trim import VocabTrim, VocabTrimError, kept_vocabulary, trim_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unused0>", "<unused1>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE (GPT-2 / Qwen style) trained here on prose and code, with specials and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = corpus_text("prose", "train")[:60000] + corpus_text("code", "train")[:60000]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   chat_template=TEMPLATE)


def test_bpe_trim_encodes_kept_domain_text_identically_and_everything_else_losslessly(bpe_tokenizer, tmp_path):
    prose = corpus_text("prose", "train")[:20000]
    trim = kept_vocabulary(bpe_tokenizer, [prose])
    assert len(trim.kept_ids) < len(bpe_tokenizer) and trim.reasons["merge_path"] > 0
    new = trim_tokenizer(bpe_tokenizer, trim, tmp_path / "tok", check_texts=[prose])
    assert len(new) == len(trim.kept_ids)
    saved = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    original = json.loads(bpe_tokenizer.backend_tokenizer.to_str())
    assert 0 < len(saved["model"]["merges"]) < len(original["model"]["merges"])
    remap = trim.remap
    for text in (prose[:3000], prose[7000:9000], prose[15000:15500]):
        old, ids = bpe_tokenizer(text)["input_ids"], new(text)["input_ids"]
        assert ids == [remap[i] for i in old]  # same token sequence (BOS included), ids remapped
        assert new.decode(ids) == bpe_tokenizer.decode(old)
    code = "def spam(eggs):\n    return {'ham': eggs ** 2}  # ü ∑ 🙂\n"
    assert new.decode(new(code, add_special_tokens=False)["input_ids"]) == code  # byte-level: still total
    assert len(new(code)["input_ids"]) >= len(bpe_tokenizer(code)["input_ids"])


def test_specials_and_chat_tokens_survive_and_placeholders_go(bpe_tokenizer, tmp_path):
    corpus = "user\nhello world\n"
    trim = kept_vocabulary(bpe_tokenizer, [corpus])
    new = trim_tokenizer(bpe_tokenizer, trim, tmp_path / "tok", check_texts=[corpus])
    kept_tokens = set(new.convert_ids_to_tokens(list(range(len(new)))))
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= kept_tokens
    assert not {"<unused0>", "<unused1>"} & kept_tokens
    chat = [{"role": "user", "content": "hello world"}]
    text = bpe_tokenizer.apply_chat_template(chat, tokenize=False)
    assert new.apply_chat_template(chat, tokenize=False) == text
    old_ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert new(text, add_special_tokens=False)["input_ids"] == [trim.remap[i] for i in old_ids]
    assert new.bos_token_id == trim.remap[bpe_tokenizer.bos_token_id] and new.eos_token == "<|im_end|>"


def test_a_naive_trim_without_merge_paths_is_caught_and_nothing_is_written(bpe_tokenizer, tmp_path):
    prose = corpus_text("prose", "train")[:5000]
    trim = kept_vocabulary(bpe_tokenizer, [prose])
    used = set(bpe_tokenizer(prose, add_special_tokens=False)["input_ids"])
    naive = VocabTrim(sorted(i for i in trim.kept_ids if i in used or len(bpe_tokenizer.convert_ids_to_tokens(i)) == 1
                             or i in bpe_tokenizer.all_special_ids), trim.original_size)
    assert len(naive.kept_ids) < len(trim.kept_ids)
    with pytest.raises(VocabTrimError, match="encodes differently"):
        trim_tokenizer(bpe_tokenizer, naive, tmp_path / "tok", check_texts=[prose])
    assert not (tmp_path / "tok").exists()


def test_word_level_trim_and_trimmed_model_agree(tmp_path):
    tok = char_tokenizer()
    text = "abc def\n123"
    trim = kept_vocabulary(tok, [text])
    new = trim_tokenizer(tok, trim, tmp_path / "tok", check_texts=[text])
    assert len(new) == len(set(text)) + 4  # the used characters + pad/bos/eos/unk
    model = nexus_from_teacher(tiny_teacher("llama"))
    pruned, _ = apply_prune_plan(model, PrunePlan(vocab=trim.kept_ids))
    old = torch.tensor([tok(text)["input_ids"]])
    ids = torch.tensor([new(text)["input_ids"]])
    with torch.no_grad():  # the kept tokens' logits are unchanged, in the new order
        assert torch.allclose(model(old).logits[..., trim.kept_ids], pruned(ids).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").decode(ids[0]) == text


def test_slow_tokenizers_and_unknown_extra_tokens_are_refused():
    class Slow:
        pass

    with pytest.raises(VocabTrimError, match="fast"):
        kept_vocabulary(Slow(), ["x"])
    with pytest.raises(VocabTrimError, match="not in the vocabulary"):
        kept_vocabulary(char_tokenizer(), ["abc"], extra_tokens=["<nope>"])

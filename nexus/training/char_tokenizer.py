"""A character-level tokenizer that Hugging Face loads like any other: one token per character.

Built with the `tokenizers` library (a WordLevel model over single characters, a pre-tokenizer that isolates every
character, a `Fuse` decoder that joins them back without adding spaces) and wrapped in `PreTrainedTokenizerFast`, so
``save_pretrained`` writes a ``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` reads back with no custom code.

``decode(encode(text))`` returns ``text`` for any text made of the alphabet's characters, spaces and newlines included.
A character outside the alphabet becomes ``<unk>``. The tokenizer prepends ``<bos>`` (like Llama's), never ``<eos>``.
"""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
# Printable ASCII (space to '~') plus newline and tab: the whole bundled prose and code corpora, and arithmetic.
PRINTABLE_ASCII = "\n\t" + "".join(chr(c) for c in range(32, 127))
DIGITS_AND_OPERATORS = string.digits + "+-="


def build_char_tokenizer(alphabet: str = PRINTABLE_ASCII, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` over the distinct characters of ``alphabet`` (in first-seen order).

    Ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; the characters follow.
    """
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError("alphabet: give a non-empty string of the characters the tokenizer must know")
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] matches every single character, newline included; "isolated" keeps each one as its own piece.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join the pieces with no separator
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return as_hf_tokenizer(tok, model_max_length)


def as_hf_tokenizer(tok, model_max_length):
    """``tok`` (a `tokenizers.Tokenizer` with the four specials) as the HF tokenizer the specialists use: left
    padding, no clean-up of spaces (shared with `bpe_tokenizer`)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )

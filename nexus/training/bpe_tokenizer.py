"""A small byte-level BPE tokenizer (GPT-2 style) trained on a text corpus, loadable by Hugging Face like any other.

Built with the `tokenizers` library: a ByteLevel pre-tokenizer maps every UTF-8 byte to a printable symbol, so any
text encodes with no ``<unk>`` and ``decode(encode(text)) == text`` for every string (the special-token strings
themselves aside). The result is wrapped in `PreTrainedTokenizerFast`; ``save_pretrained`` writes a
``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` reads back with no custom code. It prepends ``<bos>``.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from nexus.training.char_tokenizer import BOS, SPECIAL_TOKENS, as_hf_tokenizer

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens


def train_bpe_tokenizer(text: str, vocab_size: int = 1024, model_max_length: int = 2048,
                        split_digits: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ``vocab_size`` entries (specials and the 256 bytes included) on ``text``.

    ``split_digits`` makes every digit its own token (as Llama and Gemma do), so numbers are never merged into
    multi-digit tokens and a character-level arithmetic teacher's digits align one to one with the student's.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("text: give a non-empty training corpus")
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size: {vocab_size} is below {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0-3: <pad>, <bos>, <eos>, <unk>
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_lines(text), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return as_hf_tokenizer(tok, model_max_length)


def _lines(text, chunk=1000):
    """Feed the trainer groups of lines (newlines kept, so merges can learn indentation after a newline)."""
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), chunk):
        yield "".join(lines[i : i + chunk])

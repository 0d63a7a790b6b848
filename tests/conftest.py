"""Shared fixtures: tiny random teachers of every supported family, saved as HF folders with a tokenizer.

Nothing here downloads: configs are built in code, weights are random, tokenizers are built from a character list.
"""

import os
import string

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# The suite's tolerances are for fp32 compute: on a CPU with native bf16 matmuls every "auto" would autocast to bf16.
# Set before anything runs (session fixtures, CLI subprocesses inherit it); tests of the bf16 paths set it to 1.
os.environ["NEXUS_NATIVE_BF16"] = "0"

TINY_VOCAB = 97
_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def load_bench(name):
    """A ``bench/<name>.py`` script loaded as a module (the bench folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_teacher(family, seed=0, **overrides):
    """A tiny random HF teacher of ``family``; norms and biases are perturbed so a mapping error shows in logits.
    ``overrides``: config fields that replace the common tiny ones (e.g. ``hidden_size``)."""
    torch.manual_seed(seed)
    common = {**_COMMON, **overrides}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=True))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **common, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


def char_tokenizer():
    """A character-level fast tokenizer with exactly TINY_VOCAB entries (specials + printable ASCII)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    printable = [c for c in string.printable if not c.isspace()]
    chars = (["<pad>", "<s>", "</s>", "<unk>", " ", "\n"] + printable)[:TINY_VOCAB]
    vocab = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session", params=FAMILIES)
def teacher_dir(request, tmp_path_factory):
    """(family, folder) of a saved tiny random teacher with a tokenizer, one per supported family."""
    family = request.param
    out = tmp_path_factory.mktemp(f"teacher-{family}")
    tiny_teacher(family).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return family, out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher-llama-only")
    tiny_teacher("llama").save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


# ---------------------------------------------------------------- profile: two tokenizers, two families (issue 3)


def digits_tokenizer():
    """A character tokenizer that knows only digits, + - = and whitespace: prose is almost all <unk> to it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = ["<pad>", "<s>", "</s>", "<unk>", " ", "\n"] + list("0123456789+-=")
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def small_bpe_tokenizer(vocab_size=320):
    """A byte-level BPE (lossless, no BOS, EOS only, like Qwen's) trained on ~12 KB of the bundled prose and code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nexus.conversion.corpora import corpus_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = corpus_text("prose", "train")[:6000] + corpus_text("code", "train")[:6000]
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def profile_tokenizers():
    """The profile tests' tokenizers: ``char`` (97-entry char-level WordLevel, BOS), ``bpe`` (byte-level BPE, EOS
    only) and ``digits`` (a char tokenizer that cannot represent prose)."""
    return {"char": char_tokenizer(), "bpe": small_bpe_tokenizer(), "digits": digits_tokenizer()}


@pytest.fixture(scope="session")
def profile_teachers(profile_tokenizers, tmp_path_factory):
    """Saved tiny random teachers for profiling: name -> HF folder. ``llama_char`` (Llama + char tokenizer),
    ``qwen_bpe`` (Qwen3 + BPE tokenizer), ``gemma_digits`` (Gemma 3 + digits-only tokenizer)."""
    root = tmp_path_factory.mktemp("profile-teachers")
    qwen = Qwen3ForCausalLM(Qwen3Config(**{**_COMMON, "vocab_size": len(profile_tokenizers["bpe"])}, head_dim=16,
                                        tie_word_embeddings=True)).eval()
    models = {"llama_char": (tiny_teacher("llama", seed=1), "char"), "qwen_bpe": (qwen, "bpe"),
              "gemma_digits": (tiny_teacher("gemma3", seed=2), "digits")}
    out = {}
    for name, (model, tok) in models.items():
        out[name] = root / name
        model.save_pretrained(out[name])
        profile_tokenizers[tok].save_pretrained(out[name])
    return out

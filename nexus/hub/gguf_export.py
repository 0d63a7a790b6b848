"""GGUF output of a standard export (`standard_export.py`), written with the ``gguf`` package (gguf-py).

The file follows llama.cpp's conventions, the way its ``convert_hf_to_gguf.py`` writes them, so that llama.cpp and
transformers' GGUF reader (``from_pretrained(dir, gguf_file=...)``, which undoes the same conventions) both load it:

- tensor names from gguf-py's own tensor map (``blk.N.attn_q``, ``ffn_gate``, ``token_embd``, ``output`` ...);
- llama: q/k projection rows permuted from HF's rotate-half RoPE layout to llama.cpp's interleaved one;
- gemma3: every RMSNorm weight stored as ``1 + w`` (llama.cpp multiplies by the stored weight);
- 1-D tensors (norms, biases) stay F32; matrices are F32, F16 or Q8_0 (``dtype``);
- the tokenizer goes in when gguf-py can describe it: byte-level BPE (``gpt2``, with merges) or a Llama/Gemma-style
  byte-fallback tokenizer (``llama``, with scores). A character-level tokenizer (a WordLevel model whose every
  non-special token is one character, as the demo's specialists use) is written as llama.cpp's byte-level BPE: each
  character token under its byte-level spelling (``' '`` -> ``'Ġ'``), plus one merge chain per multi-byte UTF-8
  character, so llama.cpp splits text into the same one-token-per-character ids (`char_level_vocab`). Any other
  tokenizer is refused with one line naming the file and why (`GGUFExportError`), never a GGUF without a vocabulary.

What llama.cpp hard-codes for an architecture is checked before writing, and a mismatch is an error naming the
field: Gemma-3 in llama.cpp always uses the 5-local:1-global layer pattern, local RoPE theta 10000 and attention
scale ``head_dim ** -0.5``; RoPE scaling other than ``default`` is not written. Transformers' GGUF reader rebuilds the
config from fewer keys than llama.cpp: `transformers_reader_gaps` lists what it would restore differently.

Example::

    from nexus.hub.gguf_export import export_gguf
    export_gguf("out/prose-llama", "out/prose-llama/model-f32.gguf")
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..conversion.atomic_output import atomic_file, check_output_vs_sources

GGUF_ARCH = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gemma3_text": "GEMMA3"}
DTYPES = ("f32", "f16", "q8_0")


class GGUFExportError(ValueError):
    pass


def _rope(config, layer_type=None):
    params = config.rope_parameters or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    return params


def check_gguf_expressible(config):
    """Raise a GGUFExportError naming the first config field llama.cpp cannot reproduce for this architecture."""
    arch = config.model_type
    if arch not in GGUF_ARCH:
        raise GGUFExportError(f"model_type {arch!r} has no GGUF export; supported: {', '.join(GGUF_ARCH)}")
    if arch == "gemma3_text":
        pattern = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(config.num_hidden_layers)]
        if list(config.layer_types) != pattern:
            raise GGUFExportError(f"layer_types {list(config.layer_types)} is not the 5-sliding:1-full pattern that "
                                  "llama.cpp hard-codes for gemma3")
        local = _rope(config, "sliding_attention")
        if float(local.get("rope_theta", 10000.0)) != 10000.0:
            raise GGUFExportError(f"rope_parameters.sliding_attention.rope_theta = {local.get('rope_theta')}: "
                                  "llama.cpp hard-codes 10000 for gemma3's local layers")
        expected = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == 62 else config.head_dim
        if not math.isclose(config.query_pre_attn_scalar, expected):
            raise GGUFExportError(f"query_pre_attn_scalar = {config.query_pre_attn_scalar}: llama.cpp's gemma3 "
                                  f"scales attention by {expected} ** -0.5 for this shape")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, name, None) is not None:
                raise GGUFExportError(f"{name} = {getattr(config, name)}: llama.cpp's gemma3 has no such softcap")
        kinds = ("sliding_attention", "full_attention")
    else:
        kinds = (None,)
    for kind in kinds:
        rope_type = _rope(config, kind).get("rope_type", "default")
        if rope_type != "default":
            raise GGUFExportError(f"rope_parameters{'.' + kind if kind else ''}.rope_type = {rope_type!r}: "
                                  "only default RoPE is written to GGUF")
    if arch == "llama" and (config.mlp_bias or config.attention_bias):
        raise GGUFExportError(f"llama with attention_bias={config.attention_bias}, mlp_bias={config.mlp_bias}: "
                              "llama.cpp's llama graph has no such biases")
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    expected_act = "gelu_pytorch_tanh" if arch == "gemma3_text" else "silu"
    if act != expected_act:
        raise GGUFExportError(f"hidden_act = {act!r}: llama.cpp's {arch} uses {expected_act!r}")


def transformers_reader_gaps(config):
    """Config fields transformers' GGUF reader would restore to a different value than ``config`` holds.

    The reader takes the llama.cpp keys it knows and fills the rest from the config class defaults; for gemma3 that
    includes ``query_pre_attn_scalar`` (default 256, llama.cpp uses head_dim), so a gemma3 with head_dim != 256
    loads into transformers with a different attention scale. Returns ``{field: (ours, reader's)}``.
    """
    gaps = {}
    if config.model_type == "gemma3_text":
        from transformers import Gemma3TextConfig

        default = Gemma3TextConfig().query_pre_attn_scalar
        if config.query_pre_attn_scalar != default:
            gaps["query_pre_attn_scalar"] = (config.query_pre_attn_scalar, default)
    return gaps


def _permute(w, n_head):
    """llama.cpp's q/k permutation (rotate-half rows -> interleaved pairs), for weights and biases."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_vocab(folder):
    """A gguf-py vocab for the tokenizer in ``folder``, or None when gguf-py cannot describe it."""
    from gguf.vocab import BpeVocab, LlamaHfVocab

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return None
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    for cls in (BpeVocab, LlamaHfVocab):
        try:
            if cls is BpeVocab and (model.get("type") != "BPE" or model.get("byte_fallback")):
                continue
            return cls(folder)
        except (FileNotFoundError, TypeError, ValueError, KeyError):
            continue
    return None


def byte_level_alphabet():
    """GPT-2's byte -> printable character map (what llama.cpp's ``gpt2`` tokenizer runs text through)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def char_level_vocab(folder):
    """``(tokens, types, merges)`` of a character-level WordLevel tokenizer as a byte-level BPE vocabulary, or a
    reason string when the tokenizer in ``folder`` is not character-level."""
    from gguf import TokenType

    path = Path(folder) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "WordLevel":
        return f"its model is {model.get('type')!r}, neither byte-level BPE, byte-fallback nor character-level"
    specials = {t["content"] for t in data.get("added_tokens") or [] if t.get("special")}
    vocab = model["vocab"]
    long = [t for t in vocab if t not in specials and len(t) != 1]
    if long:
        return (f"its WordLevel vocabulary has multi-character tokens (e.g. {long[0]!r}), which llama.cpp's "
                "tokenizers cannot reproduce without merges")
    alphabet = byte_level_alphabet()
    tokens, types, merges = [None] * len(vocab), [TokenType.NORMAL] * len(vocab), []
    for text, i in vocab.items():
        if text in specials:
            tokens[i], types[i] = text, TokenType.CONTROL
            continue
        pieces = [alphabet[b] for b in text.encode("utf-8")]
        tokens[i] = "".join(pieces)
        for k in range(1, len(pieces)):  # a multi-byte character: merge its bytes left to right
            merges.append(f"{''.join(pieces[:k])} {pieces[k]}")
    if any(t is None for t in tokens):
        return "its vocabulary ids are not contiguous from 0"
    return [t.encode("utf-8") for t in tokens], types, merges


def _add_tokenizer(writer, folder, vocab_size):
    from gguf import TokenType
    from gguf.vocab import SpecialVocab

    vocab = _tokenizer_vocab(folder) if folder else None
    if vocab is None:
        where = Path(folder) / "tokenizer.json" if folder else "(no tokenizer folder)"
        if not folder or not (Path(folder) / "tokenizer.json").is_file():
            raise GGUFExportError(f"{where}: no tokenizer.json, so the GGUF would have no vocabulary llama.cpp can "
                                  "tokenize with; export from a folder that holds the tokenizer")
        described = char_level_vocab(folder)
        if isinstance(described, str):
            raise GGUFExportError(f"{where}: no llama.cpp tokenizer can express it: {described}")
        tokens, types, merges = described
        if len(tokens) > vocab_size:
            raise GGUFExportError(f"{where}: {len(tokens)} tokens but the model has {vocab_size} embedding rows")
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            types.append(TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # llama.cpp requires the merges key and gguf-py skips an empty array: a merge of two characters byte-level
        # text never holds (U+0200 is past the byte alphabet, which ends at U+0143) keeps it present and inert
        writer.add_token_merges(merges or ["\u0200 \u0200"])
        SpecialVocab(folder, load_merges=False, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
        return "gpt2 (character-level)"
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), vocab_size):  # rows the model has beyond the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_scores(scores[:vocab_size])
    writer.add_token_types(types[:vocab_size])
    SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return vocab.tokenizer_model


def _tensor(writer, name, array, dtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    array = np.ascontiguousarray(array.astype(np.float32))
    if array.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, array)
    elif dtype == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    elif array.shape[-1] % 32 == 0:
        writer.add_tensor(name, quantize(array, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    else:  # Q8_0 needs rows in blocks of 32
        writer.add_tensor(name, array.astype(np.float16))


def export_gguf(standard_dir, out_file, dtype="f32", name=None, overwrite=False):
    """Write the standard export at ``standard_dir`` as one GGUF file ``out_file``; returns a dict describing it."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise GGUFExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    standard_dir, out_file = Path(standard_dir), Path(out_file)
    # the file may go inside the folder it is made from, but not over that folder, a parent of it or a file it reads
    check_output_vs_sources(out_file, {"standard export": standard_dir}, inside_ok=True)
    if standard_dir.is_dir():
        check_output_vs_sources(out_file, [("file", p) for p in standard_dir.iterdir()
                                           if p.is_file() and p.suffix != ".gguf"])
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"output {out_file} already exists; remove it or pass overwrite")
    if not (standard_dir / "config.json").is_file():
        raise FileNotFoundError(f"standard export {standard_dir} has no config.json")
    config = AutoConfig.from_pretrained(standard_dir)
    check_gguf_expressible(config)
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[config.model_type])
    state = {}
    for shard in sorted(standard_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise FileNotFoundError(f"standard export {standard_dir} has no *.safetensors weights")
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    gemma = config.model_type == "gemma3_text"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    with atomic_file(out_file) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(name or standard_dir.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_vocab_size(config.vocab_size)
        if gemma:
            writer.add_rope_freq_base(float(_rope(config, "full_attention").get("rope_theta", 1e6)))
            writer.add_sliding_window(config.sliding_window)
        else:
            writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
            writer.add_rope_dimension_count(head_dim)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        tokenizer = _add_tokenizer(writer, standard_dir, config.vocab_size)

        written = []
        for key, tensor in state.items():
            if config.tie_word_embeddings and key == "lm_head.weight":
                continue
            base, _, suffix = key.rpartition(".")
            mapped = names.get_name(base)
            if mapped is None:
                raise GGUFExportError(f"weight {key!r} has no GGUF name for {config.model_type}")
            array = tensor.to(torch.float32).numpy()
            if config.model_type == "llama" and base.endswith(("q_proj", "k_proj")):
                heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
                array = _permute(array, heads)
            if gemma and base.endswith("norm"):
                array = array + 1.0
            _tensor(writer, f"{mapped}.{suffix}", array, dtype)
            written.append(f"{mapped}.{suffix}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual permissions
    return {"path": str(out_file), "architecture": gguf.MODEL_ARCH_NAMES[arch], "dtype": dtype,
            "tensors": len(written), "tokenizer": tokenizer, "transformers_reader_gaps": transformers_reader_gaps(config)}

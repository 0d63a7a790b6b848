"""Read a CTranslate2 Whisper model (``model.bin`` + ``config.json`` + ``tokenizer.json``) into transformers'
`WhisperForConditionalGeneration`, weight for weight.

The CTranslate2 ``model.bin`` layout (``ctranslate2/specs/model_spec.py::ModelSpec._serialize``, binary version 6)::

    u32 binary_version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x ( str name | u8 rank | rank x u32 dim | u8 dtype_id | u32 n_bytes | n_bytes raw little-endian )
    u32 n_aliases | n_aliases x ( str alias | str target )

where ``str`` is ``u16 length-including-NUL | bytes | NUL`` and dtype ids are float32, int8, int16, int32, float16,
bfloat16 (0..5). It is a flat tensor file, not a pickle: nothing in it is executed.

CTranslate2's Whisper converter (``converters/transformers.py::WhisperLoader``) fuses the self-attention q/k/v into one
``linear_0`` (k has no bias in Whisper: its third of the fused bias is zeros) and the cross-attention k/v into
``linear_1``; this module splits them back. Weights keep their stored dtype (fp16 for faster-whisper-base) and are
only cast when the caller asks for another one.

Sample::

    model, tokenizer, feature_extractor = whisper_from_ctranslate2("faster-whisper-base/")
    write_whisper_folder("faster-whisper-base/", "whisper-base-hf/")   # safetensors + tokenizer + preprocessor
"""

import json
import struct
from pathlib import Path

import torch

from .atomic_output import atomic_dir

CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
CT2_MAX_BINARY_VERSION = 6
# common_spec.Activation in CTranslate2 -> transformers' activation names
CT2_ACTIVATIONS = {0: "relu", 1: "gelu_pytorch_tanh", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh", 6: "sigmoid"}
WHISPER_NON_LANGUAGE_TOKENS = {"<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
                               "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"}


class CTranslate2FormatError(ValueError):
    """A CTranslate2 model file that cannot be read; the message names the file."""


# ----------------------------------------------------------------------------------------------------- the file


def is_ctranslate2_model(path):
    """True if ``path`` starts like a CTranslate2 ``model.bin`` (not a pickle, which starts with 0x80 or 'PK')."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
            if len(head) < 6:
                return False
            version, length = struct.unpack("<IH", head)
            if not 1 <= version <= CT2_MAX_BINARY_VERSION or not 2 <= length <= 256:
                return False
            name = fh.read(length)
    except OSError:
        return False
    return len(name) == length and name.endswith(b"\0") and name[:-1].isascii() and name[:-1].isalnum()


def read_ctranslate2_model(path):
    """Parse a CTranslate2 ``model.bin``: returns ``(spec_name, revision, {name: tensor}, {alias: target})``.

    Scalars (rank 0) come back as 0-d tensors. Any truncation, unknown dtype or inconsistent size is a
    CTranslate2FormatError naming ``path``; nothing is half-returned.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CTranslate2FormatError(f"CTranslate2 model {path}: cannot read it ({exc})") from None
    pos = 0

    def take(n, what):
        nonlocal pos
        if pos + n > len(data):
            raise CTranslate2FormatError(f"CTranslate2 model {path} is truncated: {what} at byte {pos} needs {n} "
                                         f"bytes, the file has {len(data)}")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    def u(fmt, what):
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt), what))[0]

    def string(what):
        n = u("H", what)
        raw = take(n, what)
        if n == 0 or raw[-1:] != b"\0":
            raise CTranslate2FormatError(f"CTranslate2 model {path}: {what} at byte {pos - n} is not a NUL-terminated "
                                         "string (not a CTranslate2 file, or corrupt)")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CTranslate2FormatError(f"CTranslate2 model {path}: {what} is not UTF-8 (corrupt file)") from None

    version = u("I", "binary version")
    if not 1 <= version <= CT2_MAX_BINARY_VERSION:
        raise CTranslate2FormatError(f"CTranslate2 model {path}: binary version {version} is not supported "
                                     f"(this reader knows 1..{CT2_MAX_BINARY_VERSION})")
    if version < 6:
        raise CTranslate2FormatError(f"CTranslate2 model {path}: binary version {version} predates the aliases "
                                     "layout (6); re-convert it with a recent ctranslate2")
    spec_name = string("spec name")
    revision = u("I", "spec revision")
    n_variables = u("I", "variable count")
    variables = {}
    for _ in range(n_variables):
        name = string("variable name")
        rank = u("B", f"rank of {name}")
        shape = [u("I", f"shape of {name}") for _ in range(rank)]
        dtype_id = u("B", f"dtype of {name}")
        if dtype_id >= len(CT2_DTYPES):
            raise CTranslate2FormatError(f"CTranslate2 model {path}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = CT2_DTYPES[dtype_id]
        n_bytes = u("I", f"size of {name}")
        expected = torch.Size(shape).numel() * dtype.itemsize
        if n_bytes != expected:
            raise CTranslate2FormatError(f"CTranslate2 model {path}: variable {name!r} of shape {shape} and dtype "
                                         f"{dtype} should hold {expected} bytes, the file says {n_bytes}")
        raw = take(n_bytes, f"data of {name}")
        if name in variables:
            raise CTranslate2FormatError(f"CTranslate2 model {path}: variable {name!r} appears twice")
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype) if n_bytes else torch.empty(0, dtype=dtype)
        variables[name] = tensor.reshape(shape)
    aliases = {}
    for _ in range(u("I", "alias count")):
        alias, target = string("alias name"), string("alias target")
        if target not in variables:
            raise CTranslate2FormatError(f"CTranslate2 model {path}: alias {alias!r} points to missing {target!r}")
        aliases[alias] = target
    if pos != len(data):
        raise CTranslate2FormatError(f"CTranslate2 model {path}: {len(data) - pos} unexpected trailing bytes")
    return spec_name, revision, variables, aliases


# ---------------------------------------------------------------------------------------------- Whisper mapping


def _count_layers(variables, prefix):
    n = 0
    while any(k.startswith(f"{prefix}/layer_{n}/") for k in variables):
        n += 1
    return n


def whisper_state_dict(variables, path="model.bin"):
    """CTranslate2 WhisperSpec variables -> a transformers WhisperForConditionalGeneration state dict (fused q/k/v
    split back). Every CTranslate2 weight is used exactly once; a leftover or missing one is an error."""
    used = set()

    def get(name):
        if name not in variables:
            raise CTranslate2FormatError(f"CTranslate2 model {path}: missing variable {name!r} (not a Whisper spec?)")
        used.add(name)
        return variables[name]

    def linear(dst, src):
        state[f"{dst}.weight"] = get(f"{src}/weight")
        state[f"{dst}.bias"] = get(f"{src}/bias")

    def layer_norm(dst, src):
        state[f"{dst}.weight"] = get(f"{src}/gamma")
        state[f"{dst}.bias"] = get(f"{src}/beta")

    def split_qkv(dst, src, names):
        w, b = get(f"{src}/weight"), get(f"{src}/bias")
        parts = len(names)
        if w.shape[0] % parts:
            raise CTranslate2FormatError(f"CTranslate2 model {path}: {src}/weight rows {w.shape[0]} do not split into "
                                         f"{parts} equal parts")
        for name, wp, bp in zip(names, w.chunk(parts, 0), b.chunk(parts, 0)):
            state[f"{dst}.{name}.weight"] = wp
            if name == "k_proj":  # Whisper's k_proj has no bias; the converter filled zeros
                if bool(bp.any()):
                    raise CTranslate2FormatError(f"CTranslate2 model {path}: {src}/bias has a non-zero k part, which "
                                                 "Whisper's k_proj (no bias) cannot hold")
            else:
                state[f"{dst}.{name}.bias"] = bp

    state = {}
    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        n_layers = _count_layers(variables, side)
        if n_layers == 0:
            raise CTranslate2FormatError(f"CTranslate2 model {path}: no {side} layers found (not a Whisper spec?)")
        for i in range(n_layers):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            split_qkv(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            layer_norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                split_qkv(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                layer_norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            layer_norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        layer_norm(f"{hf}.layer_norm", f"{side}/layer_norm")
        state[f"{hf}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
    for conv in ("conv1", "conv2"):
        state[f"model.encoder.{conv}.weight"] = get(f"encoder/{conv}/weight")
        state[f"model.encoder.{conv}.bias"] = get(f"encoder/{conv}/bias")
    state["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    scalars = {k for k, v in variables.items() if v.dim() == 0}
    leftover = sorted(set(variables) - used - scalars)
    if leftover:
        raise CTranslate2FormatError(f"CTranslate2 model {path}: variables this reader does not map: {leftover[:8]}")
    return state


def _scalar(variables, name, default=None):
    v = variables.get(name)
    return default if v is None else int(v.item())


def whisper_config_from_ctranslate2(variables, aliases, path="model.bin", vocabulary=None):
    """A transformers WhisperConfig for the CTranslate2 Whisper variables (special token ids from ``vocabulary``,
    the token strings in id order, when given; Whisper's multilingual ids otherwise)."""
    from transformers import WhisperConfig

    for side in ("encoder", "decoder"):
        if _scalar(variables, f"{side}/pre_norm", 1) != 1:
            raise CTranslate2FormatError(f"CTranslate2 model {path}: {side} is post-norm; Whisper is pre-norm")
    if _scalar(variables, "decoder/scale_embeddings", 0) not in (0, 1) or _scalar(variables, "decoder/alibi", 0):
        raise CTranslate2FormatError(f"CTranslate2 model {path}: embedding scaling / ALiBi is not Whisper's layout")
    if aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight":
        raise CTranslate2FormatError(f"CTranslate2 model {path}: the output projection is not tied to the embeddings")
    activation = _scalar(variables, "decoder/activation", 3)
    if activation not in CT2_ACTIVATIONS:
        raise CTranslate2FormatError(f"CTranslate2 model {path}: unknown activation id {activation}")
    index = {tok: i for i, tok in enumerate(vocabulary or [])}
    eot = index.get("<|endoftext|>", 50257)
    emb = variables["decoder/embeddings/weight"]
    enc_ffn = variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    dec_ffn = variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]
    return WhisperConfig(
        vocab_size=emb.shape[0],
        d_model=emb.shape[1],
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=_count_layers(variables, "encoder"),
        decoder_layers=_count_layers(variables, "decoder"),
        encoder_attention_heads=_scalar(variables, "encoder/num_heads"),
        decoder_attention_heads=_scalar(variables, "decoder/num_heads"),
        encoder_ffn_dim=enc_ffn,
        decoder_ffn_dim=dec_ffn,
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function=CT2_ACTIVATIONS[activation],
        scale_embedding=bool(_scalar(variables, "decoder/scale_embeddings", 0)),
        tie_word_embeddings=True,
        decoder_start_token_id=index.get("<|startoftranscript|>", 50258),
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
    )


def _generation_config(config, ct2_config, vocabulary):
    """Whisper's generation settings (language / task / timestamp tokens) rebuilt from CTranslate2's config.json and
    its vocabulary, so `generate(language="en", task="transcribe")` works as on the original checkpoint."""
    from transformers import GenerationConfig

    index = {tok: i for i, tok in enumerate(vocabulary)}
    lang_ids = ct2_config.get("lang_ids") or [i for tok, i in index.items() if tok.startswith("<|") and len(tok) <= 9
                                              and tok not in WHISPER_NON_LANGUAGE_TOKENS and "." not in tok]
    gen = GenerationConfig(
        decoder_start_token_id=index.get("<|startoftranscript|>", config.decoder_start_token_id),
        eos_token_id=index.get("<|endoftext|>", config.eos_token_id),
        pad_token_id=index.get("<|endoftext|>", config.pad_token_id),
        bos_token_id=index.get("<|endoftext|>", config.bos_token_id),
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
    )
    gen.lang_to_id = {vocabulary[i]: i for i in lang_ids}
    gen.task_to_id = {t: index[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in index}
    gen.is_multilingual = len(gen.lang_to_id) > 1
    gen.no_timestamps_token_id = index.get("<|notimestamps|>")
    gen.prev_sot_token_id = index.get("<|startofprev|>")
    return gen


def _whisper_tokenizer(folder):
    from transformers import WhisperTokenizerFast

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CTranslate2FormatError(f"CTranslate2 Whisper folder {folder} has no tokenizer.json")
    return WhisperTokenizerFast(tokenizer_file=str(path), unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def whisper_from_ctranslate2(folder, dtype=None):
    """(WhisperForConditionalGeneration, tokenizer, WhisperFeatureExtractor) for a CTranslate2 Whisper ``folder``.

    ``dtype=None`` keeps the stored dtype (fp16 for faster-whisper); any other dtype casts after the exact copy.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    folder = Path(folder)
    model_file = folder / "model.bin" if folder.is_dir() else folder
    folder = model_file.parent
    if not model_file.is_file():
        raise CTranslate2FormatError(f"CTranslate2 Whisper folder {folder} has no model.bin")
    spec_name, _, variables, aliases = read_ctranslate2_model(model_file)
    if spec_name != "WhisperSpec":
        raise CTranslate2FormatError(f"CTranslate2 model {model_file} is a {spec_name}, not a WhisperSpec")
    vocab_size = variables["decoder/embeddings/weight"].shape[0] if "decoder/embeddings/weight" in variables else 0
    ct2_config_file = folder / "config.json"
    try:
        ct2_config = json.loads(ct2_config_file.read_text()) if ct2_config_file.is_file() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise CTranslate2FormatError(f"CTranslate2 Whisper config {ct2_config_file} is not valid JSON ({exc})") from None
    vocab_file = folder / "vocabulary.txt"
    tokenizer = _whisper_tokenizer(folder)
    if vocab_file.is_file():
        vocabulary = vocab_file.read_text(encoding="utf-8").split("\n")[:vocab_size]
    else:
        vocabulary = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    config = whisper_config_from_ctranslate2(variables, aliases, model_file, vocabulary)
    state = whisper_state_dict(variables, model_file)
    stored = state["model.decoder.embed_tokens.weight"].dtype
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(stored)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise CTranslate2FormatError(f"CTranslate2 model {model_file}: mapped weights do not fit Whisper "
                                     f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    model.generation_config = _generation_config(config, ct2_config, vocabulary)
    model.config.nexus_source = {"path": str(model_file), "format": "ctranslate2", "spec": spec_name}
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return model, tokenizer, feature_extractor


def write_whisper_folder(src, out, overwrite=False, dtype=None):
    """Convert the CTranslate2 Whisper at ``src`` into an HF folder at ``out`` (safetensors only, tokenizer,
    preprocessor config); nothing is written at ``out`` unless the whole conversion succeeds. Returns ``out``."""
    model, tokenizer, feature_extractor = whisper_from_ctranslate2(src, dtype=dtype)
    with atomic_dir(Path(out), overwrite=overwrite, sources={"CTranslate2 Whisper": Path(src)}) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        feature_extractor.save_pretrained(tmp)
    return Path(out)


def join_parts(parts, out):
    """Concatenate split files (``model.bin.part1``, ``model.bin.part2``...) into ``out``, written atomically."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    tmp.replace(out)
    return out


def ctranslate2_model_file(path):
    """The CTranslate2 ``model.bin`` at ``path`` (the file itself, or inside the folder), or None if it is not one."""
    path = Path(path)
    candidate = path / "model.bin" if path.is_dir() else path
    return candidate if candidate.is_file() and is_ctranslate2_model(candidate) else None

"""Where a teacher comes from: an HF folder of safetensors or a `.gguf` file, checked before anything loads.

Safety defaults: pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused unless ``allow_pickle`` is set, and
remote code is never run unless ``trust_remote_code`` is set. A GGUF file is dequantised once into a cached
safetensors folder (keyed by the file's size and mtime), so later loads skip the slow conversion.
"""

import hashlib
import json
import os
from pathlib import Path

import torch

from .atomic_output import atomic_dir
from .ctranslate2_whisper import ctranslate2_model_file, write_whisper_folder
from .load_check import LoadCheckError, checked_from_pretrained, logger_quieted

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class TeacherSourceError(ValueError):
    pass


def check_safetensors_file(path):
    """Raise a TeacherSourceError naming ``path`` (and the tensor) unless its header parses and its tensors tile the
    file exactly, each entry's offsets matching its shape and dtype (`safetensors_header.read_safetensors_header`).

    Reads only the header, so a corrupt or truncated download is caught before anything loads.
    """
    from .safetensors_header import SafetensorsHeaderError, read_safetensors_header

    try:
        read_safetensors_header(path)
    except SafetensorsHeaderError as exc:
        raise TeacherSourceError(f"teacher weights {exc}") from None


def check_teacher_source(path, allow_pickle=False):
    """Return ``"hf"``, ``"gguf"`` or ``"ctranslate2"`` (a CTranslate2 Whisper) for a loadable teacher, or raise a TeacherSourceError naming the problem."""
    path = Path(path)
    if not path.exists():
        if os.path.lexists(path):
            raise TeacherSourceError(f"teacher path {path} is a symlink that loops or points to nothing "
                                     f"({os.readlink(path)})")
        raise TeacherSourceError(f"teacher path {path} does not exist")
    if ctranslate2_model_file(path) is not None:  # a CTranslate2 model.bin is a flat tensor file, not a pickle
        return "ctranslate2"
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        if path.suffix in PICKLE_SUFFIXES:
            raise TeacherSourceError(f"teacher {path} is a pickle checkpoint; refusing it (set allow_pickle to load it)")
        raise TeacherSourceError(f"teacher {path} is a file but not a .gguf; give an HF folder or a .gguf file")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        raise TeacherSourceError(f"teacher folder {path} has no config.json (not an HF checkpoint folder)")
    weights = sorted(path.glob("*.safetensors"))
    if weights:
        for file in weights:
            check_safetensors_file(file)
        return "hf"
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        if allow_pickle:
            return "hf"
        raise TeacherSourceError(
            f"teacher folder {path} holds only pickle weights ({', '.join(sorted(pickles))}); pickle can run "
            "arbitrary code, so it is refused. Convert it to safetensors, or pass --allow-pickle / allow_pickle: true"
        )
    raise TeacherSourceError(f"teacher folder {path} has no weights (*.safetensors)")


def _gguf_file(path):
    path = Path(path)
    return path if path.is_file() else sorted(path.glob("*.gguf"))[0]


def gguf_cache_dir(gguf_path, cache_root):
    gguf_path = Path(gguf_path).resolve()
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache_root) / f"{gguf_path.stem}-{key}"


def gguf_to_safetensors(gguf_path, cache_root):
    """Dequantise a GGUF file once into ``cache_root``; return the cached HF folder (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _gguf_file(gguf_path)
    out = gguf_cache_dir(gguf_path, cache_root)
    if (out / "config.json").is_file():
        return out
    try:
        model = checked_from_pretrained(AutoModelForCausalLM, gguf_path.parent, what="teacher",
                                        gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except LoadCheckError:
        raise
    except (ValueError, OSError, RuntimeError, KeyError) as exc:  # the gguf reader's own errors name no file
        if str(gguf_path) in str(exc):
            raise
        raise TeacherSourceError(f"teacher {gguf_path}: not a readable GGUF file ({exc})") from exc
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, overwrite=True, sources={"GGUF teacher": gguf_path}) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "nexus_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    return out


def cast_cache_folder(folder, dtype):
    """A sibling of the cached fp32 folder ``folder`` holding the same weights in ``dtype`` (made once).

    A bf16 teacher then loads straight from bf16 safetensors: loading the fp32 cache and casting would hold both
    copies at once (measured on Gemma-3-270M: +1.7 GB peak for a 0.5 GB bf16 model). The cast is done tensor by
    tensor, so converting needs the bf16 copy plus one fp32 tensor at a time.
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    out = folder.with_name(f"{folder.name}-{str(dtype).removeprefix('torch.')}")
    if (out / "config.json").is_file():
        return out
    with atomic_dir(out, overwrite=True, sources={"cached teacher": folder}) as tmp:
        for path in sorted(folder.iterdir()):
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    tensors = {k: (t.to(dtype) if (t := fh.get_tensor(k)).is_floating_point() else t)
                               for k in fh.keys()}
                    save_file(tensors, str(tmp / path.name), metadata=fh.metadata())
                del tensors
            elif path.is_file():
                shutil.copy2(path, tmp / path.name)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.chmod(out, 0o755)
    return out


def resolve_teacher_folder(path, allow_pickle=False, cache_root=None, dtype=None):
    """An HF folder for the teacher at ``path`` (converting a GGUF into ``cache_root`` when needed).

    For a GGUF, ``dtype`` (e.g. ``torch.bfloat16``) picks a cached copy already in that dtype; the default is the
    fp32 dequantisation.
    """
    kind = check_teacher_source(path, allow_pickle)
    if kind == "gguf":
        if cache_root is None:
            cache_root = Path.home() / ".cache" / "nexus" / "gguf"
        folder = gguf_to_safetensors(path, cache_root)
        if dtype is not None and dtype != torch.float32:
            folder = cast_cache_folder(folder, dtype)
        return folder
    if kind == "ctranslate2":  # converted once into an HF Whisper folder (safetensors), like a GGUF
        model_file = ctranslate2_model_file(path)
        folder = gguf_cache_dir(model_file, cache_root or Path.home() / ".cache" / "nexus" / "ctranslate2")
        if not (folder / "config.json").is_file():
            write_whisper_folder(model_file.parent, folder, overwrite=True)
        return folder
    return Path(path)


def load_teacher(path, dtype=torch.bfloat16, allow_pickle=False, trust_remote_code=False, cache_root=None,
                 with_tokenizer=True):
    """Load (model, tokenizer) for a teacher; the tokenizer must exist alongside the weights.

    ``with_tokenizer=False``: (model, None), for a caller that holds the tokenizer already (a 262k-token tokenizer
    costs ~320 MiB resident and more while it parses: loading it twice raised the distill stage's peak by that much).
    """
    from transformers import AutoModelForCausalLM

    from .checkpoint_config import check_checkpoint_config, read_hf_config

    folder = resolve_teacher_folder(path, allow_pickle, cache_root, dtype=dtype)
    check_checkpoint_config(folder, what="teacher", dtype=dtype)  # before transformers builds anything from it
    config = read_hf_config(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise TeacherSourceError(
            f"teacher {path} needs remote code (auto_map in config.json); refusing it unless trust_remote_code is set"
        )
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code) if with_tokenizer else None
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, config, folder)
    model = checked_from_pretrained(
        AutoModelForCausalLM, folder, what="teacher", dtype=dtype,
        use_safetensors=not allow_pickle or any(Path(folder).glob("*.safetensors")), trust_remote_code=trust_remote_code,
    )
    model.eval()
    return model, tokenizer


def check_tokenizer_fits(tokenizer, config, folder):
    """Raise a TeacherSourceError when the tokenizer can produce an id the embedding has no row for (every token
    but the special ones counts; a tokenizer smaller than the embedding is fine)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text_config, "vocab_size", None)
    if not isinstance(rows, int):
        return
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    ids = [i for token, i in tokenizer.get_vocab().items() if token not in special]
    top = max(ids, default=-1)
    if top >= rows:
        token = next(t for t, i in tokenizer.get_vocab().items() if i == top)
        raise TeacherSourceError(
            f"teacher {folder}: the tokenizer has token {token!r} with id {top}, but config.json vocab_size is {rows} "
            f"(the embedding has {rows} rows); the tokenizer does not belong to these weights")


# Spaces (single, double, leading), a tab, newlines, digits, punctuation and non-ASCII: what a wrong class guess
# mangles first (a byte-level BPE class over a character vocabulary drops every space and every unknown character).
TOKENIZER_PROBE = " Hello, world!  Two  spaces,\ttab and\nnewline: 1234 + 5678 = 6912. café naïve 中文 “q” {x: [1]}\n"


def load_tokenizer(folder, trust_remote_code=False):
    """The tokenizer in ``folder``, as AutoTokenizer loads it unless that changes what its ``tokenizer.json`` does.

    AutoTokenizer picks a class from ``config.json``'s model type (transformers 5.x), and a class with its own
    ``__init__`` (e.g. ``Qwen2Tokenizer``) rebuilds the pipeline from the vocabulary alone: a word-level or character
    ``tokenizer.json`` in a ``qwen2`` folder then loses its spaces and unknown characters without a ``<unk>``. So when
    the class rebuilt the pipeline, its ids on `TOKENIZER_PROBE` are compared with the raw ``tokenizer.json``'s; if
    they differ, the folder's ``tokenizer.json`` is loaded as it is (`TokenizersBackend`, the class transformers 5
    also exports as ``PreTrainedTokenizerFast``, with the specials of ``tokenizer_config.json`` /
    ``special_tokens_map.json``). A tokenizer loaded verbatim already (the generic class) is not compared.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        raise TeacherSourceError(
            f"no tokenizer in {folder}: expected one of {', '.join(names)} next to the weights"
        )
    try:
        # AutoTokenizer reads a Nexus folder's config.json through the base config class, which logs "You are using
        # a model of type `nexus` to instantiate a model of type ``" although nothing is instantiated: hide that
        with logger_quieted("transformers.configuration_utils"):
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            if _class_guess_changes_encoding(tokenizer, folder):
                from transformers import TokenizersBackend

                del tokenizer
                tokenizer = TokenizersBackend.from_pretrained(folder)
            return tokenizer
    except Exception as exc:  # the library's own errors are long; keep the cause, name the folder
        raise TeacherSourceError(f"cannot load the tokenizer in {folder}: {exc}") from exc


def _class_guess_changes_encoding(tokenizer, folder):
    """True when ``tokenizer`` (AutoTokenizer's class guess) encodes `TOKENIZER_PROBE` unlike ``tokenizer.json``."""
    from transformers import TokenizersBackend

    file = Path(folder) / "tokenizer.json"
    if type(tokenizer) is TokenizersBackend or not file.is_file():
        return False  # the generic class loads tokenizer.json as it is; without one there is nothing to compare
    try:
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and config.get("auto_map"):
        return False  # the author's own tokenizer code decides
    from tokenizers import Tokenizer

    guessed = list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    raw = Tokenizer.from_file(str(file))
    ids = raw.encode(TOKENIZER_PROBE, add_special_tokens=False).ids
    del raw
    return guessed != ids



"""The load check: every weight load must fill the model exactly, from the file, with finite numbers.

transformers' ``from_pretrained`` initialises a missing tensor at random, ignores an unexpected one and (by default)
raises a bare RuntimeError on a shape mismatch; ``load_state_dict(strict=False)`` says nothing either. Each load in
NEXUS goes through one of the functions here instead, which raise a `LoadCheckError` (a ValueError: the CLI prints it
as one line, exit 2) naming the file and the first few tensors, e.g.::

    teacher /m/model.safetensors: missing tensor model.layers.0.mlp.down_proj.weight (1 of 1 missing); refusing to
    initialise it at random
    teacher /m/model.safetensors: tensor model.layers.0.self_attn.q_proj.weight has 64 NaN/Inf values (of 1024);
    refusing to load it

Tied weights (``lm_head.weight`` = ``embed_tokens.weight``, saved once) and buffers that are never in a file (rotary
``inv_freq``) are not reported: transformers already drops them from its report, and `checked_load_state_dict` treats
a tensor as present when any tensor it shares storage with is. Callers check before they write, so a failed check
leaves no output.

Example::

    from nexus.conversion.load_check import checked_from_pretrained
    model = checked_from_pretrained(AutoModelForCausalLM, folder, what="teacher", dtype=torch.float32)
"""

import contextlib
import json
import logging
from pathlib import Path

import torch

SHOWN = 3  # tensor names a message lists before "+N more"
CHUNK = 1 << 22  # elements per isfinite pass: bounds the temporary bool mask to 4 MiB


class LoadCheckError(ValueError):
    pass


def weights_file(folder, key=None):
    """The file holding ``key`` in the checkpoint at ``folder`` (a file is its own answer); the single
    ``*.safetensors``, the shard index or the folder when that is all that can be said."""
    folder = Path(folder)
    if folder.is_file():
        return folder
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            shard = json.loads(index.read_text()).get("weight_map", {}).get(key)
            if shard:
                return folder / shard
        return index
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        pickles = sorted(p for p in folder.glob("pytorch_model*.bin"))
        if len(pickles) == 1:
            return pickles[0]
    return folder


def _names(keys):
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN])


def _plural(n, word):
    return word if n == 1 else f"{word}s"


def load_report_problems(missing=(), unexpected=(), mismatched=()):
    """The report as message parts (empty when the load was exact); ``mismatched`` holds (key, file shape, model
    shape) triples."""
    parts = []
    missing, unexpected = sorted(set(missing)), sorted(set(unexpected))
    mismatched = sorted({(k, tuple(a), tuple(b)) for k, a, b in mismatched})
    if missing:
        n = len(missing)
        parts.append(f"missing {_plural(n, 'tensor')} {_names(missing)} ({min(n, SHOWN)} of {n} missing); "
                     f"refusing to initialise {'it' if n == 1 else 'them'} at random")
    if unexpected:
        n = len(unexpected)
        parts.append(f"unexpected {_plural(n, 'tensor')} {_names(unexpected)} ({min(n, SHOWN)} of {n} unexpected); "
                     "the model has no such weight (another architecture or size?)")
    if mismatched:
        n = len(mismatched)
        shown = ", ".join(f"{k} has shape {list(a)} in the file but {list(b)} in the model"
                          for k, a, b in mismatched[:SHOWN])
        parts.append(f"{_plural(n, 'tensor')} {shown} ({min(n, SHOWN)} of {n} mismatched)")
    return parts


def check_load_report(missing=(), unexpected=(), file=None, what="checkpoint", mismatched=()):
    """Raise a LoadCheckError naming ``file`` unless the load had no missing, unexpected or mismatched tensor."""
    parts = load_report_problems(missing, unexpected, mismatched)
    if parts:
        raise LoadCheckError(f"{what} {file}: " + "; ".join(parts))


def _nonfinite(tensor):
    """Number of NaN/Inf values in ``tensor`` (0 for integer tensors), one bounded chunk at a time.

    Fast path: a chunk's sum (accumulated in fp32) is finite when the chunk is, ~10x cheaper than an isfinite mask
    (64M fp32 values: 0.04 s against 0.47 s on one core); only a non-finite sum, which finite values near the fp32
    limit can also give, pays for the exact count.
    """
    if not tensor.is_floating_point() or tensor.device.type == "meta":
        return 0
    flat = tensor.detach().reshape(-1)
    acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    chunks = [flat[s:s + CHUNK] for s in range(0, flat.numel(), CHUNK)]
    if all(bool(torch.isfinite(c.sum(dtype=acc))) for c in chunks):
        return 0
    return sum(int(c.numel() - torch.isfinite(c).sum()) for c in chunks)


def check_finite(source, file=None, what="checkpoint", key_file=None):
    """Raise a LoadCheckError naming ``file`` and the first tensor holding a NaN or an Inf.

    ``source``: a module (its parameters and buffers) or a dict of tensors. ``key_file(key)``, when given, names the
    file of each tensor instead of ``file`` (a sharded checkpoint). Shared tensors are checked once.
    """
    if isinstance(source, torch.nn.Module):
        items = list(source.named_parameters()) + list(source.named_buffers())
    else:
        items = list(source.items())
    seen = set()
    for key, tensor in items:
        if not torch.is_tensor(tensor):
            continue
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if tensor.numel() else None
        if ident is not None and ident in seen:
            continue
        seen.add(ident)
        bad = _nonfinite(tensor)
        if bad:
            where = key_file(key) if key_file is not None else file
            raise LoadCheckError(f"{what} {where}: tensor {key} has {bad} NaN/Inf {_plural(bad, 'value')} "
                                 f"(of {tensor.numel()}); refusing to load it")


@contextlib.contextmanager
def logger_quieted(name):
    """Raise logger ``name`` to ERROR for the block: e.g. transformers' own load-report table, logged as a warning
    before we raise the one-line error."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def checked_from_pretrained(cls, folder, what="checkpoint", **kwargs):
    """``cls.from_pretrained(folder, **kwargs)``, refused (LoadCheckError) on any missing, unexpected or mismatched
    tensor, or any NaN/Inf in the loaded model. A GGUF (``gguf_file=``) is named as the file."""
    folder = Path(folder)
    gguf = kwargs.get("gguf_file")
    file_of = (lambda key=None: folder / gguf) if gguf else (lambda key=None: weights_file(folder, key))
    if not gguf:  # config.json against its weights and the RAM budget, before anything is allocated
        from .checkpoint_config import check_checkpoint_config

        check_checkpoint_config(folder, what=what, dtype=kwargs.get("dtype"))
    kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
    try:
        with logger_quieted("transformers.modeling_utils"):
            model, info = cls.from_pretrained(folder, **kwargs)
    except RuntimeError as exc:  # error_msgs / conversion errors: transformers raises after its (hidden) report
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "loading state_dict" in first or "conversion" in first:
            raise LoadCheckError(f"{what} {file_of()}: {' '.join(str(exc).split())}") from None
        raise
    parts = load_report_problems(info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                                 info.get("mismatched_keys", ()))
    parts += [" ".join(str(m).split()) for m in info.get("error_msgs", ())]
    if parts:
        keys = sorted(set(info.get("missing_keys", ())) | set(info.get("unexpected_keys", ()))
                      | {k for k, *_ in info.get("mismatched_keys", ())})
        raise LoadCheckError(f"{what} {file_of(keys[0] if keys else None)}: " + "; ".join(parts))
    check_finite(model, what=what, key_file=file_of)
    return model


def _storage_groups(tensors):
    """Lists of keys that share one tensor (tied weights), from a module's state dict."""
    by_ident = {}
    for key, t in tensors.items():
        if t.numel() and t.device.type != "meta":
            by_ident.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(key)
    return [keys for keys in by_ident.values() if len(keys) > 1]


def checked_load_state_dict(module, state, file=None, what="checkpoint", allow_missing=()):
    """Load ``state`` into ``module`` after checking it fills the module exactly with finite values.

    A key tied to a key present in ``state`` counts as present; ``allow_missing`` holds key prefixes the caller fills
    itself. Raises LoadCheckError before anything is copied.
    """
    expected = module.state_dict()
    present = set(state)
    for group in _storage_groups(expected):
        if present & set(group):
            present |= set(group)
    missing = [k for k in expected if k not in present and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    check_load_report(missing, unexpected, file, what, mismatched)
    check_finite(state, file, what)
    return module.load_state_dict(state, strict=False)


def checked_load_file(path, what="checkpoint", device="cpu"):
    """``safetensors.torch.load_file(path)``, refused (LoadCheckError) when a tensor holds a NaN or an Inf."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .safetensors_header import read_safetensors_header

    read_safetensors_header(path)  # names the file and the tensor where the library would not
    try:
        tensors = load_file(str(path), device=str(device))
    except SafetensorError as exc:
        raise LoadCheckError(f"{what} {path}: not a readable safetensors file ({exc})") from None
    check_finite(tensors, path, what)
    return tensors

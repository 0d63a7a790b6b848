"""A checkpoint's ``config.json``, checked against its weights and the RAM budget before any tensor is allocated.

transformers builds the model from ``config.json`` first and reads the weights after: a config with
``vocab_size: 2000000000`` allocates 256 GB before anything fails, ``num_hidden_layers: 200000`` builds layers for
hours, and a missing ``hidden_size`` silently takes the class default (4096) and then fails with a shape traceback.
`check_checkpoint_config` reads only ``config.json`` and the safetensors headers and raises a `CheckpointConfigError`
(a ValueError: one line, exit 2) naming the file and the field::

    /m/config.json: hidden_size is missing (a llama config needs vocab_size, hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads)
    /m/config.json: vocab_size is 2000000000 but tensor model.embed_tokens.weight in /m/model.safetensors has
    97 rows
    /m/config.json: the tensors it describes need 238,418 MiB in float32, over the RAM budget of 23,000 MiB
    (vocab_size 2000000000, hidden_size 32, num_hidden_layers 3)

Checked, in order: the file is UTF-8 JSON holding an object; the dimension fields of a supported family (llama,
qwen2, qwen3, gemma3 / gemma3_text, and Nexus's own towers) are positive integers; every safetensors header is valid
(`safetensors_header`); the embedding's rows and columns and the number of layers agree with the weights; and the
planned bytes of every tensor the config describes fit the RAM budget (default: the machine's total RAM).
"""

import json
import math
import re
from pathlib import Path

from .safetensors_header import read_safetensors_header

HF_DIMENSIONS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
HF_OPTIONAL = ("num_key_value_heads", "head_dim")
HF_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text", "gemma3")
MAX_LAYERS = 4096  # the deepest published decoders have ~100-200 layers; building 200,000 tiny ones takes hours
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NEXUS_LAYER = re.compile(r"(?:^|\.)towers\.(\d+)\.layers\.(\d+)\.")


class CheckpointConfigError(ValueError):
    """A config.json that is unreadable, lacks a dimension, disagrees with its weights or plans over the budget."""


def read_config_json(path) -> dict:
    """The JSON object in ``path``, or `CheckpointConfigError` naming the file (not UTF-8, not JSON, not an object)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise CheckpointConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise CheckpointConfigError(f"{path}: not UTF-8 text (byte offset {exc.start})") from None
    try:
        config = json.loads(text)
    except RecursionError:
        raise CheckpointConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise CheckpointConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointConfigError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    return config


def _positive_int(config, key, where, required=True):
    value = config.get(key)
    if value is None and not required:
        return None
    if key not in config:
        raise CheckpointConfigError(f"{where}{key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointConfigError(f"{where}{key} must be a positive integer, got {value!r:.80}")
    return value


def _hf_dimensions(config, path):
    """{field: value} of an HF decoder config (the text config of a multimodal Gemma 3), every field checked."""
    where = f"{path}: "
    if config.get("model_type") == "gemma3" and "text_config" in config:
        if not isinstance(config["text_config"], dict):
            raise CheckpointConfigError(f"{where}text_config must be an object")
        config, where = config["text_config"], f"{path}: text_config."
    dims = {}
    for key in HF_DIMENSIONS:
        if key not in config:
            raise CheckpointConfigError(f"{where}{key} is missing (a {config.get('model_type', 'decoder')} config "
                                        f"needs {', '.join(HF_DIMENSIONS)})")
        dims[key] = _positive_int(config, key, where)
    for key in HF_OPTIONAL:
        dims[key] = _positive_int(config, key, where, required=False)
    _positive_int(config, "max_position_embeddings", where, required=False)
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    for key in ("rms_norm_eps", "rope_theta"):
        holder, at = (config, where) if key in config else (rope, f"{where}rope_parameters.") if key in rope else \
            (None, None)
        if holder is None:
            continue  # the class default applies
        value = holder[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CheckpointConfigError(f"{at}{key} must be a positive number, got {value!r:.80}")
    if dims["num_hidden_layers"] > MAX_LAYERS:
        raise CheckpointConfigError(f"{where}num_hidden_layers is {dims['num_hidden_layers']}, over the "
                                    f"{MAX_LAYERS:,} layers any real decoder has; refusing to build them")
    heads = dims["num_attention_heads"]
    dims["num_key_value_heads"] = dims["num_key_value_heads"] or heads
    if heads % dims["num_key_value_heads"]:
        raise CheckpointConfigError(f"{where}num_attention_heads ({heads}) must be a multiple of "
                                    f"num_key_value_heads ({dims['num_key_value_heads']})")
    dims["head_dim"] = dims["head_dim"] or max(1, dims["hidden_size"] // heads)
    dims["tied"] = bool(config.get("tie_word_embeddings", config.get("model_type") in ("qwen3", "gemma3_text")))
    return dims, where


def _hf_tensor_numels(d):
    """Elements of every tensor an HF decoder of dims ``d`` holds (approximate only in norms and biases)."""
    H, V, I, L = d["hidden_size"], d["vocab_size"], d["intermediate_size"], d["num_hidden_layers"]
    q, kv = d["num_attention_heads"] * d["head_dim"], d["num_key_value_heads"] * d["head_dim"]
    per_layer = H * (q + 2 * kv) + q + 2 * kv + q * H + 3 * H * I + 4 * H + 2 * d["head_dim"]
    return {"embedding": V * H, "head": 0 if d["tied"] else V * H, "layers": L * per_layer, "final_norm": H}


def _nexus_tensor_numels(config, path):
    """Elements of every tensor a Nexus config describes; fields checked with their config path."""
    where = f"{path}: "
    V = _positive_int(config, "vocab_size", where)
    H = _positive_int(config, "hidden_size", where)
    towers = config.get("towers")
    if not isinstance(towers, list) or not towers:
        raise CheckpointConfigError(f"{where}towers must be a non-empty list of tower specs")
    layers, n_layers = 0, []
    for t, tower in enumerate(towers):
        tw = f"{where}towers[{t}]."
        if not isinstance(tower, dict):
            raise CheckpointConfigError(f"{where}towers[{t}] must be an object")
        h = _positive_int(tower, "hidden_size", tw, required=False) or H
        specs = tower.get("layers", [])
        if not isinstance(specs, list):
            raise CheckpointConfigError(f"{tw}layers must be a list of layer specs")
        n_layers.append(len(specs))
        if sum(n_layers) > MAX_LAYERS:
            raise CheckpointConfigError(f"{tw}layers: {sum(n_layers)} layers in all, over the {MAX_LAYERS:,} layers "
                                        "any real decoder has; refusing to build them")
        for i, layer in enumerate(specs):
            lw = f"{tw}layers[{i}]."
            if not isinstance(layer, dict):
                raise CheckpointConfigError(f"{where}towers[{t}].layers[{i}] must be an object")
            sizes = {}
            for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
                value = layer.get(key, 0)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise CheckpointConfigError(f"{lw}{key} must be a non-negative integer, got {value!r:.80}")
                sizes[key] = value
            q = sizes["num_attention_heads"] * sizes["head_dim"]
            kv = sizes["num_key_value_heads"] * sizes["head_dim"]
            layers += h * (q + 2 * kv) + q * h + 3 * h * sizes["intermediate_size"] + 4 * h
        if h != H:
            layers += 2 * h * H  # edge projections in and out of the shared width
    numels = {"embedding": V * H, "head": 0 if config.get("tie_word_embeddings", True) else V * H,
              "layers": layers, "final_norm": H}
    return {"vocab_size": V, "hidden_size": H, "n_layers": n_layers}, numels, where


def _weights(folder):
    """{tensor name: (file, shape)} from every safetensors header in ``folder`` (each header validated)."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, entry in read_safetensors_header(file).items():
            out[name] = (file, entry["shape"], entry["dtype"])
    return out


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _check_dtypes(weights, config, where):
    """An unquantised checkpoint holds floating-point weights, and never both F16 and BF16 (the same two bytes read
    as the other type are different numbers: a header that swapped one for the other would load silently)."""
    if config.get("quantization_config") is not None:
        return
    for name, (file, _, dtype) in sorted(weights.items()):
        if dtype not in FLOAT_DTYPES:
            raise CheckpointConfigError(f"{file}: tensor {name} has dtype {dtype}, but {where.rstrip(': ')} "
                                        "describes an unquantised model (floating-point weights only)")
    halves = {dtype: name for name, (_, _, dtype) in sorted(weights.items()) if dtype in ("F16", "BF16")}
    if len(halves) == 2:
        file = weights[halves["BF16"]][0]
        raise CheckpointConfigError(f"{file}: tensors {halves['F16']} (F16) and {halves['BF16']} (BF16) mix the two "
                                    "16-bit float types; a checkpoint is saved in one of them")


def _embedding(weights):
    keys = sorted((k for k in weights if k.endswith("embed_tokens.weight")), key=len)
    return (keys[0], *weights[keys[0]][:2]) if keys else None


def _check_embedding(weights, vocab, hidden, where):
    found = _embedding(weights)
    if found is None:
        return
    key, file, shape = found
    if len(shape) != 2:
        raise CheckpointConfigError(f"{where.rstrip(': ')}: tensor {key} in {file} has shape {shape}, not 2-D")
    for field, value, have, what in (("vocab_size", vocab, shape[0], "rows"), ("hidden_size", hidden, shape[1],
                                                                               "columns")):
        if value != have:
            raise CheckpointConfigError(f"{where}{field} is {value} but tensor {key} in {file} has {have} {what}")


def _check_layer_count(weights, pattern, expected, where, field):
    counts = {}
    for key in weights:
        m = pattern.search(key) if "vision" not in key else None  # a multimodal model's encoder has layers too
        if m:
            group = tuple(int(g) for g in m.groups()[:-1])
            counts[group] = max(counts.get(group, 0), int(m.groups()[-1]) + 1)
    for group, want in expected.items():
        have = counts.get(group, 0)
        if counts and have != want:
            label = field(group)
            raise CheckpointConfigError(f"{where}{label} is {want} but the weights hold {have} layer(s) there")


def planned_bytes(numels, dtype_bytes=4) -> int:
    return sum(numels.values()) * dtype_bytes


def _element_bytes(dtype):
    if dtype is None:
        return 4
    name = str(dtype).removeprefix("torch.")
    return {"float32": 4, "fp32": 4, "float64": 8, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}.get(name, 4)


def check_checkpoint_config(folder, what="checkpoint", dtype=None, budget_bytes=None) -> dict:
    """Check the checkpoint at ``folder`` (see the module docstring) before it is loaded; returns
    ``{"planned_bytes", "numels"}``. ``dtype``: the dtype it will be loaded in (default fp32); ``budget_bytes``:
    the RAM a load may plan for (default the machine's total RAM). Families it does not know are only
    header-checked."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        return {"planned_bytes": None, "numels": None}
    config = read_config_json(path)
    weights = _weights(folder)
    model_type = config.get("model_type")
    if model_type == "nexus" or model_type in HF_FAMILIES:
        _check_dtypes(weights, config, f"{path}: ")
    if model_type == "nexus":
        dims, numels, where = _nexus_tensor_numels(config, path)
        _check_embedding(weights, dims["vocab_size"], dims["hidden_size"], where)
        _check_layer_count(weights, _NEXUS_LAYER, {(t,): n for t, n in enumerate(dims["n_layers"])}, where,
                           lambda g: f"the number of towers[{g[0]}].layers")
        shown = f"vocab_size {dims['vocab_size']}, hidden_size {dims['hidden_size']}, layers {dims['n_layers']}"
    elif model_type in HF_FAMILIES:
        dims, where = _hf_dimensions(config, path)
        numels = _hf_tensor_numels(dims)
        _check_embedding(weights, dims["vocab_size"], dims["hidden_size"], where)
        _check_layer_count(weights, _LAYER, {(): dims["num_hidden_layers"]}, where, lambda g: "num_hidden_layers")
        shown = ", ".join(f"{k} {dims[k]}" for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                       "num_hidden_layers"))
    else:
        return {"planned_bytes": None, "numels": None}
    if budget_bytes is None:
        from .stage_memory import machine_ram_bytes

        budget_bytes = machine_ram_bytes()
    need = planned_bytes(numels, _element_bytes(dtype))
    if need > budget_bytes:
        raise CheckpointConfigError(
            f"{path}: the tensors it describes need {need / 2**20:,.0f} MiB in "
            f"{str(dtype or 'float32').removeprefix('torch.')}, over the RAM budget of {budget_bytes / 2**20:,.0f} "
            f"MiB ({shown}); refusing to allocate them ({what})")
    stored = sum(math.prod(shape) for _, shape, _ in weights.values())
    return {"planned_bytes": need, "numels": numels, "stored_numel": stored}


def read_hf_config(folder, trust_remote_code=False, what="teacher"):
    """``AutoConfig.from_pretrained(folder)``, with whatever it raises on a malformed ``config.json`` (an unknown
    model_type, a field of the wrong type: huggingface_hub's strict dataclass errors, TypeError, KeyError...) turned
    into one `CheckpointConfigError` naming the file."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - the only input is this file; its own error text follows
        raise CheckpointConfigError(f"{what} {path}: cannot read the config ({type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:500]})") from None

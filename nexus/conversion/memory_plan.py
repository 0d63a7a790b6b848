"""Plan memory before a stage runs, from configs alone (no weights loaded), and refuse a plan over its budget.

Two plans:

* `plan_stage`: the peak RAM of a stage that holds one teacher at a time (profile, localise, compress's
  calibration): the process's own runtime, the teacher's weights in its dtype, its tokenizer, and the activations
  of one no-grad forward of ``batch x seq_len`` tokens. The stage's peak is the larger of two phases: loading the
  tokenizer (its parse peak) and the forward (everything resident at once). With several teachers the largest one
  sets the peak, since only one is resident at a time (DESIGN.md's memory rule).
* `plan_final_model`: the GPU memory the final Nexus student needs for inference at a given context length:
  bf16 weights, the KV cache of the routed tower (per-layer kv heads x head_dim; a sliding-window layer holds only its
  window when the cache the model builds trims it), and the prefill working set.

`check_plan(plan, budget_bytes)` raises `MemoryPlanError` with the numbers when a plan does not fit.

Parameter counts are analytic for the supported teacher families (llama, qwen2, qwen3, gemma3_text; tests check them
against built models); any other architecture is instantiated on the ``meta`` device (no memory) and counted.

Measured constants (bench/memory_plan_real.py, Gemma-3-270M's 33 MB tokenizer.json, transformers 5.23, fast
tokenizer): the loaded tokenizer stays resident at ~10x its file size and peaks at ~15x while it is parsed.
"""

import json
from pathlib import Path

import torch

GIB = 2**30
DEFAULT_FINAL_BUDGET_BYTES = 16 * GIB  # a "16 GB" GPU
TOKENIZER_RESIDENT_PER_FILE_BYTE = 10.2
TOKENIZER_LOAD_PEAK_PER_FILE_BYTE = 14.8
SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text")

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}


class MemoryPlanError(ValueError):
    """A plan does not fit its budget, or cannot be made; the message carries the numbers."""


def dtype_bytes(dtype) -> int:
    """Bytes per element of ``dtype`` ("bf16", "fp32", a torch dtype...)."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise MemoryPlanError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(_DTYPE_BYTES))}")
    return _DTYPE_BYTES[key]


def _mib(n):
    return f"{n / 2**20:,.0f} MiB"


# ---------------------------------------------------------------------------------------------- teacher parameters


def _head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def hf_parameter_count(config) -> dict:
    """``{"total", "embedding", "non_embedding"}`` of an HF decoder config, without building the model.

    Analytic for llama / qwen2 / qwen3 / gemma3_text; any other model_type is built on the meta device and counted.
    """
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        return meta_parameter_count(config)
    H, V, I = config.hidden_size, config.vocab_size, config.intermediate_size
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    q, kv = nh * hd, nkv * hd
    attention_bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = True if family == "qwen2" else attention_bias  # Qwen2 always biases q/k/v, never o
    o_bias = attention_bias if family != "qwen2" else False
    per_layer = H * (q + 2 * kv) + (q + 2 * kv if qkv_bias else 0)
    per_layer += q * H + (H if o_bias else 0)
    per_layer += 3 * H * I + ((2 * I + H) if getattr(config, "mlp_bias", False) else 0)
    per_layer += (4 if family == "gemma3_text" else 2) * H  # norms (Gemma: pre/post around both blocks)
    if family in ("qwen3", "gemma3_text"):
        per_layer += 2 * hd  # q_norm, k_norm
    embedding = V * H * (1 if config.tie_word_embeddings else 2)
    non_embedding = config.num_hidden_layers * per_layer + H  # + final norm
    return {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding}


def meta_parameter_count(config) -> dict:
    """Count parameters of ``AutoModelForCausalLM.from_config(config)`` built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen, total, embedding = set(), 0, 0
    emb_ids = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    head = model.get_output_embeddings()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if (getattr(text_config, "tie_word_embeddings", False) and head is not None
            and head.weight is not model.get_input_embeddings().weight):
        seen.add(id(head.weight))  # tied: some transformers 5.x releases do not tie on the meta device
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        embedding += p.numel() if id(p) in emb_ids else 0
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def load_config(source):
    """An HF config from a folder (or a config object, returned as is), without touching the weights."""
    if not isinstance(source, (str, Path)):
        return source
    from transformers import AutoConfig

    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise MemoryPlanError(f"cannot plan memory for {folder}: no config.json (plan from an HF folder)")
    return AutoConfig.from_pretrained(folder)


def teacher_weight_bytes(config, dtype="bf16") -> int:
    """Resident bytes of a teacher's weights in ``dtype`` (tied embeddings counted once)."""
    return hf_parameter_count(config)["total"] * dtype_bytes(dtype)


def safetensors_numel(folder) -> int | None:
    """Elements stored in the ``*.safetensors`` files of ``folder``, read from their headers only (no weights
    loaded; a tied matrix is stored, and counted, once); None when the folder has none."""
    import math

    from .safetensors_header import read_safetensors_header

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:  # a header that lies is refused here, naming the file and the tensor
        total += sum(math.prod(entry["shape"]) for entry in read_safetensors_header(path).values())
    return total


# ---------------------------------------------------------------------------------------------- tokenizer


def tokenizer_file_bytes(folder) -> int:
    """Size of the tokenizer's files in ``folder`` (tokenizer.json, else tokenizer.model / vocab + merges)."""
    folder = Path(folder)
    for names in (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt")):
        files = [folder / n for n in names]
        if all(f.is_file() for f in files):
            return sum(f.stat().st_size for f in files)
    raise MemoryPlanError(f"cannot plan the tokenizer's memory: no tokenizer.json, tokenizer.model or vocab.json in "
                          f"{folder}")


def tokenizer_bytes(folder) -> dict:
    """``{"resident", "load_peak"}``: the loaded tokenizer's RSS and its peak while parsing (file size x ratio)."""
    size = tokenizer_file_bytes(folder)
    return {"resident": int(size * TOKENIZER_RESIDENT_PER_FILE_BYTE),
            "load_peak": int(size * TOKENIZER_LOAD_PEAK_PER_FILE_BYTE)}


# ---------------------------------------------------------------------------------------------- activations


def forward_activation_bytes(config, batch, seq_len, dtype="bf16", sliced_head=False, position_slices=False) -> dict:
    """Activations of one no-grad forward of an HF decoder: ``{"logits", "layer_working_set", "total"}``.

    The logits (B, T, V) in the model's dtype are the largest tensor; a final-logit softcap makes two more of them
    at once (divide, tanh, multiply). Inside a layer, the live set is the residual stream and its normed copy, q/k/v
    before and after RoPE, SDPA's (B, nh, T, T) fp32 scores when it cannot use a fused path, and the MLP's gate, up
    and their product. Layers run one after another, so only one layer's working set is live.

    ``sliced_head``: the probes' scoring (`probes.token_scores`) runs the head over vocabulary slices of at most
    ``LOGIT_BUDGET`` fp32 logits instead: three such slices live at once (the slice, its softcap / log-sum-exp
    temporaries) and the head's weight slice cast to fp32. ``position_slices`` (with ``sliced_head``): the teacher
    cache's head instead (`teacher_cache`): full-vocabulary rows for up to ``FULL_LOGIT_BUDGET // V`` positions at a
    time, the head's output in ``dtype``, its fp32 copy and the top-k / log-sum-exp temporaries (two more).
    """
    b = dtype_bytes(dtype)
    tokens = batch * seq_len
    H, V, I = config.hidden_size, config.vocab_size, config.intermediate_size
    nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, _head_dim(config)
    softcap = getattr(config, "final_logit_softcapping", None)
    if sliced_head and position_slices:
        from .probes.token_scores import FULL_LOGIT_BUDGET

        rows = min(tokens, max(1, FULL_LOGIT_BUDGET // V))
        logits = 3 * rows * V * 4 + rows * V * b
    elif sliced_head:
        from .probes.token_scores import LOGIT_BUDGET, MIN_VOCAB_SLICE

        span = min(V, max(MIN_VOCAB_SLICE, LOGIT_BUDGET // max(1, tokens)))
        logits = 3 * tokens * span * 4 + span * H * 4
    else:
        logits = tokens * V * b * (2 if softcap else 1)
    residual = 4 * tokens * H * b
    attention = 2 * tokens * (nh + 2 * nkv) * hd * b + 2 * batch * nh * seq_len * seq_len * 4
    mlp = 3 * tokens * I * b
    working = residual + attention + mlp
    hidden = tokens * H * b  # the final hidden state is alive while the head runs
    return {"logits": logits, "layer_working_set": working, "total": max(working, logits + hidden)}


# ---------------------------------------------------------------------------------------------- stage plan


def _component_total(components):
    return sum(components.values())


def plan_stage(teachers, stage="forward", batch=8, seq_len=256, runtime_bytes=None, activation_dtype=None,
               sliced_head=False, position_slices=False) -> dict:
    """Peak-RAM plan of a stage that loads each teacher in turn and runs one no-grad forward of batch x seq_len.

    ``teachers``: a list of ``(name, config_or_folder, dtype, tokenizer_folder_or_None)``. ``runtime_bytes``: the
    process before any teacher loads (default: this process's RSS now, i.e. Python + torch + transformers).
    ``activation_dtype``: the forward's dtype when it differs from the weights' (fp32 matmuls over bf16 weights);
    ``sliced_head``: score through the probes' vocabulary-sliced head where the family allows it (see
    `forward_activation_bytes`); ``position_slices``: the teacher cache's head over position slices instead.
    A folder's weights are counted from its safetensors headers, a config (or a folder without weights)
    analytically. Returns ``{"stage", "components", "total_bytes", "per_teacher", "peak_teacher", "assumptions"}``;
    components are those of the teacher that sets the peak.
    """
    from .peak_rss import current_rss

    if not teachers:
        raise MemoryPlanError(f"stage {stage!r}: no teacher to plan for")
    if runtime_bytes is None:
        runtime_bytes = current_rss() or 0
    per_teacher = {}
    for name, source, dtype, tok_folder in teachers:
        config = load_config(source)
        tok = tokenizer_bytes(tok_folder) if tok_folder is not None else {"resident": 0, "load_peak": 0}
        stored = safetensors_numel(source) if isinstance(source, (str, Path)) else None
        params = stored if stored is not None else hf_parameter_count(config)["total"]
        weights = params * dtype_bytes(dtype)
        from .probes.token_scores import SLICED_HEAD_TYPES

        sliced = sliced_head and getattr(config, "model_type", None) in SLICED_HEAD_TYPES
        acts = forward_activation_bytes(config, batch, seq_len, activation_dtype or dtype, sliced_head=sliced,
                                        position_slices=position_slices)
        forward_phase = {"runtime": runtime_bytes, "teacher_weights": weights, "tokenizer": tok["resident"],
                         "activations": acts["total"]}
        load_phase = {"runtime": runtime_bytes, "tokenizer_load_peak": tok["load_peak"]}
        phases = {"load": _component_total(load_phase), "forward": _component_total(forward_phase)}
        peak_phase = max(phases, key=phases.get)
        per_teacher[name] = {"components": forward_phase if peak_phase == "forward" else load_phase,
                             "phases": phases, "peak_phase": peak_phase, "total_bytes": phases[peak_phase],
                             "activations": acts, "params": params,
                             "params_from": "safetensors headers" if stored is not None else "config",
                             "dtype": str(dtype), "activation_dtype": str(activation_dtype or dtype)}
    peak = max(per_teacher, key=lambda n: per_teacher[n]["total_bytes"])
    return {"stage": stage, "kind": "ram", "components": dict(per_teacher[peak]["components"]),
            "total_bytes": per_teacher[peak]["total_bytes"], "per_teacher": per_teacher, "peak_teacher": peak,
            "assumptions": {"batch": batch, "seq_len": seq_len, "one_teacher_resident": True,
                            "sliced_head": sliced_head,
                            "tokenizer_resident_per_file_byte": TOKENIZER_RESIDENT_PER_FILE_BYTE,
                            "tokenizer_load_peak_per_file_byte": TOKENIZER_LOAD_PEAK_PER_FILE_BYTE}}


# ---------------------------------------------------------------------------------------------- final model (GPU)


def cache_windows(nexus_config):
    """Per cache slot of the Nexus model: the tokens a slot keeps (``None``: all) in the cache the model builds.

    The model builds ``DynamicCache(config=config)``; transformers makes a slot sliding when the config says so. The
    answer is read from that cache object (no tensors), so it follows the model if its cache changes.
    """
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    cache = DynamicCache(config=nexus_config)
    layers = getattr(cache, "layers", [])
    windows = []
    for layer in layers:
        windows.append(layer.sliding_window - 1 if isinstance(layer, DynamicSlidingWindowLayer) else None)
    return windows


def kv_cache_bytes(nexus_config, context, batch=1, dtype="bf16", tower=None, sliding_cache=None) -> int:
    """Bytes of the Nexus model's KV cache after ``context`` tokens for the routed ``tower`` (default: the largest).

    Slot 0 is the routing record (B, 1, T, 1) in keys and values; then 2 x (B, kv_heads, kept, head_dim) per layer
    with attention. ``kept`` is ``context``, or ``min(context, sliding_window - 1)`` for a windowed layer when the
    cache trims windows: ``sliding_cache`` True/False forces it; None reads it off the cache the model builds.
    """
    b = dtype_bytes(dtype)
    if sliding_cache is None:
        windows = cache_windows(nexus_config)
        trims = any(w is not None for w in windows)
    else:
        trims = bool(sliding_cache)
    per_tower = []
    for spec in nexus_config.towers:
        total = 0
        for layer in spec["layers"]:
            if layer["num_attention_heads"] == 0:
                continue
            kept = context
            if trims and layer["sliding_window"] is not None:
                kept = min(context, layer["sliding_window"] - 1)
            total += 2 * batch * layer["num_key_value_heads"] * kept * layer["head_dim"] * b
        per_tower.append(total)
    record = 2 * batch * context * b
    if tower is not None:
        return record + per_tower[tower]
    return record + max(per_tower)


def prefill_working_bytes(nexus_config, context, batch=1, dtype="bf16") -> dict:
    """The prefill's live activations for ``context`` tokens in one pass (the worst tower), and its attention mask.

    Logits are computed for the last token only (generate passes ``logits_to_keep=1``; fp32 for the sampler). A
    windowed layer shorter than the context needs a (B, 1, T, T) bool mask, which SDPA turns into an additive mask
    in the model's dtype.
    """
    b = dtype_bytes(dtype)
    tokens = batch * context
    H, V = nexus_config.hidden_size, nexus_config.vocab_size
    worst, needs_mask = 0, False
    for spec in nexus_config.towers:
        h = spec["hidden_size"]
        for layer in spec["layers"]:
            nh, nkv, hd, ffn = (layer[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                   "intermediate_size"))
            live = 4 * tokens * h * b + 2 * tokens * (nh + 2 * nkv) * hd * b + 3 * tokens * ffn * b
            worst = max(worst, live)
            window = layer["sliding_window"]
            needs_mask |= nh > 0 and window is not None and context > window
    mask = batch * context * context * (1 + b) if needs_mask else 0
    logits = batch * V * (b + 4)
    return {"layer_working_set": worst + tokens * H * b, "attention_mask": mask, "last_token_logits": logits}


def plan_final_model(nexus_config, context, batch=1, dtype="bf16", sliding_cache=None) -> dict:
    """GPU-memory plan for serving the Nexus student at ``context`` tokens: weights + KV cache + prefill."""
    from .budget import config_parameter_count

    if isinstance(nexus_config, (str, Path)):
        from ..modeling_nexus import NexusConfig

        nexus_config = NexusConfig.from_pretrained(nexus_config)
    params = config_parameter_count(nexus_config)["total"]
    prefill = prefill_working_bytes(nexus_config, context, batch, dtype)
    components = {"weights": params * dtype_bytes(dtype),
                  "kv_cache": kv_cache_bytes(nexus_config, context, batch, dtype, sliding_cache=sliding_cache),
                  **{f"prefill_{k}": v for k, v in prefill.items()}}
    return {"stage": "final_model", "kind": "gpu", "components": components,
            "total_bytes": _component_total(components),
            "assumptions": {"context": context, "batch": batch, "dtype": str(dtype), "params": params,
                            "sliding_cache": sliding_cache if sliding_cache is not None else "as the model builds it"}}


# ---------------------------------------------------------------------------------------------- the check


def check_plan(plan, budget_bytes=None) -> dict:
    """Return ``plan`` if its total fits ``budget_bytes`` (default 16 GiB); else raise with every component."""
    budget = DEFAULT_FINAL_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    if budget <= 0:
        raise MemoryPlanError(f"memory budget must be positive, got {budget_bytes!r}")
    total = plan["total_bytes"]
    if total > budget:
        parts = ", ".join(f"{k} {_mib(v)}" for k, v in sorted(plan["components"].items(), key=lambda kv: -kv[1]))
        what = "GPU memory" if plan.get("kind") == "gpu" else "peak RAM"
        raise MemoryPlanError(f"stage {plan['stage']}: planned {what} {_mib(total)} ({total:,} bytes) exceeds the "
                              f"budget of {_mib(budget)} ({budget:,} bytes) by {_mib(total - budget)}: {parts}")
    return plan


def plan_json(plan) -> str:
    return json.dumps(plan, indent=1, default=str)

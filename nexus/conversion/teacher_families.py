"""Teacher families: how a Hugging Face decoder's config and weights map onto a Nexus decoder tower.

Each family is one registered `TeacherFamily` instance, keyed by the HF ``model_type``. A family knows
- the tower spec (norm type and placement, activation, q/k-norm, biases, per-layer RoPE and sliding window),
- the model-level settings (embedding scale, final norm, logit softcap),
- how its parameter names map to Nexus names.

Adding a family means registering one more instance; `nexus import` names the registered ones when it meets another.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TeacherFamily:
    model_type: str
    norm: str = "rms"
    sandwich_norms: bool = False
    qk_norm: bool = False
    qkv_bias: str | bool = "attention_bias"  # a config attribute name, or a constant
    o_bias: str | bool = "attention_bias"
    gemma_scaling: bool = False  # embedding * sqrt(hidden), query_pre_attn_scalar, softcaps
    # HF layer-local name -> Nexus layer-local name, for names that differ
    renames: dict = field(default_factory=dict)


FAMILIES: dict[str, TeacherFamily] = {}


def register_family(family: TeacherFamily) -> TeacherFamily:
    if family.model_type in FAMILIES:
        raise ValueError(f"teacher family {family.model_type!r} is already registered")
    FAMILIES[family.model_type] = family
    return family


register_family(TeacherFamily("llama", renames={"post_attention_layernorm": "pre_feedforward_layernorm"}))
register_family(TeacherFamily("qwen2", qkv_bias=True, o_bias=False,
                              renames={"post_attention_layernorm": "pre_feedforward_layernorm"}))
register_family(TeacherFamily("qwen3", qk_norm=True, renames={"post_attention_layernorm": "pre_feedforward_layernorm"}))
register_family(TeacherFamily("gemma3_text", norm="gemma_rms", sandwich_norms=True, qk_norm=True, gemma_scaling=True))


def family_for(hf_config) -> TeacherFamily:
    """The registered family of an HF config; the error names the supported architectures."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gemma3" and hasattr(hf_config, "text_config"):
        model_type = "gemma3_text"
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported teacher architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def _flag(hf_config, value):
    return bool(getattr(hf_config, value, False)) if isinstance(value, str) else value


def _rope_for(hf_config, layer_type):
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", "default")
    scaling = None
    if rope_type != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta), scaling


def nexus_config_kwargs(hf_config, name="teacher", capabilities=()):
    """NexusConfig keyword arguments that reproduce ``hf_config`` as a one-tower Nexus model."""
    family = family_for(hf_config)
    if hf_config.model_type == "gemma3" and hasattr(hf_config, "text_config"):
        hf_config = hf_config.text_config
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    layer_types = getattr(hf_config, "layer_types", None) or ["full_attention"] * hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None)
    layers = []
    for i in range(hf_config.num_hidden_layers):
        theta, scaling = _rope_for(hf_config, layer_types[i])
        layers.append({
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "intermediate_size": hf_config.intermediate_size,
            "sliding_window": window if layer_types[i] == "sliding_attention" else None,
            "rope_theta": theta,
            "rope_scaling": scaling,
        })
    act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", "silu")
    tower = {
        "type": "decoder",
        "name": name,
        "capabilities": list(capabilities),
        "norm": family.norm,
        "rms_norm_eps": hf_config.rms_norm_eps,
        "hidden_act": act,
        "sandwich_norms": family.sandwich_norms,
        "qk_norm": family.qk_norm,
        "attention_bias": _flag(hf_config, family.qkv_bias),
        "attention_out_bias": _flag(hf_config, family.o_bias),
        "mlp_bias": bool(getattr(hf_config, "mlp_bias", False)),
        "query_pre_attn_scalar": getattr(hf_config, "query_pre_attn_scalar", None) if family.gemma_scaling else None,
        "attn_logit_softcapping": getattr(hf_config, "attn_logit_softcapping", None) if family.gemma_scaling else None,
        "layers": layers,
    }
    return {
        "vocab_size": hf_config.vocab_size,
        "hidden_size": hf_config.hidden_size,
        "towers": [tower],
        "embedding_scale": hf_config.hidden_size**0.5 if family.gemma_scaling else None,
        "final_norm": family.norm,
        "final_norm_eps": hf_config.rms_norm_eps,
        "final_logit_softcapping": getattr(hf_config, "final_logit_softcapping", None) if family.gemma_scaling else None,
        "max_position_embeddings": getattr(hf_config, "max_position_embeddings", 4096),
        "tie_word_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
        "pad_token_id": getattr(hf_config, "pad_token_id", None),
        "bos_token_id": getattr(hf_config, "bos_token_id", None),
        "eos_token_id": getattr(hf_config, "eos_token_id", None),
    }


def nexus_state_dict(hf_config, hf_state_dict, tower_index=0):
    """Rename an HF decoder's weights to Nexus names (tower ``tower_index``); unknown names are an error."""
    family = family_for(hf_config)
    out = {}
    for key, tensor in hf_state_dict.items():
        key = key.removeprefix("language_model.")
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        if key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            out[key] = tensor
            continue
        if not key.startswith("model.layers."):
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"teacher weight {key!r} has no place in a Nexus tower ({family.model_type})")
        _, _, index, rest = key.split(".", 3)
        module, _, leaf = rest.rpartition(".")
        head, _, tail = module.partition(".")
        head = family.renames.get(head, head)
        module = f"{head}.{tail}" if tail else head
        out[f"model.towers.{tower_index}.layers.{index}.{module}.{leaf}"] = tensor
    return out

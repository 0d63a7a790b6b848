"""`NexusConfig`: one shared vocabulary and embedding, a list of towers, a router, a shared final norm and LM head.

Everything is plain JSON so a checkpoint's ``config.json`` is readable and editable. A tower is a dict::

    {"type": "decoder", "name": "prose", "capabilities": ["prose"],
     "hidden_size": 640, "norm": "gemma_rms", "rms_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
     "sandwich_norms": true, "qk_norm": true, "attention_bias": false, "attention_out_bias": false,
     "mlp_bias": false, "query_pre_attn_scalar": 256, "attn_logit_softcapping": null,
     "layers": [{"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                 "intermediate_size": 2048, "sliding_window": 512, "rope_theta": 10000.0,
                 "rope_scaling": null}, ...]}

Widths are per layer on purpose: pruning leaves irregular shapes, and a layer with 0 heads (or 0 FFN neurons) has
no attention (or no MLP) at all.
"""

import copy

from transformers import PretrainedConfig

from .audio_encoder import normalise_audio_encoder
from .low_rank_linear import FACTORISABLE
from .whisper_decoder_tower import CACHE_SLOTS_PER_LAYER, normalise_whisper_decoder_tower

NORM_TYPES = ("rms", "gemma_rms")
ROPE_TYPES = ("default", "linear", "llama3")

DECODER_TOWER_DEFAULTS = {
    "name": None,
    "capabilities": [],
    "hidden_size": None,  # None: the shared hidden size (no edge projections)
    "norm": "rms",
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "sandwich_norms": False,  # Gemma-style post-attention / post-feedforward norms
    "qk_norm": False,
    "attention_bias": False,  # bias on q/k/v
    "attention_out_bias": False,  # bias on o_proj
    "mlp_bias": False,
    "query_pre_attn_scalar": None,  # None: head_dim, i.e. scaling = head_dim ** -0.5
    "attn_logit_softcapping": None,
    # "own": the tower has its own input embedding, final norm and LM head over the shared vocabulary (copied from its
    # teacher by token string), so a teacher whose hidden space differs from the shared head's keeps its own; "shared":
    # it reads the shared embedding and writes through the shared final norm and head (with edge projections if its
    # width differs)
    "vocabulary": "shared",
    "embedding_scale": None,  # "own" vocabulary only: multiply its embeddings by this (Gemma: sqrt(hidden))
    "vocabulary_ids": None,  # "own" vocabulary only: the shared ids it has rows for (None: all of them)
    "final_logit_softcapping": None,  # "own" vocabulary only
}
VOCABULARY_KINDS = ("shared", "own")
DECODER_LAYER_DEFAULTS = {
    "sliding_window": None,
    "rope_theta": 10000.0,
    "rope_scaling": None,
}
DECODER_LAYER_REQUIRED = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
# Optional, stored only when set: ``ranks`` ({projection: rank}) stores those projections as two factors
# (low_rank_linear.py, the manifold option).
# Optional, stored only when set: which positions a layer's text queries attend to when an encoder prefix (audio) sits
# before the text: "all" (prefix and text, causal), "text" (text only: self-attention) or "prefix" (the prefix only:
# cross-attention written as self-attention). Without a prefix, "prefix" leaves each query only itself.
LAYER_ATTENDS = ("all", "text", "prefix")


def tower_cache_slots(spec):
    """KV-cache slots a tower uses: one per layer, two per cross-attention (``whisper_decoder``) layer."""
    per_layer = CACHE_SLOTS_PER_LAYER if spec.get("type") == "whisper_decoder" else 1
    return per_layer * len(spec.get("layers", []))


def _check_int(value, where, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")


def _check_ranks(ranks, where):
    """A layer's optional ``ranks``: ``{projection: rank}`` for the projections stored as two factors."""
    if ranks is None:
        return
    if not isinstance(ranks, dict) or not ranks:
        raise ValueError(f"{where} must be a non-empty dict {{projection: rank}}, got {ranks!r}")
    for name, rank in ranks.items():
        if name not in FACTORISABLE:
            raise ValueError(f"{where}: unknown projection {name!r}; factorisable: {', '.join(FACTORISABLE)}")
        _check_int(rank, f"{where}.{name}", 1)


def normalise_decoder_tower(spec, where, shared_hidden_size):
    """Fill defaults into a decoder tower spec and check it; errors name the config path (``towers[0].layers[3]``)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a dict, got {type(spec).__name__}")
    unknown = set(spec) - set(DECODER_TOWER_DEFAULTS) - {"type", "layers"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(DECODER_TOWER_DEFAULTS)}")
    out = {"type": "decoder", **copy.deepcopy(DECODER_TOWER_DEFAULTS), **copy.deepcopy(spec)}
    if out["hidden_size"] is None:
        out["hidden_size"] = shared_hidden_size
    _check_int(out["hidden_size"], f"{where}.hidden_size", 1)
    if out["norm"] not in NORM_TYPES:
        raise ValueError(f"{where}.norm must be one of {NORM_TYPES}, got {out['norm']!r}")
    if out["vocabulary"] not in VOCABULARY_KINDS:
        raise ValueError(f"{where}.vocabulary must be one of {VOCABULARY_KINDS}, got {out['vocabulary']!r}")
    ids = out["vocabulary_ids"]
    if ids is not None:
        if out["vocabulary"] != "own" or not isinstance(ids, list) or not ids:
            raise ValueError(f"{where}.vocabulary_ids must be a non-empty list of ids, with vocabulary: own")
        for i, v in enumerate(ids):
            _check_int(v, f"{where}.vocabulary_ids[{i}]", 0)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}.vocabulary_ids holds an id twice")
    layers = spec.get("layers")
    if not isinstance(layers, list):
        raise ValueError(f"{where}.layers must be a list of layer dicts")
    out["layers"] = []
    for i, layer in enumerate(layers):
        lw = f"{where}.layers[{i}]"
        if not isinstance(layer, dict):
            raise ValueError(f"{lw} must be a dict")
        missing = [k for k in DECODER_LAYER_REQUIRED if k not in layer]
        if missing:
            raise ValueError(f"{lw}: missing field(s) {missing}")
        unknown = set(layer) - set(DECODER_LAYER_REQUIRED) - set(DECODER_LAYER_DEFAULTS) - {"attends", "ranks"}
        if unknown:
            raise ValueError(f"{lw}: unknown field(s) {sorted(unknown)}")
        if layer.get("attends", "all") not in LAYER_ATTENDS:
            raise ValueError(f"{lw}.attends must be one of {LAYER_ATTENDS}, got {layer['attends']!r}")
        _check_ranks(layer.get("ranks"), f"{lw}.ranks")
        full = {**DECODER_LAYER_DEFAULTS, **copy.deepcopy(layer)}
        for key in DECODER_LAYER_REQUIRED:
            _check_int(full[key], f"{lw}.{key}", 0)
        heads, kv = full["num_attention_heads"], full["num_key_value_heads"]
        if heads > 0:
            _check_int(full["head_dim"], f"{lw}.head_dim", 1)
            _check_int(kv, f"{lw}.num_key_value_heads", 1)
            if heads % kv:
                raise ValueError(f"{lw}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
        if full["sliding_window"] is not None:
            _check_int(full["sliding_window"], f"{lw}.sliding_window", 1)
        scaling = full["rope_scaling"]
        if scaling is not None and scaling.get("rope_type", "default") not in ROPE_TYPES:
            raise ValueError(f"{lw}.rope_scaling.rope_type must be one of {ROPE_TYPES}, got {scaling.get('rope_type')!r}")
        out["layers"].append(full)
    return out


class NexusConfig(PretrainedConfig):
    r"""Configuration of a [`NexusForCausalLM`]: shared embedding + towers + router + shared final norm and head.

    Args:
        vocab_size (`int`): size of the shared vocabulary.
        hidden_size (`int`): width of the shared embedding / residual interface between towers and head.
        towers (`list[dict]`): tower specs; see the module docstring. Each has a registered ``type``.
        router (`dict`): ``{"type": "pooled_linear"}``; used only when there is more than one tower.
        embedding_scale (`float`, *optional*): multiply embeddings by this (Gemma: ``sqrt(hidden_size)``).
        final_norm (`str`): ``"rms"`` or ``"gemma_rms"`` (the ``(1 + w)`` variant).
        final_logit_softcapping (`float`, *optional*): ``tanh`` softcap on the logits.
        capability_names (`list[str]`): the capabilities the model serves; each tower lists its own under
            ``capabilities`` (several capabilities may share a tower) and `capability_to_tower` maps them; the
            router's classes are the towers.
    """

    model_type = "nexus"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=256,
        hidden_size=64,
        towers=None,
        router=None,
        encoders=None,
        vocoder=None,
        embedding_scale=None,
        final_norm="rms",
        final_norm_eps=1e-6,
        final_logit_softcapping=None,
        max_position_embeddings=4096,
        initializer_range=0.02,
        tie_word_embeddings=True,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        if towers is None:
            towers = [{"type": "decoder", "layers": [
                {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128}
            ] * 2}]
        if not isinstance(towers, list) or not towers:
            raise ValueError("towers must be a non-empty list of tower specs")
        normalised = []
        for i, spec in enumerate(towers):
            if not isinstance(spec, dict) or "type" not in spec:
                raise ValueError(f"towers[{i}] must be a dict with a 'type' field")
            if spec["type"] == "decoder":
                spec = normalise_decoder_tower(spec, f"towers[{i}]", hidden_size)
            elif spec["type"] == "whisper_decoder":
                spec = normalise_whisper_decoder_tower(spec, f"towers[{i}]", hidden_size)
            bad = [i for i in spec.get("vocabulary_ids") or [] if i >= vocab_size]
            if bad:
                raise ValueError(f"towers[{i}].vocabulary_ids: id {bad[0]} is not below vocab_size ({vocab_size})")
            normalised.append(spec)
        self.towers = normalised
        self.router = router if router is not None else {"type": "pooled_linear"}
        self.encoders = [normalise_audio_encoder(spec, f"encoders[{i}]")  # filled in and checked once, here
                         if isinstance(spec, dict) and spec.get("type") == "whisper_audio" else spec
                         for i, spec in enumerate(encoders or [])]
        self.vocoder = vocoder
        self.embedding_scale = embedding_scale
        if final_norm not in NORM_TYPES:
            raise ValueError(f"final_norm must be one of {NORM_TYPES}, got {final_norm!r}")
        self.final_norm = final_norm
        self.final_norm_eps = final_norm_eps
        self.final_logit_softcapping = final_logit_softcapping
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # One cache slot for the routing record, then every tower's layers in order (see NexusModel.forward).
        self.num_hidden_layers = 1 + sum(tower_cache_slots(t) for t in self.towers)
        kwargs.pop("num_hidden_layers", None)  # derived from the towers: a stale value in a config.json must not win
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def capability_to_tower(self):
        """Map each capability name to the index of the tower that serves it."""
        mapping = {}
        for i, tower in enumerate(self.towers):
            for cap in tower.get("capabilities") or []:
                mapping[cap] = i
        return mapping

    def tower_layer_offset(self, tower_index):
        """Cache slot of the first layer of ``tower_index`` (slot 0 holds the routing record)."""
        return 1 + sum(tower_cache_slots(t) for t in self.towers[:tower_index])

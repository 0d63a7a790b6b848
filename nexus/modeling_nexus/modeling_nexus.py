"""NexusForCausalLM: a shared embedding, several decoder towers, a router, a shared final norm and LM head.

Reads top to bottom: norm -> rotary -> attention -> MLP -> layer -> tower -> router -> model -> head.

The decoder layer is parametrised (norm type and placement, activation, q/k-norm, biases, per-layer RoPE theta and
sliding window, softcaps) so that Llama, Qwen2, Qwen3 and Gemma-3 blocks are reproduced exactly, and every layer has
its own widths (heads, kv-heads, head_dim, FFN size) because pruned models are irregular.

Routing is hard top-1 at inference: for each sequence the router (or the caller, with ``tower=`` / ``capability=``)
picks one tower and only the picked towers run. The pick is written into cache slot 0 so that every decoding step of
``generate`` reuses it, and beam search reorders it with the rest of the cache. A forced tower (or a model with one
tower) is known without reading a tensor, so that forward compiles with no graph break (``torch.compile(...,
fullgraph=True)``); the router's pick decides which towers run from tensor data, a graph break.

This folder imports only torch, transformers and itself: ``save_pretrained`` copies it into every checkpoint.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .audio_encoder import NexusAudioEncoder  # noqa: F401  (registers encoder type "whisper_audio")
from .configuration_nexus import NexusConfig
from .low_rank_linear import projection
from .registry import register, resolve
from .transcribe import transcribe_audio
from .whisper_decoder_tower import NexusWhisperDecoderTower  # noqa: F401  (registers tower type "whisper_decoder")

# transformers renamed the cache argument and output field from ``past_key_values`` to ``cache`` during 5.x (5.25 passes
# ``cache=`` from ``generate``). Nexus accepts both names and returns the cache under the installed version's name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache, past_key_values):
    """The cache passed under either name; both at once is a caller error."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as cache= or past_key_values=, not both")
    return cache if cache is not None else past_key_values

# ----------------------------------------------------------------------------------------------------------- norms


class NexusRMSNorm(nn.Module):
    """RMSNorm in two flavours.

    ``"rms"`` (Llama/Qwen): normalise in fp32, cast back, then multiply by ``w`` (initialised to 1).
    ``"gemma_rms"`` (Gemma): normalise and multiply by ``(1 + w)`` in fp32, then cast (``w`` initialised to 0).
    """

    def __init__(self, dim, eps=1e-6, kind="rms"):
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim) if kind == "gemma_rms" else torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "gemma_rms":
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.eps}, kind={self.kind}"


# ---------------------------------------------------------------------------------------------------------- rotary


def rope_inverse_frequencies(head_dim, theta, scaling, device):
    """Inverse frequencies for RoPE (``default``, ``linear`` and ``llama3`` types), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / head_dim))
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # same arithmetic as transformers' _compute_llama3_parameters
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}")


def rotary_cos_sin(position_ids, head_dim, theta, scaling, dtype):
    """cos/sin tables for ``position_ids`` (B, T) -> each (B, T, head_dim), in ``dtype``."""
    inv_freq = rope_inverse_frequencies(head_dim, theta, scaling, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ------------------------------------------------------------------------------------------------------- attention


class NexusAttention(nn.Module):
    """Grouped-query attention with optional q/k-norm, biases, sliding window and logit softcap; SDPA by default."""

    def __init__(self, tower_spec, layer_spec, cache_index):
        super().__init__()
        hidden = tower_spec["hidden_size"]
        self.num_heads = layer_spec["num_attention_heads"]
        self.num_kv_heads = layer_spec["num_key_value_heads"]
        self.head_dim = layer_spec["head_dim"]
        self.cache_index = cache_index
        self.sliding_window = layer_spec["sliding_window"]
        self.attends = layer_spec.get("attends", "all")  # text queries see: prefix and text / text / the prefix
        self.rope_theta = layer_spec["rope_theta"]
        self.rope_scaling = layer_spec["rope_scaling"]
        scalar = tower_spec["query_pre_attn_scalar"] or self.head_dim
        self.scaling = scalar**-0.5
        self.softcap = tower_spec["attn_logit_softcapping"]
        bias, out_bias = tower_spec["attention_bias"], tower_spec["attention_out_bias"]
        ranks = layer_spec.get("ranks") or {}  # factored projections (low_rank_linear.py)
        self.q_proj = projection(hidden, self.num_heads * self.head_dim, bias, ranks.get("q_proj"))
        self.k_proj = projection(hidden, self.num_kv_heads * self.head_dim, bias, ranks.get("k_proj"))
        self.v_proj = projection(hidden, self.num_kv_heads * self.head_dim, bias, ranks.get("v_proj"))
        self.o_proj = projection(self.num_heads * self.head_dim, hidden, out_bias, ranks.get("o_proj"))
        if tower_spec["qk_norm"]:
            eps, kind = tower_spec["rms_norm_eps"], tower_spec["norm"]
            self.q_norm = NexusRMSNorm(self.head_dim, eps, kind)
            self.k_norm = NexusRMSNorm(self.head_dim, eps, kind)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, ctx, past_key_values=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.rotary(self.head_dim, self.rope_theta, self.rope_scaling, x.dtype)  # as HF: input dtype
        q, k = apply_rotary(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.cache_index)  # (B, nkv, S, hd)
        attn_mask = ctx.mask(self.sliding_window, self.attends)
        if self.softcap is None:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                is_causal=attn_mask is None and T > 1,
                scale=self.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )  # (B, nh, T, hd)
        else:  # SDPA has no softcap: eager path
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            scores = (q @ k.transpose(-2, -1)) * self.scaling  # (B, nh, T, S)
            scores = torch.tanh(scores / self.softcap) * self.softcap
            if attn_mask is None:
                attn_mask = ctx.causal_bool()
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            y = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


# ------------------------------------------------------------------------------------------------------------- mlp


class NexusMLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``; SwiGLU with ``silu``, GeGLU with ``gelu_pytorch_tanh``."""

    def __init__(self, tower_spec, intermediate_size, ranks=None):
        super().__init__()
        hidden, bias, ranks = tower_spec["hidden_size"], tower_spec["mlp_bias"], ranks or {}
        self.gate_proj = projection(hidden, intermediate_size, bias, ranks.get("gate_proj"))
        self.up_proj = projection(hidden, intermediate_size, bias, ranks.get("up_proj"))
        self.down_proj = projection(intermediate_size, hidden, bias, ranks.get("down_proj"))
        self.act_fn = ACT2FN[tower_spec["hidden_act"]]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------------------- layer


class NexusDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block, optionally with Gemma's post-attention / post-feedforward "sandwich" norms.

    A layer with 0 heads has no attention and a layer with 0 FFN neurons has no MLP: that is what pruning leaves.
    """

    def __init__(self, tower_spec, layer_spec, cache_index):
        super().__init__()
        hidden, eps, kind = tower_spec["hidden_size"], tower_spec["rms_norm_eps"], tower_spec["norm"]
        sandwich = tower_spec["sandwich_norms"]
        self.self_attn = self.input_layernorm = self.post_attention_layernorm = None
        self.mlp = self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        if layer_spec["num_attention_heads"] > 0:
            self.input_layernorm = NexusRMSNorm(hidden, eps, kind)
            self.self_attn = NexusAttention(tower_spec, layer_spec, cache_index)
            if sandwich:
                self.post_attention_layernorm = NexusRMSNorm(hidden, eps, kind)
        if layer_spec["intermediate_size"] > 0:
            self.pre_feedforward_layernorm = NexusRMSNorm(hidden, eps, kind)
            self.mlp = NexusMLP(tower_spec, layer_spec["intermediate_size"], layer_spec.get("ranks"))
            if sandwich:
                self.post_feedforward_layernorm = NexusRMSNorm(hidden, eps, kind)

    def forward(self, hidden_states, ctx=None, past_key_values=None):
        if self.self_attn is not None:
            h = self.self_attn(self.input_layernorm(hidden_states), ctx, past_key_values)
            if self.post_attention_layernorm is not None:
                h = self.post_attention_layernorm(h)
            hidden_states = hidden_states + h
        if self.mlp is not None:
            h = self.mlp(self.pre_feedforward_layernorm(hidden_states))
            if self.post_feedforward_layernorm is not None:
                h = self.post_feedforward_layernorm(h)
            hidden_states = hidden_states + h
        return hidden_states


# --------------------------------------------------------------------------------------------- per-call context


class ForwardContext:
    """What every layer of one forward call shares, built once and memoised: RoPE tables and attention masks.

    ``mask(window)`` returns ``None`` when plain ``is_causal`` (or no mask at all) is exact, which keeps SDPA on its
    fastest path. Otherwise it is a (B, 1, T, S) bool mask: causal, within the window, not padding. A query may
    always see itself, so no row is empty (a fully masked row would give NaN).
    """

    def __init__(self, attention_mask, position_ids, past_length, query_length, batch_size, device):
        self.position_ids = position_ids  # (B, T)
        self.past_length, self.query_length = past_length, query_length
        self.key_length = past_length + query_length
        self.batch_size, self.device = batch_size, device
        self.padding = None
        if attention_mask is not None:
            am = attention_mask[:, -self.key_length :].to(device=device, dtype=torch.bool)  # (B, S)
            if not bool(am.all()):
                self.padding = am[:, None, None, :]  # (B, 1, 1, S)
        self.prefix_length = 0  # positions [0, prefix_length) hold an encoder prefix (set by NexusModel.forward)
        self._masks, self._rotary = {}, {}

    def rotary(self, head_dim, theta, scaling, dtype):
        key = (head_dim, theta, repr(scaling), dtype)
        if key not in self._rotary:
            self._rotary[key] = rotary_cos_sin(self.position_ids, head_dim, theta, scaling, dtype)
        return self._rotary[key]

    def causal_bool(self):
        q = torch.arange(self.past_length, self.key_length, device=self.device)[:, None]
        k = torch.arange(self.key_length, device=self.device)[None, :]
        return k <= q  # (T, S)

    def mask(self, window, attends="all"):
        needs_window = window is not None and self.key_length > window
        scoped = attends == "prefix" or (attends == "text" and self.prefix_length > 0)
        if not scoped and self.padding is None and not needs_window and (self.past_length == 0 or self.query_length == 1):
            return None  # is_causal (prefill) or no mask (one new token) is exact
        if scoped:
            return self._scoped_mask(window, attends)
        if window not in self._masks:
            q = torch.arange(self.past_length, self.key_length, device=self.device)[:, None]  # (T, 1)
            k = torch.arange(self.key_length, device=self.device)[None, :]  # (1, S)
            allowed = k <= q
            if window is not None:
                allowed = allowed & (k > q - window)
            allowed = allowed[None, None].expand(self.batch_size, 1, -1, -1)  # (B, 1, T, S)
            if self.padding is not None:
                allowed = allowed & self.padding
            self._masks[window] = allowed | (k == q)[None, None]
        return self._masks[window]

    def _scoped_mask(self, window, attends):
        """The causal/window/padding mask, then text queries (position >= prefix_length) restricted to text keys
        (``"text"``) or to prefix keys (``"prefix"``); a row left empty keeps only its own position."""
        key = (window, attends)
        if key not in self._masks:
            base = self.mask(window) if (self.padding is not None or window is not None) else None
            q = torch.arange(self.past_length, self.key_length, device=self.device)[:, None]  # (T, 1)
            k = torch.arange(self.key_length, device=self.device)[None, :]  # (1, S)
            allowed = (k <= q)[None, None] if base is None else base  # (1 or B, 1, T, S)
            text_q, prefix_k = q >= self.prefix_length, k < self.prefix_length
            scope = ~text_q | (~prefix_k if attends == "text" else prefix_k)  # (T, S)
            allowed = allowed & scope[None, None]
            empty = ~allowed.any(-1, keepdim=True)
            self._masks[key] = (allowed | ((k == q)[None, None] & empty)).expand(self.batch_size, 1, -1, -1)
        return self._masks[key]


# ----------------------------------------------------------------------------------------------------------- tower


class NexusScaledEmbedding(nn.Embedding):
    """Token embedding times an optional constant (Gemma multiplies by sqrt(hidden) in the weights' dtype)."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, scale=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale = scale

    def forward(self, input_ids):
        x = super().forward(input_ids)
        if self.scale is None:
            return x
        return x * torch.tensor(self.scale, dtype=self.weight.dtype, device=x.device)


@register("tower", "decoder")
class NexusDecoderTower(nn.Module):
    """A stack of `NexusDecoderLayer`s with per-layer widths; projections at its edges if its width differs, or (spec
    ``vocabulary: own``) its own embedding, final norm and LM head over the shared vocabulary."""

    def __init__(self, config, tower_index):
        super().__init__()
        spec = config.towers[tower_index]
        self.spec = spec
        self.name = spec.get("name") or f"tower{tower_index}"
        offset = config.tower_layer_offset(tower_index)
        self.layers = nn.ModuleList(
            [NexusDecoderLayer(spec, layer, offset + i) for i, layer in enumerate(spec["layers"])]
        )
        self.own_vocabulary = spec.get("vocabulary", "shared") == "own"
        h = spec["hidden_size"]
        self.vocab_size = config.vocab_size
        self.vocabulary_ids = spec.get("vocabulary_ids")  # own vocabulary: its rows' shared ids (None: every id)
        self._id_maps = {}
        if self.own_vocabulary:  # its own embedding, final norm and head over (part of) the shared vocabulary
            if self.vocabulary_ids is None:
                self.embed_tokens = NexusScaledEmbedding(config.vocab_size, h, config.pad_token_id,
                                                         spec.get("embedding_scale"))
                self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
            else:  # rows for its ids only, plus a last row every other shared id uses (a zero input; one logit)
                n = len(self.vocabulary_ids)
                self.embed_tokens = NexusScaledEmbedding(n + 1, h, n, spec.get("embedding_scale"))
                self.lm_head = nn.Linear(h, n + 1, bias=False)
            self.norm = NexusRMSNorm(h, spec["rms_norm_eps"], spec["norm"])
            self.in_proj = self.out_proj = None
        elif h != config.hidden_size:
            self.in_proj = nn.Linear(config.hidden_size, h, bias=False)
            self.out_proj = nn.Linear(h, config.hidden_size, bias=False)
        else:
            self.in_proj = self.out_proj = None

    def forward(self, hidden_states, ctx, past_key_values=None, collect_hidden=False, input_ids=None):
        """``hidden_states``: the shared embeddings (B, T, H). A tower with its own vocabulary embeds ``input_ids``
        itself and returns its final-normed hidden states (B, T, h) for its own head; others return (B, T, H)."""
        hidden = [] if collect_hidden else None
        if self.own_vocabulary:
            if input_ids is None:
                raise ValueError(f"tower {self.name!r} has its own vocabulary: pass input_ids, not inputs_embeds")
            hidden_states = self.embed_tokens(self._local_ids(input_ids))
        if self.in_proj is not None:
            hidden_states = self.in_proj(hidden_states)
        for layer in self.layers:
            if collect_hidden:
                hidden.append(hidden_states)
            hidden_states = layer(hidden_states, ctx=ctx, past_key_values=past_key_values)
        if self.out_proj is not None:
            hidden_states = self.out_proj(hidden_states)
        if self.own_vocabulary:
            hidden_states = self.norm(hidden_states)
        return hidden_states, hidden

    def _maps(self, device):
        """(shared id -> own row (absent: the zero row), own row -> shared id) for ``vocabulary_ids``, per device."""
        if device not in self._id_maps:
            ids = torch.tensor(self.vocabulary_ids, dtype=torch.long, device=device)
            local = torch.full((self.vocab_size,), len(self.vocabulary_ids), dtype=torch.long, device=device)
            local[ids] = torch.arange(len(ids), device=device)
            self._id_maps[device] = (local, ids)
        return self._id_maps[device]

    def _local_ids(self, input_ids):
        return input_ids if self.vocabulary_ids is None else self._maps(input_ids.device)[0][input_ids]

    def logits(self, hidden_states):
        """Own-vocabulary towers only: (B, T, h) final-normed hidden states -> (B, T, V) logits; every shared id
        outside ``vocabulary_ids`` gets the logit of the head's last row."""
        weight = self.lm_head.weight  # fp32 under an fp16 load (_keep_in_fp32_modules)
        logits = self.lm_head(hidden_states.to(weight.dtype) if weight.dtype.is_floating_point else hidden_states)
        cap = self.spec.get("final_logit_softcapping")
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if self.vocabulary_ids is None:
            return logits
        full = logits[..., -1:].expand(*logits.shape[:-1], self.vocab_size).contiguous()  # (B, T, V)
        return full.index_copy(-1, self._maps(logits.device)[1], logits[..., :-1])


# ---------------------------------------------------------------------------------------------------------- router


@register("router", "pooled_linear")
class NexusPooledRouter(nn.Module):
    """Linear classifier on the mean of the prompt's (unpadded) input embeddings -> one logit per tower."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, len(config.towers), bias=True)

    def forward(self, inputs_embeds, attention_mask=None):
        x = inputs_embeds.float()
        if attention_mask is not None:
            m = attention_mask[:, -x.shape[1] :].to(x.dtype)[..., None]  # (B, T, 1)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        else:
            pooled = x.mean(1)
        weight = self.proj.weight  # kept out of quantisation (_keep_in_fp32_modules); never cast to an int8 dtype
        return self.proj(pooled.to(weight.dtype) if weight.dtype.is_floating_point else pooled)  # (B, n_towers)


# ----------------------------------------------------------------------------------------------------------- model


@dataclass
class NexusModelOutput(BaseModelOutputWithPast):
    """``last_hidden_state`` holds the shared final norm's output for rows routed to shared-vocabulary towers (zeros
    elsewhere); ``tower_hidden_states[t]`` holds own-vocabulary tower ``t``'s final-normed states when it ran."""

    router_logits: torch.FloatTensor | None = None
    tower_index: torch.LongTensor | None = None
    tower_hidden_states: tuple | None = None
    towers_run: tuple | None = None  # the tower indices that ran (Python ints)


@dataclass
class NexusCausalLMOutput(CausalLMOutputWithPast):
    router_logits: torch.FloatTensor | None = None
    tower_index: torch.LongTensor | None = None


PACKED_4BIT_BLOCK = 32  # bitsandbytes' packed bf16 CPU kernel (AVX512-BF16) needs out_features % 32 == 0 ...


def unpack_irregular_4bit(model):
    """Keep bitsandbytes 4-bit layers that the packed CPU kernel cannot take on the unpacked path, which computes the
    same NF4 product at any width. The packed kernel needs the output width to be a multiple of 32 and the input width
    a multiple of the quantisation block (64 by default); a pruned tower's widths are irregular, and it would fail at
    the first forward ("N must be divisible by block_n", or a reshape error). Returns the names of those layers."""
    irregular = []
    for name, module in model.named_modules():  # duck-typed: this folder does not import bitsandbytes
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
        if module.out_features % PACKED_4BIT_BLOCK or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False
            irregular.append(name)
    return irregular


class NexusPreTrainedModel(PreTrainedModel):
    config_class = NexusConfig
    config: NexusConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NexusDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    # Never quantised (bitsandbytes, torchao: transformers adds these to the quantizer's modules_to_not_convert, matched
    # as a prefix regex or a suffix of the module name) and kept in fp32 under an fp16 load: the router, whose top-1
    # pick a 4-bit weight flips, and own-vocabulary towers' LM heads. The shared lm_head is skipped by transformers'
    # default (the output embeddings) and stays tied to the embedding.
    _keep_in_fp32_modules = ["model.router", "router.proj", "model.towers.*.lm_head"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        unpack_irregular_4bit(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, NexusRMSNorm):
            (init.zeros_ if module.kind == "gemma_rms" else init.ones_)(module.weight)

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # transformers 5.0 has only the older names

        def activation_checkpointing_enable(self, checkpointing_kwargs=None):
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)

        def activation_checkpointing_disable(self):
            self.gradient_checkpointing_disable()

        @property
        def is_activation_checkpointing(self):
            return self.is_gradient_checkpointing


class NexusModel(NexusPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = NexusScaledEmbedding(
            config.vocab_size, config.hidden_size, config.pad_token_id, config.embedding_scale
        )
        self.towers = nn.ModuleList(
            [resolve("tower", spec["type"], f"towers[{i}].type")(config, i) for i, spec in enumerate(config.towers)]
        )
        router_cls = resolve("router", config.router["type"], "router.type")
        self.router = router_cls(config) if len(config.towers) > 1 else None
        self.encoders = nn.ModuleList(  # audio (later vision) encoders: their outputs become an input prefix
            [resolve("encoder", spec.get("type"), f"encoders[{i}].type")(config, i)
             for i, spec in enumerate(config.encoders)]
        )
        self.norm = NexusRMSNorm(config.hidden_size, config.final_norm_eps, config.final_norm)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def tower_index_for(self, tower=None, capability=None):
        """Resolve ``tower`` (index, tower name, or the name of a capability it serves) or ``capability`` (name) to a
        tower index; errors list the choices."""
        if tower is not None and capability is not None:
            raise ValueError("pass tower= or capability=, not both")
        if capability is not None:
            mapping = self.config.capability_to_tower
            if capability not in mapping:
                raise ValueError(f"unknown capability {capability!r}; this model serves: {sorted(mapping)}")
            return mapping[capability]
        if isinstance(tower, str):
            names = [t.name for t in self.towers]
            if tower in names:
                return names.index(tower)
            mapping = self.config.capability_to_tower  # a capability's name picks the tower that serves it
            if tower in mapping:
                return mapping[tower]
            raise ValueError(f"unknown tower {tower!r}; towers: {names}; capabilities: {sorted(mapping)}")
        if not 0 <= int(tower) < len(self.towers):
            raise ValueError(f"tower index {tower} out of range: this model has {len(self.towers)} tower(s)")
        return int(tower)

    def prefix_tower_index(self):
        """The tower an encoder prefix goes to when the caller picks none: the first tower that reads prefixes
        (``whisper_decoder``), else None (the router decides)."""
        for i, t in enumerate(self.towers):
            if getattr(t, "reads_prefix", False):
                return i
        return None

    @property
    def _text_routable(self):
        """(n_towers,) bool: the towers the router may pick (not those with their own token space); None: all."""
        flags = [not getattr(t, "foreign_vocabulary", False) for t in self.towers]
        return None if all(flags) else torch.tensor(flags)

    def _foreign_route(self, forced, kept):
        """The name of the tower with its own token space this call runs (from the forced pick, or the cache's
        record), else None; such a tower runs alone in its batch."""
        if not any(getattr(t, "foreign_vocabulary", False) for t in self.towers):
            return None
        if forced is not None:
            picks = [forced]
        elif kept is not None and not torch.compiler.is_compiling():
            picks = kept[:, 0, 0, 0].round().long().unique().tolist()
        else:
            return None
        foreign = [t for t in picks if getattr(self.towers[t], "foreign_vocabulary", False)]
        if foreign and len(picks) > 1:
            raise ValueError(f"tower {self.towers[foreign[0]].name!r} has its own token space and runs alone in a "
                             f"batch; this cache's rows were filled by towers {picks}")
        return self.towers[foreign[0]].name if foreign else None

    def encoder_index_for(self, encoder=None, modality=None):
        """Resolve ``encoder`` (index or name; None: the only / first encoder of ``modality``) to an index."""
        names = [e.name for e in self.encoders]
        if not names:
            raise ValueError("this model has no encoders (config.encoders is empty): it takes text only")
        if encoder is None:
            fits = [i for i, e in enumerate(self.encoders) if modality is None or e.spec.get("modality") == modality]
            if not fits:
                raise ValueError(f"this model has no {modality} encoder; encoders: {names}")
            return fits[0]
        if isinstance(encoder, str):
            if encoder not in names:
                raise ValueError(f"unknown encoder {encoder!r}; encoders: {names}")
            return names.index(encoder)
        if not 0 <= int(encoder) < len(names):
            raise ValueError(f"encoder index {encoder} out of range: this model has {len(names)} encoder(s)")
        return int(encoder)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        tower=None,
        capability=None,
        past_key_values=None,
        input_features=None,
        encoder=None,
        **kwargs,
    ):
        past_key_values = _one_cache(cache, past_key_values)  # (the name used below, whichever the caller passed)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        B, T = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        # --- routing: caller's pick > cached pick (decoding) > an audio prefix's tower > router. A caller's pick is a
        # Python int, so the towers to run are known without reading a tensor: a forced (or only) tower compiles with
        # no graph break.
        forced = None if tower is None and capability is None else self.tower_index_for(tower, capability)
        kept = past_key_values.layers[0].keys if past_length > 0 else None  # slot 0: the routing record so far
        cached = kept is not None and kept.numel() > 0
        if forced is None and not cached and input_features is not None:
            forced = self.prefix_tower_index()
        foreign = self._foreign_route(forced, kept if cached else None)
        if inputs_embeds is None:  # (B, T, H); a tower with its own token space embeds input_ids itself
            inputs_embeds = (self.embed_tokens.weight.new_zeros(B, T, self.config.hidden_size) if foreign
                             else self.embed_tokens(input_ids))
        elif foreign:
            raise ValueError(f"tower {foreign!r} has its own token space: pass input_ids, not inputs_embeds")
        if input_features is not None and past_length == 0:  # --- encoder features -> a prefix before the text
            prefix, _ = self.encoders[self.encoder_index_for(encoder)](input_features)  # (B, P, H)
            inputs_embeds = torch.cat([prefix.to(inputs_embeds.dtype), inputs_embeds], dim=1)
            P, T = prefix.shape[1], T + prefix.shape[1]
            if past_key_values is not None:  # decoding steps need to know where the prefix ends
                past_key_values.nexus_prefix_length = P
            if position_ids is not None:  # the caller counted text positions only
                position_ids = torch.cat([torch.arange(P, device=position_ids.device)[None].expand(B, P),
                                          position_ids + P], dim=1)
        if attention_mask is not None and attention_mask.shape[1] < past_length + T:  # a prefix the mask omits
            missing = past_length + T - attention_mask.shape[1]  # prefix positions are never padding
            attention_mask = F.pad(attention_mask, (missing, 0), value=1)
            if position_ids is not None and past_length > 0:
                position_ids = position_ids + missing
        elif attention_mask is None and position_ids is not None and past_length > 0:  # (generate() after a prefix)
            position_ids = position_ids + getattr(past_key_values, "nexus_prefix_length", 0)  # counted text only

        router_logits = None
        if forced is not None:
            routes = torch.full((B,), forced, dtype=torch.long, device=inputs_embeds.device)
            if cached and not torch.compiler.is_compiling():  # (eager only: a data-dependent check)
                before = kept[:, 0, 0, 0].round().long()
                if not bool((before == forced).all()):
                    raise ValueError(f"this cache was filled by tower(s) {sorted(set(before.tolist()))}, not the "
                                     f"forced tower {forced}: force the same tower for the prompt and every step")
        elif cached:
            routes = kept[:, 0, 0, 0].round().long()  # (B,)
        elif self.router is None:
            routes = torch.zeros(B, dtype=torch.long, device=inputs_embeds.device)
        else:
            router_logits = self.router(inputs_embeds, attention_mask)
            if self._text_routable is not None:  # towers with their own token space never take text from the router
                router_logits = router_logits.masked_fill(~self._text_routable.to(router_logits.device),
                                                          torch.finfo(router_logits.dtype).min)
            routes = router_logits.argmax(-1)
        if past_key_values is not None:  # slot 0: the routing record, one entry per token (keeps get_seq_length right)
            record = routes.to(inputs_embeds.dtype)[:, None, None, None].expand(B, 1, T, 1)
            past_key_values.update(record, record, 0)

        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + T, device=inputs_embeds.device)[None].expand(B, T)
        ctx = ForwardContext(attention_mask, position_ids, past_length, T, B, inputs_embeds.device)
        if input_features is not None and past_length == 0:
            ctx.prefix_length = P
        elif past_length > 0:
            ctx.prefix_length = getattr(past_key_values, "nexus_prefix_length", 0)

        if forced is not None or len(self.towers) == 1:
            picked = [forced or 0]
        else:  # the router's (or the cache's) picks: data-dependent, a graph break under torch.compile
            picked = routes.unique().tolist()
        if input_features is not None and any(
                self.towers[t].own_vocabulary and not getattr(self.towers[t], "reads_prefix", False) for t in picked):
            raise ValueError("an encoder prefix needs a shared-vocabulary tower; the picked tower has its own "
                             "vocabulary and embeds input_ids itself")
        if output_hidden_states and len(picked) > 1:
            raise ValueError("output_hidden_states needs one tower per batch: pass tower= or capability=")
        hidden_states, all_hidden, own = None, None, [None] * len(self.towers)
        for t in picked:
            out, all_hidden = self.towers[t](
                inputs_embeds, ctx, past_key_values, collect_hidden=bool(output_hidden_states), input_ids=input_ids
            )
            if self.towers[t].own_vocabulary or getattr(self.towers[t], "own_final_norm", False):
                own[t] = out  # final-normed by the tower itself; read by its own head or the shared one
            elif hidden_states is None:
                hidden_states = out
            else:
                hidden_states = torch.where((routes == t)[:, None, None], out, hidden_states)
        if hidden_states is None:  # only own-vocabulary towers ran
            hidden_states = inputs_embeds.new_zeros(B, T, self.config.hidden_size)
        else:
            hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden = tuple(all_hidden) + (own[picked[0]] if own[picked[0]] is not None else hidden_states,)
        return NexusModelOutput(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=all_hidden,
            router_logits=router_logits,
            tower_index=routes,
            tower_hidden_states=tuple(own) if any(o is not None for o in own) else None,
            towers_run=tuple(picked),
        )


# ------------------------------------------------------------------------------------------------------------ head


class NexusForCausalLM(NexusPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = NexusModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        logits_to_keep=0,
        tower=None,
        capability=None,
        return_dict=None,
        past_key_values=None,
        input_features=None,
        encoder=None,
        **kwargs,
    ):
        out = self.model(
            input_features=input_features,
            encoder=encoder,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            tower=tower,
            capability=capability,
        )
        def keep(h):  # (B, T, *) -> the positions whose logits are wanted
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                return h[:, -logits_to_keep:, :]
            if isinstance(logits_to_keep, torch.Tensor):
                return h[:, logits_to_keep, :]
            return h

        own = out.tower_hidden_states or ()
        logits = None
        if not own or any(own[t] is None for t in out.towers_run):  # a tower through the shared norm ran
            logits = self.lm_head(keep(out.last_hidden_state))  # (B, T, V)
            cap = self.config.final_logit_softcapping
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
        for t, h in enumerate(own):
            if h is None:
                continue
            tower = self.model.towers[t]  # its own head, or the shared head after the tower's own final norm
            tower_logits = tower.logits(keep(h)) if tower.own_vocabulary else self.lm_head(keep(h))  # (B, T, V)
            logits = tower_logits if logits is None else torch.where(
                (out.tower_index == t)[:, None, None], tower_logits.to(logits.dtype), logits)
        loss = None
        if labels is not None and logits.shape[1] > labels.shape[1] and not logits_to_keep:
            labels = F.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=-100)  # an encoder prefix: no labels
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return NexusCausalLMOutput(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
            hidden_states=out.hidden_states,
            router_logits=out.router_logits,
            tower_index=out.tower_index,
        )


    def transcribe(self, audio, feature_extractor=None, tokenizer=None, processor=None, encoder=None,
                   max_new_tokens=96, resample=True):
        """Speech to text through the audio encoder's prefix and the towers; see ``transcribe.py``."""
        return transcribe_audio(self, audio, feature_extractor, tokenizer, processor, encoder, max_new_tokens,
                                resample)


NexusConfig.register_for_auto_class()
NexusForCausalLM.register_for_auto_class("AutoModelForCausalLM")
NexusModel.register_for_auto_class("AutoModel")

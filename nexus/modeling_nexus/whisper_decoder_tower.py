"""Cross-attention tower (``whisper_decoder``): Whisper's decoder as a Nexus tower, weight for weight.

Reads top to bottom: spec -> layer -> tower (the attention is `whisper_attention.py`, shared with the encoder).
A tower entry in ``NexusConfig.towers``::

    {"type": "whisper_decoder", "name": "speech", "capabilities": ["speech"], "hidden_size": 512,
     "max_target_positions": 448, "activation": "gelu", "layer_norm_eps": 1e-5,
     "layers": [{"num_attention_heads": 8, "head_dim": 64, "cross_attention_heads": 8,
                 "intermediate_size": 2048}, ...]}

The text tokens come from the shared embedding (a speech student's shared vocabulary is Whisper's, its rows copied
exactly), or, with ``vocab_size`` set, from the tower's **own token space**: its own embedding (Whisper's) and a head
tied to it, beside text towers whose shared vocabulary is another teacher's (``nexus attach-speech``). Such a tower's
token ids are not shared ids: it runs alone in a batch, only when picked (an audio prefix, ``tower=`` or
``capability=``), never by the text router, and its logits have its own width. Its ``hidden_size`` may then differ
from the shared one: cross-attention reads the prefix at the shared width.

The tower adds its learned positions, runs pre-LayerNorm blocks of causal self-attention, cross-attention over the
encoder prefix (the positions ``[0, ctx.prefix_length)`` that `NexusModel` puts before the text) and a GELU MLP, then
its own final LayerNorm (with bias). That output bypasses the shared RMSNorm (``own_final_norm``) and the shared head
(or its own) reads it, tied to the embedding as Whisper's ``proj_out`` is. So a full-width tower and encoder give
Whisper's logits (a test, 1e-4). The prefix itself gets no logits: its positions hold zeros.

Cache: each layer has two slots, self-attention keys/values (text only) and cross-attention keys/values (written once,
at the step that reads the prefix, then read back), so beam search reorders both with the rest of the cache. Text
positions count from the end of the prefix.

A layer with 0 heads (self or cross) or 0 FFN neurons has no such part, as pruning leaves it.
This file imports only torch, transformers and its own package: it is copied into every checkpoint.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .audio_encoder import check_layer_widths
from .registry import register
from .whisper_attention import NexusWhisperAttention

WHISPER_DECODER_DEFAULTS = {
    "name": None,
    "capabilities": [],
    "hidden_size": None,  # None: the shared hidden size
    "max_target_positions": 448,
    "activation": "gelu",
    "layer_norm_eps": 1e-5,
    "vocab_size": None,  # None: the shared vocabulary; an int: the tower's own token space (own embedding and head)
}
WHISPER_DECODER_LAYER_REQUIRED = ("num_attention_heads", "head_dim", "cross_attention_heads", "intermediate_size")
CACHE_SLOTS_PER_LAYER = 2  # self-attention, cross-attention


def normalise_whisper_decoder_tower(spec, where, shared_hidden_size):
    """Fill defaults into a ``whisper_decoder`` tower spec and check it; errors name the config path."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a dict, got {type(spec).__name__}")
    unknown = set(spec) - set(WHISPER_DECODER_DEFAULTS) - {"type", "layers"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(WHISPER_DECODER_DEFAULTS)}")
    out = {"type": "whisper_decoder", **copy.deepcopy(WHISPER_DECODER_DEFAULTS), **copy.deepcopy(spec)}
    if out["hidden_size"] is None:
        out["hidden_size"] = shared_hidden_size
    for key in ("hidden_size", "max_target_positions") + (("vocab_size",) if out["vocab_size"] is not None else ()):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"{where}.{key} must be a positive integer, got {out[key]!r}")
    if out["vocab_size"] is None and out["hidden_size"] != shared_hidden_size:
        raise ValueError(f"{where}.hidden_size ({out['hidden_size']}) must equal the shared hidden_size "
                         f"({shared_hidden_size}): the tower reads the shared embedding and writes the shared head")
    if out["activation"] not in ACT2FN:
        raise ValueError(f"{where}.activation {out['activation']!r} is not a transformers activation")
    check_layer_widths(out.get("layers"), WHISPER_DECODER_LAYER_REQUIRED, where)
    return out


# ----------------------------------------------------------------------------------------------------------- layer


class NexusWhisperDecoderLayer(nn.Module):
    """``x + self_attn(ln(x))``, ``x + encoder_attn(ln(x), prefix)``, ``x + fc2(act(fc1(ln(x))))``."""

    def __init__(self, spec, layer, self_slot, cross_slot, prefix_size=None):
        super().__init__()
        d, eps, hd = spec["hidden_size"], spec["layer_norm_eps"], layer["head_dim"]
        self.self_slot, self.cross_slot = self_slot, cross_slot
        self.self_attn = self.self_attn_layer_norm = self.encoder_attn = self.encoder_attn_layer_norm = None
        self.fc1 = self.fc2 = self.final_layer_norm = None
        if layer["num_attention_heads"]:
            self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
            self.self_attn = NexusWhisperAttention(d, layer["num_attention_heads"], hd)
        if layer["cross_attention_heads"]:
            self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
            self.encoder_attn = NexusWhisperAttention(d, layer["cross_attention_heads"], hd, kv_size=prefix_size)
        if layer["intermediate_size"]:
            self.final_layer_norm = nn.LayerNorm(d, eps=eps)
            self.fc1 = nn.Linear(d, layer["intermediate_size"])
            self.fc2 = nn.Linear(layer["intermediate_size"], d)
        self.act = ACT2FN[spec["activation"]]

    def _cross_keys(self, prefix, cache):
        """Cross-attention keys/values: from ``prefix`` (stored in the cache), else from the cache, else None."""
        attn = self.encoder_attn
        if prefix is not None:
            k, v = attn.heads(attn.k_proj, prefix), attn.heads(attn.v_proj, prefix)
            if cache is not None:
                cache.update(k, v, self.cross_slot)
            return k, v
        if cache is not None and len(cache.layers) > self.cross_slot:
            stored = cache.layers[self.cross_slot]
            if getattr(stored, "keys", None) is not None and stored.keys.numel() > 0:
                return stored.keys, stored.values
        return None  # no audio was given: the layer has nothing to attend to

    def forward(self, x, prefix, mask, causal, cache):
        if self.self_attn is not None:
            attn, h = self.self_attn, self.self_attn_layer_norm(x)
            q, k, v = attn.heads(attn.q_proj, h), attn.heads(attn.k_proj, h), attn.heads(attn.v_proj, h)
            if cache is not None:
                k, v = cache.update(k, v, self.self_slot)
            x = x + attn.attend(q, k, v, mask, causal)
        if self.encoder_attn is not None:
            kv = self._cross_keys(prefix, cache)
            if kv is not None:
                attn, h = self.encoder_attn, self.encoder_attn_layer_norm(x)
                x = x + attn.attend(attn.heads(attn.q_proj, h), *kv)
        if self.fc1 is not None:
            x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        return x


# ----------------------------------------------------------------------------------------------------------- tower


@register("tower", "whisper_decoder")
class NexusWhisperDecoderTower(nn.Module):
    """Whisper's decoder over the shared embedding (or its own, with ``vocab_size``); its final LayerNorm replaces the
    shared norm (see module doc)."""

    own_final_norm = True  # its output is final-normed; the shared head (or its own) reads it directly
    reads_prefix = True  # an audio prefix with no tower picked goes to this tower

    def __init__(self, config, tower_index):
        super().__init__()
        spec = config.towers[tower_index]
        self.spec = spec
        self.name = spec.get("name") or f"tower{tower_index}"
        offset = config.tower_layer_offset(tower_index)
        d = spec["hidden_size"]
        # own token space: ids are the tower's, not shared ids (see module doc); the head is tied to this embedding
        self.own_vocabulary = self.foreign_vocabulary = spec.get("vocab_size") is not None
        self.embed_tokens = nn.Embedding(spec["vocab_size"], d) if self.own_vocabulary else None
        self.embed_positions = nn.Embedding(spec["max_target_positions"], d)
        self.layers = nn.ModuleList([
            NexusWhisperDecoderLayer(spec, layer, offset + CACHE_SLOTS_PER_LAYER * i,
                                     offset + CACHE_SLOTS_PER_LAYER * i + 1, prefix_size=config.hidden_size)
            for i, layer in enumerate(spec["layers"])])
        self.layer_norm = nn.LayerNorm(d, eps=spec["layer_norm_eps"])

    def _text_mask(self, ctx, past_text, T):
        """(mask, is_causal) for text self-attention: ``is_causal`` when exact, else a (B, 1, T, S) bool mask."""
        padding = None if ctx.padding is None else ctx.padding[..., ctx.prefix_length:]  # (B, 1, 1, S_text)
        if padding is None and (past_text == 0 or T == 1):
            return None, past_text == 0 and T > 1
        q = torch.arange(past_text, past_text + T, device=ctx.device)[:, None]
        k = torch.arange(past_text + T, device=ctx.device)[None, :]
        allowed = (k <= q)[None, None]
        if padding is not None:
            allowed = allowed & padding
        return allowed | (k == q)[None, None], False

    def forward(self, hidden_states, ctx, past_key_values=None, collect_hidden=False, input_ids=None):
        """``hidden_states``: (B, P + T, H), the prefix (this call's, if any) then the shared text embeddings.
        Returns the final-normed states (B, P + T, H), zeros at the prefix positions."""
        P = ctx.prefix_length if ctx.past_length == 0 else 0
        prefix = hidden_states[:, :P] if P else None
        if self.own_vocabulary:
            if input_ids is None:
                raise ValueError(f"tower {self.name!r} has its own token space: pass input_ids, not inputs_embeds")
            x = self.embed_tokens(input_ids)  # (B, T, d): the tower's own ids
        else:
            x = hidden_states[:, P:]
        T = x.shape[1]
        past_text = max(0, ctx.past_length - ctx.prefix_length)
        positions = (ctx.position_ids[:, P:] - ctx.prefix_length).clamp(min=0)  # (B, T) text positions
        if int(positions.max()) >= self.embed_positions.num_embeddings:
            raise ValueError(f"tower {self.name!r}: text position {int(positions.max())} exceeds max_target_positions "
                             f"{self.embed_positions.num_embeddings}")
        x = x + self.embed_positions(positions).to(x.dtype)
        mask, causal = self._text_mask(ctx, past_text, T)
        hidden = [] if collect_hidden else None
        for layer in self.layers:
            if collect_hidden:
                hidden.append(x)
            x = layer(x, prefix, mask, causal, past_key_values)
        x = self.layer_norm(x)
        if P:
            x = torch.cat([x.new_zeros(x.shape[0], P, x.shape[2]), x], dim=1)
        return x, hidden

    def logits(self, hidden_states):
        """Own token space only: (B, T, d) final-normed states -> (B, T, vocab_size), the head tied to the embedding
        (as Whisper's ``proj_out``)."""
        weight = self.embed_tokens.weight
        return F.linear(hidden_states.to(weight.dtype), weight)

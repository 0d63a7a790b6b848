"""Audio encoder: log-mel features -> a Whisper-style encoder -> a projector into the shared hidden size.

Reads top to bottom: layer -> encoder -> projector (the attention is `whisper_attention.py`). The encoder's output
is a *prefix*: `NexusModel` places it before the text embeddings, so the towers read speech as they read text.

An encoder entry in ``NexusConfig.encoders`` is plain JSON with a registered ``type``::

    {"type": "whisper_audio", "name": "speech", "modality": "audio", "num_mel_bins": 80, "d_model": 512,
     "max_source_positions": 1500, "activation": "gelu", "layer_norm_eps": 1e-5,
     "sampling_rate": 16000, "downsample": 4, "projector": "mlp", "transcribe_prompt_ids": [50258, 50259, 50359, 50363],
     "layers": [{"num_attention_heads": 8, "head_dim": 64, "intermediate_size": 2048}, ...]}

Every layer has its own widths (heads, FFN neurons), because capability-weighted pruning leaves irregular shapes; a
layer with 0 heads has no attention and 0 FFN neurons no MLP. ``d_model`` may be narrower than the teacher's. The
weights are Whisper's layout (pre-LayerNorm, q/v/out biases, no k bias, GELU MLP), so Whisper's encoder copies in
exactly (``whisper_encoder_state_dict`` below) before it is pruned and distilled.

The projector stacks ``downsample`` consecutive frames (20 ms each after Whisper's stride-2 conv) and maps them
through ``Linear -> GELU -> Linear`` into the shared hidden size, as LLaVA / Qwen2-Audio projectors do. Later
encoders (vision) register another type with the same contract: ``forward(features) -> (B, P, hidden_size)``.

This file imports only torch, transformers and its own package: it is copied into every checkpoint.
"""

import copy

import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .registry import register
from .whisper_attention import NexusWhisperAttention

AUDIO_ENCODER_DEFAULTS = {
    "name": "speech",
    "modality": "audio",
    "num_mel_bins": 80,
    "d_model": 512,
    "max_source_positions": 1500,  # positions after the stride-2 conv: 30 s of 10 ms frames / 2
    "activation": "gelu",
    "layer_norm_eps": 1e-5,
    "sampling_rate": 16000,
    "downsample": 4,  # encoder frames stacked into one prefix embedding
    "projector": "mlp",  # "mlp": Linear -> GELU -> Linear; "linear": one Linear
    "transcribe_prompt_ids": [],  # text token ids after the audio prefix that ask for a transcript
    # True: every clip is padded to the full window (max_source_positions x 2 frames, Whisper's 30 s), as Whisper
    # reads audio; a decoder copied from Whisper expects that. False: a clip costs only its own frames.
    "fixed_window": False,
}
PROJECTOR_KINDS = ("mlp", "linear")
AUDIO_LAYER_REQUIRED = ("num_attention_heads", "head_dim", "intermediate_size")


def normalise_audio_encoder(spec, where):
    """Fill defaults into a ``whisper_audio`` encoder spec and check it; errors name the config path."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a dict, got {type(spec).__name__}")
    unknown = set(spec) - set(AUDIO_ENCODER_DEFAULTS) - {"type", "layers"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(AUDIO_ENCODER_DEFAULTS)}")
    out = {"type": "whisper_audio", **copy.deepcopy(AUDIO_ENCODER_DEFAULTS), **copy.deepcopy(spec)}
    for key in ("num_mel_bins", "d_model", "max_source_positions", "downsample", "sampling_rate"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{key} must be a positive integer, got {value!r}")
    if not isinstance(out["fixed_window"], bool):
        raise ValueError(f"{where}.fixed_window must be true or false, got {out['fixed_window']!r}")
    if out["projector"] not in PROJECTOR_KINDS:
        raise ValueError(f"{where}.projector must be one of {PROJECTOR_KINDS}, got {out['projector']!r}")
    if out["activation"] not in ACT2FN:
        raise ValueError(f"{where}.activation {out['activation']!r} is not a transformers activation")
    check_layer_widths(out.get("layers"), AUDIO_LAYER_REQUIRED, where)
    return out


def check_layer_widths(layers, required, where):
    """A list of layer dicts with exactly the integer fields ``required`` (each >= 0; ``head_dim`` >= 1 when any
    ``*heads`` field is set); errors name the layer (``encoders[0].layers[2].head_dim``)."""
    if not isinstance(layers, list):
        raise ValueError(f"{where}.layers must be a list of layer dicts")
    for i, layer in enumerate(layers):
        lw = f"{where}.layers[{i}]"
        if not isinstance(layer, dict) or set(layer) != set(required):
            raise ValueError(f"{lw} must be a dict with exactly {list(required)}, got {layer!r}")
        for key in required:
            if isinstance(layer[key], bool) or not isinstance(layer[key], int) or layer[key] < 0:
                raise ValueError(f"{lw}.{key} must be an integer >= 0, got {layer[key]!r}")
        if any(layer[k] for k in required if k.endswith("heads")) and not layer["head_dim"]:
            raise ValueError(f"{lw}.head_dim must be >= 1 when the layer has heads")


# ----------------------------------------------------------------------------------------------------------- layer


class NexusAudioEncoderLayer(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))`` then ``x + fc2(act(fc1(ln(x))))``; either part may be pruned away."""

    def __init__(self, spec, layer):
        super().__init__()
        d, eps = spec["d_model"], spec["layer_norm_eps"]
        self.self_attn = self.self_attn_layer_norm = None
        self.fc1 = self.fc2 = self.final_layer_norm = None
        if layer["num_attention_heads"] > 0:
            self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
            self.self_attn = NexusWhisperAttention(d, layer["num_attention_heads"], layer["head_dim"])
        if layer["intermediate_size"] > 0:
            self.final_layer_norm = nn.LayerNorm(d, eps=eps)
            self.fc1 = nn.Linear(d, layer["intermediate_size"])
            self.fc2 = nn.Linear(layer["intermediate_size"], d)
        self.act = ACT2FN[spec["activation"]]

    def forward(self, x):
        if self.self_attn is not None:
            x = x + self.self_attn(self.self_attn_layer_norm(x))
        if self.fc1 is not None:
            x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        return x


# ---------------------------------------------------------------------------------------------------- projector


class NexusFrameStackProjector(nn.Module):
    """(B, T, d) encoder states -> (B, ceil(T / k), hidden): stack k frames, then Linear -> GELU -> Linear
    (``kind="mlp"``) or one Linear (``kind="linear"``)."""

    def __init__(self, d_model, hidden_size, downsample, kind="mlp"):
        super().__init__()
        self.downsample = downsample
        self.linear_1 = nn.Linear(d_model * downsample, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size) if kind == "mlp" else None

    def forward(self, x):
        B, T, d = x.shape
        pad = (-T) % self.downsample
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        x = x.reshape(B, (T + pad) // self.downsample, d * self.downsample)  # (B, P, k*d)
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(F.gelu(x))  # (B, P, hidden)


# --------------------------------------------------------------------------------------------------------- encoder


@register("encoder", "whisper_audio")
class NexusAudioEncoder(nn.Module):
    """Log-mel (B, n_mels, F) -> conv stem (stride 2) -> positions -> layers -> LayerNorm -> projector.

    ``F`` may be shorter than Whisper's fixed 3000 frames (30 s): positions are taken from the start, so a 4 s clip
    costs 4 s of compute (unless the spec's ``fixed_window`` pads every clip to the full window). ``forward``
    returns ``(prefix (B, P, hidden), states (B, F/2, d_model))``; the states are
    what hidden-state distillation compares with the teacher's encoder output.
    """

    def __init__(self, config, index):
        super().__init__()
        spec = normalise_audio_encoder(config.encoders[index], f"encoders[{index}]")
        self.spec = spec
        self.name = spec["name"]
        d = spec["d_model"]
        self.conv1 = nn.Conv1d(spec["num_mel_bins"], d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(spec["max_source_positions"], d)
        self.layers = nn.ModuleList([NexusAudioEncoderLayer(spec, layer) for layer in spec["layers"]])
        self.layer_norm = nn.LayerNorm(d, eps=spec["layer_norm_eps"])
        self.projector = NexusFrameStackProjector(d, config.hidden_size, spec["downsample"], spec["projector"])

    def encode(self, input_features, output_hidden_states=False):
        """(B, n_mels, F) -> final-normed states (B, ceil(F / 2), d) [and the input of every layer]."""
        assert input_features.dim() == 3 and input_features.shape[1] == self.spec["num_mel_bins"], (
            f"encoder {self.name!r} wants log-mel features (B, {self.spec['num_mel_bins']}, frames), "
            f"got {tuple(input_features.shape)}")
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, d)
        T = x.shape[1]
        if T > self.embed_positions.num_embeddings:
            raise ValueError(f"encoder {self.name!r}: {T} positions exceed max_source_positions "
                             f"{self.embed_positions.num_embeddings} (audio longer than 30 s? split it)")
        x = x + self.embed_positions.weight[:T]
        hidden = []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x = layer(x)
        return self.layer_norm(x), hidden

    def forward(self, input_features):
        states, _ = self.encode(input_features)
        return self.projector(states), states


def whisper_encoder_state_dict(whisper_encoder_state, prefix="model.encoder."):
    """transformers WhisperEncoder weights -> ``NexusAudioEncoder`` names (without the projector). The layouts are
    the same by construction, so this only strips the prefix and drops nothing but the unused position buffer."""
    out = {}
    for key, value in whisper_encoder_state.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
    return out

"""The Nexus architecture. Self-contained: imports only torch, transformers and itself (copied into checkpoints)."""

from .audio_encoder import NexusAudioEncoder
from .configuration_nexus import NexusConfig
from .modeling_nexus import NexusDecoderTower, NexusForCausalLM, NexusModel, NexusPooledRouter
from .registry import register, registered, resolve

__all__ = [
    "NexusConfig",
    "NexusAudioEncoder",
    "NexusForCausalLM",
    "NexusModel",
    "NexusDecoderTower",
    "NexusPooledRouter",
    "register",
    "registered",
    "resolve",
]

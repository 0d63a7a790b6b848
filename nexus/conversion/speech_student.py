"""A speech student from a Whisper teacher: a `NexusForCausalLM` whose audio encoder and tower are Whisper's, exactly.

- **Audio encoder** (`whisper_audio`, ``fixed_window``): Whisper's encoder copied weight for weight; it reads the
  same 30 s log-mel window Whisper reads. Capability-weighted pruning (`speech_prune`) and distillation
  (`speech_distill`) then shrink it.
- **Projector**: one Linear, initialised to the identity (downsample 1), so the prefix is the encoder's output.
- **Tower** (`whisper_decoder`): Whisper's decoder, cross-attention over the audio prefix, learned positions and
  LayerNorms as Whisper has them. The shared embedding is Whisper's token embedding and the shared head is tied to it,
  as Whisper's ``proj_out`` is.

Before pruning the student's logits equal Whisper's (``tests/test_whisper_decoder_tower.py``, 1e-4). Transcription
asks with Whisper's own prompt (``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``), stored as the encoder's
``transcribe_prompt_ids``.
"""

import torch

from ..modeling_nexus import NexusConfig, NexusForCausalLM


def whisper_prompt_ids(tokenizer, language="en"):
    return tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>",
                                            "<|notimestamps|>"])


def audio_encoder_spec(whisper_config, prompt_ids, layers=None, d_model=None, downsample=1, projector="linear"):
    """The ``whisper_audio`` encoder entry for a Whisper config (full widths unless ``layers`` / ``d_model``)."""
    d = d_model or whisper_config.d_model
    heads = whisper_config.encoder_attention_heads
    head_dim = whisper_config.d_model // heads
    return {
        "type": "whisper_audio", "name": "speech", "modality": "audio",
        "num_mel_bins": whisper_config.num_mel_bins, "d_model": d,
        "max_source_positions": whisper_config.max_source_positions,
        "activation": whisper_config.activation_function, "layer_norm_eps": 1e-5, "sampling_rate": 16000,
        "downsample": downsample, "projector": projector, "transcribe_prompt_ids": list(prompt_ids),
        "layers": layers or [{"num_attention_heads": heads, "head_dim": head_dim,
                              "intermediate_size": whisper_config.encoder_ffn_dim}] * whisper_config.encoder_layers,
    }


def decoder_tower_spec(whisper_config):
    """The ``whisper_decoder`` tower entry for a Whisper config (full widths)."""
    heads = whisper_config.decoder_attention_heads
    layer = {"num_attention_heads": heads, "head_dim": whisper_config.d_model // heads,
             "cross_attention_heads": heads, "intermediate_size": whisper_config.decoder_ffn_dim}
    return {"type": "whisper_decoder", "name": "speech", "capabilities": ["speech"],
            "max_target_positions": whisper_config.max_target_positions,
            "activation": whisper_config.activation_function, "layer_norm_eps": 1e-5,
            "layers": [dict(layer) for _ in range(whisper_config.decoder_layers)]}


def speech_student_state(whisper, config):
    """Nexus state dict for ``config`` (from `speech_student_config`): Whisper's weights under Nexus names."""
    s = {}
    for key, value in whisper.state_dict().items():
        value = value.detach().float()
        if key == "model.decoder.embed_tokens.weight":
            s["model.embed_tokens.weight"] = value  # the shared embedding; the head is tied to it
        elif key.startswith("model.decoder."):
            s["model.towers.0." + key[len("model.decoder."):]] = value
        elif key.startswith("model.encoder."):
            s["model.encoders.0." + key[len("model.encoder."):]] = value
    hidden, spec = config.hidden_size, config.encoders[0]
    d_enc = spec["d_model"]
    eye = torch.zeros(hidden, d_enc * spec["downsample"])
    eye[: min(hidden, d_enc), : min(hidden, d_enc)] = torch.eye(min(hidden, d_enc))
    s["model.encoders.0.projector.linear_1.weight"] = eye
    s["model.encoders.0.projector.linear_1.bias"] = torch.zeros(hidden)
    s["model.norm.weight"] = torch.ones(hidden)  # unused: the tower normalises its own output
    return s


def speech_student_config(whisper, tokenizer):
    wc = whisper.config
    encoder = audio_encoder_spec(wc, whisper_prompt_ids(tokenizer))
    encoder["fixed_window"] = True
    return NexusConfig(
        vocab_size=wc.vocab_size, hidden_size=wc.d_model, towers=[decoder_tower_spec(wc)], encoders=[encoder],
        final_norm="rms", final_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=wc.max_source_positions + wc.max_target_positions,
        bos_token_id=wc.bos_token_id, eos_token_id=wc.eos_token_id, pad_token_id=wc.pad_token_id,
    )


def speech_student_from_whisper(whisper, tokenizer):
    """A NexusForCausalLM (fp32) whose encoder and tower are Whisper's encoder and decoder, weight for weight."""
    config = speech_student_config(whisper, tokenizer)
    model = NexusForCausalLM(config)
    state = speech_student_state(whisper, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the shared embedding
    if missing or unexpected:
        raise ValueError(f"speech student: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    return model.eval()

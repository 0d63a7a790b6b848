"""A speech student from a Whisper teacher: a `NexusForCausalLM` whose audio encoder and tower start from Whisper.

- **Audio encoder** (`whisper_audio`): Whisper's encoder copied exactly (same layout), then pruned and distilled.
- **Projector**: one Linear, initialised to ``prefix_scale * identity`` (downsample 1), so the prefix the towers read
  starts as (a scaled copy of) Whisper's encoder output.
- **Tower** (a normal Nexus ``decoder`` tower over Whisper's vocabulary; embedding and head copied from Whisper):
  each Whisper decoder layer becomes two Nexus layers. The first (``attends: text``) holds Whisper's
  self-attention, with RoPE where Whisper had learned absolute positions. The second (``attends: prefix``) holds
  Whisper's *cross*-attention as attention over the audio prefix only, RoPE switched off (``linear`` scaling by
  1e9) so queries match keys on content as in cross-attention, plus Whisper's MLP as a gated MLP whose
  up-projection is the constant 1 (``down(gelu(fc1 x) * 1)`` = ``fc2(gelu(fc1 x))``).

This is an *initialisation*, not an exact copy (see `speech_student_state` for what is exact and what is not):
measured on espeak-ng clips, the untrained student does not transcribe; transcription KD has to teach the tower
to read the prefix. Transcription asks with Whisper's own prompt
(``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``), stored as the encoder's ``transcribe_prompt_ids``.
"""

import torch

from ..modeling_nexus import NexusConfig, NexusForCausalLM

NO_ROPE = {"rope_type": "linear", "factor": 1e9}  # every angle below 1e-6 rad: content-only matching


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
    """Two Nexus layers per Whisper decoder layer: self-attention, then cross-attention-as-prefix-attention + MLP."""
    heads = whisper_config.decoder_attention_heads
    head_dim = whisper_config.d_model // heads
    layers = []
    for _ in range(whisper_config.decoder_layers):
        layers.append({"num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim,
                       "intermediate_size": 0, "attends": "text"})
        layers.append({"num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim,
                       "intermediate_size": whisper_config.decoder_ffn_dim, "rope_scaling": dict(NO_ROPE),
                       "attends": "prefix"})
    return {"type": "decoder", "name": "speech", "capabilities": ["speech"], "norm": "rms", "rms_norm_eps": 1e-5,
            "hidden_act": whisper_config.activation_function, "attention_bias": True, "attention_out_bias": True,
            "mlp_bias": True, "layers": layers}


def _centre(weight, bias=None):
    """Make a residual write mean-free over the hidden dimension (rows of ``weight``/``bias`` minus their mean)."""
    weight = weight - weight.mean(0, keepdim=True)
    return weight, None if bias is None else bias - bias.mean()


def _after_layer_norm(weight, bias, ln_w, ln_b, fold_bias=True):
    """``W (g * x + b) + c`` as ``W' x + c'``: a LayerNorm's gain and bias moved into the next projection."""
    c = bias if bias is not None else torch.zeros(weight.shape[0])
    return weight * ln_w[None, :], (c + weight @ ln_b) if fold_bias else c


def speech_student_state(whisper, config, prefix_scale=100.0, prefix_rms=None):
    """Nexus state dict for ``config`` (built by `speech_student_config`) from a WhisperForConditionalGeneration.

    Exactness: every residual write (embeddings, attention outputs, MLP outputs) is centred, so the text stream
    has zero mean and RMSNorm equals Whisper's LayerNorm; the LayerNorm gains and biases move into the following
    projections (the norms keep weight 1), except the final norm's bias, which the bias-free head cannot hold.
    The prefix is ``prefix_scale`` x the encoder output: the towers' updates to it are then negligible, and the
    RMSNorm before a cross layer divides the scale away; ``prefix_rms`` (the encoder output's mean RMS, by default
    estimated from its final LayerNorm) puts Whisper's key/value magnitude back into ``k_proj`` / ``v_proj``.
    What stays approximate: Whisper's learned absolute positions (RoPE in the self-attention layers instead), the
    final LayerNorm bias, the per-position RMS of the prefix (one mean value is folded into k/v; measured on
    espeak-ng speech it ranges 0.26..1.70 around a mean of 1.45) and the small updates the towers make to the
    prefix positions.
    """
    w = {k: v.detach().float() for k, v in whisper.state_dict().items()}
    emb = w["model.decoder.embed_tokens.weight"]
    g_f = w["model.decoder.layer_norm.weight"]  # its bias has no place in the bias-free head: dropped
    s = {"model.embed_tokens.weight": emb - emb.mean(1, keepdim=True),  # centred rows: a mean-free text stream
         "model.norm.weight": g_f, "lm_head.weight": emb.clone()}
    if prefix_rms is None:
        g_e, b_e = w["model.encoder.layer_norm.weight"], w["model.encoder.layer_norm.bias"]
        prefix_rms = float((g_e.pow(2) + b_e.pow(2)).mean().sqrt())
    for i in range(whisper.config.decoder_layers):
        src, a, b = f"model.decoder.layers.{i}.", f"model.towers.0.layers.{2 * i}.", f"model.towers.0.layers.{2 * i + 1}."
        g, ln_b = w[src + "self_attn_layer_norm.weight"], w[src + "self_attn_layer_norm.bias"]
        s[a + "input_layernorm.weight"] = torch.ones_like(g)
        for p in ("q", "k", "v"):
            s[f"{a}self_attn.{p}_proj.weight"], s[f"{a}self_attn.{p}_proj.bias"] = _after_layer_norm(
                w[f"{src}self_attn.{p}_proj.weight"], w.get(f"{src}self_attn.{p}_proj.bias"), g, ln_b)
        s[a + "self_attn.o_proj.weight"], s[a + "self_attn.o_proj.bias"] = _centre(
            w[src + "self_attn.out_proj.weight"], w[src + "self_attn.out_proj.bias"])
        g, ln_b = w[src + "encoder_attn_layer_norm.weight"], w[src + "encoder_attn_layer_norm.bias"]
        s[b + "input_layernorm.weight"] = torch.ones_like(g)
        s[b + "self_attn.q_proj.weight"], s[b + "self_attn.q_proj.bias"] = _after_layer_norm(
            w[src + "encoder_attn.q_proj.weight"], w[src + "encoder_attn.q_proj.bias"], g, ln_b)
        k = w[src + "encoder_attn.k_proj.weight"]
        s[b + "self_attn.k_proj.weight"] = k * prefix_rms  # keys read the RMS-normalised prefix
        s[b + "self_attn.k_proj.bias"] = torch.zeros(k.shape[0])  # Whisper's k has no bias
        s[b + "self_attn.v_proj.weight"] = w[src + "encoder_attn.v_proj.weight"] * prefix_rms
        s[b + "self_attn.v_proj.bias"] = w[src + "encoder_attn.v_proj.bias"]
        s[b + "self_attn.o_proj.weight"], s[b + "self_attn.o_proj.bias"] = _centre(
            w[src + "encoder_attn.out_proj.weight"], w[src + "encoder_attn.out_proj.bias"])
        g, ln_b = w[src + "final_layer_norm.weight"], w[src + "final_layer_norm.bias"]
        fc1 = w[src + "fc1.weight"]
        s[b + "pre_feedforward_layernorm.weight"] = torch.ones_like(g)
        s[b + "mlp.gate_proj.weight"], s[b + "mlp.gate_proj.bias"] = _after_layer_norm(fc1, w[src + "fc1.bias"], g, ln_b)
        s[b + "mlp.up_proj.weight"] = torch.zeros_like(fc1)  # up(x) = 1: the gated MLP becomes Whisper's plain MLP
        s[b + "mlp.up_proj.bias"] = torch.ones(fc1.shape[0])
        s[b + "mlp.down_proj.weight"], s[b + "mlp.down_proj.bias"] = _centre(w[src + "fc2.weight"], w[src + "fc2.bias"])
    for key, value in w.items():  # the encoder: the same layout
        if key.startswith("model.encoder."):
            s["model.encoders.0." + key[len("model.encoder."):]] = value
    d_enc = w["model.encoder.layer_norm.weight"].shape[0]
    hidden, spec = config.hidden_size, config.encoders[0]
    eye = torch.zeros(hidden, d_enc * spec["downsample"])
    eye[: min(hidden, d_enc), : min(hidden, d_enc)] = torch.eye(min(hidden, d_enc))
    s["model.encoders.0.projector.linear_1.weight"] = prefix_scale * eye
    s["model.encoders.0.projector.linear_1.bias"] = torch.zeros(hidden)
    return s


def speech_student_config(whisper, tokenizer):
    wc = whisper.config
    return NexusConfig(
        vocab_size=wc.vocab_size, hidden_size=wc.d_model, towers=[decoder_tower_spec(wc)],
        encoders=[audio_encoder_spec(wc, whisper_prompt_ids(tokenizer))], final_norm="rms", final_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=wc.max_source_positions + wc.max_target_positions,
        bos_token_id=wc.bos_token_id, eos_token_id=wc.eos_token_id, pad_token_id=wc.pad_token_id,
    )


def speech_student_from_whisper(whisper, tokenizer, prefix_scale=100.0, prefix_rms=None):
    """A NexusForCausalLM (fp32) whose encoder is Whisper's encoder and whose tower starts from Whisper's decoder."""
    config = speech_student_config(whisper, tokenizer)
    model = NexusForCausalLM(config)
    state = speech_student_state(whisper, config, prefix_scale, prefix_rms)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"speech student: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()

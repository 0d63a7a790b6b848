"""Peak RAM of the speech path (`bench/speech_encoder.py`, issue 21), planned before anything loads.

One teacher is resident at a time: Whisper is freed before the student trains. So the plan has five phases and the
peak is the largest:

- **convert**: the process's runtime, the CTranslate2 file's variables, the fp32 state dict made from them and the
  fp32 model it fills;
- **teacher**: the runtime; Whisper's fp32 weights and the student copied from them (the bench builds it before the
  teacher pass); one batch of 30 s windows through the encoder under bf16, attention scores included (the math
  path's bound); and the teacher-pass examples (at the end of the pass, all of them);
- **prune**: as *teacher* without the batch, plus one calibration clip's backward through the full-width student
  encoder in fp32 (every head and FFN neuron: the capability scorer's Taylor terms) and Whisper's decoder over it;
- **train**: the runtime; every example (its log-mel window in fp32, Whisper's fp16 encoder states, the transcript ids
  and top-k logits); the student's fp32 weights; gradients and AdamW moments of what trains; one clip's encoder
  activations kept for the backward pass (each layer's inputs, projections, FFN and attention probabilities in fp32,
  and under bf16 autocast the bf16 copies every matmul saves of its input, the bf16 scores and probabilities; the
  convolutional front end); and, for the transcription KD part, the tower's side: bf16 copies of the frozen tower's
  weights and of the embedding (the LM head) that autocast makes and the backward keeps, each decoder layer's
  cross-attention keys and values over the window, and the vocabulary-wide logits of the transcript positions. The
  hidden-state part runs the encoder alone, so the KD part is the phase's peak; freed memory is handed back to the
  OS between the parts (`peak_rss.release_freed_memory`);
- **evaluate**: the runtime, the examples, the student's weights and one serialised copy of them (``save_pretrained``
  writes from a byte copy; one clip's inference in fp32 is smaller).

Each term is a count times a width times bytes from the Whisper config and the run's settings; nothing is fitted to
a measurement. ``bench/speech_encoder.py`` plans before loading Whisper, refuses a plan over ``--ram-gb`` and records
the plan beside the measured peak.
"""

from .memory_plan import _component_total


def whisper_parameter_counts(whisper_config) -> dict:
    """``{"total", "encoder", "decoder_layers"}`` parameter counts of a WhisperForConditionalGeneration built from
    ``whisper_config`` on the meta device (nothing allocated)."""
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(whisper_config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total = sum(p.numel() for n, p in model.named_parameters() if n != "proj_out.weight")  # tied to the embedding
    return {"total": total, "encoder": count(model.model.encoder),
            "decoder_layers": count(model.model.decoder.layers)}


def example_bytes(whisper_config, window_frames=3000, top_k=16, max_tokens=64, prompt_tokens=4) -> int:
    """One teacher-pass example held in memory: the log-mel window (fp32), Whisper's encoder states over it (fp16),
    the prompt + transcript ids (int64) and the top-k logits (fp16 values, int64 indices) of the scored positions."""
    tokens = prompt_tokens + max_tokens
    return (whisper_config.num_mel_bins * window_frames * 4 + (window_frames // 2) * whisper_config.d_model * 2
            + tokens * 8 + (max_tokens + 1) * top_k * (2 + 8))


def encoder_activation_bytes(whisper_config, batch, positions, dtype_bytes, layers=1, ffn=None, heads=None,
                             autocast=False) -> int:
    """Activations of ``layers`` encoder layers over ``batch`` x ``positions``: the residual, LayerNorm output, q/k/v,
    attention output and FFN hidden of each, plus the (heads x positions^2) attention scores. ``autocast`` (bf16 on
    an fp32 model): also the bf16 input copy each of the layer's six matmuls saves (q, k, v and the output
    projection read d channels each -- every linear casts its input itself --, fc1 reads d, fc2 the FFN width) and the
    bf16 scores and probabilities beside the fp32 softmax."""
    d = whisper_config.d_model
    ffn = whisper_config.encoder_ffn_dim if ffn is None else ffn
    heads = whisper_config.encoder_attention_heads if heads is None else heads
    per_layer = batch * positions * (6 * d + ffn) * dtype_bytes + batch * heads * positions * positions * dtype_bytes
    if autocast:
        per_layer += batch * positions * (5 * d + ffn) * 2 + batch * heads * positions * positions * 2 * 2
    return layers * per_layer


def frontend_activation_bytes(whisper_config, window_frames) -> int:
    """The encoder's two convolutions over one window under bf16 autocast: each one's bf16 input and output and the
    fp32 GELU over it (conv1 at the full frame rate, conv2 at half)."""
    d, mels = whisper_config.d_model, whisper_config.num_mel_bins
    return window_frames * (mels * 2 + d * (2 + 4)) + (window_frames // 2) * d * (2 + 2 + 4)


def tower_kd_bytes(whisper_config, positions, max_new_tokens, prompt_tokens=4) -> int:
    """The transcription-KD side of one clip's backward through the frozen tower under bf16 autocast: bf16 copies of
    the decoder layers' and the embedding's (the tied LM head's) weights, kept for the input gradients; each decoder
    layer's cross-attention keys and values over the window (the bf16 input copies and outputs); the logits of the
    transcript positions (bf16, their fp32 copy, the log-softmax and its gradient)."""
    counts = whisper_parameter_counts(whisper_config)
    d, vocab = whisper_config.d_model, whisper_config.vocab_size
    scored = max_new_tokens + 1
    weights = 2 * (counts["decoder_layers"] + vocab * d)
    cross = whisper_config.decoder_layers * positions * d * 2 * 4
    logits = scored * vocab * (2 + 4 + 4 + 4)
    decoder = whisper_config.decoder_layers * (prompt_tokens + scored) * (6 * d + whisper_config.decoder_ffn_dim) * 4
    return weights + cross + logits + decoder


def plan_speech_ram(whisper_config, n_clips, runtime, ct2_file_bytes=0, window_frames=3000, batch_size=8, top_k=16,
                    max_new_tokens=64, budget=0.25, train_tower=False) -> dict:
    """The speech bench's RAM plan (see the module doc): ``{"stage": "speech", "kind": "ram", "components",
    "total_bytes", "phases": {phase: bytes}, "assumptions"}``."""
    counts = whisper_parameter_counts(whisper_config)
    positions = window_frames // 2
    examples = n_clips * example_bytes(whisper_config, window_frames, top_k, max_new_tokens)
    mels = batch_size * whisper_config.num_mel_bins * window_frames * 4
    convert = {"runtime": runtime, "ctranslate2_variables": ct2_file_bytes,
               "fp32_state_dict": 4 * counts["total"], "whisper_fp32_weights": 4 * counts["total"]}
    teacher = {
        "runtime": runtime,
        "whisper_fp32_weights": 4 * counts["total"],
        "student_fp32_copy": 4 * counts["total"],
        "teacher_batch_activations": mels + encoder_activation_bytes(whisper_config, batch_size, positions, 2),
        "teacher_pass_examples": examples,
    }
    d, ffn = whisper_config.d_model, whisper_config.encoder_ffn_dim
    prune = {k: v for k, v in teacher.items() if k != "teacher_batch_activations"}
    prune["calibration_backward"] = (  # fc1 and its GELU output both kept: the FFN width counts twice
        encoder_activation_bytes(whisper_config, 1, positions, 4, layers=whisper_config.encoder_layers, ffn=2 * ffn)
        + whisper_config.decoder_layers * 2 * positions * d * 4  # cross-attention keys / values over the window
        + (max_new_tokens + 1) * whisper_config.vocab_size * 4 * 2)  # the logits and their gradient
    encoder_params = int(budget * counts["encoder"])
    student = counts["total"] - counts["encoder"] + encoder_params
    trained = encoder_params + (counts["decoder_layers"] if train_tower else 0)
    kept_ffn = max(1, int(budget * ffn))
    train = {
        "runtime": runtime,
        "examples": examples,
        "student_fp32_weights": 4 * student,
        "gradients_and_adamw": 3 * 4 * trained,
        "encoder_backward_activations": (
            encoder_activation_bytes(whisper_config, 1, positions, 4, layers=whisper_config.encoder_layers,
                                     ffn=kept_ffn, heads=1, autocast=True)
            + frontend_activation_bytes(whisper_config, window_frames)),
        "tower_kd_backward": tower_kd_bytes(whisper_config, positions, max_new_tokens),
    }
    evaluate = {"runtime": runtime, "examples": examples, "student_fp32_weights": 4 * student,
                "serialised_weights": 4 * student}
    phases = {"convert": convert, "teacher": teacher, "prune": prune, "train": train, "evaluate": evaluate}
    totals = {name: _component_total(parts) for name, parts in phases.items()}
    peak = max(totals, key=totals.get)
    return {"stage": "speech", "kind": "ram", "components": {f"{peak}:{k}": v for k, v in phases[peak].items()},
            "total_bytes": totals[peak], "phases": totals, "peak_phase": peak, "phase_components": phases,
            "assumptions": {"clips": n_clips, "window_frames": window_frames, "batch_size": batch_size,
                            "top_k": top_k, "max_new_tokens": max_new_tokens, "encoder_budget": budget,
                            "train_tower": train_tower, "whisper_params": counts["total"],
                            "student_params": student, "trained_params": trained,
                            "per_example_bytes": examples // max(1, n_clips)}}

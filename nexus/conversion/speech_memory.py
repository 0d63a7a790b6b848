"""Peak RAM of the speech path (`bench/speech_encoder.py`, issue 21), planned before anything loads.

One teacher is resident at a time: Whisper is freed before the student trains. So the plan has four phases and the
peak is the largest:

- **convert**: the process's runtime, the CTranslate2 file's variables, the fp32 state dict made from them and the
  fp32 model it fills;
- **teacher**: the runtime; Whisper's fp32 weights and the student copied from them (the bench builds it before the
  teacher pass); one batch of 30 s windows through the encoder under bf16, attention scores included (the math
  path's bound); and the teacher-pass examples (at the end of the pass, all of them);
- **prune**: as *teacher* without the batch, plus one calibration clip's backward through the full-width student
  encoder in fp32 (every head and FFN neuron: the capability scorer's Taylor terms) and Whisper's decoder over it;
- **train**: the runtime; every example (its log-mel window in fp32, Whisper's fp16 encoder states, the transcript ids
  and top-k logits); the student's fp32 weights; gradients and AdamW moments of what trains; and one clip's
  activations kept for the backward pass (each encoder layer's inputs, projections, FFN and fp32 attention
  probabilities; the vocabulary-wide logits of the transcript positions).

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


def encoder_activation_bytes(whisper_config, batch, positions, dtype_bytes, layers=1, ffn=None, heads=None) -> int:
    """Activations of ``layers`` encoder layers over ``batch`` x ``positions``: the residual, LayerNorm output, q/k/v,
    attention output and FFN hidden of each, plus the (heads x positions^2) attention scores."""
    d = whisper_config.d_model
    ffn = whisper_config.encoder_ffn_dim if ffn is None else ffn
    heads = whisper_config.encoder_attention_heads if heads is None else heads
    per_layer = batch * positions * (6 * d + ffn) * dtype_bytes + batch * heads * positions * positions * dtype_bytes
    return layers * per_layer


def plan_speech_ram(whisper_config, n_clips, runtime, ct2_file_bytes=0, window_frames=3000, batch_size=8, top_k=16,
                    max_new_tokens=64, budget=0.25, train_tower=False) -> dict:
    """The speech bench's RAM plan (see the module doc): ``{"stage": "speech", "kind": "ram", "components",
    "total_bytes", "phases": {"teacher": bytes, "train": bytes}, "assumptions"}``."""
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
        "backward_activations": (encoder_activation_bytes(whisper_config, 1, positions, 4,
                                                          layers=whisper_config.encoder_layers, ffn=kept_ffn, heads=1)
                                 + 2 * positions * d * 4 + (max_new_tokens + 1) * whisper_config.vocab_size * 4 * 2),
    }
    phases = {"convert": convert, "teacher": teacher, "prune": prune, "train": train}
    totals = {name: _component_total(parts) for name, parts in phases.items()}
    peak = max(totals, key=totals.get)
    return {"stage": "speech", "kind": "ram", "components": {f"{peak}:{k}": v for k, v in phases[peak].items()},
            "total_bytes": totals[peak], "phases": totals, "peak_phase": peak, "phase_components": phases,
            "assumptions": {"clips": n_clips, "window_frames": window_frames, "batch_size": batch_size,
                            "top_k": top_k, "max_new_tokens": max_new_tokens, "encoder_budget": budget,
                            "train_tower": train_tower, "whisper_params": counts["total"],
                            "student_params": student, "trained_params": trained,
                            "per_example_bytes": examples // max(1, n_clips)}}

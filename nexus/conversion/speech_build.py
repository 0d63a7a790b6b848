"""A speech student from a Whisper teacher and a folder of spoken clips, in one call (``nexus speech-student``).

    record = build_speech_student("faster-whisper-base/", "clips/", "speech-student/", SpeechBuildOptions())

1. **Clips** (`read_clips`): every ``*.wav`` of the folder, by name. A ``NAME.txt`` beside ``NAME.wav`` is its
   reference transcript; either every clip has one or none does (then the held-out clips are scored against
   Whisper's own transcripts: agreement with the teacher, not accuracy). The last ``heldout`` clips are held out.
2. **RAM plan** (`speech_memory.plan_speech_ram`: convert, teacher pass, pruning, training, evaluation; one teacher
   resident at a time), checked against ``ram_gb`` (default: the machine's RAM) before Whisper loads.
3. **Teacher** (`load_whisper`): a CTranslate2 Whisper folder (faster-whisper) or an HF Whisper folder (safetensors
   only: pickle weights are refused). One pass over every clip keeps what training needs (`teacher_pass`: encoder
   states, transcript, top-k logits); Whisper is freed before training.
4. **Student**: `speech_student_from_whisper` (Whisper's encoder, a projector and Whisper's decoder as a
   ``whisper_decoder`` tower, copied exactly), the encoder pruned capability-weighted to ``budget`` of Whisper's
   encoder parameters (`prune_to_budget`), then distilled (`distil_student`: hidden states, then hidden states plus
   transcription KD through the tower).
5. **Held-out score** (`evaluate_heldout`): word accuracy of the student and of Whisper on the same held-out clips,
   retention = student / Whisper with a paired bootstrap 95% CI.
6. **Output**, written all at once (nothing on failure): the student (safetensors, with ``nexus_hashes.json``),
   its tokenizer and feature extractor (``model.transcribe(wav, feature_extractor, tokenizer)`` works without
   NEXUS installed; ``nexus attach-speech`` takes the folder) and ``speech_student.json`` (sizes, widths, training
   logs, the held-out score, the RAM plan beside the measured peak).
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .atomic_output import atomic_dir, atomic_file
from .bootstrap import bootstrap_ci, ratio, ratio_ci
from .speech_distill import distil_speech, teacher_pass, word_accuracy, word_errors
from .speech_prune import allocate_units, audio_encoder_parameter_count, prune_audio_encoder, speech_unit_scores
from .speech_student import speech_student_from_whisper, whisper_prompt_ids
from .student_hashes import write_student_hashes

SCHEMA = "nexus.speech_student/1"
RECORD = "speech_student.json"


class SpeechBuildError(ValueError):
    """Bad input for a speech student build: the message names the file or the field."""


class SpeechBuildOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget: float = Field(0.25, gt=0, le=1, description="the student's audio encoder (projector included) as a "
                                                        "fraction of Whisper's encoder parameters")
    heldout: int = Field(8, ge=1, description="the last N clips are held out and scored, not trained on")
    calibration: int = Field(8, ge=1, description="training clips whose transcription loss scores the encoder's "
                                                  "heads and FFN units for pruning")
    encoder_steps: int = Field(600, ge=0, description="hidden-state distillation steps (the tower does not run)")
    steps: int = Field(300, ge=0, description="hidden-state + transcription KD steps through the tower")
    accumulate: int = Field(4, ge=1, description="clips per optimizer step")
    encoder_lr: float = Field(5e-4, gt=0, description="the encoder's learning rate")
    lr: float = Field(1e-4, gt=0, description="the tower's learning rate (train_tower only)")
    train_tower: bool = Field(False, description="also train the whisper_decoder tower (default: Whisper's, frozen)")
    speech_weight: float | None = Field(0.75, gt=0, le=1, description="hidden-state loss: the share of the clip's "
                                                                      "own positions against the window's padding "
                                                                      "(null: one error over the window)")
    max_new_tokens: int = Field(64, ge=1, description="transcript tokens per clip (teacher pass and scoring)")
    ram_gb: float | None = Field(None, gt=0, description="refuse a run whose RAM plan exceeds this (default: the "
                                                         "machine's RAM)")


# ------------------------------------------------------------------------------------------------------- inputs


def read_clips(folder):
    """(WAV paths sorted by name, reference transcripts or None) of a clip folder; see the module doc."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpeechBuildError(f"clip folder {folder} does not exist")
    wavs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wav" and p.is_file())
    if not wavs:
        raise SpeechBuildError(f"clip folder {folder} holds no .wav file")
    texts = [p.with_suffix(".txt") for p in wavs]
    present = [t.is_file() for t in texts]
    if any(present) and not all(present):
        missing = next(t for t, ok in zip(texts, present) if not ok)
        raise SpeechBuildError(f"{missing} is missing: give every clip a reference transcript (NAME.txt beside "
                               f"NAME.wav) or none ({sum(present)} of {len(wavs)} clips have one)")
    if not any(present):
        return wavs, None
    references = []
    for t in texts:
        words = t.read_text(encoding="utf-8").strip()
        if not words:
            raise SpeechBuildError(f"reference transcript {t} is empty")
        references.append(words)
    return wavs, references


def _hf_whisper_folder(src):
    """Refuse what is not an HF Whisper folder with safetensors weights, naming the problem."""
    config = src / "config.json"
    if not config.is_file():
        raise SpeechBuildError(f"{src} is neither a CTranslate2 Whisper folder (model.bin) nor an HF folder "
                               "(config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpeechBuildError(f"{config} is not valid JSON ({exc})") from None
    if model_type != "whisper":
        raise SpeechBuildError(f"{src} holds a {model_type!r} model, not a Whisper one")
    if not list(src.glob("*.safetensors")):
        found = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        raise SpeechBuildError(f"{src} has no .safetensors weights" + (
            f" (only pickle files, refused: {', '.join(found)}; convert them to safetensors)" if found else ""))


def load_whisper(src):
    """(WhisperForConditionalGeneration fp32, tokenizer, WhisperFeatureExtractor) from a CTranslate2 Whisper folder
    or an HF Whisper folder with safetensors weights."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from .ctranslate2_whisper import ctranslate2_model_file, whisper_from_ctranslate2

    src = Path(src)
    if not src.exists():
        raise SpeechBuildError(f"Whisper teacher {src} does not exist")
    if ctranslate2_model_file(src) is not None:
        return whisper_from_ctranslate2(src, dtype=torch.float32)
    _hf_whisper_folder(src)
    whisper = WhisperForConditionalGeneration.from_pretrained(src, dtype=torch.float32, use_safetensors=True).eval()
    return whisper, AutoTokenizer.from_pretrained(src), WhisperFeatureExtractor.from_pretrained(src)


def whisper_config(src):
    """Whisper's config without loading its weights (for the RAM plan): (WhisperConfig, bytes of the CTranslate2
    file the conversion reads; 0 for an HF folder)."""
    from transformers import WhisperConfig

    from .ctranslate2_whisper import ctranslate2_model_file, read_ctranslate2_model, whisper_config_from_ctranslate2

    src = Path(src)
    if not src.exists():
        raise SpeechBuildError(f"Whisper teacher {src} does not exist")
    model_file = ctranslate2_model_file(src)
    if model_file is not None:
        _, _, variables, aliases = read_ctranslate2_model(model_file)
        return whisper_config_from_ctranslate2(variables, aliases, model_file), model_file.stat().st_size
    _hf_whisper_folder(src)
    return WhisperConfig.from_pretrained(src), 0


# ------------------------------------------------------------------------------------------------------- steps


def prune_to_budget(student, whisper, examples, tokenizer, prompt, budget, calibration):
    """Capability-weighted pruning of the student's audio encoder to ``budget`` of Whisper's encoder parameters
    (projector included): Taylor + activation importance of every head and FFN unit on Whisper's transcription loss
    of the first ``calibration`` clips (their reference, else Whisper's transcript). Returns (student, record)."""
    calib = []
    for ex in examples[:calibration]:
        words = ex.reference or ex.transcript
        labels = torch.tensor([prompt + tokenizer(" " + words, add_special_tokens=False).input_ids
                               + [tokenizer.eos_token_id]])
        calib.append((ex.features, labels))
    whisper_params = sum(p.numel() for p in whisper.model.encoder.parameters())
    scores = speech_unit_scores(student.model.encoders[0], whisper, calib)
    keep = allocate_units(student.model.encoders[0], scores, int(budget * whisper_params),
                          hidden_size=student.config.hidden_size)
    student = prune_audio_encoder(student, keep)
    spec = student.config.encoders[0]
    params = sum(p.numel() for p in student.model.encoders[0].parameters())
    projector = sum(p.numel() for p in student.model.encoders[0].projector.parameters())
    assert params == audio_encoder_parameter_count(spec, student.config.hidden_size)
    return student, {
        "whisper_encoder_params": whisper_params, "student_encoder_params_with_projector": params,
        "student_projector_params": projector, "params_ratio_with_projector": params / whisper_params,
        "params_ratio_encoder_only": (params - projector) / whisper_params,
        "student_encoder_widths_heads_ffn": [(layer["num_attention_heads"], layer["intermediate_size"])
                                             for layer in spec["layers"]],
        "pruning": "capability-weighted (CapabilityScorer: Taylor + activation on Whisper's transcription loss of "
                   f"{len(calib)} spoken calibration clips), dynamic allocation of heads and FFN neurons"}


def distil_student(student, examples, options, progress=None, between=None):
    """Hidden-state distillation (``encoder_steps``), then hidden states plus transcription KD through the tower
    (``steps``); returns {"hidden_state_distillation": ..., "distillation": ...} with the first and last losses.
    ``between()`` runs between the two parts (the bench measures each part's peak RSS)."""
    encoder_log = distil_speech(student, examples, steps=options.encoder_steps, encoder_lr=options.encoder_lr,
                                weights=(1.0, 0.0, 0.0), accumulate=options.accumulate, progress=progress,
                                log_every=25, speech_weight=options.speech_weight) if options.encoder_steps else []
    if between is not None:
        between()
    train_log = distil_speech(student, examples, steps=options.steps, lr=options.lr, encoder_lr=options.encoder_lr,
                              accumulate=options.accumulate, train_tower=options.train_tower, progress=progress,
                              log_every=10, speech_weight=options.speech_weight) if options.steps else []
    return {"hidden_state_distillation": {"steps": options.encoder_steps, "clips_per_step": options.accumulate,
                                          "speech_weight": options.speech_weight, "encoder_lr": options.encoder_lr,
                                          "first": encoder_log[:1], "last": encoder_log[-3:]},
            "distillation": {"steps": options.steps, "clips_per_step": options.accumulate, "lr": options.lr,
                             "encoder_lr": options.encoder_lr, "train_tower": options.train_tower,
                             "first": train_log[:1], "last": train_log[-3:]}}


def evaluate_heldout(student, feature_extractor, tokenizer, wavs, examples, max_new_tokens=64):
    """Transcribe every held-out clip with the student; word accuracies of the student and of Whisper against the
    references, retention (paired bootstrap CI), the encoder's held-out hidden-state error and the per-clip items.
    Returns {"rows": [...], "fields": {...}}."""
    from .peak_rss import release_freed_memory

    rows, rel = [], []
    for wav, ex in zip(wavs, examples):
        release_freed_memory()  # each clip's generation leaves freed buffers in the heap (the RAM plan counts one)
        hyp = student.transcribe(str(wav), feature_extractor, tokenizer, max_new_tokens=max_new_tokens)
        rows.append({"reference": ex.reference, "whisper": ex.transcript, "student": hyp,
                     "whisper_errors": word_errors(ex.reference, ex.transcript),
                     "student_errors": word_errors(ex.reference, hyp)})
        with torch.no_grad():
            _, states = student.model.encoders[0](ex.features)
        t, n = ex.teacher_states.float(), ex.speech_positions
        rel.append([float((states[0, :m].float() - t[:m]).pow(2).sum() / t[:m].pow(2).sum()) for m in (None, n)])
    s_items = np.array([r["student_errors"] for r in rows], dtype=float)
    t_items = np.array([r["whisper_errors"] for r in rows], dtype=float)
    s_acc, t_acc = word_accuracy(s_items), word_accuracy(t_items)
    fields = {
        "whisper_word_accuracy": t_acc, "whisper_word_accuracy_ci95": bootstrap_ci(t_items, n=2000, stat=word_accuracy),
        "whisper_wer": 1 - t_acc,
        "student_word_accuracy": s_acc, "student_word_accuracy_ci95": bootstrap_ci(s_items, n=2000, stat=word_accuracy),
        "student_wer": 1 - s_acc,
        # undefined when Whisper gets no word right (a 0 denominator): None, with the reason
        "retention": ratio(s_items, t_items, stat=word_accuracy) if t_acc > 0 else None,
        "retention_ci95": list(ratio_ci(s_items, t_items, stat=word_accuracy, n=2000)) if t_acc > 0 else None,
        **({} if t_acc > 0 else {"retention_note": "undefined: Whisper gets no held-out word right"}),
        "heldout_hidden_relative_error": float(np.mean([r[0] for r in rel])),
        "heldout_hidden_relative_error_speech_positions": float(np.mean([r[1] for r in rel])),
        "samples": rows[:8],
        # every held-out clip, in order: [student errors, Whisper errors, reference words] (paired comparisons)
        "items": [[r["student_errors"][0], r["whisper_errors"][0], r["whisper_errors"][1]] for r in rows],
    }
    return {"rows": rows, "fields": fields}


# ------------------------------------------------------------------------------------------------------- the build


def build_speech_student(whisper_src, clips, out, options=None, overwrite=False, progress=None):
    """The whole build (see the module doc); returns the record written to ``out/speech_student.json``."""
    from .peak_rss import current_rss, peak_rss, release_freed_memory, reset_peak_rss
    from .speech_memory import plan_speech_ram
    from .stage_memory import check_stage_plan, machine_ram_bytes

    options = options or SpeechBuildOptions()
    say = progress or (lambda _msg: None)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SpeechBuildError(f"{out} exists; pass overwrite to replace it")
    wavs, references = read_clips(clips)
    if len(wavs) <= options.heldout:
        raise SpeechBuildError(f"heldout={options.heldout} leaves no training clip: {clips} holds {len(wavs)} clips")
    config, raw_bytes = whisper_config(whisper_src)
    plan = plan_speech_ram(config, len(wavs), current_rss() or 0, ct2_file_bytes=raw_bytes, budget=options.budget,
                           train_tower=options.train_tower, max_new_tokens=options.max_new_tokens)
    budget_bytes = int(options.ram_gb * 2**30) if options.ram_gb else machine_ram_bytes()
    check_stage_plan(plan, budget_bytes, f"{options.ram_gb:g} GiB (ram_gb)" if options.ram_gb
                     else "this machine's RAM", hint="lower the number of clips or pass a larger ram_gb")
    say(f"RAM plan: peak {plan['total_bytes'] / 2**20:,.0f} MiB in the {plan['peak_phase']} phase")
    seconds, measured = {}, {}

    def phase_done(name):  # the phase's peak; the next one starts with freed memory handed back to the OS
        measured[name] = peak_rss() / 2**20
        release_freed_memory()
        reset_peak_rss()

    reset_peak_rss()
    t0 = time.time()
    whisper, tokenizer, fe = load_whisper(whisper_src)
    phase_done("convert")
    prompt = whisper_prompt_ids(tokenizer)
    student = speech_student_from_whisper(whisper, tokenizer)
    spec = student.config.encoders[0]
    # a transcript fits the decoder's positions with the prompt (Whisper's 448 leave room for the default 64)
    max_new = max(1, min(options.max_new_tokens, whisper.config.max_target_positions - len(prompt)))
    say(f"teacher pass over {len(wavs)} clips")
    examples = teacher_pass(whisper, tokenizer, fe, wavs, references or [None] * len(wavs), prompt, spec,
                            max_new_tokens=max_new)
    if references is None:  # no reference: the held-out clips are scored against Whisper's own transcripts
        for ex in examples:
            ex.reference = ex.transcript
    seconds["teacher_pass"] = time.time() - t0
    phase_done("teacher")
    train, held = examples[:-options.heldout], examples[-options.heldout:]
    t0 = time.time()
    student, pruned = prune_to_budget(student, whisper, train, tokenizer, prompt, options.budget,
                                      options.calibration)
    phase_done("prune")
    del whisper  # one teacher resident at a time: training needs only the teacher pass
    release_freed_memory()
    seconds["prune"] = time.time() - t0
    say(f"pruned encoder: {pruned['params_ratio_with_projector']:.3f} of Whisper's; distilling")
    t0 = time.time()
    logs = distil_student(student, train, options, progress=say)
    seconds["distillation"] = time.time() - t0
    phase_done("train")
    t0 = time.time()
    scores = evaluate_heldout(student.eval(), fe, tokenizer, wavs[-options.heldout:], held, max_new)
    seconds["evaluation"] = time.time() - t0
    record = {
        "schema": SCHEMA, "teacher": str(whisper_src), "clips": {
            "folder": str(clips), "train": len(train), "heldout": len(held),
            "reference": "NAME.txt transcripts" if references else "Whisper's own transcripts (agreement)"},
        **pruned, **scores["fields"], **logs,
        "student_total_params": sum(p.numel() for p in student.parameters()),
        "tower": "whisper_decoder (Whisper's decoder, copied exactly; "
                 + ("trained" if options.train_tower else "frozen") + ")",
        "options": options.model_dump(mode="json"), "max_new_tokens": max_new, "seconds": seconds,
        "ram_plan": {"peak_phase": plan["peak_phase"], "phases_mib": {k: v / 2**20 for k, v in plan["phases"].items()},
                     "total_mib": plan["total_bytes"] / 2**20},
        "measured_phase_peak_mib": measured,
    }
    with atomic_dir(out, overwrite=overwrite, sources={"Whisper teacher": Path(whisper_src), "clips": Path(clips)}) \
            as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fe.save_pretrained(tmp)
        write_student_hashes(tmp)  # (attach-speech and the other folder readers check the weights against it)
        phase_done("evaluate")  # held-out scoring and saving (the plan's evaluate phase); ``measured`` is in record
        with atomic_file(tmp / RECORD) as f:
            f.write_text(json.dumps(record, indent=1, default=str))
    return record

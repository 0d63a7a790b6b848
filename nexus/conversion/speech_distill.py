"""Distil Whisper into a Nexus speech student: hidden-state distillation of the audio encoder plus transcription KD
through the student's tower.

Teacher pass (the only time the teacher is resident): for every spoken clip, Whisper (bf16 autocast) reads the
standard 30 s log-mel window and gives (a) its encoder output over the student's input frames (the whole window when
the encoder's spec has ``fixed_window``, else the clip's own frames), (b) its greedy transcript and (c) its decoder's
top-k logits teacher-forced on that transcript. Only these are kept (fp16 / top-k), so training never holds the
teacher; `save_examples` / `load_examples` store them for a rerun.

Student step, per clip::

    L = w_hidden * ||enc_s - enc_t||^2 / ||enc_t||^2          (HiddenStateLoss: the encoder matches Whisper's;
                                                               optionally speech and padding positions apart)
      + w_ce     * CE(student next-token logits, Whisper transcript)       (sequence-level KD, Kim & Rush 2016)
      + w_kd     * CE(student log-probs on Whisper's top-k, Whisper's top-k probs)   (TopKDistillationLoss)

Sample::

    examples = teacher_pass(whisper, tokenizer, feature_extractor, wavs, prompt_ids, spec)
    del whisper
    log = distil_speech(student, examples, steps=600)
"""

import hashlib
import math
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ..modeling_nexus.audio_input import load_wav
from ..modeling_nexus.transcribe import audio_features
from .peak_rss import release_freed_memory

# ------------------------------------------------------------------------------------------------ spoken corpus

_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-]*[.,;:!?]?$")


def spoken_sentences(text, count, min_words=5, max_words=14, seed=0, exclude=()):
    """Up to ``count`` distinct plain-English sentences from ``text`` (letters and light punctuation only, so what
    espeak-ng says and what WER scores are the same words), shuffled with ``seed``; ``exclude``: sentences to skip."""
    seen, out = set(exclude), []
    for line in text.splitlines():
        for sent in re.split(r"(?<=[.!?])\s+", line.strip()):
            words = sent.split()
            if not min_words <= len(words) <= max_words or not all(_WORD.match(w) for w in words):
                continue
            if sent in seen:
                continue
            seen.add(sent)
            out.append(sent)
    random.Random(seed).shuffle(out)
    return out[:count]


def espeak_available():
    return shutil.which("espeak-ng") is not None


def synthesize(sentences, folder, voice="en-us", speed=160):
    """Speak each sentence with espeak-ng into ``folder/NNNN-<hash>.wav`` (22050 Hz PCM); returns the paths. The
    hash covers the sentence, voice and speed, so a clip already on disk is reused only for the same words."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed: `apt-get install -y espeak-ng` (setup.sh does this)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sent in enumerate(sentences):
        key = hashlib.sha1(f"{voice}|{speed}|{sent}".encode()).hexdigest()[:10]
        path = folder / f"{i:04d}-{key}.wav"
        if not path.is_file():
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), sent], check=True,
                           capture_output=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- word error rate


def normalise_words(text):
    """Lower-case words without punctuation (``"Don't stop."`` -> ``["don't", "stop"]``); hyphens split words."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def word_errors(reference, hypothesis):
    """(substitutions + deletions + insertions, reference word count) after `normalise_words`."""
    ref, hyp = normalise_words(reference), normalise_words(hypothesis)
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1], len(ref)


def word_accuracy(items):
    """``items``: (n, 2) array of [errors, words] -> 1 - WER, floored at 0 (a ratio of sums, as WER is)."""
    return max(0.0, 1.0 - float(items[:, 0].sum()) / max(1.0, float(items[:, 1].sum())))


# -------------------------------------------------------------------------------------------------- teacher pass


@dataclass
class SpeechExample:
    features: torch.Tensor  # (1, n_mels, F): the clip's own frames (the student's input)
    teacher_states: torch.Tensor  # (F / 2, d) fp16: Whisper's encoder output over those frames (30 s context)
    input_ids: torch.Tensor  # (L,): prompt + Whisper's transcript tokens (teacher-forced input)
    topk_values: torch.Tensor  # (L - len(prompt) + 1, k) fp16: Whisper's logits at the scored positions
    topk_indices: torch.Tensor  # (L - len(prompt) + 1, k)
    transcript: str
    reference: str
    speech_positions: int = 0  # encoder positions holding the clip (the rest of a 30 s window is padding); 0: unknown


@torch.no_grad()
def teacher_pass(whisper, tokenizer, feature_extractor, wavs, references, prompt_ids, spec, top_k=16,
                 max_new_tokens=64, batch_size=8):
    """Whisper's encoder states, transcripts and top-k logits for every clip (see the module docstring)."""
    examples = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(wavs), batch_size):
        waves = [load_wav(p, spec["sampling_rate"]) for p in wavs[start:start + batch_size]]
        feats30 = feature_extractor([w.numpy() for w in waves], sampling_rate=spec["sampling_rate"],
                                    return_tensors="pt").input_features  # (B, n_mels, 3000)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            enc = whisper.model.encoder(feats30).last_hidden_state  # (B, 1500, d)
            out = whisper.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                                   decoder_input_ids=torch.tensor([prompt_ids] * len(waves)),
                                   max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        for b, wave in enumerate(waves):
            seq = out[b].tolist()
            text_ids = [t for t in seq if t < eos]  # (generate may or may not echo the prompt: drop all specials)
            ids = torch.tensor(prompt_ids + text_ids)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = whisper(encoder_outputs=(enc[b:b + 1],), decoder_input_ids=ids[None]).logits[0]  # (L, V)
            scored = logits[len(prompt_ids) - 1:].float()  # positions that predict transcript tokens and EOS
            values, indices = scored.topk(top_k, dim=-1)
            feats = audio_features([wave], feature_extractor, spec)  # (1, n_mels, F)
            T = feats.shape[-1] // 2
            examples.append(SpeechExample(
                features=feats, teacher_states=enc[b, :T].to(torch.float16).clone(), input_ids=ids,
                topk_values=values.to(torch.float16), topk_indices=indices,
                transcript=tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                reference=references[start + b],
                speech_positions=speech_positions(wave.shape[-1], getattr(feature_extractor, "hop_length", 160))))
    return examples


def save_examples(examples, path):
    """Write teacher-pass ``examples`` to ``path`` (safetensors: tensors; a JSON sidecar: texts), atomically, so a
    rerun skips the teacher; the features are not stored (`load_examples` recomputes them from the WAVs)."""
    import json

    from safetensors.torch import save_file

    from .atomic_output import atomic_file

    tensors = {}
    for i, ex in enumerate(examples):
        for name in ("teacher_states", "input_ids", "topk_values", "topk_indices"):
            tensors[f"{i}.{name}"] = getattr(ex, name).contiguous()
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))
    with atomic_file(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps([{"transcript": ex.transcript, "reference": ex.reference} for ex in examples]))


def load_examples(path, wavs, feature_extractor, spec):
    """`save_examples`' file back as SpeechExamples, features recomputed from ``wavs`` (same order)."""
    import json

    from safetensors.torch import load_file

    tensors, texts = load_file(str(path)), json.loads(Path(path).with_suffix(".json").read_text())
    if len(texts) != len(wavs):
        raise ValueError(f"{path}: {len(texts)} cached examples for {len(wavs)} clips")
    examples = []
    for i, (path, text) in enumerate(zip(wavs, texts)):
        wave = load_wav(path, spec["sampling_rate"])
        examples.append(SpeechExample(
            features=audio_features([wave], feature_extractor, spec),
            speech_positions=speech_positions(wave.shape[-1], getattr(feature_extractor, "hop_length", 160)),
            **{n: tensors[f"{i}.{n}"] for n in ("teacher_states", "input_ids", "topk_values", "topk_indices")},
            **text))
    return examples


# ------------------------------------------------------------------------------------------------------- losses


def speech_positions(num_samples, hop_length=160):
    """Encoder positions (after Whisper's stride-2 conv) that a clip of ``num_samples`` samples covers."""
    return -(-int(num_samples) // (2 * hop_length))


class HiddenStateLoss(nn.Module):
    """Relative squared error ``||s - t||^2 / ||t||^2`` between student and teacher encoder states.

    ``speech_weight`` (with a clip's ``speech_positions``): the error of the clip's own positions and that of the
    padding after it are taken apart, each relative to its own teacher norm, and mixed ``w * speech + (1 - w) *
    padding``. In a 30 s window a few seconds of speech hold a small share of the teacher states' energy, so the
    plain loss spends most of its effort on the padding (bench/RESULTS.md §12 measures both)."""

    def __init__(self, speech_weight=None):
        super().__init__()
        self.speech_weight = speech_weight

    @staticmethod
    def _relative(student, teacher):
        return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp(min=1e-6)

    def forward(self, student, teacher, speech_positions=0):
        teacher = teacher.to(student.dtype)
        n = int(speech_positions)
        if self.speech_weight is None or not 0 < n < teacher.shape[0]:
            return self._relative(student, teacher)
        w = self.speech_weight
        return w * self._relative(student[:n], teacher[:n]) + (1 - w) * self._relative(student[n:], teacher[n:])


class TopKDistillationLoss(nn.Module):
    """Cross-entropy of the student's log-probs on the teacher's top-k tokens under the teacher's (renormalised)
    top-k distribution at temperature ``temperature``."""

    def __init__(self, temperature=1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits, topk_values, topk_indices):
        t = self.temperature
        target = torch.softmax(topk_values.float() / t, dim=-1)  # (N, k)
        logp = torch.log_softmax(student_logits.float() / t, dim=-1).gather(-1, topk_indices)  # (N, k)
        return -(target * logp).sum(-1).mean() * t * t


# -------------------------------------------------------------------------------------------------- distillation


def distil_speech(student, examples, steps, lr=2e-4, encoder_lr=None, weights=(1.0, 1.0, 1.0), accumulate=4,
                  seed=0, train_tower=True, log_every=50, progress=print, bf16=True, speech_weight=None,
                  release_every=5):
    """Train ``student`` (a NexusForCausalLM with one audio encoder) on ``examples``; returns the loss log.

    The shared embedding and head stay frozen (they are Whisper's, copied exactly); the encoder, projector and (with
    ``train_tower``) the tower's layers train. ``steps`` counts optimizer steps of ``accumulate`` clips each.
    ``weights=(1, 0, 0)``: hidden-state distillation only; the towers do not run. ``speech_weight``: see
    `HiddenStateLoss` (None: one relative error over the whole window). Every ``release_every`` steps, and at the
    end, freed memory goes back to the OS (`peak_rss.release_freed_memory`), so the resident set stays near one
    step's working set (`speech_memory` plans that much).
    """
    w_hidden, w_ce, w_kd = weights
    encoder_only = w_ce == 0 and w_kd == 0
    train_tower = train_tower and not encoder_only
    hidden_loss, kd_loss = HiddenStateLoss(speech_weight), TopKDistillationLoss()
    enc_params = list(student.model.encoders.parameters())
    tower_params = list(student.model.towers.parameters()) if train_tower else []
    for p in student.parameters():
        p.requires_grad_(False)
    for p in enc_params + tower_params:
        p.requires_grad_(True)
    student.model.encoders[0].embed_positions.weight.requires_grad_(False)  # sinusoids, as in Whisper
    groups = [{"params": [p for p in enc_params if p.requires_grad], "lr": encoder_lr or lr}]
    if tower_params:
        groups.append({"params": tower_params, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    order, log = [], []
    captured = [None]
    hook = student.model.encoders[0].register_forward_hook(lambda m, args, out: captured.__setitem__(0, out[1]))
    student.train()
    for step in range(steps):
        totals = [0.0, 0.0, 0.0]
        for _ in range(accumulate):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            ex = examples[order.pop()]
            if encoder_only:  # hidden-state distillation alone: the towers are not run (much cheaper)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    student.model.encoders[0](ex.features)
                l_ce = l_kd = torch.zeros(())
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = student(input_ids=ex.input_ids[None], input_features=ex.features, encoder=0,
                                  use_cache=False, logits_to_keep=ex.topk_indices.shape[0])
                n_prompt = ex.input_ids.shape[0] - ex.topk_indices.shape[0] + 1
                logits = out.logits[0]  # (N, V): the positions that predict the transcript and EOS
                targets = torch.cat([ex.input_ids[n_prompt:], ex.topk_indices[-1:, 0]])  # teacher's tokens, then EOS
                l_ce = nn.functional.cross_entropy(logits.float(), targets)
                l_kd = kd_loss(logits, ex.topk_values, ex.topk_indices)
            states = captured[0]  # (1, F / 2, d): the encoder states of that same forward
            l_hidden = hidden_loss(states[0].float(), ex.teacher_states.float(), ex.speech_positions)
            loss = (w_hidden * l_hidden + w_ce * l_ce + w_kd * l_kd) / accumulate
            loss.backward()
            for i, v in enumerate((l_hidden, l_ce, l_kd)):
                totals[i] += float(v.detach()) / accumulate
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "hidden": totals[0], "ce": totals[1], "kd": totals[2]})
        if (step + 1) % release_every == 0:
            release_freed_memory()  # glibc keeps freed activations; the RAM plan counts one step's worth
        if progress and (step + 1) % log_every == 0:
            progress(f"step {step + 1}/{steps}: hidden {totals[0]:.4f} ce {totals[1]:.3f} kd {totals[2]:.3f}")
    hook.remove()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    del opt, schedule, groups
    release_freed_memory()
    return log

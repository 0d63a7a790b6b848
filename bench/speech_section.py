"""RESULTS.md §12 from ``bench/results/speech_encoder.json`` (`bench/speech_encoder.py`, issue 21): a pruned,
distilled Whisper encoder inside a Nexus student against real Whisper-base on held-out espeak-ng speech: word
accuracy of both on the same clips, retention with its paired CI, the encoder's size against Whisper's, the check
that the unpruned copy is Whisper, and where the time went."""

import json
from pathlib import Path

TITLE = "## 12. Speech: a distilled Whisper encoder inside the student (issue 21)"


def _ci(value, ci, digits=3):
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def speech_section(path, md_table) -> list:
    path = Path(path)
    if not path.is_file():
        return [f"No `{path.name}` yet: run `python bench/speech_encoder.py`."]
    d = json.loads(path.read_text())
    clips, kd, hs = d["clips"], d["distillation"], d["hidden_state_distillation"]
    lines = [(f"From `{path.name}` (`python bench/speech_encoder.py`). Teacher: {d['teacher']}. "
              f"{clips['train']} training clips and {clips['heldout']} held-out clips, {clips['voice']}; text: "
              f"{clips['text']}. Word accuracy = 1 − WER over all held-out words; retention = student ÷ Whisper on "
              "the same clips, paired bootstrap 95% CI."), ""]
    copy = d.get("unpruned_copy_check")
    if copy:
        lines += [(f"Before pruning, the student is Whisper: on {copy['clips']} held-out clips its features differ "
                   f"by at most {copy['max_abs_feature_diff']:.1e} and its logits by at most "
                   f"{copy['max_abs_logit_diff']:.1e} (fp32)."), ""]
    alone = d.get("standalone_check")
    if alone:
        same = "the same text as" if alone["same_text_as_in_process"] else "**different text from**"
        lines += [(f"The saved checkpoint stands alone: in a process that cannot import NEXUS ({alone['loader']}), "
                   f"it transcribed {alone['clips']} held-out clips to {same} the bench's own process."), ""]
    goal = "met" if d["goal_met"] else "missed"
    rows = [["Whisper-base", _ci(d["whisper_word_accuracy"], d["whisper_word_accuracy_ci95"]), "–",
             f"{d['whisper_encoder_params']:,}", "1.000"],
            ["Nexus student", _ci(d["student_word_accuracy"], d["student_word_accuracy_ci95"]),
             f"**{_ci(d['retention'], d['retention_ci95'])}**", f"{d['student_encoder_params_with_projector']:,}",
             f"{d['params_ratio_with_projector']:.3f}"]]
    lines += [md_table(["model", "word accuracy", "retention", "encoder params (with projector)", "of Whisper's"],
                       rows), ""]
    lines += [(f"Goal: {d['goal']}: **{goal}**. The student's tower: {d.get('tower', 'decoder')}; whole student "
               f"{d['student_total_params']:,} params." if "student_total_params" in d else
               f"Goal: {d['goal']}: **{goal}**."), ""]
    widths = ", ".join(f"{h}/{f}" for h, f in d["student_encoder_widths_heads_ffn"])
    lines += [f"- Pruning: {d['pruning']}. Heads / FFN neurons kept per layer (of 8 / 2048): {widths}.",
              (f"- Distillation: {hs['steps']} hidden-state steps, then {kd['steps']} steps of hidden-state + "
               f"transcription KD, {kd['clips_per_step']} clips per step (encoder lr {kd['encoder_lr']})."
               + (f" Held-out relative hidden-state error after training: "
                  f"{d['heldout_hidden_relative_error']:.3f}." if "heldout_hidden_relative_error" in d else ""))]
    if "seconds" in d:
        parts = ", ".join(f"{k.replace('_', ' ')} {v:,.0f} s" for k, v in d["seconds"].items())
        lines.append(f"- Time ({d.get('threads', '?')} threads): {parts}."
                     + (f" Peak RSS {d['peak_rss_mb']:,.0f} MB (Whisper freed before training)."
                        if "peak_rss_mb" in d else ""))
    samples = d.get("samples") or []
    if samples:
        lines += ["", md_table(["reference", "Whisper", "student"],
                               [[s["reference"], s["whisper"], s["student"] or "(empty)"] for s in samples[:4]])]
    return lines

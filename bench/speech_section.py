"""RESULTS.md §12 from ``bench/results/speech_encoder.json`` (`bench/speech_encoder.py`, issue 21): a pruned,
distilled Whisper encoder inside a Nexus student against real Whisper-base on held-out espeak-ng speech: word
accuracy of both on the same clips, retention with its paired CI, the encoder's size against Whisper's, the check
that the unpruned copy is Whisper, and where the time went."""

import json
from pathlib import Path

import numpy as np

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
    lo = d["retention_ci95"][0]
    goal = (f"**{'met' if d['goal_met'] else 'missed'}** by the point estimate (the CI's lower end, {lo:.3f}, is "
            f"{'above' if lo >= 0.90 else 'below'} 0.90)")
    rows = [["Whisper-base", _ci(d["whisper_word_accuracy"], d["whisper_word_accuracy_ci95"]), "–",
             f"{d['whisper_encoder_params']:,}", "1.000"],
            ["Nexus student", _ci(d["student_word_accuracy"], d["student_word_accuracy_ci95"]),
             f"**{_ci(d['retention'], d['retention_ci95'])}**", f"{d['student_encoder_params_with_projector']:,}",
             f"{d['params_ratio_with_projector']:.3f}"]]
    lines += [md_table(["model", "word accuracy", "retention", "encoder params (with projector)", "of Whisper's"],
                       rows), ""]
    lines += [(f"Goal: {d['goal']}: {goal}. The student's tower: {d.get('tower', 'decoder')}; whole student "
               f"{d['student_total_params']:,} params." if "student_total_params" in d else
               f"Goal: {d['goal']}: {goal}."), ""]
    widths = ", ".join(f"{h}/{f}" for h, f in d["student_encoder_widths_heads_ffn"])
    lines += [f"- Pruning: {d['pruning']}. Heads / FFN neurons kept per layer: {widths}.",
              (f"- Distillation: {hs['steps']} hidden-state steps, then {kd['steps']} steps of hidden-state + "
               f"transcription KD, {kd['clips_per_step']} clips per step (encoder lr {kd['encoder_lr']})."
               + (f" Held-out relative hidden-state error after training: "
                  f"{d['heldout_hidden_relative_error']:.3f}" if "heldout_hidden_relative_error" in d else "")
               + (f" (the clips' own positions: {d['heldout_hidden_relative_error_speech_positions']:.3f})"
                  if "heldout_hidden_relative_error_speech_positions" in d else "")
               + ("." if "heldout_hidden_relative_error" in d else ""))]
    if "seconds" in d:
        parts = ", ".join(f"{k.replace('_', ' ')} {v:,.0f} s" for k, v in d["seconds"].items())
        lines.append(f"- Time ({d.get('threads', '?')} threads): {parts}."
                     + (f" Peak RSS {whole_run_peak_mib(d):,.0f} MB (Whisper freed before training)."
                        if "peak_rss_mb" in d else ""))
    arms = sorted(path.parent.glob(path.stem + "_*.json"))
    if arms:
        lines += ["", *arm_lines(d, arms, md_table)]
    ram = path.parent / "speech_ram_plan.json"
    if ram.is_file():
        lines += ["", *ram_lines(json.loads(ram.read_text()), md_table, d)]
    attached = path.parent / "speech_attach.json"
    if attached.is_file():
        lines += ["", *attach_lines(json.loads(attached.read_text()), md_table)]
    samples = d.get("samples") or []
    if samples:
        lines += ["", md_table(["reference", "Whisper", "student"],
                               [[s["reference"], s["whisper"], s["student"] or "(empty)"] for s in samples[:4]])]
    return lines


def whole_run_peak_mib(d):
    """A run's peak RSS: its largest measured phase when it measured phases (``peak_rss_mb`` of runs before that fix
    was getrusage's ru_maxrss, which the per-phase reset of the kernel's high-water mark resets too), else
    ``peak_rss_mb``."""
    phases = d.get("measured_phase_peak_mib")
    return max(phases.values()) if phases else d["peak_rss_mb"]


def ram_lines(r, md_table, main=None) -> list:
    """The speech path's RAM plan (`speech_memory.plan_speech_ram`) beside what a run measured per phase, and, when
    ``main`` (the full run's record) measured its phases too, its figures in columns of their own: a phase over its
    plan is marked, and a measured phase the plan does not have is listed."""
    plan, measured = r["plan"], r.get("measured_phase_peak_mib") or {}
    full = (main or {}).get("measured_phase_peak_mib") if main and "ram_plan" in main else None
    full_plan = {k: v / 2**20 for k, v in main["ram_plan"]["phases"].items()} if full else {}

    def cells(name, total):
        row = [f"{measured[name]:,.0f}" if name in measured else "–",
               f"{total / 2**20 / measured[name]:.2f}" if name in measured and total else "–"]
        if full:
            p = full_plan.get(name)
            m = full.get(name)
            row += [f"{p:,.0f}" if p else "not planned", f"{m:,.0f}" if m else "–",
                    (f"{p / m:.2f}" + (" **under**" if p < m else "")) if p and m else "–"]
        return row

    rows = [[name + (" (peak)" if name == plan["peak_phase"] else ""), f"{total / 2**20:,.0f}", *cells(name, total)]
            for name, total in plan["phases"].items()]
    if full:  # phases the check's plan lacks: the full run's own plan may have them
        rows += [[name, "not planned", "–", "–", f"{full_plan[name]:,.0f}" if name in full_plan else "not planned",
                  f"{m:,.0f}", (f"{full_plan[name] / m:.2f}" + (" **under**" if full_plan[name] < m else ""))
                  if name in full_plan else "–"]
                 for name, m in full.items() if name not in plan["phases"]]
    a = plan["assumptions"]
    head = (f"**Planned memory** (`{r['command']}`, `speech_ram_plan.json`; one teacher resident at a time: Whisper "
            f"is freed before training): {a['clips']} clips of {a['per_example_bytes'] / 2**20:.2f} MiB each "
            "(log-mel window, fp16 teacher states, top-k logits) dominate. The bench refuses to start when the plan "
            "exceeds `--ram-gb` (default: the machine's RAM).")
    if measured:
        head += (f" Measured: {r['note']}; the plan's peak is {r['peak_plan_over_measured']:.2f}× the largest "
                 "measured phase.")
        if main and "peak_rss_mb" in main and "ram_plan" not in main:
            clips = main["clips"]
            head += (f" The full run in `speech_encoder.json` predates the plan; its whole-process peak was "
                     f"{main['peak_rss_mb']:,.0f} MiB, with {clips['train']} training clips (its held-out clips have "
                     "been re-scored since).")
        elif main and "ram_plan" in main:
            planned = main["ram_plan"]["total_bytes"] / 2**20
            head += (f" The full run in `speech_encoder.json` ({main['hidden_state_distillation']['steps']} + "
                     f"{main['distillation']['steps']} training steps, then evaluation and saving): plan "
                     f"{planned:,.0f} MiB, whole-process peak {whole_run_peak_mib(main):,.0f} MiB"
                     + ("; its phases are the last three columns." if full else "."))
    elif "measured" in r:
        head += (f" The last full run measured a peak of {r['measured']['peak_rss_bytes'] / 2**20:,.0f} MiB; plan ÷ "
                 f"measured {r['measured']['plan_over_measured']:.2f}.")
    columns = ["phase", "plan MiB", "measured MiB", "plan ÷ measured"]
    if full:
        columns = ["phase", "plan MiB", "check: measured MiB", "check: plan ÷ measured", "full run: plan MiB",
                   "full run: measured MiB", "full run: plan ÷ measured"]
    return [head, "", md_table(columns, rows)]


def attach_lines(a, md_table) -> list:
    """Text + speech in one checkpoint (`bench/speech_attach.py`, ``nexus attach-speech``): both sources' behaviour
    kept, measured on real inputs."""
    at, text, sp, alone = a["attach"], a["text"], a["speech"], a["standalone_check"]
    p = at["params"]
    same = "the same text as" if alone["same_text_as_in_process"] else "**different text from**"
    rows = [["text (held-out prose + code windows)",
             f"{text['windows']} × {text['tokens_per_window']} tokens",
             f"max |logit diff| vs the text student {text['max_abs_logit_diff']:.1e}; router picks "
             f"{'identical' if text['same_router_picks'] else '**different**'}"],
            ["speech (held-out clips)", f"{sp['clips']} clips",
             f"{sp['identical_transcripts']}/{sp['clips']} transcripts identical to the speech student's; word "
             f"accuracy {_ci(sp['student_word_accuracy'], sp['student_word_accuracy_ci95'])}, retention vs Whisper "
             f"{_ci(sp['retention'], sp['retention_ci95'])}"]]
    return ["**One checkpoint with text and speech** (`python bench/speech_attach.py`, `speech_attach.json`): "
            f"`nexus attach-speech` joined the text student ({p['text_student']:,} params; towers "
            f"{', '.join(at['towers'][:-1])}) and the speech student above ({p['speech_student']:,} params) into "
            f"one `NexusForCausalLM` of {p['total']:,} params ({at['added_params']:,} of them added zeros: the "
            "projector and cross-attention padding to the text student's hidden size "
            f"{at['shared_hidden_size']}, and the router's speech class, which it never picks). The speech tower "
            f"keeps Whisper's token space ({at['speech_tower']['vocab_size']:,} tokens) beside the text vocabulary; "
            "its processor sits in the `speech/` subfolder.", "",
            md_table(["input", "measured on", "result"], rows), "",
            f"In a process that cannot import NEXUS ({alone['loader']}), the checkpoint transcribed {alone['clips']} "
            f"clips to {same} the bench's own process. Peak RSS {a['peak_rss_mb']:,.0f} MB."]


def _accuracy(errors, words):
    return np.maximum(0.0, 1.0 - errors.sum(-1) / np.maximum(1.0, words.sum(-1)))


def paired_retention_delta(arm, main, n=2000, seed=0):
    """Arm minus main retention on the same held-out clips, with a paired bootstrap 95% CI over clips; None when
    the two runs did not score the same clips with the same Whisper transcripts."""
    a, m = np.asarray(arm.get("items") or [], float), np.asarray(main.get("items") or [], float)
    if a.shape != m.shape or not len(a) or not np.array_equal(a[:, 1:], m[:, 1:]):
        return None
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n, len(a)))  # (n, clips)
    words, teacher = a[idx, 2], _accuracy(a[idx, 1], a[idx, 2])
    delta = (_accuracy(a[idx, 0], words) - _accuracy(m[idx, 0], words)) / np.maximum(teacher, 1e-9)
    return {"value": arm["retention"] - main["retention"], "ci": [float(np.percentile(delta, 2.5)),
                                                                    float(np.percentile(delta, 97.5))]}


def arm_lines(main, arm_paths, md_table) -> list:
    """One row per other arm (``speech_encoder_<arm>.json``): what it changed, its retention and the paired Δ."""
    rows = []
    for p in arm_paths:
        arm = json.loads(p.read_text())
        delta = paired_retention_delta(arm, main)
        changed = [f"{k} {arm['distillation'][k]}" for k in ("train_tower", "lr", "steps", "encoder_lr")
                   if arm["distillation"].get(k) != main["distillation"].get(k)]
        changed += [f"hidden-state {k.replace('_', ' ')} {arm['hidden_state_distillation'].get(k)}"
                    for k in ("steps", "speech_weight")
                    if arm["hidden_state_distillation"].get(k) != main["hidden_state_distillation"].get(k)]
        rows.append([f"`{p.name}`", ", ".join(changed) or "–", _ci(arm["retention"], arm["retention_ci95"]),
                     "not paired (other clips)" if delta is None else
                     f"{delta['value']:+.3f} [{delta['ci'][0]:+.3f}, {delta['ci'][1]:+.3f}]"])
    return ["Other arms on the same clips and teacher pass (Δ = arm − the run above, paired bootstrap over clips):",
            "", md_table(["arm", "changed", "retention", "Δ retention"], rows)]

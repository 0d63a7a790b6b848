"""Text + speech in one checkpoint (issue 21): `nexus attach-speech` on real students, checked on real inputs.

1. Text student: the size sweep's NEXUS student at 0.25 (Gemma-3-270M + the arithmetic and code specialists; a Gemma
   tower over Gemma's trimmed vocabulary and an own-vocabulary specialist tower), copied to
   ``bench/out/speech/text_student_0.25`` (``--text`` to pick another).
2. Speech student: ``bench/out/speech/student``, written by `bench/speech_encoder.py` (the pruned, distilled encoder
   and Whisper's decoder as a ``whisper_decoder`` tower).
3. `attach_speech` writes ``bench/out/speech/text_speech``. Then:
   - text: held-out prose and code windows (the text tokenizer) through both, max |logit diff| and the router's picks;
   - speech: every held-out clip of `speech_encoder.py` transcribed by the attached student (processor from its
     ``speech/`` subfolder) and by the speech student: identical transcripts, word accuracy and retention against
     Whisper (the cached teacher pass) with the paired bootstrap CI;
   - the checkpoint stands alone: 3 clips transcribed in a process that cannot import NEXUS.

Writes bench/results/speech_attach.json.

Usage: python bench/speech_attach.py [--text FOLDER] [--speech FOLDER] [--windows 16]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speech_encoder as se  # noqa: E402
from paths import RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402
from nexus.conversion.peak_rss import peak_rss  # noqa: E402
from nexus.conversion.speech_attach import SPEECH_SUBFOLDER, attach_speech  # noqa: E402
from nexus.hub.fresh_load import fresh_process_transcripts  # noqa: E402

OUT = se.OUT / "text_speech"


def text_windows(tokenizer, count, length=128):
    """``count`` windows of ``length`` tokens: half from the held-out prose, half from the held-out code."""
    rows = []
    for name in ("prose_heldout.txt", "code_heldout.txt"):
        ids = tokenizer((se.DATA / name).read_text())["input_ids"]
        rows += [ids[i * length:(i + 1) * length] for i in range(count // 2)]
    return torch.tensor(rows)


@torch.no_grad()
def text_check(model, text_model, ids, batch=4):
    diff, same_routes, routes = 0.0, True, []
    for i in range(0, len(ids), batch):
        got, ref = model(input_ids=ids[i:i + batch]), text_model(input_ids=ids[i:i + batch])
        diff = max(diff, float((got.logits - ref.logits).abs().max()))
        same_routes &= bool(torch.equal(got.tower_index, ref.tower_index))
        routes += got.tower_index.tolist()
    return {"windows": len(ids), "tokens_per_window": ids.shape[1], "max_abs_logit_diff": diff,
            "same_router_picks": same_routes, "picked_towers": sorted(set(routes))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", type=Path, default=se.OUT / "text_student_0.25")
    ap.add_argument("--speech", type=Path, default=se.OUT / "student")
    ap.add_argument("--eval", type=int, default=None, help="held-out clips (speech_encoder.py's; default: all)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from nexus.modeling_nexus import NexusForCausalLM

    seconds = {}
    t0 = time.time()
    record = attach_speech(args.text, args.speech, OUT, overwrite=True)
    seconds["attach"] = time.time() - t0
    se.log(f"attached: towers {record['towers']}, {record['params']['total']:,} params; exactness "
           f"{record['exactness']}")

    def load(folder):
        return NexusForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    model, text_model = load(OUT), load(args.text)
    ids = text_windows(AutoTokenizer.from_pretrained(OUT, trust_remote_code=True), args.windows)  # (our own code)
    text = text_check(model, text_model, ids)
    se.log(f"text: {text}")
    del text_model

    eval_text = se.heldout_sentences(args.eval)
    eval_wavs = se.synthesize(eval_text, se.OUT / "clips" / "heldout")
    fe = WhisperFeatureExtractor.from_pretrained(OUT, subfolder=SPEECH_SUBFOLDER)
    tok = AutoTokenizer.from_pretrained(OUT, subfolder=SPEECH_SUBFOLDER)
    prompt, spec = se.whisper_prompt_ids(tok), model.config.encoders[0]
    held = se.cached_teacher_pass(None, tok, fe, eval_wavs, eval_text, prompt, spec, "heldout")
    t0 = time.time()
    attached = se.evaluate(model, fe, tok, eval_wavs, held)
    seconds["evaluate_attached"] = time.time() - t0
    del model
    t0 = time.time()
    alone = se.evaluate(load(args.speech), fe, tok, eval_wavs, held)
    seconds["evaluate_speech_student"] = time.time() - t0
    same = [a["student"] == b["student"] for a, b in zip(attached["rows"], alone["rows"])]
    fields = attached["fields"]
    se.log(f"speech: {sum(same)}/{len(same)} transcripts identical to the speech student's; word accuracy "
           f"{fields['student_word_accuracy']:.3f} (Whisper {fields['whisper_word_accuracy']:.3f}), retention "
           f"{fields['retention']:.3f} {fields['retention_ci95']}")
    texts, module = fresh_process_transcripts(OUT, eval_wavs[:3], subfolder=SPEECH_SUBFOLDER)
    standalone = {"clips": len(texts), "same_text_as_in_process": texts == [r["student"] for r in attached["rows"][:3]],
                  "module": module.rsplit(".", 1)[-1],
                  "loader": "AutoModelForCausalLM(trust_remote_code=True); WhisperFeatureExtractor and AutoTokenizer "
                            f"from the folder's {SPEECH_SUBFOLDER!r} subfolder; model.transcribe(wav)"}
    se.log(f"stand-alone: {standalone}")
    result = {
        "text_student": str(args.text), "speech_student": str(args.speech), "checkpoint": str(OUT),
        "attach": {k: record[k] for k in ("towers", "encoders", "capability_to_tower", "speech_tower",
                                          "shared_hidden_size", "cache_slots", "params", "added_params",
                                          "exactness")},
        "text": text,
        "speech": {"clips": len(same), "identical_transcripts": sum(same),
                   **{k: fields[k] for k in ("whisper_word_accuracy", "whisper_word_accuracy_ci95",
                                             "student_word_accuracy", "student_word_accuracy_ci95", "retention",
                                             "retention_ci95")},
                   "speech_student_word_accuracy": alone["fields"]["student_word_accuracy"],
                   "items": fields["items"]},
        "standalone_check": standalone,
        "checkpoint_bytes": sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file()),
        "seconds": seconds, "threads": args.threads, "peak_rss_mb": peak_rss() / 2**20,
    }
    path = RESULTS / "speech_attach.json"
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    se.log(f"wrote {path}")


if __name__ == "__main__":
    main()

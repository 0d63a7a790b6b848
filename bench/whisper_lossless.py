"""Is the CTranslate2 -> transformers Whisper conversion lossless? Prints figures, writes bench/results/whisper_lossless.json.

1. every HF tensor equals the stored CTranslate2 fp16 tensor bit for bit (q/k/v split back from the fused weights);
2. with `ctranslate2` installed: the HF encoder (fp32 compute) vs CTranslate2's own `Whisper.encode` (CPU, float32
   compute) on the log-mel features of espeak-ng speech, max abs error; and both greedy transcripts.

Usage: python bench/whisper_lossless.py CT2_FOLDER   (a folder with model.bin, config.json, tokenizer.json)
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from nexus.conversion.ctranslate2_whisper import read_ctranslate2_model, whisper_from_ctranslate2, whisper_state_dict
from nexus.modeling_nexus.audio_input import load_wav

SENTENCES = ["The quick brown fox jumps over the lazy dog near the river bank.",
             "Please send the report to the office before noon on Friday."]


def main(folder):
    folder = Path(folder)
    torch.set_num_threads(1)
    model, tokenizer, fe = whisper_from_ctranslate2(folder)
    _, _, variables, _ = read_ctranslate2_model(folder / "model.bin")
    stored = whisper_state_dict(variables)
    hf_state = model.state_dict()
    mismatched = [k for k, v in stored.items() if not torch.equal(hf_state[k], v)]
    result = {"tensors_checked": len(stored), "tensors_bit_exact": len(stored) - len(mismatched),
              "mismatched": mismatched[:10]}
    print(f"stored fp16 tensors: {result['tensors_bit_exact']}/{len(stored)} bit-exact")
    model = model.float()
    with tempfile.TemporaryDirectory() as tmp:
        wavs = []
        for i, text in enumerate(SENTENCES):
            path = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
            wavs.append(load_wav(path, 16000).numpy())
    feats = fe(wavs, sampling_rate=16000, return_tensors="pt").input_features  # (B, 80, 3000)
    with torch.no_grad():
        hf_enc = model.model.encoder(feats).last_hidden_state  # (B, 1500, 512)
        hf_ids = model.generate(feats, language="en", task="transcribe", max_new_tokens=40)
    result["hf_transcripts"] = tokenizer.batch_decode(hf_ids, skip_special_tokens=True)
    print("HF transcripts:", result["hf_transcripts"])
    try:
        import ctranslate2
    except ImportError:
        result["ctranslate2"] = "not installed: checked against the stored weights only"
        print(result["ctranslate2"])
    else:
        ct = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=1)
        sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
        ct_enc = torch.from_numpy(np.array(ct.encode(sv)))
        err = (ct_enc - hf_enc).abs().max().item()
        mean_err = (ct_enc - hf_enc).abs().mean().item()
        scale = hf_enc.abs().max().item()
        with torch.no_grad():  # a float64 reference: how far is each fp32 implementation from exact arithmetic?
            ref = model.double().model.encoder(feats.double()).last_hidden_state
        model.float()
        hf_vs_ref = (hf_enc.double() - ref).abs().max().item()
        ct_vs_ref = (ct_enc.double() - ref).abs().max().item()
        prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                                  "<|notimestamps|>"])
        out = ct.generate(sv, [prompt] * len(wavs), beam_size=1, max_length=40)
        result.update(ctranslate2=ctranslate2.__version__, encoder_max_abs_error=err, encoder_mean_abs_error=mean_err,
                      encoder_max_abs_value=scale, hf_fp32_vs_fp64_max_abs=hf_vs_ref, ct2_fp32_vs_fp64_max_abs=ct_vs_ref,
                      ct2_transcripts=[tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True) for r in out])
        print(f"ctranslate2 {ctranslate2.__version__}: encoder max |HF - CT2| = {err:.3g}, mean {mean_err:.3g} "
              f"(max |value| {scale:.3g}); vs a float64 run of the converted weights: HF fp32 {hf_vs_ref:.3g}, "
              f"CT2 fp32 {ct_vs_ref:.3g}")
        print("CT2 transcripts:", result["ct2_transcripts"])
    out = Path(__file__).parent / "results" / "whisper_lossless.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])

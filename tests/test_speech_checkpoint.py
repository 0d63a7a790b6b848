"""A speech checkpoint stands alone: model + feature extractor + tokenizer in one folder transcribe a WAV in a process
that cannot import NEXUS."""

import os
import subprocess
import sys
import textwrap

import torch
from conftest import char_tokenizer
from test_audio_input import sine, write_wav
from transformers import WhisperFeatureExtractor

from nexus.modeling_nexus import NexusConfig, NexusForCausalLM
from nexus.modeling_nexus.audio_input import AudioInputError

CHILD = textwrap.dedent(
    """
    import sys
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith({repo!r})]
    sys.modules["nexus"] = None  # the installed (editable) package is blocked
    try:
        import nexus
    except ImportError:
        pass
    else:
        raise SystemExit("nexus is importable in the child")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor
    ckpt = {ckpt!r}
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
    text = model.transcribe({wav!r}, fe, tok, max_new_tokens=8)
    assert isinstance(text, str)
    print("NEXUS_TEXT", repr(text), type(model).__module__)
    try:
        model.transcribe({corrupt!r}, fe, tok)
    except ValueError as exc:
        print("NEXUS_ERROR", type(exc).__name__, exc)
    """
)


def test_speech_checkpoint_transcribes_without_the_project(tmp_path):
    torch.manual_seed(0)
    tok = char_tokenizer()
    encoder = {"type": "whisper_audio", "d_model": 32, "downsample": 4, "max_source_positions": 1500,
               "transcribe_prompt_ids": [tok.bos_token_id],
               "layers": [{"num_attention_heads": 2, "head_dim": 16, "intermediate_size": 64}] * 2}
    config = NexusConfig(vocab_size=len(tok), hidden_size=64, encoders=[encoder], eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    model = NexusForCausalLM(config).eval()
    fe = WhisperFeatureExtractor(feature_size=80)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    fe.save_pretrained(ckpt)
    files = sorted(p.name for p in ckpt.iterdir())
    for name in ("modeling_nexus.py", "audio_encoder.py", "audio_input.py", "transcribe.py", "preprocessor_config.json"):
        assert name in files, files
    assert not any(name.endswith((".bin", ".pt")) for name in files)

    wav = tmp_path / "clip.wav"
    write_wav(wav, sine(300, 22050, seconds=1.0), 22050)  # espeak-ng's rate: resampled to 16 kHz
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEfmt garbage")
    expected = model.transcribe(str(wav), fe, tok, max_new_tokens=8)
    try:
        model.transcribe(str(corrupt), fe, tok)
    except AudioInputError as exc:
        assert "corrupt.wav" in str(exc)
    else:
        raise AssertionError("a corrupt WAV must be an error")

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = CHILD.format(repo=repo, ckpt=str(ckpt), wav=str(wav), corrupt=str(corrupt))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("NEXUS_TEXT")][-1]
    assert line.startswith(f"NEXUS_TEXT {expected!r} ")  # the same words as in this process
    assert "transformers_modules" in line  # the checkpoint's own copy of the code ran
    error = [l for l in done.stdout.splitlines() if l.startswith("NEXUS_ERROR")][-1]
    assert "AudioInputError" in error and "corrupt.wav" in error

"""WAV input: PCM decoding, resampling to the model's rate (or a clear refusal), clear errors for corrupt files."""

import math
import shutil
import struct
import subprocess
import wave

import pytest
import torch

from nexus.modeling_nexus.audio_input import AudioInputError, load_wav, read_wav, resample


def write_wav(path, samples, rate, width=2, channels=1):
    scale = (1 << (8 * width - 1)) - 1
    ints = (samples.clamp(-1, 1) * scale).round().to(torch.int64)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(channels)
        fh.setsampwidth(width)
        fh.setframerate(rate)
        frames = b"".join(int(v).to_bytes(width, "little", signed=True) * channels for v in ints)
        fh.writeframes(frames)


def sine(freq, rate, seconds=0.5):
    t = torch.arange(int(rate * seconds)) / rate
    return 0.5 * torch.sin(2 * math.pi * freq * t)


@pytest.mark.parametrize("width", [2, 3, 4])
def test_pcm_round_trip(tmp_path, width):
    x = sine(440, 16000)
    write_wav(tmp_path / "a.wav", x, 16000, width=width, channels=2)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and y.shape == x.shape
    assert (y - x).abs().max() < 2 ** -(8 * width - 2)


def test_wrong_rate_is_resampled_or_refused(tmp_path):
    x = sine(1000, 22050)
    write_wav(tmp_path / "espeak_rate.wav", x, 22050)
    y = load_wav(tmp_path / "espeak_rate.wav", 16000)
    assert y.shape[0] == math.ceil(x.shape[0] * 16000 / 22050)
    spectrum = torch.fft.rfft(y[1000:7000])  # the tone stays at 1 kHz
    peak_hz = spectrum.abs().argmax().item() * 16000 / 6000
    assert abs(peak_hz - 1000) < 5
    with pytest.raises(AudioInputError, match=r"espeak_rate.wav is sampled at 22050 Hz but the model needs 16000 Hz"):
        load_wav(tmp_path / "espeak_rate.wav", 16000, resample_audio=False)


def test_resample_identity_and_length():
    x = torch.randn(1234)
    assert resample(x, 16000, 16000) is x
    assert resample(x, 8000, 16000).shape[0] == 2468


def test_corrupt_wavs_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a wav file at all" * 10)
    with pytest.raises(AudioInputError, match=r"garbage.wav is not a readable PCM WAV"):
        load_wav(garbage)
    write_wav(tmp_path / "ok.wav", sine(440, 16000), 16000)
    data = (tmp_path / "ok.wav").read_bytes()
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioInputError, match=r"truncated.wav is truncated"):
        load_wav(truncated)
    crazy_rate = tmp_path / "rate.wav"
    crazy_rate.write_bytes(data[:24] + struct.pack("<I", 7) + data[28:])
    with pytest.raises(AudioInputError, match=r"rate.wav: sample rate 7 Hz"):
        load_wav(crazy_rate)
    with pytest.raises(AudioInputError, match="does not exist"):
        load_wav(tmp_path / "missing.wav")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (setup.sh installs it)")
def test_espeak_speech_loads_at_16k(tmp_path):
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "hello world"], check=True, capture_output=True)
    y = load_wav(path, 16000)
    assert y.dim() == 1 and y.shape[0] > 8000 and y.abs().max() > 0.05

"""Audio in: read a PCM WAV file and bring it to the feature extractor's sample rate.

Self-contained like the rest of this folder (torch and the standard library only), so a checkpoint transcribes a
file in a process where NEXUS is not installed. A WAV whose rate differs from the wanted one is resampled with a
windowed-sinc filter (Hann window, the same kernel as ``torchaudio.functional.resample``'s ``sinc_interp_hann``), or
refused when ``resample=False``. A file that is not a readable PCM WAV is an `AudioInputError` naming the file.
"""

import math
import wave
from pathlib import Path

import torch
import torch.nn.functional as F

MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 384000


class AudioInputError(ValueError):
    """An audio file that cannot be used as model input; the message names the file."""


def resample(waveform, orig_rate, new_rate, lowpass_filter_width=6, rolloff=0.99):
    """Resample a mono (T,) float waveform from ``orig_rate`` to ``new_rate`` Hz -> (ceil(T * new / orig),)."""
    if orig_rate == new_rate:
        return waveform
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    base = min(orig, new) * rolloff  # cut-off below the lower Nyquist, in units of the reduced rates
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig  # (1, 1, K)
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx  # (new, 1, K)
    t = (t * base).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernels = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)  # (new, 1, K)
    x = F.pad(waveform.to(torch.float64)[None, None], (width, width + orig))  # (1, 1, T + pad)
    y = F.conv1d(x, kernels, stride=orig)  # (1, new, frames)
    y = y.transpose(1, 2).reshape(-1)  # interleave the `new` phases
    return y[: math.ceil(new * waveform.shape[-1] / orig)].to(waveform.dtype)


def read_wav(path):
    """(mono float32 waveform in [-1, 1] of shape (T,), sample rate) for a PCM WAV file (8/16/24/32-bit)."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as fh:
            channels, width, rate, frames = fh.getnchannels(), fh.getsampwidth(), fh.getframerate(), fh.getnframes()
            raw = fh.readframes(frames)
    except FileNotFoundError:
        raise AudioInputError(f"audio file {path} does not exist") from None
    except (wave.Error, EOFError, OSError, ValueError) as exc:
        raise AudioInputError(f"audio file {path} is not a readable PCM WAV ({exc or type(exc).__name__})") from None
    if width not in (1, 2, 3, 4) or channels < 1:
        raise AudioInputError(f"audio file {path}: unsupported sample width {width} bytes or {channels} channels")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioInputError(f"audio file {path}: sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}.."
                              f"{MAX_SAMPLE_RATE} Hz (corrupt header?)")
    if len(raw) != frames * channels * width or frames == 0:
        raise AudioInputError(f"audio file {path} is truncated or empty: the header promises {frames} frames, "
                              f"the data holds {len(raw) // max(1, channels * width)}")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(frames, channels, width)
    if width == 1:  # unsigned 8-bit
        samples = (data[..., 0].to(torch.float32) - 128.0) / 128.0
    else:  # signed little-endian: assemble the bytes into int32, most significant byte last
        value = torch.zeros(frames, channels, dtype=torch.int64)
        for b in range(width):
            value |= data[..., b].to(torch.int64) << (8 * b)
        sign = 1 << (8 * width - 1)
        value = (value ^ sign) - sign
        samples = value.to(torch.float32) / float(sign)
    return samples.mean(dim=1), rate  # (T,) mono


def load_wav(path, sampling_rate=16000, resample_audio=True):
    """A mono float32 waveform (T,) at ``sampling_rate`` from a WAV file: resampled if its rate differs, or refused
    with an AudioInputError naming the file and both rates when ``resample_audio=False``."""
    waveform, rate = read_wav(path)
    if rate != sampling_rate:
        if not resample_audio:
            raise AudioInputError(f"audio file {path} is sampled at {rate} Hz but the model needs {sampling_rate} Hz; "
                                  "resample it, or pass resample=True")
        waveform = resample(waveform, rate, sampling_rate)
    if not bool(torch.isfinite(waveform).all()):
        raise AudioInputError(f"audio file {path} decodes to non-finite samples (corrupt data)")
    return waveform

"""Speech to text with a Nexus model that has an audio encoder: ``model.transcribe(wav, processor)``.

The checkpoint folder holds the feature extractor (``preprocessor_config.json``, a WhisperFeatureExtractor) and the
tokenizer beside the weights, so in a process without NEXUS::

    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    text = model.transcribe("clip.wav", WhisperFeatureExtractor.from_pretrained(folder),
                            AutoTokenizer.from_pretrained(folder, trust_remote_code=True))

A checkpoint whose speech tower has its own token space beside text towers (``nexus attach-speech``) keeps the
speech processor in the subfolder ``speech/``: ``WhisperProcessor.from_pretrained(folder, subfolder="speech")``.

A WAV at another sample rate is resampled (``resample=False`` refuses it instead); a corrupt WAV is an
`AudioInputError` naming the file. Decoding is greedy with the KV cache: the audio prefix and the encoder's
``transcribe_prompt_ids`` are run once, then one token per step until EOS or ``max_new_tokens``.

Imports only torch, transformers and this package (copied into every checkpoint).
"""

import torch

from .audio_input import AudioInputError, load_wav


def audio_features(waveforms, feature_extractor, encoder_spec):
    """Mono waveforms (list of (T,) tensors at the encoder's rate) -> log-mel (B, n_mels, F): F the longest clip
    rounded up to whole prefix embeddings (2 x downsample frames), or with the spec's ``fixed_window`` the full
    window (Whisper's 30 s). Longer audio is cut at the window."""
    rate = encoder_spec["sampling_rate"]
    hop = getattr(feature_extractor, "hop_length", 160)
    unit = hop * 2 * encoder_spec["downsample"]  # samples per prefix embedding
    window = encoder_spec["max_source_positions"] * 2 * hop
    longest = max(int(w.shape[-1]) for w in waveforms)
    length = window if encoder_spec.get("fixed_window") else min(-(-longest // unit) * unit, window)
    batch = [torch.nn.functional.pad(w.float(), (0, max(0, length - w.shape[-1])))[:length].numpy()
             for w in waveforms]
    feats = feature_extractor(batch, sampling_rate=rate, return_tensors="pt", padding="do_not_pad").input_features
    return feats[..., : length // hop]  # (B, n_mels, F)


def _as_waveform(audio, rate, resample):
    if isinstance(audio, torch.Tensor):
        return audio.float().reshape(-1)
    if hasattr(audio, "dtype") and hasattr(audio, "shape"):  # a numpy array
        return torch.as_tensor(audio, dtype=torch.float32).reshape(-1)
    return load_wav(audio, rate, resample_audio=resample)  # a path


@torch.no_grad()
def transcribe_audio(model, audio, feature_extractor=None, tokenizer=None, processor=None, encoder=None,
                     max_new_tokens=96, resample=True):
    """Transcribe one clip (a WAV path, or a mono waveform at the encoder's sampling rate) -> str.

    ``processor``: anything with ``.feature_extractor`` and ``.tokenizer`` (e.g. a WhisperProcessor), or pass both.
    """
    if processor is not None:
        feature_extractor = feature_extractor or processor.feature_extractor
        tokenizer = tokenizer or processor.tokenizer
    if feature_extractor is None or tokenizer is None:
        raise ValueError("transcribe needs a feature extractor and a tokenizer (or a processor holding both)")
    base = model.model if hasattr(model, "model") else model
    index = base.encoder_index_for(encoder, modality="audio")
    spec = base.encoders[index].spec
    waveform = _as_waveform(audio, spec["sampling_rate"], resample)
    if waveform.numel() == 0:
        raise AudioInputError(f"audio {audio if isinstance(audio, str) else '(array)'} is empty")
    device = next(model.parameters()).device
    feats = audio_features([waveform], feature_extractor, spec).to(device)
    prompt = list(spec["transcribe_prompt_ids"]) or [tokenizer.bos_token_id or 0]
    input_ids = torch.tensor([prompt], device=device)
    out = model(input_ids=input_ids, input_features=feats, encoder=index, use_cache=True, logits_to_keep=1)
    tower = base.prefix_tower_index()
    own_space = tower is not None and getattr(base.towers[tower], "foreign_vocabulary", False)
    # the config's EOS is a shared-vocabulary id: a tower with its own token space stops on its tokenizer's EOS only
    eos = ({tokenizer.eos_token_id} | ({model.config.eos_token_id} if not own_space else set())) - {None}
    eos = {e for x in eos for e in (x if isinstance(x, (list, tuple)) else [x])}
    generated = []
    cache_name = "cache" if "cache" in out else "past_key_values"
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token in eos:
            break
        generated.append(token)
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, logits_to_keep=1,
                    **{cache_name: out[cache_name]})
    return tokenizer.decode(generated, skip_special_tokens=True).strip()

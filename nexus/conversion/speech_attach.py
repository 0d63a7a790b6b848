"""One checkpoint with text and speech: ``nexus attach-speech TEXT_STUDENT SPEECH_STUDENT --out OUT``.

    record = attach_speech("runs/demo/export", "out/speech/student", "out/text+speech")

A text student (towers over its base teacher's vocabulary, e.g. Gemma's) and a speech student (`speech_student`: an
audio encoder and a ``whisper_decoder`` tower over Whisper's vocabulary) become one `NexusForCausalLM`:

- the text towers, shared embedding, head and router are the text student's, bit for bit;
- the speech student's encoder joins ``encoders``; its projector now writes the text student's (wider) shared hidden
  size, its rows padded with zeros;
- the speech tower joins ``towers`` with its **own token space** (``vocab_size``: Whisper's embedding and the head
  tied to it); its cross-attention key/value projections read the wider prefix, their extra columns zero;
- the router gets one class for it that it never picks (towers with their own token space take no text from the
  router); an audio prefix goes to it, as do ``tower="speech"`` / ``capability="speech"``;
- the speech processor (feature extractor + Whisper tokenizer) sits in the subfolder ``speech/``; the text tokenizer
  stays at the top.

Zero padding keeps both students exact: before anything is written, text logits are compared with the text
student's and audio-prefixed logits with the speech student's (``attach_speech.json`` records both maxima; above
``TOLERANCE`` nothing is written). Refused with one line: a folder that is not a NEXUS student, a "speech student"
without exactly one audio encoder and one shared-vocabulary ``whisper_decoder`` tower or without a processor
(``preprocessor_config.json`` and a tokenizer), a text student that already has an encoder, a capability or tower
name both serve, or a text hidden size narrower than the speech student's.
The output is written all at once (`atomic_dir`), with ``nexus_hashes.json``; neither source is modified.
"""

import copy
import json
import re
import shutil
from pathlib import Path

import torch

from .atomic_output import atomic_dir
from .remove_capability import SKIPPED_FILES, check_state_fits
from .student_capabilities import read_student_capabilities, write_student_capabilities
from .student_hashes import check_student_folder, read_student_tensors, write_student_hashes

RECORD_FILE = "attach_speech.json"
SPEECH_SUBFOLDER = "speech"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "normalizer.json", "added_tokens.json")
ROUTER_KEYS = ("model.router.proj.weight", "model.router.proj.bias")
TOLERANCE = 1e-4  # max |logit difference| against either source student
CROSS_KV = re.compile(r"^layers\.\d+\.encoder_attn\.[kv]_proj\.weight$")


class AttachSpeechError(ValueError):
    pass


def _speech_parts(config, where):
    """The speech student's one ``whisper_audio`` encoder and one shared-vocabulary ``whisper_decoder`` tower."""
    encoders = [e for e in config.encoders if isinstance(e, dict) and e.get("type") == "whisper_audio"]
    if len(config.encoders) != 1 or len(encoders) != 1:
        raise AttachSpeechError(f"speech student {where}: needs exactly one whisper_audio encoder, has "
                                f"{[e.get('type') for e in config.encoders] or 'none'}")
    towers = config.towers
    if len(towers) != 1 or towers[0]["type"] != "whisper_decoder" or towers[0].get("vocab_size") is not None:
        raise AttachSpeechError(f"speech student {where}: needs exactly one whisper_decoder tower over its shared "
                                f"vocabulary, has {[t['type'] for t in towers]}")
    return encoders[0], towers[0]


def _check_text(config, where, speech_tower, speech_hidden):
    if config.encoders:
        raise AttachSpeechError(f"text student {where} already has encoder(s) "
                                f"{[e.get('name') for e in config.encoders]}: attach speech to a text-only student")
    clash = sorted(set(speech_tower.get("capabilities") or []) & set(config.capability_to_tower))
    if clash:
        raise AttachSpeechError(f"capability {clash[0]!r} is served by both students ({where} and the speech student)")
    names = [t.get("name") for t in config.towers]
    if speech_tower.get("name") in names:
        raise AttachSpeechError(f"tower name {speech_tower.get('name')!r} is taken in text student {where}: towers "
                                f"{names}")
    if config.hidden_size < speech_hidden:
        raise AttachSpeechError(f"text student {where} has hidden_size {config.hidden_size}, narrower than the speech "
                                f"student's {speech_hidden}: the audio prefix could not be carried exactly")


def _pad(tensor, rows=None, cols=None):
    """``tensor`` with zero rows (dim 0) / columns (dim 1) appended up to ``rows`` / ``cols``."""
    out = tensor
    if rows is not None and rows > out.shape[0]:
        out = torch.cat([out, out.new_zeros(rows - out.shape[0], *out.shape[1:])], 0)
    if cols is not None and cols > out.shape[1]:
        out = torch.cat([out, out.new_zeros(out.shape[0], cols - out.shape[1])], 1)
    return out


def attached_state(text_tensors, speech_tensors, text_config, hidden):
    """The combined state dict: the text student's tensors as they are, the speech tower as tower ``n`` (its
    embedding its own, cross-attention key/value inputs padded), the encoder with its projector padded to ``hidden``,
    one router class added (zeros; never picked)."""
    n = len(text_config.towers)
    out = dict(text_tensors)
    for key, value in speech_tensors.items():
        if key.startswith("model.towers.0."):
            rest = key[len("model.towers.0."):]
            out[f"model.towers.{n}.{rest}"] = _pad(value, cols=hidden) if CROSS_KV.match(rest) else value
        elif key == "model.embed_tokens.weight":
            out[f"model.towers.{n}.embed_tokens.weight"] = value  # Whisper's tokens: the tower's own space
        elif key.startswith("model.encoders.0.projector.linear_1."):
            out[key] = _pad(value, rows=hidden)  # writes the first d columns of the prefix; the rest stay 0
        elif key == "model.encoders.0.projector.linear_2.weight":
            out[key] = _pad(value, rows=hidden, cols=hidden)  # gelu(0) = 0 keeps the padded columns at 0
        elif key == "model.encoders.0.projector.linear_2.bias":
            out[key] = _pad(value, rows=hidden)
        elif key.startswith("model.encoders."):
            out[key] = value
        # else: the speech student's shared norm (unused) and tied head
    if n > 1:
        weight, bias = (text_tensors[k] for k in ROUTER_KEYS)
        out[ROUTER_KEYS[0]] = _pad(weight, rows=n + 1)
        out[ROUTER_KEYS[1]] = _pad(bias, rows=n + 1)
    else:  # the text student had one tower and no router: one now exists, and only tower 0 takes text
        dtype = text_tensors["model.embed_tokens.weight"].dtype
        out[ROUTER_KEYS[0]] = torch.zeros(2, hidden, dtype=dtype)
        out[ROUTER_KEYS[1]] = torch.zeros(2, dtype=dtype)
    return out


def attached_config(text_config, speech_config):
    from ..modeling_nexus import NexusConfig

    encoder, tower = _speech_parts(speech_config, "")
    tower = {**copy.deepcopy(tower), "vocab_size": speech_config.vocab_size, "hidden_size": speech_config.hidden_size}
    raw = text_config.to_dict()
    for key in ("num_hidden_layers", "transformers_version", "auto_map", "architectures"):
        raw.pop(key, None)
    names = list(getattr(text_config, "capability_names", None) or text_config.capability_to_tower)
    raw.update(towers=[*copy.deepcopy(text_config.towers), tower], encoders=[copy.deepcopy(encoder)],
               capability_names=names + list(tower.get("capabilities") or []))
    return NexusConfig(**raw)


@torch.no_grad()
def exactness(model, text_model, speech_model, seed=0):
    """Max |logit difference| of ``model`` against the text student on random text ids (routed as the text student
    routes them) and against the speech student on a random audio window plus the transcription prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text_model.config.vocab_size, (2, 12), generator=g)
    text = (model(input_ids=ids, use_cache=False).logits - text_model(input_ids=ids, use_cache=False).logits).abs()
    spec = speech_model.config.encoders[0]
    frames = 2 * spec["max_source_positions"]
    feats = torch.randn(1, spec["num_mel_bins"], frames, generator=g)
    prompt = list(spec["transcribe_prompt_ids"]) or [0]
    sids = torch.tensor([prompt + torch.randint(0, speech_model.config.vocab_size, (4,), generator=g).tolist()])
    ref = speech_model(input_ids=sids, input_features=feats, use_cache=False).logits
    got = model(input_ids=sids, input_features=feats, use_cache=False).logits
    T = sids.shape[1]
    speech = (got[:, -T:] - ref[:, -T:]).abs()
    return {"text_max_abs_logit_diff": float(text.max()), "speech_max_abs_logit_diff": float(speech.max()),
            "text_ids_shape": list(ids.shape), "speech_frames": frames}


def speech_processor_files(speech):
    """The speech student's feature extractor and tokenizer files; refused when either is missing."""
    files = [Path(speech) / n for n in PROCESSOR_FILES if (Path(speech) / n).is_file()]
    names = {p.name for p in files}
    if "preprocessor_config.json" not in names or not names & {"tokenizer.json", "vocab.json"}:
        raise AttachSpeechError(f"speech student {speech}: no processor (preprocessor_config.json and a tokenizer) to "
                                "carry over")
    return files


def attach_speech(text, speech, out, overwrite=False) -> dict:
    """Write ``text`` + ``speech`` as one student into ``out``; returns the record (see module doc)."""
    from ..modeling_nexus import NexusConfig, NexusForCausalLM
    from .load_check import checked_from_pretrained

    text, speech, out = Path(text), Path(speech), Path(out)
    checked_text, checked_speech = check_student_folder(text), check_student_folder(speech)
    text_config, speech_config = NexusConfig.from_pretrained(text), NexusConfig.from_pretrained(speech)
    _, speech_tower = _speech_parts(speech_config, str(speech))
    _check_text(text_config, str(text), speech_tower, speech_config.hidden_size)
    processor = speech_processor_files(speech)
    config = attached_config(text_config, speech_config)
    text_tensors, speech_tensors = read_student_tensors(text), read_student_tensors(speech)
    tensors = attached_state(text_tensors, speech_tensors, text_config, text_config.hidden_size)
    sizes = {"text": sum(int(t.numel()) for t in text_tensors.values()),  # what the sources hold (not the speech
             "speech": sum(int(t.numel()) for k, t in speech_tensors.items()  # student's unused norm / tied head)
                           if k not in ("model.norm.weight", "lm_head.weight"))}
    check_state_fits(config, tensors, "attached student")
    model = NexusForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise AttachSpeechError(f"attached student: weights do not fit (missing {missing[:3]}, unexpected "
                                f"{unexpected[:3]})")
    model.tie_weights()
    model.eval()
    text_model = checked_from_pretrained(NexusForCausalLM, text, what="text student", dtype=torch.float32).eval()
    speech_model = checked_from_pretrained(NexusForCausalLM, speech, what="speech student",
                                           dtype=torch.float32).eval()
    checks = exactness(model, text_model, speech_model)
    worst = max(checks["text_max_abs_logit_diff"], checks["speech_max_abs_logit_diff"])
    if not worst <= TOLERANCE:
        raise AttachSpeechError(f"attached student differs from its sources by {worst:.3g} in the logits (text "
                                f"{checks['text_max_abs_logit_diff']:.3g}, speech "
                                f"{checks['speech_max_abs_logit_diff']:.3g}; tolerance {TOLERANCE}); nothing written")
    sources = {"text student": text, "speech student": speech}
    with atomic_dir(out, overwrite=overwrite, sources=sources) as tmp:
        for path in text.iterdir():  # the text tokenizer and small files; not its weights or (older) modeling code
            if path.is_file() and path.suffix not in (".safetensors", ".py") and path.name not in SKIPPED_FILES:
                shutil.copy2(path, tmp / path.name)
        model.save_pretrained(tmp)  # config with auto_map, safetensors and this NEXUS's modeling files
        (tmp / SPEECH_SUBFOLDER).mkdir()
        for path in processor:
            shutil.copy2(path, tmp / SPEECH_SUBFOLDER / path.name)
        checked_from_pretrained(NexusForCausalLM, tmp, what="attached student", dtype=None)
        capabilities = read_student_capabilities(text)  # the text capabilities' probes and data, as they were
        if capabilities is not None:
            capabilities.pop("schema", None)
            write_student_capabilities(tmp, capabilities)
        record = {
            "schema": "nexus.attach_speech/1", "text_student": str(text), "speech_student": str(speech),
            "towers": [t.get("name") for t in config.towers], "encoders": [e.get("name") for e in config.encoders],
            "capability_to_tower": dict(config.capability_to_tower),
            "speech_tower": {"index": len(config.towers) - 1, "vocab_size": speech_config.vocab_size,
                             "hidden_size": speech_config.hidden_size},
            "shared_hidden_size": config.hidden_size, "cache_slots": config.num_hidden_layers,
            "params": {"total": sum(p.numel() for p in model.parameters()),
                       "text_student": sum(p.numel() for p in text_model.parameters()),
                       "speech_student": sum(p.numel() for p in speech_model.parameters())},
            "added_params": sum(int(t.numel()) for t in tensors.values()) - sum(sizes.values()),
            "speech_processor": {"subfolder": SPEECH_SUBFOLDER, "files": sorted(p.name for p in processor)},
            "exactness": {**checks, "tolerance": TOLERANCE},
            "student_hashes": {"text": checked_text["note"], "speech": checked_speech["note"]},
        }
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "README.md").write_text(
            f"# NEXUS student: text + speech\n\n{text.name} with the speech encoder and tower of {speech.name} "
            f"(`nexus attach-speech`). Text: the tokenizer at the top; speech: "
            "`model.transcribe(wav, processor=WhisperProcessor.from_pretrained(folder, "
            f"subfolder=\"{SPEECH_SUBFOLDER}\"))`. See {RECORD_FILE}.\n")
        write_student_hashes(tmp)
    return {**record, "path": str(out)}

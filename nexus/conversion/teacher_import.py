"""`nexus import SRC OUT`: turn one teacher checkpoint into a one-tower Nexus checkpoint, losslessly.

The teacher (an HF folder of safetensors, or a .gguf) is loaded in fp32, its config mapped to a Nexus tower spec by its
registered family, its weights renamed, and the result saved with the modeling files and the teacher's tokenizer.
Nothing is written at OUT unless the whole import succeeds.
"""

from pathlib import Path

import torch

from ..modeling_nexus import NexusConfig, NexusForCausalLM
from .atomic_output import atomic_dir, check_output_vs_sources
from .load_check import checked_load_state_dict
from .teacher_families import family_for, nexus_config_kwargs, nexus_state_dict
from .ctranslate2_whisper import write_whisper_folder
from .teacher_source import check_teacher_source, load_teacher


def nexus_from_teacher(teacher, name="teacher", capabilities=()):
    """A NexusForCausalLM holding exactly the weights of the HF decoder ``teacher`` (same dtype)."""
    family_for(teacher.config)  # fail early, naming the supported families
    config = NexusConfig(**nexus_config_kwargs(teacher.config, name=name, capabilities=capabilities))
    dtype = next(teacher.parameters()).dtype
    model = NexusForCausalLM(config).to(dtype)
    state = nexus_state_dict(teacher.config, teacher.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    source = getattr(teacher.config, "_name_or_path", None) or "(in memory)"
    checked_load_state_dict(model, state, f"{source} (mapped to Nexus names)", what="teacher",
                            allow_missing=("lm_head.weight",) if config.tie_word_embeddings else ())
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model


def import_teacher(src, out, allow_pickle=False, trust_remote_code=False, name=None, overwrite=False,
                   cache_root=None, on_note=None):
    """Write a one-tower Nexus checkpoint for the teacher at ``src`` into ``out``; returns ``out``.

    Unless ``trust_remote_code``, remote-code references in the teacher's tokenizer files (``auto_map``) are not
    carried into ``out`` (`tokenizer_remote_code.strip_remote_code`); ``on_note(text)`` is told each removal."""
    src, out = Path(src), Path(out)
    sources = {"teacher": src}
    check_output_vs_sources(out, sources)  # before loading anything: `import T T --overwrite` would replace T
    if check_teacher_source(src, allow_pickle) == "ctranslate2":  # a speech teacher: an HF Whisper folder, not a tower
        return write_whisper_folder(src, out, overwrite=overwrite)
    teacher, tokenizer = load_teacher(src, dtype=torch.float32, allow_pickle=allow_pickle,
                                      trust_remote_code=trust_remote_code, cache_root=cache_root)
    model = nexus_from_teacher(teacher, name=name or src.stem)
    model.config.nexus_source = {"path": str(src), "architecture": teacher.config.model_type}
    del teacher
    with atomic_dir(out, overwrite=overwrite, sources=sources) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not trust_remote_code:
            from .tokenizer_remote_code import strip_remote_code

            for note in strip_remote_code(tmp):
                (on_note or print)(note)
    return out

"""A saved Nexus checkpoint folder as an export source: checked before anything loads, then loaded with the project's
own modeling code (never the folder's copied python files, never pickle).
"""

import json
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a tokenizer may consist of; whichever are present travel with an export.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def check_nexus_checkpoint(src):
    """Return the parsed ``config.json`` of the Nexus checkpoint at ``src``, or raise a ValueError naming the problem."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    if not src.is_dir():
        raise ValueError(f"checkpoint {src} is a file; give the folder written by save_pretrained")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ValueError(f"checkpoint folder {src} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if config.get("model_type") != "nexus":
        raise ValueError(f"{config_path}: model_type is {config.get('model_type')!r}, not 'nexus' "
                         "(export takes a Nexus checkpoint; `nexus import` makes one from a teacher)")
    if not any(src.glob("*.safetensors")):
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
        detail = f" (only pickle weights: {', '.join(pickles)}; refused)" if pickles else ""
        raise ValueError(f"checkpoint folder {src} has no *.safetensors weights{detail}")
    return config


def load_nexus_checkpoint(src, dtype="auto"):
    """The NexusForCausalLM saved at ``src`` (eval mode), built from the installed project code."""
    from ..conversion.load_check import checked_from_pretrained
    from ..modeling_nexus import NexusForCausalLM

    check_nexus_checkpoint(src)
    model = checked_from_pretrained(NexusForCausalLM, Path(src), what="checkpoint", dtype=dtype, use_safetensors=True)
    return model.eval()


def tokenizer_files(folder):
    """The tokenizer files present in ``folder`` (names from TOKENIZER_FILES)."""
    folder = Path(folder)
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]

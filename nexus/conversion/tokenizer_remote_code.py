"""Remote-code references in a tokenizer's files, removed from what NEXUS writes unless remote code is trusted.

A teacher's ``tokenizer_config.json`` may carry ``auto_map`` (``{"AutoTokenizer": ["tokenization_x.XTokenizer",
...]}``). Loaded without ``trust_remote_code`` transformers ignores it, but ``save_pretrained`` copies it into the
output, and the output's ``AutoTokenizer.from_pretrained(out, trust_remote_code=True)`` (as the README says to load a
Nexus checkpoint) then fails on a ``tokenization_x.py`` that was never copied, or runs code nobody vetted.
`strip_remote_code(folder)` removes ``auto_map`` from the tokenizer/processor JSON files in ``folder`` and points a
``tokenizer_class`` that transformers does not define at the generic class, returning one note per change.
"""

import json
from pathlib import Path

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                   "preprocessor_config.json", "feature_extractor_config.json")
GENERIC_CLASS = "PreTrainedTokenizerFast"


def _known_class(name) -> bool:
    import transformers

    return isinstance(name, str) and (hasattr(transformers, name) or hasattr(transformers, f"{name}Fast"))


def strip_remote_code(folder) -> list[str]:
    """Remove remote-code references from the tokenizer files in ``folder`` (rewritten in place); the notes say
    what was removed from which file."""
    notes = []
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            continue
        changed = []
        if "auto_map" in data:
            changed.append(f"auto_map {json.dumps(data.pop('auto_map'))}")
        cls = data.get("tokenizer_class")
        if cls is not None and not _known_class(cls) and (Path(folder) / "tokenizer.json").is_file():
            data["tokenizer_class"] = GENERIC_CLASS
            changed.append(f"tokenizer_class {cls!r} (now {GENERIC_CLASS!r})")
        if changed:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            notes.append(f"removed remote code from {name}: {'; '.join(changed)} (pass --trust-remote-code to keep "
                         "it)")
    return notes

"""`nexus export`: a self-contained Nexus checkpoint folder, ready for the Hub.

From a checkpoint written by ``NexusForCausalLM.save_pretrained`` this writes, all at once (nothing at ``out``
unless the whole export succeeds):

- ``model.safetensors`` (never pickle) and ``config.json`` with ``auto_map``;
- the modeling files (``modeling_nexus.py``, ``configuration_nexus.py``, ``registry.py``), copied from the installed
  project by ``save_pretrained``, so ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` works in
  a process that cannot import NEXUS;
- the tokenizer files and ``generation_config.json``;
- ``model_card.md`` and the same text as ``README.md`` (the file the Hub shows): the card at ``card`` if given,
  else the source's own ``model_card.md``, else a minimal card rendered from the config and ``card_info``; its
  usage snippet loads ``out`` as given (or ``repo_id``), and absolute local paths are made relative (``card_paths.py``).

The full card, with retention numbers from the validation report, is rendered by the report code; this file only
places it. ``verify=True`` loads the result in a fresh project-free process before it is moved into place.

Example::

    from nexus.hub.export import export_checkpoint
    export_checkpoint("runs/demo/student", "out/nexus-demo", card="runs/demo/validate/model_card.md")
"""

import shutil
from pathlib import Path

import torch

from ..conversion.atomic_output import atomic_dir, check_output_vs_sources
from .card_paths import card_with_paths, load_path_for
from .nexus_checkpoint import (
    check_nexus_checkpoint,
    load_nexus_checkpoint,
    tokenizer_files,
)

CARD_NAMES = ("model_card.md", "README.md")
MODELING_FILES = ("modeling_nexus.py", "configuration_nexus.py", "registry.py")


def render_minimal_card(model, info=None, repo_id=None):
    """A short model card from the model's config and ``info`` (a dict; every value printed as given)."""
    info = dict(info or {})
    config = model.config
    name = info.pop("name", None) or repo_id or "NEXUS student"
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    rows = []
    for i, (spec, tower) in enumerate(zip(config.towers, model.model.towers)):
        n = sum(p.numel() for p in tower.parameters())
        caps = ", ".join(spec.get("capabilities") or []) or "-"
        layers = len(spec.get("layers", []))
        rows.append(f"| {i} | {tower.name} | {caps} | {layers} | {n:,} |")
    extra = "\n".join(f"- **{k}**: {v}" for k, v in info.items())
    repo = repo_id or "PATH_OR_REPO_ID"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [nexus, niwt, custom_code]
---

# {name}

A NEXUS model: {len(config.towers)} tower(s) behind a router, {total:,} parameters.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

Force a tower with `tower=...` or `capability="..."` in `forward` / `generate`; by default the router picks one
tower per sequence and only that tower runs.

## Towers

| tower | name | capabilities | layers | parameters |
|---|---|---|---|---|
{chr(10).join(rows)}
{chr(10) + "## Details" + chr(10) + chr(10) + extra + chr(10) if extra else ""}"""


def _card_text(src, model, card, card_info, repo_id):
    if card is not None:
        card = Path(card)
        if not card.is_file():
            raise FileNotFoundError(f"model card {card} does not exist")
        return card.read_text()
    for name in CARD_NAMES:
        if (Path(src) / name).is_file():
            return (Path(src) / name).read_text()
    return render_minimal_card(model, card_info, repo_id)


def export_checkpoint(src, out, card=None, card_info=None, tokenizer_src=None, repo_id=None, overwrite=False,
                      verify=False):
    """Write the self-contained export of the Nexus checkpoint at ``src`` into ``out``; returns a summary dict.

    ``tokenizer_src``: a folder to take the tokenizer from when ``src`` has none (a missing tokenizer is an error).
    ``verify``: load the finished folder in a fresh project-free process and compare its logits with ``src``'s
    before moving it into place; the summary then holds ``max_abs_logit_diff``.
    """
    src, out = Path(src), Path(out)
    check_nexus_checkpoint(src)
    sources = {"checkpoint": src, "tokenizer": tokenizer_src, "model card": card}
    check_output_vs_sources(out, sources)  # an output that is, holds or sits in a source would delete it
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass overwrite")
    tok_files = tokenizer_files(tokenizer_src or src)
    if not tok_files:
        raise FileNotFoundError(f"no tokenizer in {tokenizer_src or src}: expected tokenizer.json or "
                                "tokenizer.model (pass a tokenizer folder with tokenizer_src / --tokenizer)")
    model = load_nexus_checkpoint(src)
    text = card_with_paths(_card_text(src, model, card, card_info, repo_id), load_path_for(out, repo_id))
    summary = {"path": str(out), "source": str(src), "towers": len(model.config.towers)}
    with atomic_dir(out, overwrite=overwrite, sources=sources) as tmp:
        model.save_pretrained(tmp)  # safetensors + config with auto_map + copied modeling files
        for path in tok_files:
            shutil.copy2(path, tmp / path.name)
        for name in CARD_NAMES:
            (tmp / name).write_text(text)
        missing = [n for n in MODELING_FILES if not (tmp / n).is_file()]
        if missing:
            raise RuntimeError(f"save_pretrained did not copy the modeling files {missing}")
        from ..conversion.student_hashes import write_student_hashes

        write_student_hashes(tmp)  # per-tensor sha256: add-teacher refuses a modified folder
        if verify:
            from .fresh_load import fresh_process_logits

            ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                expected = model(ids).logits.float()
            logits, module = fresh_process_logits(tmp, ids, trust_remote_code=True)
            summary["max_abs_logit_diff"] = (logits - expected).abs().max().item()
            summary["loaded_as"] = module
        summary["files"] = sorted(p.name for p in tmp.iterdir())
    return summary

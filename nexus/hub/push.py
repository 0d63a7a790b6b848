"""`nexus push FOLDER REPO_ID`: check an exported folder, then upload it to the Hugging Face Hub.

Checks before any network call, each failure naming the file: the folder holds ``*.safetensors`` weights and no
pickle file (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``), a ``config.json``, and a model card (``README.md``,
which the Hub shows, or ``model_card.md``, which is then uploaded as ``README.md`` too); a Nexus config
(``model_type: nexus``) also needs ``auto_map`` and the modeling files it points to. A standard export (Llama,
Gemma-3 ...) needs no ``auto_map``.

Real use (needs network and a token with write access, from ``huggingface-cli login`` or ``HF_TOKEN``)::

    nexus export runs/demo/student out/nexus-demo
    nexus push out/nexus-demo my-user/nexus-demo            # creates the repo if needed, then uploads
    nexus push out/nexus-demo my-user/nexus-demo --private

Before the real upload, `check_hub_access` (``hub_access.py``) checks for a token and reaches the Hub, so being
offline or logged out is one line (exit 2), not a traceback. The upload is ``HfApi().create_repo(repo_id,
exist_ok=True, private=...)`` then ``HfApi().upload_folder(...)``; ``push_folder(..., api=...)`` takes any object
with those two methods, which is how the tests run it offline.
"""

import json
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CARD_NAMES = ("README.md", "model_card.md")


def validate_push_folder(folder):
    """Return the parsed config of a folder fit to push, or raise a ValueError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickles = sorted(str(p.relative_to(folder)) for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder} holds pickle file(s) {', '.join(pickles)}; only safetensors are pushed")
    if not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(f"{folder} has no *.safetensors weights")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if config.get("model_type") == "nexus":
        auto_map = config.get("auto_map") or {}
        if "AutoModelForCausalLM" not in auto_map:
            raise ValueError(f"{config_path} has no auto_map.AutoModelForCausalLM; a Nexus checkpoint needs it to "
                             "load with trust_remote_code (write the folder with `nexus export`)")
        for target in auto_map.values():
            module = str(target).split("--")[-1].rsplit(".", 1)[0]
            if not (folder / f"{module}.py").is_file():
                raise ValueError(f"{config_path}: auto_map points to {module}.py, which is not in {folder}")
    if not any((folder / name).is_file() for name in CARD_NAMES):
        raise ValueError(f"{folder} has no model card (README.md or model_card.md)")
    return config


def push_folder(folder, repo_id, private=False, commit_message="Upload NEXUS export", api=None, revision=None):
    """Validate ``folder`` and upload it to ``repo_id``; returns whatever ``api.upload_folder`` returns."""
    folder = Path(folder)
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    validate_push_folder(folder)
    if api is None:  # the real Hub: a token and the network first, each failure one line (hub_access.py)
        from huggingface_hub import HfApi

        from .hub_access import check_hub_access

        check_hub_access()
        api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    if not (folder / "README.md").is_file():  # the Hub shows README.md; upload the card under that name too
        api.upload_file(path_or_fileobj=str(folder / "model_card.md"), path_in_repo="README.md", repo_id=repo_id,
                        repo_type="model", revision=revision, commit_message=commit_message)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                             commit_message=commit_message, allow_patterns=None,
                             ignore_patterns=[f"*{s}" for s in PICKLE_SUFFIXES])

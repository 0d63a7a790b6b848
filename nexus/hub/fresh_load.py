"""Load an exported folder in a fresh python process that cannot import this project, and return its logits.

This is the proof that an export is self-contained: the child strips the repository from ``sys.path``, blocks the
installed ``nexus`` package, checks that no project module imports, then loads the folder with plain
``AutoModelForCausalLM.from_pretrained`` (remote code only when asked) in a fresh dynamic-module cache, offline.
"""

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[2]  # nexus/hub/fresh_load.py -> the repository

GUARD = textwrap.dedent(  # a child's first lines: no project module can be imported after them
    """
    import sys
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith({repo!r})]
    sys.modules["nexus"] = None  # the installed (editable) package is blocked: import nexus raises ImportError
    for name in ("nexus", "modeling_nexus", "conversion", "hub"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"project module {{name}} is importable in the child")
    """
)
CHILD = GUARD + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code={remote!r}, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(load_file({io!r})["ids"]).logits
    save_file({{"logits": logits.contiguous()}}, {io!r})
    print("NEXUS_CHILD_MODULE", type(model).__module__)
    """
)


def fresh_process_logits(folder, ids, trust_remote_code=False, timeout=600):
    """``(logits, module_name)`` of the model at ``folder`` on ``ids`` (B, T), computed in a project-free child."""
    with tempfile.TemporaryDirectory(prefix="nexus-fresh-") as tmp:
        tmp = Path(tmp)
        io = tmp / "io.safetensors"
        save_file({"ids": ids.contiguous()}, io)
        script = CHILD.format(repo=str(REPO_ROOT), folder=str(Path(folder).resolve()), io=str(io),
                              remote=bool(trust_remote_code))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_MODULES_CACHE=str(tmp / "hf_modules"), HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{folder} does not load in a fresh process:\n{done.stderr[-3000:]}")
        module = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("NEXUS_CHILD_MODULE")][-1]
        return load_file(io)["logits"].to(torch.float32), module


TRANSCRIBE_CHILD = GUARD + textwrap.dedent(
    """
    import json
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor
    model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained({folder!r}, subfolder={subfolder!r})
    tok = AutoTokenizer.from_pretrained({folder!r}, subfolder={subfolder!r}, trust_remote_code=True)
    texts = [model.transcribe(path, fe, tok, max_new_tokens={max_new_tokens!r}) for path in {wavs!r}]
    print("NEXUS_CHILD_TEXTS", json.dumps(texts))
    print("NEXUS_CHILD_MODULE", type(model).__module__)
    """
)


def fresh_process_transcripts(folder, wavs, max_new_tokens=64, timeout=900, subfolder=""):
    """``(transcripts, module_name)``: a speech checkpoint at ``folder`` transcribing ``wavs`` with
    ``model.transcribe`` in a project-free child, remote code on. The feature extractor and tokenizer are read from
    ``folder`` / ``subfolder`` (``"speech"`` in a text + speech checkpoint, `speech_attach`)."""
    import json

    with tempfile.TemporaryDirectory(prefix="nexus-fresh-") as tmp:
        script = TRANSCRIBE_CHILD.format(repo=str(REPO_ROOT), folder=str(Path(folder).resolve()),
                                         wavs=[str(Path(w).resolve()) for w in wavs], max_new_tokens=max_new_tokens,
                                         subfolder=subfolder)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_MODULES_CACHE=str(Path(tmp) / "hf_modules"), HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{folder} does not transcribe in a fresh process:\n{done.stderr[-3000:]}")
        lines = done.stdout.splitlines()
        texts = json.loads([line for line in lines if line.startswith("NEXUS_CHILD_TEXTS")][-1].split(" ", 1)[1])
        module = [line.split()[1] for line in lines if line.startswith("NEXUS_CHILD_MODULE")][-1]
        return texts, module

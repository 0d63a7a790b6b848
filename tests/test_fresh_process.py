"""A saved Nexus checkpoint is self-contained: it loads in a process that cannot import the project at all."""

import os
import subprocess
import sys
import textwrap

import torch
from conftest import tiny_teacher
from safetensors.torch import save_file

from nexus.conversion.teacher_import import nexus_from_teacher

CHILD = textwrap.dedent(
    """
    import sys
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith({repo!r})]
    sys.modules["nexus"] = None  # the installed (editable) package is blocked: import nexus raises ImportError
    for name in ("nexus", "modeling_nexus", "conversion"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"project module {{name}} is importable in the child")
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained({ckpt!r}, trust_remote_code=True, dtype=torch.float32).eval()
    data = load_file({io!r})
    with torch.no_grad():
        logits = model(data["ids"]).logits
    diff = (logits - data["logits"]).abs().max().item()
    print("NEXUS_CHILD", type(model).__module__, diff)
    """
)


def test_checkpoint_loads_without_the_project(tmp_path):
    model = nexus_from_teacher(tiny_teacher("gemma3"))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    files = sorted(p.name for p in ckpt.iterdir())
    assert "modeling_nexus.py" in files and "configuration_nexus.py" in files and "registry.py" in files
    assert not any(name.endswith((".bin", ".pt")) for name in files)

    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"ids": ids, "logits": logits.contiguous()}, tmp_path / "io.safetensors")

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = CHILD.format(repo=repo, ckpt=str(ckpt), io=str(tmp_path / "io.safetensors"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")  # a fresh dynamic-module cache
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("NEXUS_CHILD")][-1]
    _, module, diff = line.split()
    assert module.startswith("transformers_modules"), module  # loaded from the checkpoint's copied files
    assert float(diff) <= 1e-5

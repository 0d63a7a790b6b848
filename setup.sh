#!/usr/bin/env bash
# Install NEXUS and everything it needs on a fresh machine (CPU; Python 3.10+ with pip).
# torch is installed first, the CPU wheel, so no requirement below pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet --upgrade pip
# torch from PyTorch's CPU index, added to pip's own (--extra-index-url, so a local index or wheel folder still serves it
# offline); "+cpu" picks the CPU wheel, and where there is none (macOS: its wheels have no CUDA) the plain release.
torch_cpu_index=https://download.pytorch.org/whl/cpu
# torch alone (--no-deps) looks at that index, with one retry: offline, each package looked up there would otherwise
# cost pip's five retries. Its dependencies then come from pip's own index.
if ! python -m pip install --quiet --no-deps --retries 1 --timeout 20 "torch==2.13.0+cpu" --extra-index-url "$torch_cpu_index"; then
  echo "no torch 2.13.0+cpu wheel for this platform; installing torch==2.13.0 from $torch_cpu_index or pip's index"
  python -m pip install --quiet --no-deps --retries 1 --timeout 20 "torch==2.13.0" --extra-index-url "$torch_cpu_index"
fi
# torch's dependencies, for the wheel just installed (read from its metadata: torch cannot be imported before them)
python -m pip install --quiet "torch==$(python -c 'import importlib.metadata as m; print(m.version("torch"))')"
python -c "import torch; print(f'torch {torch.__version__}: the CPU wheel is installed' if torch.version.cuda is None else f'torch {torch.__version__}: a CUDA {torch.version.cuda} build is installed, not the CPU wheel')"
python -m pip install --quiet -e ".[test]"
# The newest transformers the requirement allows, even where an older one is already installed: a stale environment
# once hid a broken generate(). The range is read from pyproject.toml, so it is written in one place.
transformers_req=$(python -c "import re; print(re.search(r'\"(transformers[^\"]*)\"', open('pyproject.toml').read()).group(1))")
python -m pip install --quiet --upgrade "$transformers_req"
# espeak-ng speaks the clips of the speech encoder's tests and bench (issue 21). Optional: without apt-get or root it is
# skipped with a message, and the tests that need it skip with a reason.
if command -v espeak-ng >/dev/null 2>&1; then
    :
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get install -y -qq espeak-ng >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq espeak-ng >/dev/null 2>&1; } \
        || echo "setup.sh: apt-get could not install espeak-ng; the speech tests that need it will skip" >&2
else
    echo "setup.sh: espeak-ng is not installed and apt-get as root is unavailable (run 'apt-get install -y espeak-ng' as root); the speech tests that need it will skip" >&2
fi
python -c "import torch, transformers, nexus; print(f'nexus ready: torch {torch.__version__}, transformers {transformers.__version__}')"

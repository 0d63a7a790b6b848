#!/usr/bin/env bash
# Install NEXUS and everything it needs on a fresh machine (CPU; Python 3.10+ with pip).
# torch is installed first, pinned to the CPU wheel, so no requirement below pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# The newest transformers the requirement allows, even where an older one is already installed: a stale environment
# once hid a broken generate(). The range is read from pyproject.toml, so it is written in one place.
transformers_req=$(python -c "import re; print(re.search(r'\"(transformers[^\"]*)\"', open('pyproject.toml').read()).group(1))")
python -m pip install --quiet --upgrade "$transformers_req"
python -c "import torch, transformers, nexus; print(f'nexus ready: torch {torch.__version__}, transformers {transformers.__version__}')"

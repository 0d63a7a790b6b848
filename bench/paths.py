"""Where the benches write, defined once.

- ``RESULTS`` (``bench/results/``): each bench's small result JSON, committed next to ``bench/RESULTS.md``
  (multi-file results in subfolders, e.g. ``compare/``, ``compare-gemma/``);
- ``ARTEFACTS`` (``bench/out/``, git-ignored): checkpoints, teacher caches, run folders, bf16 copies, scratch.

A bench imports it with its own folder on ``sys.path`` (``python bench/X.py`` puts it there; a script that may be
loaded another way, e.g. by a test through ``importlib``, inserts it itself)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paths import ARTEFACTS, RESULTS
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ARTEFACTS = HERE / "out"

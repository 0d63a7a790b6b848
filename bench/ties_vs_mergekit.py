"""NEXUS's TIES merge (`nexus/conversion/ties_merge.py`) against mergekit's own code, tensor by tensor.

mergekit is not a NEXUS dependency (it pins its own transformers and accelerate), so this bench downloads its wheel
from PyPI without dependencies (``pip download --no-deps mergekit``), unpacks it into a temporary folder and imports
its TIES parts (``mergekit.sparsify.magnitude``, ``generalized_task_arithmetic.get_mask``) from there. On random base
tensors and task vectors (three models, unequal weights, densities 0.2 to 1) it composes mergekit's ``ties`` merge
exactly as ``GeneralizedTaskArithmeticMerge.merge_group`` does and compares it with ``ties_tensor``.

    python bench/ties_vs_mergekit.py          # writes bench/results/ties_vs_mergekit.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import RESULTS  # noqa: E402


def mergekit_ties(base, others, density, weights, magnitude, get_mask):
    """mergekit's ``ties`` (sparsification ``magnitude``, consensus ``sum``, ``normalize: true``, lambda 1)."""
    deltas = torch.stack([magnitude(o - base, density) for o in others])
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * base.dim()))
    deltas = deltas * w
    mask = get_mask(deltas, method="sum")
    mixed = (deltas * mask).sum(0)
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    return base + mixed / divisor


def main(argv=None):
    from nexus.conversion.ties_merge import ties_tensor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS / "ties_vs_mergekit.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "mergekit", "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("mergekit-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(Path(tmp) / "unpacked")
        sys.path.insert(0, str(Path(tmp) / "unpacked"))
        from mergekit.merge_methods.generalized_task_arithmetic import get_mask
        from mergekit.sparsify import magnitude

        cases, worst = [], 0.0
        for seed in range(args.cases):
            g = torch.Generator().manual_seed(seed)
            shape = (int(torch.randint(1, 97, (1,), generator=g)), int(torch.randint(1, 97, (1,), generator=g)))
            base = torch.randn(shape, generator=g)
            others = [base + torch.randn(shape, generator=g) * (0.1 + i) for i in range(3)]
            weights = [1.0, 0.5, 2.0]
            density = [0.2, 0.5, 0.7, 1.0][seed % 4]
            ref = mergekit_ties(base, others, density, weights, magnitude, get_mask)
            got = ties_tensor(base, others, density, weights)
            diff = float((ref - got).abs().max())
            worst = max(worst, diff)
            cases.append({"seed": seed, "shape": list(shape), "density": density, "max_abs_diff": diff})
    record = {"mergekit_wheel": wheel.name, "cases": len(cases), "max_abs_diff": worst, "per_case": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"{wheel.name}: {len(cases)} random cases, max |mergekit - nexus| = {worst:.3g}; wrote {args.out}")


if __name__ == "__main__":
    main()

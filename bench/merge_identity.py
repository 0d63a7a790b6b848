"""Are two merged teachers the same model? Tensor by tensor, the largest absolute difference between merge folders.

    python bench/merge_identity.py            # the OT and the linear merge of the gemma pair (bench/align_real.py)

On Gemma-3-270M + its code fine-tune OT moves no unit (identity is already the optimal matching), so the OT merge
should be the plain average exactly. If so, the align_linear student of ``compare_methods.py --scale gemma-pair`` is
the align_ot student (the student build and distillation are deterministic functions of the merged teacher), and a
run of it would only repeat one. Writes ``bench/results/align_merge_identity.json``: per compared pair, the tensors,
the ones that differ, the largest absolute difference and whether the folders are identical. Asserts nothing.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import ARTEFACTS, RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402

PAIRS = {  # name: (folder a, folder b), the merges bench/align_real.py and compare_methods.py wrote
    "ot vs linear (align_real)": (ARTEFACTS / "runs/gemma_pair/align-ot/merged-0",
                                  ARTEFACTS / "runs/gemma_pair/align-linear/merged-0"),
    "ot (align_real) vs ot (the align_ot student's)": (
        ARTEFACTS / "runs/gemma_pair/align-ot/merged-0",
        ARTEFACTS / "compare-runs/gemma-pair/compare/variants/align_ot/align/merged-0"),
}


def tensors(folder: Path) -> dict:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no safetensors files (run bench/align_real.py and the align_ot variant first)")
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def compare(a: Path, b: Path) -> dict:
    ta, tb = tensors(a), tensors(b)
    shared = sorted(set(ta) & set(tb))
    diffs = {k: float((ta[k].float() - tb[k].float()).abs().max()) if ta[k].shape == tb[k].shape else float("inf")
             for k in shared}
    differing = [k for k, d in diffs.items() if d != 0.0]
    only = sorted(set(ta) ^ set(tb))
    return {"a": str(a.relative_to(ARTEFACTS.parent)), "b": str(b.relative_to(ARTEFACTS.parent)),
            "tensors": len(shared), "only_in_one": only, "differing_tensors": len(differing),
            "max_abs_diff": max(diffs.values(), default=0.0), "identical": not differing and not only}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "align_merge_identity.json")
    args = parser.parse_args(argv)
    result = {"pairs": {}}
    for name, (a, b) in PAIRS.items():
        r = compare(a, b)
        result["pairs"][name] = r
        print(f"{name}: {r['tensors']} tensors, {r['differing_tensors']} differ, max |a - b| = {r['max_abs_diff']:g}"
              f"{', identical' if r['identical'] else ''}")
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

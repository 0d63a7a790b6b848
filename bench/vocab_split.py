"""How much a trimmed base vocabulary splits held-out text: tokens per held-out text under the base teacher's own
tokenizer vs the student's trimmed one, for several ``keep_top_tokens`` and both ``keep_top_by`` rankings.

    python bench/vocab_split.py --recipe bench/recipes/size_sweep.yaml --keep 0 16000 40000

The trim keeps what the recipe's capabilities' training text uses (+ specials, byte fallback, merge paths) plus
``keep`` more ordinary tokens: the first by id, or those the base teacher gives the most next-token mass on the
training text (`nexus.conversion.token_mass`, the student build's default, over ``--positions`` positions per
capability). Held-out text: the bundled prose and code held-out files and Debian's license texts (held out from every
training source, as in the size sweep). Writes ``bench/results/vocab_split.json``.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paths import RESULTS  # noqa: E402

from nexus.conversion.atomic_output import atomic_file  # noqa: E402
from heldout_text import DEFAULT_TEXT, license_text  # noqa: E402

from nexus.conversion.base_vocabulary import extra_token_mass, trimmed_base_tokenizer  # noqa: E402
from nexus.conversion.recipe import load_recipe  # noqa: E402
from nexus.conversion.stage_memory import teacher_footprint  # noqa: E402
from nexus.conversion.student_build import student_training_texts  # noqa: E402
from nexus.conversion.teacher_source import load_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "nexus" / "conversion" / "data"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--teacher", default=None, help="the base teacher's name (default: the recipe's first)")
    parser.add_argument("--keep", type=int, nargs="+", default=[0, 16000, 40000])
    parser.add_argument("--positions", type=int, default=4096, help="teacher_mass: positions per capability")
    parser.add_argument("--out", default=str(RESULTS / "vocab_split.json"))
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    spec = recipe.teacher(args.teacher) if args.teacher else recipe.teachers[0]
    folder = teacher_footprint(recipe, spec)["folder"]
    base = load_tokenizer(folder)
    texts = student_training_texts(recipe)
    held = {c: (DATA / f"{c}_heldout.txt").read_text() for c in ("prose", "code")}
    held["general_text"] = license_text(Path(DEFAULT_TEXT), 400_000)
    own = {c: len(base(x)["input_ids"]) for c, x in held.items()}
    mass, mass_record = extra_token_mass(folder, base, texts, args.positions)
    print(f"teacher mass over {args.positions} positions per capability: {mass_record['seconds']} s", flush=True)
    rows = []
    for by in ("id", "teacher_mass"):
        for keep in args.keep:
            if keep == 0 and by != "id":
                continue  # nothing extra to rank
            trimmed, _ = trimmed_base_tokenizer(base, texts, True, keep, mass if by == "teacher_mass" else None)
            ratio = {c: len(trimmed(x)["input_ids"]) / own[c] for c, x in held.items()}
            rows.append({"keep_top_by": by, "keep_top_tokens": keep, "vocab_size": len(trimmed),
                         "tokens_ratio": ratio})
            print(f"keep_top_by {by}, keep_top_tokens {keep}: {len(trimmed):,} tokens; held-out tokens vs "
                  f"{spec.name}'s own tokenizer: " + ", ".join(f"{c} {r:.4f}" for c, r in ratio.items()), flush=True)
    with atomic_file(Path(args.out)) as tmp:
        tmp.write_text(json.dumps({"recipe": str(args.recipe), "teacher": spec.name, "own_tokens": own,
                                   "mass": mass_record, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

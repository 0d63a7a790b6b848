"""Train the specialist teachers (arithmetic, code, prose, reversal) with their real step counts; print competence.

    python bench/train_specialists.py [OUT_ROOT] [--only arithmetic --only code ...] [--threads N]
                                      [--summary bench/results/specialists.json]

Writes ``OUT_ROOT/{arithmetic,code,prose,reversal}`` (default root ``/work/cache/specialists``; a finished folder of the same
recipe is reused, not retrained) and the result JSON ``bench/results/specialists.json`` with every figure printed
here (``--summary``; it keeps the figures of specialists not trained in this run when it is about the same root).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from nexus.conversion.atomic_output import atomic_file
from nexus.training.specialists import SPECIALISTS, load_competence, train_specialist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/paths.py
from paths import RESULTS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_root", nargs="?", default="/work/cache/specialists")
    parser.add_argument("--only", action="append", choices=sorted(SPECIALISTS), help="train only these (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--summary", type=Path, default=RESULTS / "specialists.json", help="the result JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.out_root)
    console = Console(width=180)
    names = args.only or list(SPECIALISTS)
    summary_path = args.summary
    summary = {"root": str(root.resolve()), "specialists": {}}
    if summary_path.is_file():  # keep the figures of specialists not trained in this run (same root only)
        previous = json.loads(summary_path.read_text())
        if previous.get("root") == summary["root"]:
            summary = previous
    summary["threads"] = torch.get_num_threads()
    for name in names:
        started = time.perf_counter()
        folder = train_specialist(name, root / name)
        elapsed = time.perf_counter() - started
        competence = load_competence(folder)
        log = json.loads((folder / "train_log.json").read_text())
        summary["specialists"][name] = {
            "folder": str(folder), "wall_seconds_this_run": elapsed, "threads_this_run": torch.get_num_threads(),
            "competence": competence,
            "train": {k: log.get(k) for k in ("steps", "tokens", "wall_seconds", "cpu_seconds", "tokens_per_second",
                                              "threads", "first_loss", "final_loss", "params", "stopped_early")},
        }
    table = Table(title=f"specialist teachers ({root})")
    for col in ("name", "family / tokenizer", "params", "steps", "train s", "cpu s", "tok/s", "score [95% CI]",
                "baseline", "competent", "this run s"):
        table.add_column(col)
    for name, row in summary["specialists"].items():
        c, t, recipe = row["competence"], row["train"], SPECIALISTS[name]
        metric = "EM" if c["metric"] == "exact_match" else "bpb"
        table.add_row(
            name, f"{recipe.family} / {recipe.tokenizer}", f"{t['params'] / 1e6:.2f}M", str(t["steps"]),
            f"{t['wall_seconds']:.0f}", f"{t['cpu_seconds']:.0f}" if t.get("cpu_seconds") else "-",
            f"{t['tokens_per_second']:.0f}",
            f"{metric} {c['score']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]",
            f"{c['baseline']['score']:.3f}", "yes" if c["competent"] else "NO", f"{row['wall_seconds_this_run']:.0f}",
        )
    console.print(table)
    with atomic_file(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {summary_path}")


if __name__ == "__main__":
    main()

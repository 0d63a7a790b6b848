"""Clips for a real `nexus speech-student` run, from text the repo never trains on (issue 21).

    python bench/speech_clips.py OUT [--count 300] [--voice en-gb] [--speed 150] [--text FILE ...]

Takes plain sentences (5-14 words) from ``--text`` (default: Debian's Apache-2.0, MPL-2.0 and GPL-3 license texts in
/usr/share/common-licenses), speaks each with espeak-ng (the speech bench uses en-us at 160 words/min; the default
here is another voice) into ``OUT/NNNN-<hash>.wav`` and writes its words to ``NAME.txt`` beside it: the reference
transcript `nexus speech-student` scores against.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nexus.conversion.speech_distill import spoken_sentences, synthesize  # noqa: E402

LICENSES = [Path("/usr/share/common-licenses", name) for name in ("Apache-2.0", "MPL-2.0", "GPL-3")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--voice", default="en-gb")
    ap.add_argument("--speed", type=int, default=150)
    ap.add_argument("--text", type=Path, nargs="+", default=LICENSES)
    args = ap.parse_args()
    missing = [str(p) for p in args.text if not p.is_file()]
    if missing:
        ap.error(f"no such text file: {', '.join(missing)}")
    sentences = spoken_sentences("\n".join(p.read_text() for p in args.text), args.count, seed=1)
    if len(sentences) < args.count:
        ap.error(f"the text holds {len(sentences)} usable sentences, fewer than --count {args.count}")
    for wav, sentence in zip(synthesize(sentences, args.out, voice=args.voice, speed=args.speed), sentences):
        wav.with_suffix(".txt").write_text(sentence + "\n")
    print(f"{len(sentences)} clips in {args.out}")


if __name__ == "__main__":
    main()

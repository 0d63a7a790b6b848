#!/usr/bin/env bash
# Issue 7's one command: regenerate bench/RESULTS.md (+ RESULTS_retention.png) from JSON that the benches write
# under bench/results/ (committed; the artefacts they also write stay in bench/out/, not tracked: bench/paths.py).
#   bash bench/make_results.sh            # runs only what has no JSON yet (every step resumes), then renders
#   bash bench/make_results.sh --force    # reruns every measurement
# Measured on a 2-core AVX2 CPU, one thread: compare_methods ~35 min (10 variants), throughput_compare ~9 min,
# inference_speed ~10 min; compare_methods --scale gemma (Gemma-3-270M + the arithmetic specialist, 6 variants) is
# the long one. Needs the bench extras (`pip install -e ".[bench]"`), the Gemma GGUF assembled at
# /work/cache/gemma-3-270m-q4_k_m.gguf and the specialists at /work/cache/specialists (bench/README.md), and the demo
# specialists, which `nexus demo` trains into runs/demo-teachers (set NEXUS_TEACHERS to use another folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
results="$(python -c 'import sys; sys.path.insert(0, "bench"); from paths import RESULTS; print(RESULTS)')"
force=""
if [[ "${1:-}" == "--force" ]]; then force=1; fi
if [[ -n "$force" || ! -f "$results/inference_speed.json" ]]; then
  python bench/inference_speed.py --shapes llama gemma --reps 9 --bf16-reps 5
fi
if [[ -n "$force" || ! -f "$results/throughput_compare.json" ]]; then
  python bench/throughput_compare.py
fi
python bench/compare_methods.py ${force:+--force} --no-progress
python bench/compare_methods.py --scale gemma ${force:+--force} --no-progress
python bench/results.py > /dev/null
echo "wrote bench/RESULTS.md and bench/RESULTS_retention.png"

#!/usr/bin/env bash
# Issue 7's one command: regenerate bench/RESULTS.md (+ RESULTS_retention.png) from JSON that the benches write.
#   bash bench/make_results.sh            # runs only what has no JSON yet (every step resumes), then renders
#   bash bench/make_results.sh --force    # reruns every measurement
# Measured on this 2-core CPU, one thread: compare_methods ~35 min (10 variants), throughput_compare ~9 min,
# inference_speed ~10 min. Needs the bench extras (`pip install -e ".[bench]"`) and the demo specialists, which
# `nexus demo` trains into runs/demo-teachers (set NEXUS_TEACHERS to use another folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
force=""
if [[ "${1:-}" == "--force" ]]; then force=1; fi
if [[ -n "$force" || ! -f bench/out/inference_speed.json ]]; then
  python bench/inference_speed.py --shapes llama gemma --reps 9 --bf16-reps 5
fi
if [[ -n "$force" || ! -f bench/out/throughput_compare.json ]]; then
  python bench/throughput_compare.py
fi
python bench/compare_methods.py ${force:+--force} --no-progress
python bench/results.py > /dev/null
echo "wrote bench/RESULTS.md and bench/RESULTS_retention.png"

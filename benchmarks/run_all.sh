#!/usr/bin/env bash
# Run every benchmark script in benchmarks/ in one mode, each under its share of a total budget.
#
#   benchmarks/run_all.sh --cpu    # CPU mode: under 20 minutes on 2 cores
#   benchmarks/run_all.sh --gpu    # GPU mode: about 9 minutes on one H100
#
# Each script gets `--device cpu|cuda` and writes JSON/CSV/PNG into benchmarks/results/. Scripts
# not written yet are skipped with a message; a script that fails or overruns its share is
# reported and the others still run; the exit status is non-zero if any failed.
# PYTHON selects the interpreter (default: python on PATH).
set -uo pipefail

PYTHON=${PYTHON:-python}
case "${1:-}" in
  --cpu) device=cpu
         # Seconds per script; 600 + 120 + 90 + 330 = 19 minutes at most. The generator's
         # compiled recipes each take 1-3 minutes of compile warm-up on 2 shared cores.
         declare -A budget=([generator]=600 [trainer]=120 [transport]=90 [hybrid]=330) ;;
  --gpu) device=cuda
         # 330 + 90 + 40 + 100 = 9.3 minutes at most on one H100.
         declare -A budget=([generator]=330 [trainer]=90 [transport]=40 [hybrid]=100) ;;
  *) echo "usage: $0 --cpu | --gpu" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
failed=()
start=$SECONDS
for name in generator trainer transport hybrid; do
  script="benchmarks/$name.py"
  if [[ ! -f "$script" ]]; then
    echo "== $name: $script does not exist yet, skipped"
    continue
  fi
  echo "== $name ($device, at most ${budget[$name]} s)"
  t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "${budget[$name]}" "$PYTHON" "$script" --device "$device"
  status=$?
  if [[ $status -eq 124 ]]; then
    echo "== $name: over its ${budget[$name]} s budget, stopped" >&2
    failed+=("$name")
  elif [[ $status -ne 0 ]]; then
    echo "== $name: failed with exit status $status" >&2
    failed+=("$name")
  else
    echo "== $name: done in $((SECONDS - t0)) s"
  fi
done

echo "== all benchmarks: $((SECONDS - start)) s; results in benchmarks/results/"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "== failed: ${failed[*]}" >&2
  exit 1
fi

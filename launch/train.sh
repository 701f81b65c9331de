#!/usr/bin/env bash
# Launch a training job with the deepspeed launcher.
#
#   launch/train.sh [--config NAME_OR_PATH] [key=value ...]
#
# GPUs are detected (NUM_GPUS overrides); with none, the CPU demo runs (default config cpu_demo,
# one rank per trainer/generator of the config, NUM_PROCS overrides). Multi-node: set HOSTFILE
# (MPI style: "node-0 slots=8"); MASTER_ADDR and MASTER_PORT are taken from the environment.
# The default config is sd15_vitb16 on GPUs and cpu_demo on the CPU.
set -euo pipefail

PYTHON=${PYTHON:-python}
config=""
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --config=*) config="${1#*=}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done

gpus=${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
if [[ "$gpus" -gt 0 ]]; then
  config=${config:-sd15_vitb16}
else
  config=${config:-cpu_demo}
fi

# Validate the config and its inputs (corpus, folders, layout) before any process starts: bad
# input ends here with exit code 2. Prints the ranks one CPU node needs, then output_dir.
world_arg=0
if [[ -z "${HOSTFILE:-}" && "$gpus" -gt 0 ]]; then world_arg=$gpus; fi
if [[ -z "${HOSTFILE:-}" && "$gpus" -eq 0 && -n "${NUM_PROCS:-}" ]]; then world_arg=$NUM_PROCS; fi
info=$("$PYTHON" -m online_stablerep.commands.ranks --world "$world_arg" --config "$config" ${overrides[@]+"${overrides[@]}"})
cpu_ranks=${info%%$'\n'*}
output_dir=${info#*$'\n'}

launcher=(deepspeed --no_local_rank --master_port "${MASTER_PORT:-29500}")
if [[ -n "${MASTER_ADDR:-}" ]]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
world=0
if [[ -n "${HOSTFILE:-}" ]]; then
  launcher+=(--hostfile "$HOSTFILE")
  if [[ -n "${NUM_GPUS:-}" ]]; then launcher+=(--num_gpus "$NUM_GPUS"); fi
  world=$(awk '/slots=/{split($2, a, "="); n += a[2]} END {print n + 0}' "$HOSTFILE")
elif [[ "$gpus" -gt 0 ]]; then
  launcher+=(--num_gpus "$gpus")
  world=$gpus
else
  # One process per rank; each pins itself to its own share of the cores (no numactl needed).
  world=${NUM_PROCS:-$cpu_ranks}
  launcher+=(--num_gpus "$world")
  export ONLINE_STABLEREP_PIN_CORES=1
fi

# The launcher and every rank run in their own process group: SIGTERM or SIGINT to this script
# (a pod stop, `kill $pid`, a scheduler's preemption, Ctrl-C) goes to all of them. Ranks stop at
# their next step (trainers save a checkpoint first); after STOP_GRACE_S seconds whatever is left
# is killed.
rm -rf "$output_dir/ranks"
setsid "${launcher[@]}" --module online_stablerep.cli train --config "$config" ${overrides[@]+"${overrides[@]}"} &
job=$!
killer=""
forward() {
  trap '' TERM INT
  kill -TERM -- "-$job" 2>/dev/null || true
  (sleep "${STOP_GRACE_S:-60}"; kill -KILL -- "-$job" 2>/dev/null) &
  killer=$!
}
trap forward TERM INT
set +e
while true; do
  wait "$job"
  code=$?
  if ! kill -0 "$job" 2>/dev/null; then
    wait "$job"
    code=$?
    break
  fi
done
# The launcher may exit before its ranks (it dies on SIGTERM on one node): wait for the group.
while kill -0 -- "-$job" 2>/dev/null; do sleep 0.5; done
if [[ -n "$killer" ]]; then kill "$killer" 2>/dev/null; fi
# One line naming the rank that failed and its role, from the ranks' last words.
"$PYTHON" -m online_stablerep.jobs.shutdown "$output_dir" --world "$world" --code "$code"

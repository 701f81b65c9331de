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

# Validate the config before any process starts; prints the ranks one CPU node needs.
cpu_ranks=$("$PYTHON" -m online_stablerep.commands.ranks --config "$config" ${overrides[@]+"${overrides[@]}"})

launcher=(deepspeed --no_local_rank --master_port "${MASTER_PORT:-29500}")
if [[ -n "${MASTER_ADDR:-}" ]]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n "${HOSTFILE:-}" ]]; then
  launcher+=(--hostfile "$HOSTFILE")
  if [[ -n "${NUM_GPUS:-}" ]]; then launcher+=(--num_gpus "$NUM_GPUS"); fi
elif [[ "$gpus" -gt 0 ]]; then
  launcher+=(--num_gpus "$gpus")
else
  # One process per rank; each pins itself to its own share of the cores (no numactl needed).
  launcher+=(--num_gpus "${NUM_PROCS:-$cpu_ranks}")
  export ONLINE_STABLEREP_PIN_CORES=1
fi

exec "${launcher[@]}" --module online_stablerep.cli train --config "$config" ${overrides[@]+"${overrides[@]}"}

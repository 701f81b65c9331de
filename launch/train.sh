#!/usr/bin/env bash
# Launch a training job with the deepspeed launcher.
#
#   launch/train.sh [--config NAME_OR_PATH] [key=value ...]
#
# GPUs are detected (NUM_GPUS overrides); with none, the CPU demo runs (default config cpu_demo,
# one rank per trainer/generator of the config, NUM_PROCS overrides). The default config is
# sd15_vitb16 on GPUs and cpu_demo on the CPU. Several nodes, two ways:
# - each node starts its own launcher (no ssh: Slurm, Kubernetes; launch/slurm.sbatch): run this
#   script on every node with NNODES, NODE_RANK (0..NNODES-1), MASTER_ADDR (node 0's address)
#   and MASTER_PORT set; every node starts as many ranks (GPUs, or NUM_PROCS on the CPU);
# - one launcher reaches the nodes over ssh: set HOSTFILE (MPI style: "node-0 slots=8").
set -euo pipefail

PYTHON=${PYTHON:-python}
config=""
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --config=*) config="${1#*=}"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done

nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
if [[ "$nnodes" -gt 1 && -n "${HOSTFILE:-}" ]]; then
  echo "launch/train.sh: set either HOSTFILE (ssh) or NNODES/NODE_RANK (no ssh), not both" >&2
  exit 2
fi
if [[ "$nnodes" -gt 1 && ( -z "${MASTER_ADDR:-}" || "$node_rank" -ge "$nnodes" ) ]]; then
  echo "launch/train.sh: NNODES=$nnodes needs MASTER_ADDR (node 0's address) and NODE_RANK" \
    "in 0..$((nnodes - 1)) (got '${NODE_RANK:-}')" >&2
  exit 2
fi

gpus=${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
if [[ "$gpus" -gt 0 ]]; then
  config=${config:-sd15_vitb16}
else
  config=${config:-cpu_demo}
fi

# Validate the config and its inputs (corpus, folders, layout) before any process starts: bad
# input ends here with exit code 2. Prints the ranks each node starts, then output_dir. On
# several nodes without ssh this node's ranks start anyway and fail at the rendezvous with the
# reason, so every other node stops with it too instead of waiting for this one.
world_arg=0
if [[ -z "${HOSTFILE:-}" && "$gpus" -gt 0 ]]; then world_arg=$((gpus * nnodes)); fi
if [[ -z "${HOSTFILE:-}" && "$gpus" -eq 0 && -n "${NUM_PROCS:-}" ]]; then
  world_arg=$((NUM_PROCS * nnodes))
fi
set +e
info=$("$PYTHON" -m online_stablerep.commands.ranks --world "$world_arg" --nodes "$nnodes" \
  --config "$config" ${overrides[@]+"${overrides[@]}"})
check=$?
set -e
if [[ $check -ne 0 && -z "$info" && "$nnodes" -gt 1 && "$world_arg" -gt 0 ]]; then
  info="$((world_arg / nnodes))"$'\n'  # the config did not load: no output_dir to report in
fi
if [[ $check -ne 0 && ( "$nnodes" -eq 1 || -z "$info" ) ]]; then exit "$check"; fi
if [[ $check -ne 0 ]]; then
  echo "node $node_rank: start-up check failed; starting its ranks so every node stops with" \
    "the reason" >&2
fi
per_node=${info%%$'\n'*}
output_dir=${info#*$'\n'}

launcher=(deepspeed --no_local_rank --master_port "${MASTER_PORT:-29500}")
if [[ -n "${MASTER_ADDR:-}" ]]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
world=0
if [[ -n "${HOSTFILE:-}" ]]; then
  launcher+=(--hostfile "$HOSTFILE")
  if [[ -n "${NUM_GPUS:-}" ]]; then launcher+=(--num_gpus "$NUM_GPUS"); fi
  world=$(awk '/slots=/{split($2, a, "="); n += a[2]} END {print n + 0}' "$HOSTFILE")
  per_node=$world  # one launcher reads every rank's last word (shared output_dir or not)
else
  if [[ "$gpus" -gt 0 ]]; then
    per_node=$gpus
  else
    per_node=${NUM_PROCS:-$per_node}
    # One process per rank; each pins itself to its own share of the cores (no numactl needed).
    export ONLINE_STABLEREP_PIN_CORES=1
  fi
  launcher+=(--num_gpus "$per_node")
  world=$((per_node * nnodes))
  if [[ "$nnodes" -gt 1 ]]; then
    # No ssh: this node's launcher starts only its own ranks, global ranks
    # NODE_RANK*per_node.. (the node names in the hostfile are never contacted).
    hostfile=$(mktemp)
    for ((n = 0; n < nnodes; n++)); do echo "node-$n slots=$per_node"; done > "$hostfile"
    launcher+=(--no_ssh --node_rank "$node_rank" --num_nodes "$nnodes" --hostfile "$hostfile")
  fi
fi

# The launcher and every rank run in their own process group: SIGTERM or SIGINT to this script
# (a pod stop, `kill $pid`, a scheduler's preemption, Ctrl-C) goes to all of them. Ranks stop at
# their next step (trainers save a checkpoint first); after STOP_GRACE_S seconds whatever is left
# is killed. The grace deadline is kept by this script's own wait loop, not by a helper process:
# nothing of a stopped job outlives this script, and the group is killed only while it exists.
#
# RESTARTS=N restarts a failed job up to N times from its newest checkpoint (resume=true), after
# a back-off doubling from RESTART_BACKOFF_S whole seconds (default 10, at most 300); never after a
# clean finish or stop, a signal to this script, or bad input (exit code 2). Each restart and
# its reason is printed and appended to output_dir/restarts.jsonl (jobs/restarts.py).
restarts=${RESTARTS:-0}
backoff=${RESTART_BACKOFF_S:-10}
attempt=0
signalled=""  # the exit code of the signal this script got (143: SIGTERM, 130: SIGINT)
job=""
deadline=""
forward() {
  signalled=${signalled:-$1}
  if [[ -n "$job" && -z "$deadline" ]]; then
    kill -TERM -- "-$job" 2>/dev/null || true
    deadline=$((SECONDS + ${STOP_GRACE_S:-60}))
  fi
}
trap 'forward 143' TERM
trap 'forward 130' INT
run_overrides=(${overrides[@]+"${overrides[@]}"})
while true; do
  # Each node clears only its own ranks' last words: nodes may share output_dir.
  if [[ -n "$output_dir" ]]; then
    for ((r = node_rank * per_node; r < (node_rank + 1) * per_node; r++)); do
      rm -f "$output_dir/ranks/rank$r.json"
    done
  fi
  deadline=""
  setsid "${launcher[@]}" --module online_stablerep.cli train --config "$config" \
    ${run_overrides[@]+"${run_overrides[@]}"} &
  job=$!
  if [[ -n "$signalled" ]]; then forward "$signalled"; fi  # one that came during the start
  set +e
  # The launcher may exit before its ranks (it dies on SIGTERM on one node): wait for the
  # whole group (and for the launcher itself, whose group exists only once setsid ran). A
  # signal interrupts only the short sleep, so the deadline is checked often.
  while kill -0 "$job" 2>/dev/null || kill -0 -- "-$job" 2>/dev/null; do
    if [[ -n "$deadline" && $SECONDS -ge $deadline ]]; then
      kill -KILL -- "-$job" 2>/dev/null
    fi
    sleep 0.5
  done
  wait "$job"
  code=$?
  # One line naming the rank that failed and its role, from the ranks' last words.
  if [[ -z "$output_dir" ]]; then break; fi
  # On several nodes each node's wrapper prints its own line (ranks of other nodes are read
  # too when output_dir is shared).
  "$PYTHON" -m online_stablerep.jobs.shutdown "$output_dir" --world "$world" --code "$code" \
    --node-rank "$node_rank" --ranks-per-node "$per_node" --restarts "$restarts" \
    --attempt "$attempt" --backoff-s "$backoff" ${signalled:+--signalled}
  code=$?
  if [[ $code -ne 75 ]]; then break; fi  # 75: jobs.restarts.RESTART_CODE, "restart me"
  attempt=$((attempt + 1))
  wait_s=$((backoff * 2 ** (attempt - 1)))  # jobs.restarts.backoff_s
  if [[ $wait_s -gt 300 ]]; then wait_s=300; fi
  job=""
  for ((t = 0; t < wait_s * 2; t++)); do
    if [[ -n "$signalled" ]]; then break; fi
    sleep 0.5
  done
  if [[ -n "$signalled" ]]; then
    echo "launch/train.sh: stopped during the back-off: not restarting" >&2
    code=$signalled
    break
  fi
  run_overrides=(${overrides[@]+"${overrides[@]}"} resume=true)
done
if [[ -n "${hostfile:-}" ]]; then rm -f "$hostfile"; fi
exit "$code"

#!/usr/bin/env bash
# The one prepared GPU session (see docs/performance.md): run from the repository root on a
# machine with one CUDA GPU; about 9 minutes in all (GEN_S, TRAIN_S, HYBRID_S, TESTS_S, MIX_S set
# the limits).
# GPU_SESSION_DRY=1 runs the same steps on the CPU at toy sizes into $OUT (a check of the script,
# tests/test_gpu_session.py; none of its figures means anything).
# Wheels for packages the machine lacks may be carried in .whl/ (diffusers, peft, accelerate,
# omegaconf, antlr4-python3-runtime, open_clip_torch, ftfy, wcwidth, deepspeed and its hjson,
# pydantic, pydantic-core, annotated-types, typing-inspection; see ../shared/GPU.md).
# Results go to benchmarks/results/ and, when $OUT is set, are copied there.
set -uo pipefail
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  export PATH=/tmp/site/bin:$PATH
fi
out=${OUT:-benchmarks/results}
log=$out/gpu_session.log
dry=${GPU_SESSION_DRY:-0}
if [[ "$dry" == 1 ]]; then
  dev=cpu
  [[ -n "${OUT:-}" ]] || { echo "GPU_SESSION_DRY=1 needs OUT (results must not replace benchmarks/results)"; exit 2; }
  mkdir -p "$out"
  hybrid_dir=$out/hybrid_job
  gen=(--scenarios stock,paper_eager,dpm20_eager,stock_ddim50 --warmup 0 --reps 1 --out "$out")
  train=(--backbones resnet10t --image-size 32 --input-size 32 --captions 4 --views 2 --warmup 1
         --reps 2 --out "$out")
  hybrid=(train.steps=4 train.log_every=2 generator.dtype=fp32 train.precision=fp32
          train.cpu_threads=1 eval.probe_at_end=false)
  mix=(--rows 8 --output-size 32 --real 2 --blocks 1 --warmup 1 --reps 2 --out "$out")
else
  dev=cuda
  hybrid_dir=/tmp/hybrid_gpu
  gen=()
  train=()
  hybrid=(train.steps=30 train.log_every=5 generator.dtype=bf16 train.precision=bf16)
  mix=(--backbone vit_base_patch16_224 --input-size 224 --rows 258 --reps 10 --blocks 2)
fi
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, go on whatever happens
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s) $(date +%T)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}
if [[ "$dry" == 1 ]]; then
  echo "dry run on the CPU" | tee -a "$log"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
fi
python3 -c "import torch, diffusers, deepspeed, timm, peft; print(torch.__version__, diffusers.__version__, deepspeed.__version__, timm.__version__, peft.__version__)" 2>&1 | tail -1 | tee -a "$log"
# Most valuable first. Every recipe compiled with CUDA graphs (paper = the official DDIM 50
# steps, dpm20 = 20 DPM-Solver++ steps, fast, turbo) beside the stock pipeline at both samplers
# (stock: DPM-Solver++ 20, stock_ddim50: DDIM 50), then the levers; SD1.5 architecture at 512
# px, bf16, random-weight LoRA and TAESD of the right shapes; rows are written after each
# scenario's warm-up and each round, so a timeout still leaves what was measured (paper, dpm20
# and both stock rows first). About 5 minutes (compile warm-ups included).
step generator "${GEN_S:-330}" python3 benchmarks/generator.py --device "$dev" "${gen[@]}"
step trainer "${TRAIN_S:-90}" python3 benchmarks/trainer.py --device "$dev" "${train[@]}"
# The hybrid job on one GPU: rank 0 trains, rank 1 generates (both on cuda:0, NCCL trainer
# group of one, images over gloo).
step hybrid-job "${HYBRID_S:-60}" python3 -m torch.distributed.run --nproc_per_node 2 \
  -m online_stablerep.cli train --config cpu_demo output_dir="$hybrid_dir" \
  roles.generators=1 "${hybrid[@]}"
step gpu-tests "${TESTS_S:-40}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_augment.py tests/test_model.py
# Real images decoded on the trainer's thread vs ahead, beside a ViT-B/16 bf16 step.
step real-mix "${MIX_S:-60}" python3 benchmarks/real_mix.py --device "$dev" "${mix[@]}"
if [[ "$dry" != 1 && "$out" != benchmarks/results ]]; then
  cp benchmarks/results/*-nvidia-* "$out"/ 2>/dev/null
fi
ls -la "$out"

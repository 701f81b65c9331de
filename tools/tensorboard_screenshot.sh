#!/usr/bin/env bash
# Screenshot of a run's TensorBoard CUSTOM SCALARS page with headless Chromium
# (Debian: apt-get install chromium).
#   tools/tensorboard_screenshot.sh RUN_DIR OUT.png [TAB]     TAB: custom_scalars (default), hparams, images
set -euo pipefail
run_dir=$1; out=$2; tab=${3:-custom_scalars}
port=${PORT:-6123}
tensorboard --logdir "$run_dir/tensorboard" --port "$port" --host localhost >/tmp/tb_screenshot.log 2>&1 &
tb=$!
trap 'kill $tb 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://localhost:$port/" >/dev/null && break; sleep 1; done
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,1900 \
  --virtual-time-budget=20000 --screenshot="$out" "http://localhost:$port/#$tab" 2>/dev/null
echo "wrote $out"

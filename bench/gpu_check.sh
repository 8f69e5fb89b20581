#!/usr/bin/env bash
# Issue 14 point 4 in one device call: the seed card's training (63k x 1024, 1024-512-256-128-32,
# 3 x 256, batch 4096, 1000 epochs) and rqvae.encode_array items/s on the GPU, with the device name.
#
#   bash bench/gpu_check.sh                          # on a GPU machine (device tool: OUT is set there)
#   DEVICE=cpu EPOCHS=2 PROBE_EPOCHS=2 ITEMS=3000 ENCODE_ITEMS=20000 OUT=/tmp/g bash bench/gpu_check.sh   # CPU smoke run
#
# 1. Probes: PROBE_EPOCHS epochs of each training variant (float32, bf16 autocast, each also with the
#    step replayed from a CUDA graph, and bf16 + torch.compile); each probe's median epoch is its rate.
# 2. The full EPOCHS run of the fastest variant by that rate, saving the model to MODEL_DIR.
# 3. encode_device.py with that model: items/s per batch size, and the codes' agreement with the CPU.
# Every step has its own time limit, so a slow one still leaves the others' figures under $OUT (8 files:
# the log and 7 JSON, what the device tool brings back). Off a GPU the graphed probes stop at once
# (cuda_graphs needs CUDA) and the others are compared.
set -u
OUT=${OUT:-bench/out/gpu}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-1000}
PROBE_EPOCHS=${PROBE_EPOCHS:-30}
ITEMS=${ITEMS:-63000}
ENCODE_ITEMS=${ENCODE_ITEMS:-4000000}
MODEL_DIR=${MODEL_DIR:-$(mktemp -d)}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
cd "$(dirname "$0")/.."
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)"
}
train() {  # train NAME EPOCHS LIMIT FLAGS...
  local name=$1 epochs=$2 limit=$3; shift 3
  echo "== train $name: $epochs epochs $*"
  timeout "$limit" "$PY" bench/train_throughput.py --items "$ITEMS" --epochs "$epochs" --device "$DEVICE" \
    --json "$OUT/train_$name.json" "$@"
}
train probe_fp32 "$PROBE_EPOCHS" "${PROBE_LIMIT:-60}"
train probe_bf16 "$PROBE_EPOCHS" "${PROBE_LIMIT:-60}" --bf16
train probe_fp32_graphs "$PROBE_EPOCHS" "${PROBE_LIMIT:-60}" --cuda-graphs
train probe_bf16_graphs "$PROBE_EPOCHS" "${PROBE_LIMIT:-60}" --bf16 --cuda-graphs
train probe_bf16_compile "$PROBE_EPOCHS" "${COMPILE_LIMIT:-120}" --bf16 --compile
best=$("$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
flags = {"fp32": "", "bf16": "--bf16", "fp32_graphs": "--cuda-graphs", "bf16_graphs": "--bf16 --cuda-graphs",
         "bf16_compile": "--bf16 --compile"}
rates = {}
for name in flags:
    f = Path(sys.argv[1]) / f"train_probe_{name}.json"
    if f.exists():
        rates[name] = json.loads(f.read_text())["epoch_seconds_median"]
print(flags[min(rates, key=rates.get)] if rates else "", end="")
print(f"probe median epoch seconds: {rates}", file=sys.stderr)
PY
)
# shellcheck disable=SC2086  # the flags are words
train full "$EPOCHS" "${TRAIN_LIMIT:-240}" $best --save "$MODEL_DIR/seed_card.pt"
echo "== encode"
timeout "${ENCODE_LIMIT:-100}" "$PY" bench/encode_device.py --device "$DEVICE" --dim 1024 --items "$ENCODE_ITEMS" \
  --base-items "$(( ENCODE_ITEMS < 250000 ? ENCODE_ITEMS : 250000 ))" --repeat 2 \
  --model "$MODEL_DIR/seed_card.pt" --json "$OUT/encode.json"

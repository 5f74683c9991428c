#!/usr/bin/env bash
# The GPU check of issue 12 (speed at scale), prepared to fit one device lease: edits on random models of the
# published shapes in bf16, seconds per phase, at 1,000 and 10,000 requests (a size that would overrun its
# share of the lease is skipped and said so). Run from the repository root on a machine whose python3 has
# torch, transformers, peft, safetensors, huggingface_hub and tokenizers; the package need not be installed.
#
#   bash scripts/gpu_check.sh                       # figures and logs in $OUT (default: gpu-check/)
#   RUNS="tiny-llama:3,6:1 tiny-gpt2:3,6:1" DEVICE=cpu DTYPE=float32 TEXTS=8 bash scripts/gpu_check.sh   # a try
#
# RUNS: shape:sizes:minutes, one per model, run in order; PYTHON: the interpreter (default python3).
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-gpu-check}"
RUNS="${RUNS:-llama-7b:1000,10000:6 gpt2-xl:1000,10000:3}"
mkdir -p "$OUT"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "${PYTHON:-python3}" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"
for run in $RUNS; do
    IFS=: read -r shape sizes minutes <<< "$run"
    "${PYTHON:-python3}" -m memit_adapter.cli bench --scale "$shape" --sizes ${sizes//,/ } --max-minutes "$minutes" \
        --dtype "${DTYPE:-bfloat16}" ${DEVICE:+--device "$DEVICE"} --texts "${TEXTS:-2000}" --quiet \
        --json "$OUT/$shape.json" 2>&1 | tee "$OUT/$shape.log"
done

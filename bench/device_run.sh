#!/usr/bin/env bash
# Runs on the offline GPU machine after shared/devicekit's parts are installed into /tmp/site
# (see its README; the SmolLM2 GGUF travels as the extra folder "gguf").
# Installs this package beside SGLang, converts the model, then runs the GPU checks into $OUT.
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v "Target directory" || true
export EVICPRESS_CACHE=/tmp/evcache
mkdir -p "$EVICPRESS_CACHE" && cp /tmp/extra/gguf/*.gguf "$EVICPRESS_CACHE/"
MODEL=$(python3 -m evicpress_sglang.cli model prepare 2>/dev/null | tail -1)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
[ -n "${SKIP_CODECS:-}" ] || python3 -m evicpress_sglang.cli codecs --model "$MODEL" --tokens 4096 --device cuda --json > "$OUT/codecs_cuda.json"
python3 bench/cuda_exactness.py --out "$OUT/cuda_exactness.json" > /dev/null
python3 bench/gpu_smoke.py --model "$MODEL" --out "$OUT/${SMOKE_DIR:-smoke}" --settings "${SMOKE_SETTINGS:-{\}}" -- \
  --attention-backend triton --sampling-backend pytorch --grammar-backend none --disable-cuda-graph ${SMOKE_ARGS:-}

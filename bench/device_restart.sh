#!/usr/bin/env bash
# On the GPU machine, after shared/devicekit's parts (the SmolLM2 GGUF as extra "gguf"): install this
# package, convert the model, run bench/restart_proof.py into $OUT/restart.
# Usage: bash bench/device_restart.sh [restart_proof.py arguments after --model/--out]
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v "Target directory" || true
export EVICPRESS_CACHE=/tmp/evcache
mkdir -p "$EVICPRESS_CACHE" "$OUT/restart" && cp /tmp/extra/gguf/*.gguf "$EVICPRESS_CACHE/"
MODEL=$(python3 -m evicpress_sglang.cli model prepare 2>/dev/null | tail -1)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/restart/gpu.txt"
python3 bench/restart_proof.py --model "$MODEL" --out /tmp/restart "$@"
cp /tmp/restart/restart.json "$OUT/restart/"
for f in reference before-kill after-restart; do gzip -c "/tmp/restart/$f.log" > "$OUT/restart/$f.log.gz"; done

#!/usr/bin/env bash
# On the GPU machine, after shared/devicekit's parts are installed into /tmp/site (the SmolLM2 GGUF
# travels as the extra folder "gguf"): install this package beside SGLang, convert the model, and start
# a long proof script (default bench/soak.py; SOAK_SCRIPT picks another that takes --model and --out)
# detached (setsid), so that it outlives this call; later calls collect SOAK_DIR (default /tmp/soak).
# Usage: bash bench/device_soak.sh [the script's arguments, e.g. --minutes 8 -- --attention-backend triton]
#        SOAK_SCRIPT=bench/profiler_pressure.py SOAK_DIR=/tmp/ppress bash bench/device_soak.sh
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
SCRIPT=${SOAK_SCRIPT:-bench/soak.py}
DIR=${SOAK_DIR:-/tmp/soak}
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v "Target directory" || true
export EVICPRESS_CACHE=/tmp/evcache
mkdir -p "$EVICPRESS_CACHE" "$DIR" && cp /tmp/extra/gguf/*.gguf "$EVICPRESS_CACHE/"
MODEL=$(python3 -m evicpress_sglang.cli model prepare 2>/dev/null | tail -1)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$DIR/gpu.txt"
echo "python3 $SCRIPT --model $MODEL --out $DIR $*" > "$DIR/command.txt"
setsid nohup python3 "$SCRIPT" --model "$MODEL" --out "$DIR" "$@" > "$DIR/$(basename "$SCRIPT" .py).out" 2>&1 < /dev/null &
echo "started: $(cat "$DIR/command.txt")"

#!/usr/bin/env bash
# On the GPU machine, after shared/devicekit's parts are installed into /tmp/site (the SmolLM2 GGUF
# travels as the extra folder "gguf"): install this package beside SGLang, convert the model, and start
# bench/soak.py detached (setsid), so that it outlives this call; later calls collect /tmp/soak.
# Usage: bash bench/device_soak.sh [soak.py arguments, e.g. --minutes 8 -- --attention-backend triton]
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v "Target directory" || true
export EVICPRESS_CACHE=/tmp/evcache
mkdir -p "$EVICPRESS_CACHE" /tmp/soak && cp /tmp/extra/gguf/*.gguf "$EVICPRESS_CACHE/"
MODEL=$(python3 -m evicpress_sglang.cli model prepare 2>/dev/null | tail -1)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > /tmp/soak/gpu.txt
echo "python3 bench/soak.py --model $MODEL --out /tmp/soak $*" > /tmp/soak/command.txt
setsid nohup python3 bench/soak.py --model "$MODEL" --out /tmp/soak "$@" > /tmp/soak/soak.out 2>&1 < /dev/null &
echo "soak started: $(cat /tmp/soak/command.txt)"

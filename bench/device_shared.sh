#!/usr/bin/env bash
# On the GPU machine, after shared/devicekit's parts are installed into /tmp/site (the SmolLM2
# GGUF travels as the extra folder "gguf") and a call carried MC=<folder> holding the Mooncake
# wheel (mooncake-transfer-engine-non-cuda, cp312) and the .debs of libibverbs1, librdmacm1 and
# libnuma1 (`apt-get download` them; the machine has no apt): install both, prepare the 8B-class
# dummy model, and start bench/shared_proof.py detached (setsid), so that it outlives this call;
# later calls collect /tmp/shared.
# Usage: MC=.devwork-mc bash bench/device_shared.sh [shared_proof.py arguments, e.g. -- --load-format dummy]
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 EVICPRESS_CACHE=/tmp/evcache
python3 -m pip install -q --no-deps --no-index --target /tmp/site "$MC"/*.whl 2>&1 | grep -v "Target directory" || true
mkdir -p /tmp/mclibs && for deb in "$MC"/*.deb; do dpkg -x "$deb" /tmp/mclibs; done
export LD_LIBRARY_PATH=/tmp/mclibs/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v "Target directory" || true
mkdir -p "$EVICPRESS_CACHE" /tmp/shared && cp /tmp/extra/gguf/*.gguf "$EVICPRESS_CACHE/"
MODEL=$(python3 -c "from evicpress_sglang.model import prepare_dummy_8b; print(prepare_dummy_8b())" | tail -1)
python3 -c "import mooncake.store" # fails here, loudly, if a library is missing
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > /tmp/shared/gpu.txt
echo "python3 bench/shared_proof.py --model $MODEL --out /tmp/shared $*" > /tmp/shared/command.txt
setsid nohup python3 bench/shared_proof.py --model "$MODEL" --out /tmp/shared "$@" > /tmp/shared/proof.out 2>&1 < /dev/null &
echo "shared proof started: $(cat /tmp/shared/command.txt)"

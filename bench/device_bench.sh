#!/usr/bin/env bash
# Runs bench/run.py on the offline GPU machine after shared/devicekit's parts are installed
# into /tmp/site (the SmolLM2 GGUF travels as the extra folder "gguf").
# Usage: bash bench/device_bench.sh NAME [bench/run.py args...]
#        BENCH_SCRIPT=bench/calibration.py bash bench/device_bench.sh NAME [its args...]
# Results accumulate in /tmp/bench/NAME across calls (--resume skips finished policies) and
# come back as $OUT/NAME.tgz; the bench stops 40 s before the call's 600 s limit.
set -uo pipefail
NAME=$1; shift
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 EVICPRESS_CACHE=/tmp/evcache
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | grep -v "Target directory" || true
mkdir -p "$EVICPRESS_CACHE" /tmp/bench
for f in /tmp/extra/gguf/*.gguf; do [ -e "$EVICPRESS_CACHE/${f##*/}" ] || cp "$f" "$EVICPRESS_CACHE/"; done
python3 -m evicpress_sglang.cli model prepare > /dev/null
SCRIPT=${BENCH_SCRIPT:-bench/run.py}
[ "$SCRIPT" = bench/run.py ] && set -- --resume --quiet "$@"
timeout "${BENCH_TIMEOUT:-540}" python3 "$SCRIPT" --out "/tmp/bench/$NAME" "$@" 2>&1 \
  | grep -v -e "Ignore import error" -e SyntaxWarning -e '"""Configuration class' | tail -60
tar czf "$OUT/$NAME.tgz" -C /tmp/bench "$NAME"

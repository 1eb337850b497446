#!/usr/bin/env bash
# A GPU session as one detached chain of steps, on the offline GPU machine after shared/devicekit's
# parts are installed into /tmp/site (the SmolLM2 GGUF travels as the extra folder "gguf").
#
#   bash bench/device_chain.sh start STEPS_FILE   install this package, prepare SmolLM2, then run each
#                                                 line of STEPS_FILE ("name: command") in turn, detached
#                                                 (setsid), so the chain outlives the call
#   bash bench/device_chain.sh poll SECONDS       wait until the chain is done or SECONDS passed, print
#                                                 the steps and the tail of each step's output, and bring
#                                                 /tmp/chain back as $OUT/chain.tgz (server logs left out)
#
# In a step, $R is /tmp/chain (write results under it) and $M the prepared SmolLM2 directory; each
# step's output goes to $R/NAME.out and its command to $R/NAME.command. A failing step does not stop
# the chain. Keep polling with single calls, one after the other: the machine is given back after
# ~30 s without a call, and the chain with it.
set -uo pipefail
R=/tmp/chain
case "${1:-}" in
  start)
    STEPS=$(realpath "$2")
    mkdir -p "$R"
    M=${M:-}
    if [ "${CHAIN_SETUP:-1}" = 1 ]; then  # CHAIN_SETUP=0: only the chain (to try a steps file elsewhere)
      export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 EVICPRESS_CACHE=/tmp/evcache
      python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 \
        | grep -v "Target directory" | tail -2
      mkdir -p "$EVICPRESS_CACHE" && cp /tmp/extra/gguf/*.gguf "$EVICPRESS_CACHE/"
      M=$(python3 -m evicpress_sglang.cli model prepare 2>/dev/null | tail -1)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/gpu.txt"
    fi
    cp "$STEPS" "$R/steps.in"
    export R M
    setsid nohup bash -c '
      while IFS= read -r line; do
        [ -z "$line" ] || [ "${line#\#}" != "$line" ] && continue
        name=${line%%:*}; cmd=${line#*:}
        echo "$(date +%T) start $name" >> "$R/steps.txt"
        echo "$cmd" > "$R/$name.command"
        bash -c "$cmd" > "$R/$name.out" 2>&1; rc=$?
        echo "$(date +%T) end $name rc=$rc" >> "$R/steps.txt"
      done < "$R/steps.in"
      echo "$(date +%T) done" >> "$R/steps.txt"' > "$R/chain.out" 2>&1 < /dev/null &
    sleep 3; cat "$R/steps.txt" 2>/dev/null ;;
  poll)
    end=$((SECONDS + ${2:-240}))
    while [ $SECONDS -lt $end ] && ! grep -q " done$" "$R/steps.txt" 2>/dev/null; do sleep 5; done
    cat "$R/steps.txt"
    for f in "$R"/*.out; do echo "== $f"; tail -n 4 "$f" | cut -c1-400; done
    tar czf "$OUT/chain.tgz" -C /tmp --exclude='*.log' chain ;;
  *) echo "usage: $0 start STEPS_FILE | poll SECONDS" >&2; exit 2 ;;
esac

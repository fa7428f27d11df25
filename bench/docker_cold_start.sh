#!/bin/sh
# Cold vs warm start of a worker in the image: seconds from `python` starting to the package's first
# prediction, as `python -m worker` does it (C++-runtime check, load, warm-up, one batch). Each
# round runs a fresh container (empty caches: cold) and then the same command again inside it
# (warm: whatever the first run cached is there). Prints one JSON line per round.
#   bench/docker_cold_start.sh kiln-worker:test [rounds]
set -eu
image=$1
rounds=${2:-3}
probe='from worker.cxx_runtime import ensure_cxx_runtime
import sys; ensure_cxx_runtime(sys.argv[1])
import torch
from worker.runtime import load_runtime
runtime = load_runtime(sys.argv[1])
c, h, w = runtime.manifest.input_shape
runtime.predict(torch.zeros((1, c, h, w), dtype=torch.uint8))'
for _ in $(seq "$rounds"); do
    docker run --rm --network host --entrypoint sh "$image" -c '
        timed() { s=$(date +%s.%N); python -c "$1" /opt/kiln-model/model.pt2 || exit 1; e=$(date +%s.%N); echo "$e - $s" | bc 2>/dev/null || python -c "print($e - $s)"; }
        cold=$(timed "$0"); warm=$(timed "$0")
        echo "{\"cold_s\": $cold, \"warm_s\": $warm}"' "$probe"
done

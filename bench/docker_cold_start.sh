#!/bin/sh
# Cold vs warm start of a worker in the image: seconds from `python` starting to the package's first
# prediction, as `python -m worker` does it (C++-runtime check, load, warm-up, one batch). Each
# round runs a fresh container (empty caches: cold) and then the same command again inside it
# (warm: whatever the first run cached is there). Prints one JSON line per round. DOCKER_RUN_OPTIONS
# adds `docker run` options (e.g. -e HOME=/tmp/h to start from an empty home).
#   bench/docker_cold_start.sh kiln-worker:test [rounds [package]]
set -eu
image=$1
rounds=${2:-3}
package=${3:-/opt/kiln-model/model.pt2}
probe='from worker.cxx_runtime import ensure_cxx_runtime
import sys; ensure_cxx_runtime(sys.argv[1])
import torch
from worker.runtime import load_runtime
runtime = load_runtime(sys.argv[1])
c, h, w = runtime.manifest.input_shape
runtime.predict(torch.zeros((1, c, h, w), dtype=torch.uint8))'
for _ in $(seq "$rounds"); do
    docker run --rm --network host ${DOCKER_RUN_OPTIONS:-} --entrypoint sh "$image" -c '
        timed() { s=$(date +%s.%N); python -c "$1" "$2" || exit 1; e=$(date +%s.%N); python -c "print($e - $s)"; }
        cold=$(timed "$0" "$1"); warm=$(timed "$0" "$1")
        echo "{\"cold_s\": $cold, \"warm_s\": $warm}"' "$probe" "$package"
done

#!/bin/sh
# Build the kiln worker image, then label it with the baked package's model name and weights
# digest (known only once the build stage has compiled it).
#
#   docker/build.sh -t kiln-worker [docker build options, e.g. --build-arg MODEL=resnet18]
#
# Uses BuildKit. Passes the host's CA bundle to pip as a build secret when PIP_CERT or
# /etc/ssl/certs/ca-certificates.crt exists (hosts behind a TLS-inspecting proxy need it).
# DOCKER picks the docker CLI; by default the first one on PATH that can run BuildKit builds.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)

buildkit_cli() {
    for cli in ${DOCKER:-} $(which -a docker); do
        if "$cli" buildx version >/dev/null 2>&1; then echo "$cli"; return; fi
        # Before 23.0 the docker CLI drove BuildKit itself, without the buildx plugin.
        case $("$cli" version --format '{{.Client.Version}}' 2>/dev/null) in
            19.* | 20.* | 21.* | 22.*) echo "$cli"; return ;;
        esac
    done
    echo "error: no docker CLI here can run BuildKit builds: install the buildx plugin" >&2
    exit 1
}
docker=$(buildkit_cli)
cert=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
secret=""
[ -s "$cert" ] && secret="--secret id=pip_cert,src=$cert"
export DOCKER_BUILDKIT=1

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# shellcheck disable=SC2086
"$docker" build $secret -f "$root/docker/Dockerfile" --target manifest --output "type=local,dest=$out" "$@" "$root"
labels=$(python3 - "$out/manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for key, value in [("model", m["model"]), ("weights-sha256", m["weights_sha256"]), ("device", m["device"]),
                   ("compute-dtype", m["compute_dtype"]), ("torch-version", m["torch_version"])]:
    print(f"--label=io.kiln.{key}={value}")
PY
)
# The same build again: every layer is cached, and the labels land on the worker stage.
# shellcheck disable=SC2086
"$docker" build $secret -f "$root/docker/Dockerfile" --target worker $labels "$@" "$root"

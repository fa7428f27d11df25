#!/bin/sh
# Make a Docker engine available for the docker tests (`make test` calls this): install Debian's
# docker.io, docker-compose and debootstrap where missing, and start dockerd if none answers.
# Needs root and apt-get (as on CI); elsewhere it only says what is missing, and the docker tests
# skip with the reason.
set -u
if docker info >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: no Docker engine answers and this is not root with apt-get: the docker tests will skip"
    exit 0
fi
missing=""
command -v dockerd >/dev/null || missing="$missing docker.io"
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing="$missing docker-compose"
command -v debootstrap >/dev/null || missing="$missing debootstrap"
if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null \
        || { echo "note: could not install$missing: the docker tests will skip"; exit 0; }
fi
log=${KILN_DOCKERD_LOG:-/var/log/kiln-dockerd.log}
nohup dockerd >"$log" 2>&1 &
for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && { echo "dockerd started (log: $log)"; exit 0; }
    sleep 1
done
echo "note: dockerd did not start (see $log): the docker tests will skip"

#!/bin/sh
# Build a base image equivalent to the official python:3.11-slim from Debian's own packages, for
# hosts that cannot pull from an image registry: debootstrap a bookworm root file system with
# python3 and venv, then `docker import` it. The root file system is kept as a tarball under
# KILN_BASE_CACHE, so a Docker engine that lost its images re-imports it in seconds.
#
#   docker/debian-base.sh [IMAGE]          # default IMAGE: kiln-base:bookworm
#   docker build --build-arg BASE=kiln-base:bookworm -f docker/Dockerfile .
set -eu
image=${1:-kiln-base:bookworm}
cache=${KILN_BASE_CACHE:-/var/cache/kiln}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tarball=$cache/debian-bookworm-python3.tar

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image: present"
    exit 0
fi
if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
    mkdir -p "$cache"
    root=$(mktemp -d "$cache/root.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror"
    # What the official slim images leave out too: package lists, caches, docs.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
    tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi
docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    "$tarball" "$image"
echo "$image: imported from $tarball"

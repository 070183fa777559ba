#!/usr/bin/env bash
# Makes a local stand-in for python:3.11-slim-bookworm from Debian's own packages, for machines
# that reach no image registry: Debian bookworm (minbase) with python3 (3.11), venv and CA
# certificates, imported into Docker as convsearch/python:3.11-bookworm (or the tag given).
# Needs root, debootstrap and a running Docker daemon; does nothing when the tag exists.
set -euo pipefail
TAG=${1:-convsearch/python:3.11-bookworm}
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "base image $TAG exists"
  exit 0
fi
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
echo "debootstrap bookworm from $MIRROR ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR" >/dev/null
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*
tar -C "$ROOT" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$TAG" >/dev/null
echo "base image $TAG made from Debian packages"

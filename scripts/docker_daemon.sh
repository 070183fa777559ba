#!/usr/bin/env bash
# Makes sure a Docker daemon answers: installs Debian's docker.io, docker-compose and debootstrap
# when missing (as root), and starts dockerd in the background when none is running.
set -euo pipefail
if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "run as root, or install docker.io docker-compose debootstrap" >&2; exit 1; }
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap) >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "no Docker daemon answers; start one (dockerd as root)" >&2; exit 1; }
  nohup dockerd >/var/log/convsearch-dockerd.log 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 1
  done
  echo "dockerd did not start; see /var/log/convsearch-dockerd.log" >&2
  exit 1
fi

#!/usr/bin/env bash
# Builds the service images without any network inside `docker build`:
#   1. a wheelhouse per image, made on this machine with its own pip (build/wheelhouse/<service>);
#   2. a build context per image: the source tree and those wheels (build/images/<service>);
#   3. docker build from deploy/docker/Dockerfile, installing with --no-index.
# Images: convsearch/gateway:TAG, convsearch/index:TAG, convsearch/extractor:TAG, convsearch/web:TAG
# (TAG 0.1.0).
#
# Usage: scripts/images.sh [gateway] [index] [extractor] [web]     (default: all four)
# Environment:
#   BASE_IMAGE     base of every image (default python:3.11-slim-bookworm); when it cannot be
#                  pulled, scripts/base_image.sh makes a stand-in from Debian's packages
#                  (convsearch/python:3.11-bookworm) and that is used.
#   TORCH_VARIANT  cuda (default: PyPI's torch build, which runs on CPU and CUDA) or cpu (the
#                  CPU-only build from TORCH_CPU_INDEX, https://download.pytorch.org/whl/cpu;
#                  that index must be reachable). cuda images are tagged TAG-cuda as well.
#   TAG            image tag (default 0.1.0).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-0.1.0}
TORCH_VARIANT=${TORCH_VARIANT:-cuda}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
SERVICES=("$@")
[ ${#SERVICES[@]} -gt 0 ] || SERVICES=(index gateway extractor web)
PIP=${PIP:-python3 -m pip}
# The port each image serves (the web page's is HTTP) and its metrics port (the web page has none).
declare -A GRPC_PORT=([gateway]=50051 [extractor]=50052 [index]=50053 [web]=8080)
declare -A METRICS_PORT=([gateway]=9051 [extractor]=9052 [index]=9053 [web]="")

BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && ! docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "cannot pull $BASE_IMAGE; using a base made from Debian's packages instead"
  BASE_IMAGE=convsearch/python:3.11-bookworm
  bash scripts/base_image.sh "$BASE_IMAGE"
fi

wheelhouse() {  # $1: service; fills build/wheelhouse/$1 with every dependency as a wheel
  local service=$1 dir=build/wheelhouse/$1
  mkdir -p "$dir"
  if [ "$service" = extractor ]; then
    if [ "$TORCH_VARIANT" = cpu ]; then
      $PIP wheel --quiet --wheel-dir "$dir" --index-url "$TORCH_CPU_INDEX" "${TORCH_PINS[@]}"
    else
      $PIP wheel --quiet --wheel-dir "$dir" "${TORCH_PINS[@]}"
    fi
  fi
  # grpcio-tools and setuptools: the root package's build requirements (its hook generates the gRPC code).
  $PIP wheel --quiet --wheel-dir "$dir" --find-links "$dir" . "./services/$service" grpcio-tools==1.85.1 \
    "setuptools>=68" wheel
  rm -f "$dir"/convsearch-*.whl "$dir"/convsearch_*.whl  # built from source in the image
}

context() {  # $1: service; assembles build/images/$1 (source + wheels)
  local service=$1 dir=build/images/$1
  rm -rf "$dir"
  mkdir -p "$dir/src/services" "$dir/src/scripts"
  cp -r pyproject.toml setup.py MANIFEST.in README.md protos "$dir/src/"
  cp -r "services/$service" "$dir/src/services/"
  cp scripts/gen_protos.py scripts/build_hooks.py "$dir/src/scripts/"  # what setup.py's build hook runs
  tar -c --exclude='__pycache__' --exclude='convsearch/common' --exclude='convsearch/extractor' \
    --exclude='convsearch/index' --exclude='convsearch/gateway' convsearch | tar -x -C "$dir/src"
  find "$dir/src" -name '*.egg-info' -prune -exec rm -rf {} +
  cp -al "build/wheelhouse/$service" "$dir/wheels"
}

for service in "${SERVICES[@]}"; do
  started=$(date +%s)
  echo "== $service: wheelhouse"
  wheelhouse "$service"
  context "$service"
  tags=(-t "convsearch/$service:$TAG")
  if [ "$service" = extractor ] && [ "$TORCH_VARIANT" = cuda ]; then
    tags+=(-t "convsearch/$service:$TAG-cuda")
  fi
  echo "== $service: docker build (base $BASE_IMAGE)"
  docker build --quiet "${tags[@]}" -f deploy/docker/Dockerfile \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg SERVICE="$service" \
    --build-arg GRPC_PORT="${GRPC_PORT[$service]}" --build-arg METRICS_PORT="${METRICS_PORT[$service]}" \
    "build/images/$service" >/dev/null
  echo "== $service: convsearch/$service:$TAG in $(( $(date +%s) - started ))s," \
    "$(docker image inspect -f '{{.Size}}' "convsearch/$service:$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
done

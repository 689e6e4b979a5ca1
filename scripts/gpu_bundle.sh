#!/usr/bin/env bash
# Bundle what a GPU machine with no registry needs to run kvbridge's GPU tests: the Rust test
# binaries and the NIXL runtime's UCX subset (not the whole wheel: the carry limit is 64 MiB).
#
#   scripts/gpu_bundle.sh [OUT]        # default OUT=target/gpu-bundle
#   NIXL_FLAVOR=cu12 scripts/gpu_bundle.sh   # the runtime for CUDA 12 (default cu13: the
#                                            # lent GPU machine runs CUDA 13, driver 580)
#   # on the GPU machine, from the repository root (carry OUT):
#   bash scripts/gpu_run.sh OUT
#
# The layout of the wheel's two library folders is kept, so their relative RPATHs
# ($ORIGIN/../nixl_cuXX.libs) still resolve. Only libnixl*, the UCX plugin, UCX and its
# transport modules (CUDA included) and what they link from the wheel are copied. The
# wheel's files are proprietary: the bundle lives under target/ and is never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOR="${NIXL_FLAVOR:-cu13}"
NIXL_VERSION=1.5.1
CACHE="${KVBRIDGE_CACHE:-$HOME/.cache/kvbridge}"
if [[ "$FLAVOR" == cu12 ]]; then
  RT="$CACHE/nixl-rt-$NIXL_VERSION"
else
  # The nixl-cu13 wheel beside nixl-cu12 (same version), fetched and unpacked once.
  RT="$CACHE/nixl-rt-$NIXL_VERSION-$FLAVOR"
  if [[ ! -f "$RT/.nixl_$FLAVOR.mesonpy.libs/libnixl_capi.so" ]]; then
    PY="${KVBRIDGE_PYTHON:-$CACHE/venv-vllm0.32.0-nixl$NIXL_VERSION/bin/python}"
    mkdir -p "$CACHE/wheels" "$RT"
    ls "$CACHE/wheels"/nixl_"$FLAVOR"-$NIXL_VERSION-*.whl >/dev/null 2>&1 ||
      "$PY" -m pip download -q --no-deps --only-binary=:all: "nixl-$FLAVOR==$NIXL_VERSION" -d "$CACHE/wheels"
    "$PY" -m zipfile -e "$(ls "$CACHE/wheels"/nixl_"$FLAVOR"-$NIXL_VERSION-*.whl | head -1)" "$RT"
  fi
fi
OUT="${1:-target/gpu-bundle}"
MN=".nixl_$FLAVOR.mesonpy.libs"
LN="nixl_$FLAVOR.libs"
M="$RT/$MN"
L="$RT/$LN"
[[ -f "$M/libnixl_capi.so" ]] || { echo "NIXL runtime not found in $RT: run make setup" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT/rt/$MN/plugins" "$OUT/rt/$LN/ucx" "$OUT/bin"
cp "$M"/lib*.so* "$OUT/rt/$MN/"
rm -f "$OUT"/rt/"$MN"/{libobj_utils.so,libnixl_test_utils.so}  # object-store plugin and test helpers
cp "$M/plugins/libplugin_UCX.so" "$OUT/rt/$MN/plugins/"
# UCX's transport modules: shared memory and CUDA (loopback on one GPU machine; no InfiniBand).
for f in "$L"/ucx/libuct_cma.so* "$L"/ucx/libuct_cuda.so* "$L"/ucx/libucm_cuda.so*; do
  [[ -e "$f" ]] && cp -P "$f" "$OUT/rt/$LN/ucx/"
done
# Everything those link from the wheel's own library folder (transitively, via ldd).
objs=("$OUT"/rt/"$MN"/*.so "$OUT"/rt/"$MN"/plugins/*.so "$OUT"/rt/"$LN"/ucx/*.so*)
LD_LIBRARY_PATH="$M:$L" ldd "${objs[@]}" 2>/dev/null | awk -v d="$LN/" 'index($3, d) {print $3}' | sort -u |
  while read -r dep; do cp -n "$(readlink -f "$dep")" "$OUT/rt/$LN/$(basename "$dep")"; done

# The GPU test binary (and the CUDA unit tests of kvbridge-nixl), built here.
for target in "--test gpu" "--lib"; do
  exe=$(cargo test -p kvbridge-nixl $target --no-run --message-format=json 2>/dev/null |
        jq -r 'select(.reason == "compiler-artifact" and .executable != null) | .executable' | tail -1)
  name=$([[ "$target" == "--lib" ]] && echo nixl-lib || echo "${target#--test }")
  cp "$exe" "$OUT/bin/$name"
done
strip "$OUT"/bin/* 2>/dev/null || true
if ldd "${objs[@]}" 2>/dev/null | grep -q "not found"; then
  ldd "${objs[@]}" | grep "not found" >&2; echo "bundle misses a library" >&2; exit 1
fi
# Self-check: the bundled runtime alone loads here (CUDA tests skip on a machine without a GPU).
env -i PATH=/usr/bin:/bin KVBRIDGE_NIXL_LIB_DIR="$PWD/$OUT/rt/$MN" UCX_NET_DEVICES=lo CI=true \
  "$OUT/bin/gpu" --test-threads=1 -q >/dev/null
cp scripts/gpu_run.sh "$OUT/"
echo "$FLAVOR" > "$OUT/flavor"
du -sh "$OUT"
size=$(du -sm "$OUT" | cut -f1)
if (( size > 60 )); then echo "bundle is ${size} MiB: over the carry limit" >&2; exit 1; fi

#!/usr/bin/env bash
# Bundle what a GPU machine with no registry needs to run kvbridge's GPU tests: the Rust test
# binaries and the NIXL runtime's UCX subset (not the whole wheel: the carry limit is 64 MiB).
#
#   scripts/gpu_bundle.sh [OUT]        # default OUT=target/gpu-bundle
#   # on the GPU machine, from the repository root:
#   KVBRIDGE_NIXL_LIB_DIR=$OUT/rt/.nixl_cu12.mesonpy.libs UCX_NET_DEVICES=lo \
#     KVBRIDGE_GPU_TESTS=require $OUT/bin/gpu --nocapture --test-threads=1
#
# The layout of the wheel's two library folders is kept, so their relative RPATHs
# ($ORIGIN/../nixl_cu12.libs) still resolve. Only libnixl*, the UCX plugin, UCX and its
# transport modules (CUDA included) and what they link from the wheel are copied. The
# wheel's files are proprietary: the bundle lives under target/ and is never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
RT="${KVBRIDGE_CACHE:-$HOME/.cache/kvbridge}/nixl-rt-1.5.1"
OUT="${1:-target/gpu-bundle}"
M="$RT/.nixl_cu12.mesonpy.libs"
L="$RT/nixl_cu12.libs"
[[ -f "$M/libnixl_capi.so" ]] || { echo "NIXL runtime not found in $RT: run make setup" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT/rt/.nixl_cu12.mesonpy.libs/plugins" "$OUT/rt/nixl_cu12.libs/ucx" "$OUT/bin"
cp "$M"/lib*.so* "$OUT/rt/.nixl_cu12.mesonpy.libs/"
rm -f "$OUT"/rt/.nixl_cu12.mesonpy.libs/{libobj_utils.so,libnixl_test_utils.so}  # object-store plugin and test helpers
cp "$M/plugins/libplugin_UCX.so" "$OUT/rt/.nixl_cu12.mesonpy.libs/plugins/"
# UCX's transport modules: shared memory and CUDA (loopback on one GPU machine; no InfiniBand).
for f in "$L"/ucx/libuct_cma.so* "$L"/ucx/libuct_cuda.so* "$L"/ucx/libucm_cuda.so*; do
  [[ -e "$f" ]] && cp -P "$f" "$OUT/rt/nixl_cu12.libs/ucx/"
done
# Everything those link from the wheel's own library folder (transitively, via ldd).
objs=("$OUT"/rt/.nixl_cu12.mesonpy.libs/*.so "$OUT"/rt/.nixl_cu12.mesonpy.libs/plugins/*.so "$OUT"/rt/nixl_cu12.libs/ucx/*.so*)
LD_LIBRARY_PATH="$M:$L" ldd "${objs[@]}" 2>/dev/null | awk '$3 ~ /nixl_cu12\.libs\// {print $3}' | sort -u |
  while read -r dep; do cp -n "$(readlink -f "$dep")" "$OUT/rt/nixl_cu12.libs/$(basename "$dep")"; done

# The GPU test binary (and the CUDA unit tests of kvbridge-nixl), built here.
for target in "--test gpu" "--lib"; do
  exe=$(cargo test -p kvbridge-nixl $target --no-run --message-format=json 2>/dev/null |
        jq -r 'select(.reason == "compiler-artifact" and .executable != null) | .executable' | tail -1)
  name=$([[ "$target" == "--lib" ]] && echo nixl-lib || echo gpu)
  cp "$exe" "$OUT/bin/$name"
done
strip "$OUT"/bin/* 2>/dev/null || true
if ldd "${objs[@]}" 2>/dev/null | grep -q "not found"; then
  ldd "${objs[@]}" | grep "not found" >&2; echo "bundle misses a library" >&2; exit 1
fi
# Self-check: the bundled runtime alone loads here (CUDA tests skip on a machine without a GPU).
env -i PATH=/usr/bin:/bin KVBRIDGE_NIXL_LIB_DIR="$PWD/$OUT/rt/.nixl_cu12.mesonpy.libs" UCX_NET_DEVICES=lo CI=true \
  "$OUT/bin/gpu" --test-threads=1 -q >/dev/null
du -sh "$OUT"
size=$(du -sm "$OUT" | cut -f1)
if (( size > 60 )); then echo "bundle is ${size} MiB: over the carry limit" >&2; exit 1; fi

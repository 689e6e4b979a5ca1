"""kvbridge: a KV-cache connector for disaggregated (prefill/decode) LLM inference.

The logic lives in Rust (``kvbridge._native``); this package re-exports it and adds the
vLLM connector (:mod:`kvbridge.vllm`) and the P/D proxy (:mod:`kvbridge.proxy`).
"""
from __future__ import annotations

import importlib.util
import os

from kvbridge._native import (  # noqa: F401  (re-exports)
    ConfigError,
    HandshakeError,
    KvbridgeError,
    NixlRuntimeMissing,
    ParamsError,
    PlanError,
    PushError,
    RoleError,
    Scheduler,
    TransportError,
    WireError,
    Worker,
    __version__,
    init_logging,
    nixl_runtime_available,
    validate_kv_transfer_params,
)


def nixl_lib_dir() -> str | None:
    """The NIXL runtime directory: ``KVBRIDGE_NIXL_LIB_DIR``, else the libs shipped by an
    installed ``nixl-cu12`` wheel (``site-packages/.nixl_cu12.mesonpy.libs``)."""
    env = os.environ.get("KVBRIDGE_NIXL_LIB_DIR") or os.environ.get("NIXL_LIB_DIR")
    if env:
        return env
    spec = importlib.util.find_spec("nixl_cu12")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    libs = os.path.join(site, ".nixl_cu12.mesonpy.libs")
    return libs if os.path.isdir(libs) else None


__all__ = [
    "ConfigError", "HandshakeError", "KvbridgeError", "NixlRuntimeMissing", "ParamsError",
    "PlanError", "PushError", "RoleError", "Scheduler", "TransportError", "WireError", "Worker",
    "__version__", "init_logging", "nixl_lib_dir", "nixl_runtime_available",
    "validate_kv_transfer_params",
]

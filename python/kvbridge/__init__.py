"""kvbridge: a KV-cache connector for disaggregated (prefill/decode) LLM inference.

The logic lives in Rust (``kvbridge._native``); this package re-exports it and adds the
vLLM connector (:mod:`kvbridge.vllm`) and the P/D proxy (:mod:`kvbridge.proxy`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

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
)
from kvbridge._native import inspect as _inspect
from kvbridge._native import (  # noqa: F401  (re-exports)
    validate_kv_transfer_params,
)


def inspect(host: str, port: int, timeout: float = 2.0) -> dict[str, Any]:
    """Ask the worker whose side channel listens at ``host:port`` what it holds.

    Returns its accounting: ``held_requests``/``held_blocks`` (P: blocks held for remote
    readers, pull leases and push holds), ``loading_requests``/``loading_blocks`` (D: loads
    in flight), and counters (``expired_leases``, ``released_leases``, heartbeats, reads,
    handshakes). "Nothing leaked" is ``held_blocks == 0 and loading_blocks == 0`` once the
    engines are idle. Raises ``HandshakeError`` if the listener does not answer.
    """
    return json.loads(_inspect(host, port, timeout))


def nixl_lib_dir() -> str | None:
    """The NIXL runtime directory: ``KVBRIDGE_NIXL_LIB_DIR``, else the libs shipped by an
    installed ``nixl-cu13`` or ``nixl-cu12`` wheel (``site-packages/.nixl_cuXX.mesonpy.libs``).
    With both installed, the one matching an already imported torch's CUDA major version
    wins, else ``nixl-cu12``."""
    env = os.environ.get("KVBRIDGE_NIXL_LIB_DIR") or os.environ.get("NIXL_LIB_DIR")
    if env:
        return env
    torch = sys.modules.get("torch")
    cuda = str(getattr(getattr(torch, "version", None), "cuda", None) or "")
    order = ("nixl_cu13", "nixl_cu12") if cuda.startswith("13") else ("nixl_cu12", "nixl_cu13")
    for name in order:
        found = _wheel_libs(name)
        if found:
            return found
    return None


def _wheel_libs(package: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    libs = os.path.join(site, f".{package}.mesonpy.libs")
    return libs if os.path.isdir(libs) else None


__all__ = [
    "ConfigError", "HandshakeError", "KvbridgeError", "NixlRuntimeMissing", "ParamsError",
    "PlanError", "PushError", "RoleError", "Scheduler", "TransportError", "WireError", "Worker",
    "__version__", "init_logging", "inspect", "nixl_lib_dir", "nixl_runtime_available",
    "validate_kv_transfer_params",
]

#!/usr/bin/env python3
"""First-contact cost in NIXL: `load_remote_md` (UCX endpoint wire-up) between two bare
agents in one process, with UCX error handling "peer" (NIXL's default, kvbridge's) and "none".

Usage: UCX_NET_DEVICES=lo python benches/handshake_probe.py [peer none ...]
Prints the milliseconds of five first contacts per mode. Needs the `nixl` Python package
(installed in the test venv by `make setup`).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from nixl._api import nixl_agent, nixl_agent_config


def agent(name: str, mode: str) -> tuple[Any, np.ndarray]:
    """An agent with one UCX backend in error-handling ``mode`` and 1 MiB of DRAM registered."""
    a = nixl_agent(name, nixl_agent_config(backends=[]))
    params = dict(a.get_plugin_params("UCX"))
    params["ucx_error_handling_mode"] = mode
    a.create_backend("UCX", params)
    buf = np.zeros(1 << 20, dtype=np.uint8)
    a.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    return a, buf  # the buffer must outlive the registration


def main() -> None:
    keep = []
    for mode in sys.argv[1:] or ["peer", "none"]:
        times = []
        for i in range(5):
            a, abuf = agent(f"a-{mode}-{i}", mode)
            b, bbuf = agent(f"b-{mode}-{i}", mode)
            md = b.get_agent_metadata()
            t0 = time.perf_counter()
            a.add_remote_agent(md)
            times.append((time.perf_counter() - t0) * 1e3)
            keep.append((a, b, abuf, bbuf))
        print(f"{mode}: load_remote_md ms {[round(x, 1) for x in times]}", flush=True)


if __name__ == "__main__":
    main()

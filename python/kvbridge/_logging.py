"""Rust log lines in vLLM's format.

kvbridge's Rust code logs through ``tracing``; ``_native.init_logging`` hands each line to
Python's ``logging.getLogger("kvbridge")`` (from one background thread, see
``crates/kvbridge-py/src/pylog.rs``). In a vLLM process that logger is given vLLM's own
handlers, so kvbridge lines carry the same prefix, time format, colour and stream as
vLLM's. ``KVBRIDGE_LOG`` filters at the source (default "info"; e.g.
"info,kvbridge_core=debug"); ``KVBRIDGE_LOG_STDERR=1`` writes Rust lines straight to stderr
instead.
"""

from __future__ import annotations

import atexit
import logging
import os

from kvbridge import _native

_done = False


def setup_vllm_logging() -> None:
    """Route Rust logs to the ``kvbridge`` logger with vLLM's handlers (idempotent)."""
    global _done
    if _done:
        return
    _done = True
    kb, vllm_logger = logging.getLogger("kvbridge"), logging.getLogger("vllm")
    if not kb.handlers and vllm_logger.handlers:
        for h in vllm_logger.handlers:
            if type(h) is logging.StreamHandler:
                # Same stream and formatter, but no level of its own: KVBRIDGE_LOG (applied
                # in Rust, before anything is formatted) decides which lines exist.
                mine = logging.StreamHandler(h.stream)
                mine.setFormatter(h.formatter)
                kb.addHandler(mine)
            else:
                kb.addHandler(h)
        kb.setLevel(1)
        kb.propagate = False
    to_python = os.environ.get("KVBRIDGE_LOG_STDERR", "") not in ("1", "true")
    _native.init_logging(None, to_python)
    if to_python:
        atexit.register(_native.stop_logging)

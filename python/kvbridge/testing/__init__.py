"""Test and benchmark helpers for running vLLM prefill/decode pairs locally (see ``cluster``)."""

from kvbridge.testing.cluster import (
    Cluster,
    CompletionResult,
    XferRecord,
    complete,
    cpu_delta,
    cpu_seconds,
    cpu_snapshot,
    cpu_used,
    parse_xfer_lines,
    random_prompt,
)

__all__ = [
    "Cluster",
    "CompletionResult",
    "XferRecord",
    "complete",
    "cpu_delta",
    "cpu_seconds",
    "cpu_snapshot",
    "cpu_used",
    "parse_xfer_lines",
    "random_prompt",
]

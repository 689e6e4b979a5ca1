"""vLLM stats and Prometheus metrics for kvbridge, under NixlConnector's names.

The worker's Rust core records each transfer and failure with the keys of vLLM's
``NixlKVConnectorStats`` (``kvbridge._native.Worker.take_xfer_stats``); these classes
reuse vLLM's own aggregation, log line and Prometheus metrics (``vllm:nixl_xfer_time_seconds``,
``vllm:nixl_post_time_seconds``, ``vllm:nixl_bytes_transferred``, ``vllm:nixl_num_descriptors``,
``vllm:nixl_num_failed_transfers``, ``vllm:nixl_num_failed_notifications``,
``vllm:nixl_num_kv_expired_reqs``, ...), same buckets, so dashboards built for
NixlConnector work unchanged. kvbridge adds ``vllm:kvbridge_handshake_time_seconds``,
``vllm:kvbridge_held_blocks`` and ``vllm:kvbridge_integrity_mismatches`` (blocks whose bytes
differed from the prefill engine's digest, ``kv_integrity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats, NixlPromMetrics
from vllm.v1.metrics.utils import create_metric_per_engine

EXTRA_KEYS = ("handshake_duration", "held_blocks", "num_integrity_mismatches")
HANDSHAKE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


@dataclass
class KVBridgeKVConnectorStats(NixlKVConnectorStats):
    """NixlKVConnectorStats plus handshake times and held blocks."""

    def reset(self) -> None:
        super().reset()
        for k in EXTRA_KEYS:
            self.data[k] = []

    def is_empty(self) -> bool:
        return super().is_empty() and not any(self.data.get(k) for k in EXTRA_KEYS)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if not other.is_empty():
            for k, v in other.data.items():
                self.data.setdefault(k, []).extend(v)
        return self

    def reduce(self) -> dict[str, int | float]:
        out = super().reduce()
        hs = self.data.get("handshake_duration") or []
        if hs:
            out["Num handshakes"] = len(hs)
            out["Avg handshake (ms)"] = round(sum(hs) / len(hs) * 1e3, 3)
        held = self.data.get("held_blocks") or []
        if held:
            out["Held blocks (max)"] = max(held)
        bad = self.data.get("num_integrity_mismatches") or []
        if bad:
            out["KV integrity mismatches"] = len(bad)
        return out


class KVBridgePromMetrics(NixlPromMetrics):
    """NixlConnector's metrics plus kvbridge's handshake histogram and held-blocks gauge."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:  # fmt: skip
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        handshake = self._histogram_cls(
            name="vllm:kvbridge_handshake_time_seconds",
            documentation="First contact with a remote engine: handshake with each of its ranks to a ready transfer plan.",
            buckets=HANDSHAKE_BUCKETS,
            labelnames=labelnames,
        )
        self.kvbridge_handshake_time = create_metric_per_engine(handshake, self.per_engine_labelvalues)
        held = self._gauge_cls(
            name="vllm:kvbridge_held_blocks",
            documentation="KV blocks a worker holds for remote readers (largest sample in the last interval).",
            labelnames=labelnames,
            multiprocess_mode="mostrecent",
        )
        self.kvbridge_held_blocks = create_metric_per_engine(held, self.per_engine_labelvalues)
        bad = self._counter_cls(
            name="vllm:kvbridge_integrity_mismatches",
            documentation="Loaded KV blocks whose bytes differed from the prefill engine's digest (kv_integrity); each failed its load.",
            labelnames=labelnames,
        )
        self.kvbridge_integrity_mismatches = create_metric_per_engine(bad, self.per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = {k: transfer_stats_data.get(k, []) for k in NixlKVConnectorStats().data}
        super().observe(data, engine_idx)
        for secs in transfer_stats_data.get("handshake_duration", []):
            self.kvbridge_handshake_time[engine_idx].observe(secs)
        held = transfer_stats_data.get("held_blocks") or []
        if held:
            self.kvbridge_held_blocks[engine_idx].set(max(held))
        bad = transfer_stats_data.get("num_integrity_mismatches") or []
        if bad:
            self.kvbridge_integrity_mismatches[engine_idx].inc(len(bad))

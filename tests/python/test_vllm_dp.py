"""Data parallelism in real vLLM: P runs ``--data-parallel-size 2`` (two independent engine
cores behind one API server, vLLM balancing requests between them), D runs alone.

Each DP rank of P is its own kvbridge engine: vLLM names it ``<engine_id>_dp<N>`` and gives
it ``data_parallel_index`` N, and its listener is at ``base + N`` (TP 1, PP 1). The test
prefills concurrently so both ranks serve, and checks that each request's params name the
rank that prefilled it (engine id and port agree), that D reads every byte from that rank,
and that D's output is bit-identical to D alone (float16).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import expected_kv_bytes, figure, fresh_prompt, log_dir_for

from kvbridge.testing.cluster import Cluster, complete, describe_divergence, same_generation

pytestmark = pytest.mark.slow

P_SIDE = 5970
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(model_dir: Path) -> Iterator[Cluster]:
    c = Cluster(
        model_dir, log_dir=log_dir_for(__name__), p_port=8360, d_port=8361, proxy_port=8362,
        side_ports=(P_SIDE, 5980), dtype="float16", p_dp=2, start_timeout=600,
        # Two P engines holding leases step without pause on this box's two cores: D is slow.
        extra_config={"kv_lease_duration": 300},
    )  # fmt: skip
    with c:
        yield c


def test_d_reads_from_the_dp_rank_that_prefilled(cluster: Cluster) -> None:
    c = cluster
    prompts = [fresh_prompt(300 + 10 * i) for i in range(4)]
    # References first: while P holds leases its engines keep stepping (as vLLM does for
    # delayed frees), and on two cores D is then slow.
    refs = [c.reference(q, MAX_TOKENS) for q in prompts]
    ranks = set()
    # Rounds of two concurrent prefills (so vLLM spreads them over its DP ranks), each
    # read by D right away, one at a time (batching would change D's numerics).
    for first in range(0, len(prompts), 2):
        prefilled: dict[int, object] = {}

        def go(i: int) -> None:
            prefilled[i] = c.prefill(prompts[i])

        threads = [threading.Thread(target=go, args=(i,)) for i in (first, first + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for i in (first, first + 1):
            prompt, p, ref = prompts[i], prefilled.get(i), refs[i]
            assert p is not None and p.ok and p.kv_transfer_params, p
            kp = p.kv_transfer_params
            rank = kp["remote_port"] - P_SIDE
            assert rank in (0, 1) and kp["remote_engine_id"].endswith(f"_dp{rank}"), kp
            ranks.add(rank)
            assert ref.ok, ref
            offset = c.log_offset("decode")
            res = complete(c.d_url, prompt, MAX_TOKENS, kp, stream=True, logprobs=2)
            assert res.ok, res
            assert same_generation(res, ref, exact=c.exact_for(len(prompt))), describe_divergence(res, ref)
            records = c.xfer_since(offset, count=1, timeout=10.0)
            assert len(records) == 1 and records[0].bytes == expected_kv_bytes(len(prompt)), records
    figure(f"dp_ranks_used={len(ranks)}")
    assert ranks == {0, 1}, f"vLLM sent every prefill to DP rank(s) {ranks}"

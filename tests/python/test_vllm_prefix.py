"""D with prefix caching on: a repeated prompt makes D read only the blocks it lacks.

One cluster for the module, prefix caching on D and off on P. P recomputes every prompt in full,
so each request's transferred bytes are identical: with P caching too, P would compute a repeated
prompt's tail on top of its cached prefix, whose few-ulp differences can flip one of the tiny
random model's near-tied greedy choices many tokens later. The same prompt goes through P/D twice,
each time with fresh params from P; the second time D finds the prompt's full blocks in its own
cache, so it must read fewer bytes (at most the tail block) and produce the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BLOCK_BYTES, expected_kv_bytes, fresh_prompt, log_dir_for

from kvbridge.testing.cluster import Cluster, complete, describe_divergence, same_generation

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
N_TOKENS = 1024  # 8 full blocks


@pytest.fixture(scope="module")
def cluster(model_dir: Path, connector: str) -> Iterator[Cluster]:
    c = Cluster(
        model_dir, connector=connector, log_dir=log_dir_for(__name__),
        p_port=8130, d_port=8230, proxy_port=8030, side_ports=(5630, 5730), prefix_caching=True, p_prefix_caching=False,
        dtype="float16",
    )  # fmt: skip
    with c:
        yield c


def test_repeated_prompt_reads_only_missing_blocks(cluster: Cluster, connector: str) -> None:
    prompt = fresh_prompt(N_TOKENS)

    offset = cluster.log_offset("decode")
    first = cluster.pd_request(prompt, MAX_TOKENS, logprobs=2)
    assert first.decode.ok, first
    assert len(first.tokens) == MAX_TOKENS
    first_xfer = cluster.xfer_since(offset, count=1, timeout=5.0)

    offset = cluster.log_offset("decode")
    second = cluster.pd_request(prompt, MAX_TOKENS, logprobs=2)  # fresh P params, same prompt
    assert second.decode.ok, second
    assert same_generation(second.decode, first.decode, exact=cluster.exact_for(len(prompt))), f"D reusing its prefix cache: {describe_divergence(second.decode, first.decode)}"
    second_xfer = cluster.xfer_since(offset, count=1, timeout=3.0)

    # A different prompt still moves its whole KV (the cache holds only what was seen).
    other = fresh_prompt(N_TOKENS)
    offset = cluster.log_offset("decode")
    third = cluster.pd_request(other, MAX_TOKENS)
    assert third.decode.ok, third
    third_xfer = cluster.xfer_since(offset, count=1, timeout=5.0)

    # Single-instance reference on P (no prefix cache there: a full local prefill).
    ref = complete(cluster.p_url, prompt, MAX_TOKENS, logprobs=2)
    assert ref.ok, ref
    assert same_generation(first.decode, ref, exact=cluster.exact_for(len(prompt))), describe_divergence(first.decode, ref)

    if connector == "kvbridge":
        assert len(first_xfer) == 1, first_xfer
        assert first_xfer[0].bytes == expected_kv_bytes(N_TOKENS), first_xfer
        second_bytes = sum(r.bytes for r in second_xfer)  # no line at all: nothing read
        assert second_bytes < first_xfer[0].bytes, (first_xfer, second_xfer)
        assert second_bytes <= BLOCK_BYTES, f"read {second_bytes} bytes; at most the tail block expected"
        assert len(third_xfer) == 1 and third_xfer[0].bytes == expected_kv_bytes(N_TOKENS), third_xfer

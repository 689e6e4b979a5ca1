"""P-side staging (``kv_staging_blocks``) through real vLLM: P copies a finished prefill's
KV into connector-owned DRAM, vLLM frees P's blocks at once, and D reads the staging slots.

One cluster for the module: P + D (prefix caching off) + the proxy, with 24 staging slots
on P (a 2048-token prompt takes 16 at vLLM-CPU's 128-token blocks).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import expected_kv_bytes, fresh_prompt, log_dir_for

from kvbridge.testing.cluster import Cluster, complete, describe_divergence, same_generation

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
SLOTS = 24


@pytest.fixture(scope="module")
def cluster(model_dir: Path, connector: str) -> Iterator[Cluster]:
    if connector != "kvbridge":
        pytest.skip("staging is a kvbridge feature (kv_staging_blocks)")
    c = Cluster(
        model_dir, connector="kvbridge", log_dir=log_dir_for(__name__), extra_config={"kv_staging_blocks": SLOTS},
        p_port=8150, d_port=8250, proxy_port=8050, side_ports=(5650, 5750), prefix_caching=False, dtype="float16",
    )  # fmt: skip
    with c:
        yield c


def _p_step(c: Cluster) -> None:
    """One plain request on P, so its engine steps (its worker then reads D's notifications)."""
    assert complete(c.p_url, fresh_prompt(8), 1).ok


def test_staged_requests_free_p_blocks_at_once_and_decode_equal(cluster: Cluster) -> None:
    for n_tokens in (129, 2048, 511):
        prompt = fresh_prompt(n_tokens)
        pre = cluster.prefill(prompt)
        assert pre.ok and pre.kv_transfer_params, pre
        params = pre.kv_transfer_params
        assert params.get("remote_staged") is True, params
        # vLLM freed P's blocks when the request ended, though D has not read yet (without
        # staging they stay held for the lease, 30 s). Its gauges come with its last step.
        deadline = time.monotonic() + 5.0
        while cluster.metrics("prefill").get("kv_cache_usage_perc", 1.0) != 0.0:
            assert time.monotonic() < deadline, f"P still holds KV blocks: {cluster.metrics('prefill')}"
            time.sleep(0.1)
        offset = cluster.log_offset("decode")
        d = complete(cluster.d_url, prompt, MAX_TOKENS, params, stream=True, logprobs=2)
        assert d.ok, d
        # The KV was read from P's slots, not computed by D alone: every prompt block moved.
        records = cluster.xfer_since(offset, count=1, timeout=5.0)
        assert len(records) == 1 and records[0].bytes == expected_kv_bytes(n_tokens), records
        ref = cluster.reference(prompt, MAX_TOKENS)
        assert ref.ok and same_generation(d, ref, exact=cluster.exact_for(len(prompt))) and len(d.tokens) == MAX_TOKENS, f"{n_tokens} tokens: {describe_divergence(d, ref)}"


def test_staging_slots_recycle(cluster: Cluster) -> None:
    """Many more blocks than slots pass through (D's word frees each request's slots), and
    when the slots are taken a request is held in place instead: tokens equal either way."""
    _p_step(cluster)
    for i in range(6):  # 6 x 16 blocks through 24 slots
        prompt = fresh_prompt(2048)
        offset = cluster.log_offset("decode")
        pd = cluster.pd_request(prompt, MAX_TOKENS, logprobs=2)
        assert pd.decode.ok, pd.decode
        records = cluster.xfer_since(offset, count=1, timeout=5.0)
        assert len(records) == 1 and records[0].bytes == expected_kv_bytes(2048), f"request {i}: {records}"
        assert pd.prefill.kv_transfer_params.get("remote_staged") is True, f"request {i} not staged: slots not recycled?"
        assert same_generation(pd.decode, cluster.reference(prompt, MAX_TOKENS), exact=cluster.exact_for(len(prompt))), f"request {i}"
        _p_step(cluster)  # P's worker reads D's notification; the scheduler frees the slots
    # Two unread prefills at once exceed the slots: the second is held in place.
    pa, pb = fresh_prompt(2048), fresh_prompt(2048)
    a, b = cluster.prefill(pa), cluster.prefill(pb)
    flags = [a.kv_transfer_params.get("remote_staged"), b.kv_transfer_params.get("remote_staged")]
    assert flags == [True, None], flags
    assert cluster.metrics("prefill").get("kv_cache_usage_perc", 0.0) > 0.0, "the in-place request holds its blocks"
    for prompt, pre in ((pa, a), (pb, b)):
        d = complete(cluster.d_url, prompt, MAX_TOKENS, pre.kv_transfer_params, stream=True, logprobs=2)
        assert d.ok and same_generation(d, cluster.reference(prompt, MAX_TOKENS), exact=cluster.exact_for(len(prompt))), d


def test_nothing_left_held(cluster: Cluster) -> None:
    """After D has read everything, P holds no blocks and no slots for anyone."""
    prompt = fresh_prompt(700)
    pd = cluster.pd_request(prompt, 4)
    assert pd.decode.ok
    _p_step(cluster)
    deadline = time.monotonic() + 10.0
    while True:
        acct = cluster.held("prefill")
        if acct["held_blocks"] == 0:
            break
        assert time.monotonic() < deadline, acct
        time.sleep(1.0)
        _p_step(cluster)

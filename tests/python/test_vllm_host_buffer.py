"""Host-buffer transfers (vLLM's ``kv_buffer_device="cpu"``) through real vLLM.

On a GPU engine ``kv_buffer_device="cpu"`` turns them on; this CPU machine forces them with
``kv_host_buffer: true`` on both servers, so NIXL moves a host mirror of each cache and never
the cache: P copies each finished prefill's blocks into its mirror in ``wait_for_save``, D
reads into its own mirror and copies what it read into its cache before vLLM hears the load
finished. Only the copy primitive differs on a GPU (CUDA memcpy; ``crates/kvbridge-nixl/
tests/gpu/main.rs``).

Both servers run with ``--max-num-batched-tokens 256``, so prompts over 256 tokens are
prefilled in chunks and the copy must wait for the last one. The module runs twice: pull
(D reads P's host buffer) and push (P writes from its host buffer into D's, whole requests).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import expected_kv_bytes, fresh_prompt, log_dir_for

from kvbridge.testing.cluster import BF16_STEP_NATS, Cluster, complete, describe_divergence, same_generation

pytestmark = pytest.mark.slow

MAX_TOKENS = 16


@pytest.fixture(scope="module", params=["pull", "push"])
def cluster(request: pytest.FixtureRequest, model_dir: Path, connector: str) -> Iterator[Cluster]:
    if connector != "kvbridge":
        pytest.skip("kv_host_buffer forces kvbridge's host buffer on a CPU engine (NixlConnector has no such switch)")
    push = request.param == "push"
    off = 5 if push else 0
    c = Cluster(
        model_dir, connector="kvbridge-push" if push else "kvbridge", log_dir=log_dir_for(__name__) / request.param,
        extra_config={"kv_host_buffer": True}, p_port=8170 + off, d_port=8270 + off, proxy_port=8070 + off,
        side_ports=(5670 + off, 5770 + off), prefix_caching=False, server_args=("--max-num-batched-tokens", "256"),
        dtype="float16",
    )  # fmt: skip
    with c:
        yield c


def test_both_servers_move_a_host_buffer(cluster: Cluster) -> None:
    for name in ("prefill", "decode"):
        log = cluster.log_path(name).read_text(errors="replace")
        assert "host buffer allocated" in log and "host_buffer=true" in log, f"{name}: no host buffer in {cluster.log_path(name)}"


@pytest.mark.parametrize("n_tokens", [129, 700, 2048])
def test_host_buffer_tokens_equal_single_instance(cluster: Cluster, n_tokens: int) -> None:
    """700 and 2048 tokens are prefilled in 3 and 8 chunks: P offers (pull) or writes (push)
    the KV only if the copy ran after the last chunk; the request fails otherwise."""
    prompt = fresh_prompt(n_tokens)
    offset = cluster.log_offset("decode")
    res = cluster.proxy_request(prompt, MAX_TOKENS, logprobs=2)
    assert res.ok, res
    if not cluster.push:  # pull: D logs each READ
        records = cluster.xfer_since(offset, count=1, timeout=5.0)
        assert len(records) == 1 and records[0].bytes == expected_kv_bytes(n_tokens), records
    ref = cluster.reference(prompt, MAX_TOKENS)
    assert same_generation(res, ref, exact=cluster.exact_for(len(prompt))) and len(res.tokens) == MAX_TOKENS, describe_divergence(res, ref)
    # D's first token is computed on the KV it loaded: its distribution must match, to one
    # bf16 step of a logit, the bound same_generation allows at earlier positions (CI saw a
    # step there; one local run of this module failed the tighter 1e-3 here, values unkept).
    got, want = res.top_logprobs[0], ref.top_logprobs[0]
    shared = got.keys() & want.keys()
    assert shared and all(abs(got[k] - want[k]) <= BF16_STEP_NATS for k in shared), (got, want)


def test_nothing_left_held(cluster: Cluster) -> None:
    """After D has its KV, P's blocks are released (P needs a step to read D's word)."""
    assert cluster.proxy_request(fresh_prompt(300), 4).ok
    deadline = time.monotonic() + 10.0
    while cluster.held("prefill")["held_blocks"] != 0:
        assert time.monotonic() < deadline, cluster.held("prefill")
        assert complete(cluster.p_url, fresh_prompt(8), 1).ok
        time.sleep(0.5)

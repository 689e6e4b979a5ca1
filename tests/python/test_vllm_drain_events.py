"""Scale-down and routing through real vLLM: KV events from P, and P drained on SIGTERM.

- KV events (``--kv-events-config`` on P, vLLM's own ZMQ publisher): when P offers a
  finished prefill to D it publishes ``BlockStored`` for the prompt's full blocks
  (``ownership="kvbridge"``, their token ids and hashes), and ``BlockRemoved`` with the same
  hashes once D has read them. A subscriber decodes them with vLLM's own event types.
- Drain (P runs with ``--shutdown-timeout``): SIGTERM P while it holds a prefilled request
  D has not read; P refuses new work but stays up, D's READ still succeeds (bytes moved,
  output bit-identical to D alone), and P exits once D is done, inside the bound.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BLOCK_TOKENS, expected_kv_bytes, figure, fresh_prompt, log_dir_for

from kvbridge.testing.cluster import Cluster, complete, describe_divergence, same_generation

pytestmark = pytest.mark.slow

EVENTS_PORT = 5950
SHUTDOWN_TIMEOUT = 60
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(model_dir: Path) -> Iterator[Cluster]:
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{EVENTS_PORT}", "topic": "kv"}
    c = Cluster(
        model_dir, log_dir=log_dir_for(__name__), p_port=8350, d_port=8351, proxy_port=8352,
        side_ports=(5930, 5940), dtype="float16",
        p_server_args=("--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--kv-events-config", json.dumps(events)),
    )  # fmt: skip
    with c:
        yield c


def test_p_publishes_kv_events_for_blocks_it_offers_and_releases(cluster: Cluster) -> None:
    import msgspec
    import zmq
    from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

    c = cluster
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, 500)
    sub.connect(f"tcp://127.0.0.1:{EVENTS_PORT}")
    sub.setsockopt_string(zmq.SUBSCRIBE, "kv")
    time.sleep(1.0)  # a SUB socket misses what is published before it has joined
    dec = msgspec.msgpack.Decoder(type=KVEventBatch)
    prompt = fresh_prompt(300)
    try:
        res = c.proxy_request(prompt, MAX_TOKENS)
        assert res.ok, res
        stored: list[BlockStored] = []
        removed: list[BlockRemoved] = []
        deadline = time.monotonic() + 15
        while not removed and time.monotonic() < deadline:
            try:
                _topic, _seq, payload = sub.recv_multipart()
            except zmq.Again:
                continue
            for e in dec.decode(payload).events:
                if getattr(e, "ownership", None) != "kvbridge":
                    continue
                (stored if isinstance(e, BlockStored) else removed).append(e)
    finally:
        sub.close(0)
    full = len(prompt) // BLOCK_TOKENS
    assert len(stored) == 1, stored
    s = stored[0]
    assert (s.block_size, len(s.block_hashes), s.token_ids, s.medium) == (BLOCK_TOKENS, full, prompt[: full * BLOCK_TOKENS], "CPU")
    assert [r.block_hashes for r in removed] == [s.block_hashes], "the blocks D read are reported removed, once"
    figure(f"kv_events_stored_blocks={len(s.block_hashes)}")


def test_sigterm_drains_p_until_d_has_read(cluster: Cluster) -> None:
    c = cluster
    prompt = fresh_prompt(400)
    ref = c.reference(prompt, MAX_TOKENS)
    assert ref.ok, ref
    p = c.prefill(prompt)
    assert p.ok and p.kv_transfer_params, p
    assert c.held("prefill")["held_requests"] == 1
    t0 = time.monotonic()
    c.terminate("prefill")
    time.sleep(2.0)
    assert c.alive("prefill"), "P exited with a block D had not read"
    # New work is refused while P drains.
    assert not c.prefill(fresh_prompt(50)).ok
    offset = c.log_offset("decode")
    res = complete(c.d_url, prompt, MAX_TOKENS, p.kv_transfer_params, stream=True, logprobs=2)
    assert res.ok, res
    assert same_generation(res, ref, exact=c.exact_for(len(prompt))), describe_divergence(res, ref)
    records = c.xfer_since(offset, count=1, timeout=5.0)
    assert len(records) == 1 and records[0].bytes == expected_kv_bytes(len(prompt)), records
    exited = c.wait_exit("prefill", SHUTDOWN_TIMEOUT)
    assert exited is not None, f"P did not exit within --shutdown-timeout {SHUTDOWN_TIMEOUT}"
    total = time.monotonic() - t0
    figure(f"drain_p_exit_after_sigterm_s={total:.2f}")
    assert total < SHUTDOWN_TIMEOUT
    log = c.log_path("prefill").read_text(errors="replace")
    assert "start mode=drain" in log
    c.procs.pop("prefill", None)

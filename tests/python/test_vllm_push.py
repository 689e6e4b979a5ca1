"""Real vLLM push-mode P/D: P WRITEs the KV into blocks D registered with it.

Two clusters (KVBridgePushConnector on P and D, the proxy in ``--mode push``): layer-wise
push on, then off. For each, tokens through the proxy must equal D computing alone, P must
have written exactly the prompt's blocks, and both orders (D registers before P computes,
P finishes before D registers) are driven explicitly. Failures — an unknown transfer id,
a registration for another engine, malformed push params — must fail only that request,
fast where P can say so, and leave no block held on either side.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import expected_kv_bytes, fresh_prompt, log_dir_for

from kvbridge.testing.cluster import ANSI_RE, Cluster, CompletionResult, complete, describe_divergence, same_generation

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
#: Short leases so the orphan-registration test ends in seconds (P's lease, D's timeout).
LEASE = 8.0
PUSH_RE = re.compile(r"kvbridge-push request_id=(\S+) key=(\S+) bytes=(\d+) secs=(\S+) layerwise=(true|false)")


@pytest.fixture(scope="module", params=[True, False], ids=["layerwise", "whole"])
def cluster(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[Cluster]:
    layerwise = request.param
    c = Cluster(
        model_dir, connector="kvbridge-push", log_dir=log_dir_for(__name__) / ("layerwise" if layerwise else "whole"),
        p_port=8140, d_port=8240, proxy_port=8040, side_ports=(5640, 5740), prefix_caching=False,
        extra_config={"push_layerwise": layerwise, "kv_lease_duration": LEASE, "push_registration_timeout": LEASE},
        dtype="float16",
    )  # fmt: skip
    c.layerwise = layerwise  # type: ignore[attr-defined]
    with c:
        # Learn P's coordinates (the proxy's first request per P runs P, then D).
        warm = c.proxy_request(fresh_prompt(64), 2, stream=False)
        assert warm.ok, warm
        yield c


def pushes_since(c: Cluster, offset: int, count: int, timeout: float = 10.0) -> list[tuple[str, int, bool]]:
    """(P request id, bytes, layer-wise) of each finished WRITE job logged by P."""
    deadline = time.monotonic() + timeout
    while True:
        with open(c.log_path("prefill"), "rb") as fh:
            fh.seek(offset)
            text = ANSI_RE.sub("", fh.read().decode(errors="replace"))
        text = text[: text.rfind("\n") + 1]
        recs = [(m[1], int(m[3]), m[5] == "true") for m in PUSH_RE.finditer(text)]
        if len(recs) >= count or time.monotonic() > deadline:
            return recs


def kv_usage(url: str) -> float:
    """vLLM's KV-cache usage gauge (0..1) of the server at ``url``."""
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:kv_cache_usage_perc")]
    assert vals, "no vllm:kv_cache_usage_perc in /metrics"
    return max(vals)


def assert_no_blocks_held(c: Cluster, timeout: float = 3 * LEASE) -> None:
    """Every block is free again on P and D (prefix caching is off)."""
    deadline = time.monotonic() + timeout
    while True:
        usage = {name: kv_usage(url) for name, url in (("prefill", c.p_url), ("decode", c.d_url))}
        if all(u == 0.0 for u in usage.values()):
            return
        assert time.monotonic() < deadline, f"blocks still held after {timeout:.0f}s: {usage}"
        time.sleep(0.5)


def coords(c: Cluster) -> dict[str, Any]:
    return {"remote_engine_id": c.p_engine_id, "remote_host": "127.0.0.1", "remote_port": c.side_ports[0], "tp_size": 1}  # type: ignore[attr-defined]


def d_params(c: Cluster, tid: str, over: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"do_remote_prefill": True, "transfer_mode": "push", "transfer_id": tid, **coords(c), **(over or {})}


def p_params(transfer_id: str) -> dict[str, Any]:
    return {"do_remote_decode": True, "transfer_mode": "push", "transfer_id": transfer_id}


@pytest.fixture(scope="module", autouse=True)
def _engine_id(cluster: Cluster) -> None:
    p = complete(cluster.p_url, fresh_prompt(40), 1, p_params(uuid.uuid4().hex), stream=False)
    assert p.ok and p.kv_transfer_params, p
    assert p.kv_transfer_params["transfer_mode"] == "push"
    cluster.p_engine_id = p.kv_transfer_params["remote_engine_id"]  # type: ignore[attr-defined]


def _failed(res: CompletionResult) -> bool:
    return res.status >= 400 or res.finish_reason == "error" or res.error is not None


@pytest.mark.parametrize("n_tokens", [1, 127, 128, 129, 2048])
def test_push_tokens_equal_single_instance(cluster: Cluster, n_tokens: int) -> None:
    prompt = fresh_prompt(n_tokens)
    off = cluster.log_offset("prefill")
    res = cluster.proxy_request(prompt, MAX_TOKENS, stream=True, logprobs=2)
    assert res.ok, res
    ref = cluster.reference(prompt, MAX_TOKENS)
    assert ref.ok and len(ref.tokens) == MAX_TOKENS, ref
    assert same_generation(res, ref, exact=cluster.exact_for(len(prompt))), f"{n_tokens} tokens: {describe_divergence(res, ref)}"
    recs = pushes_since(cluster, off, 1)
    assert len(recs) == 1, f"expected one kvbridge-push line in {cluster.log_path('prefill')}: {recs}"
    assert recs[0][1] == expected_kv_bytes(n_tokens), recs
    if not cluster.layerwise:  # type: ignore[attr-defined]
        assert not recs[0][2], "layer-wise push is off, but a write went layer by layer"


@pytest.mark.parametrize("order", ["d_registers_first", "p_finishes_first"])
def test_push_both_orders(cluster: Cluster, order: str) -> None:
    """Drive the two legs directly: D's registration before P's forward, or after P is done."""
    prompt, tid = fresh_prompt(700), uuid.uuid4().hex
    off = cluster.log_offset("prefill")
    out: dict[str, CompletionResult] = {}

    def decode() -> None:
        out["d"] = complete(cluster.d_url, prompt, MAX_TOKENS, d_params(cluster, tid), stream=True, logprobs=2)

    if order == "d_registers_first":
        t = threading.Thread(target=decode)
        t.start()
        time.sleep(1.0)  # D has allocated and registered by now
        p = complete(cluster.p_url, prompt, 1, p_params(tid), stream=False)
        t.join(60)
    else:
        p = complete(cluster.p_url, prompt, 1, p_params(tid), stream=False)
        decode()
    assert p.ok, p
    assert out["d"].ok, out["d"]
    ref = cluster.reference(prompt, MAX_TOKENS)
    assert same_generation(out["d"], ref, exact=cluster.exact_for(len(prompt))), describe_divergence(out["d"], ref)
    recs = pushes_since(cluster, off, 1)
    assert len(recs) == 1 and recs[0][1] == expected_kv_bytes(700), recs
    # Layer-wise applies exactly when D registered before P computed.
    assert recs[0][2] == (cluster.layerwise and order == "d_registers_first"), recs  # type: ignore[attr-defined]


def test_concurrent_push_requests(cluster: Cluster) -> None:
    prompts = [fresh_prompt(n) for n in (300, 513, 1000, 64)]
    results: list[CompletionResult | None] = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = cluster.proxy_request(prompts[i], MAX_TOKENS, stream=True, logprobs=2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for prompt, res in zip(prompts, results):
        assert res is not None and res.ok, res
        ref = cluster.reference(prompt, MAX_TOKENS)
        assert same_generation(res, ref), describe_divergence(res, ref)
    assert_no_blocks_held(cluster)


def test_registration_for_another_engine_fails_fast(cluster: Cluster) -> None:
    t0 = time.monotonic()
    res = complete(cluster.d_url, fresh_prompt(300), MAX_TOKENS, d_params(cluster, uuid.uuid4().hex, {"remote_engine_id": "not-p"}))
    assert _failed(res), res
    assert time.monotonic() - t0 < LEASE, "P refuses the registration at once; D must not wait for its timeout"
    assert_no_blocks_held(cluster)


def test_unknown_transfer_id_fails_after_the_lease(cluster: Cluster) -> None:
    """D registers for a transfer P never sees: P rejects it when its TTL ends, D fails."""
    res = complete(cluster.d_url, fresh_prompt(300), MAX_TOKENS, d_params(cluster, "never-sent-to-p"))
    assert _failed(res), res
    assert_no_blocks_held(cluster)


def test_p_finishes_but_d_never_registers_frees_p_after_the_lease(cluster: Cluster) -> None:
    p = complete(cluster.p_url, fresh_prompt(400), 1, p_params(uuid.uuid4().hex), stream=False)
    assert p.ok, p
    assert kv_usage(cluster.p_url) > 0.0, "P holds the blocks for D's registration"
    assert_no_blocks_held(cluster)


@pytest.mark.parametrize(
    "bad",
    [{"remote_host": "no such host"}, {"remote_port": 0}, {"transfer_mode": "sideways"}, {"transfer_id": 7}],
    ids=["bad_host", "port_zero", "bad_mode", "transfer_id_type"],
)
def test_malformed_push_params_fail_cleanly(cluster: Cluster, bad: dict[str, Any]) -> None:
    res = complete(cluster.d_url, fresh_prompt(300), MAX_TOKENS, d_params(cluster, uuid.uuid4().hex, bad))
    assert _failed(res), res
    good = fresh_prompt(200)
    res = cluster.proxy_request(good, MAX_TOKENS, logprobs=2)
    assert res.ok and same_generation(res, cluster.reference(good, MAX_TOKENS), exact=cluster.exact_for(len(good))), res
    assert_no_blocks_held(cluster)

"""Real vLLM P/D generation through kvbridge: token equality, bytes moved, malformed params.

One cluster for the module: P + D (prefix caching off, so every P/D request moves all its KV)
+ the kvbridge proxy.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import expected_kv_bytes, fresh_prompt, log_dir_for

from kvbridge.testing.cluster import PREFILL_PARAMS, Cluster, CompletionResult, complete, describe_divergence, same_generation

pytestmark = pytest.mark.slow

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cluster(model_dir: Path, connector: str) -> Iterator[Cluster]:
    c = Cluster(
        model_dir, connector=connector, log_dir=log_dir_for(__name__),
        p_port=8120, d_port=8220, proxy_port=8020, side_ports=(5620, 5720), prefix_caching=False, dtype="float16",
    )  # fmt: skip
    with c:
        yield c


def assert_alive(c: Cluster) -> None:
    for name in ("prefill", "decode", "proxy"):
        assert c.alive(name), f"{name} died; see {c.log_path(name)}"


def assert_good_pd(c: Cluster) -> None:
    """A normal P/D request succeeds with the same tokens as D alone."""
    prompt = fresh_prompt(300)
    pd = c.pd_request(prompt, MAX_TOKENS, logprobs=2)
    alive = {name: c.alive(name) for name in ("prefill", "decode")}
    assert pd.decode.ok, f"good P/D request failed (alive: {alive}; see {c.log_path('decode')}): {pd.decode}"
    ref = c.reference(prompt, MAX_TOKENS)
    assert ref.ok, ref
    assert same_generation(pd.decode, ref, exact=c.exact_for(len(prompt))) and len(pd.tokens) == MAX_TOKENS, describe_divergence(pd.decode, ref)


@pytest.mark.parametrize("n_tokens", [1, 127, 128, 129, 511, 2048])
def test_proxy_tokens_equal_single_instance(cluster: Cluster, connector: str, n_tokens: int) -> None:
    prompt = fresh_prompt(n_tokens)
    offset = cluster.log_offset("decode")
    res = cluster.proxy_request(prompt, MAX_TOKENS, stream=True, logprobs=2)
    assert res.ok, res
    assert res.ttft is not None
    ref = cluster.reference(prompt, MAX_TOKENS)
    assert ref.ok, ref
    assert len(ref.tokens) == MAX_TOKENS
    assert same_generation(res, ref, exact=cluster.exact_for(len(prompt))), f"{n_tokens} tokens: {describe_divergence(res, ref)}"

    if connector == "kvbridge" and n_tokens > 1:
        records = cluster.xfer_since(offset, count=1, timeout=5.0)
        assert len(records) == 1, f"expected one kvbridge-xfer line in {cluster.log_path('decode')}: {records}"
        assert records[0].bytes > 0
        assert records[0].bytes == expected_kv_bytes(n_tokens), records[0]


def test_proxy_non_streaming(cluster: Cluster) -> None:
    prompt = fresh_prompt(200)
    res = cluster.proxy_request(prompt, MAX_TOKENS, stream=False, logprobs=2)
    ref = cluster.reference(prompt, MAX_TOKENS)
    assert res.ok and ref.ok, (res, ref)
    assert same_generation(res, ref, exact=cluster.exact_for(len(prompt))), describe_divergence(res, ref)


# ----------------------------------------------------------------------------- malformed params


def _real_params(c: Cluster) -> tuple[list[int], dict[str, Any]]:
    """A fresh prompt and the kv_transfer_params a real P run gave for it."""
    prompt = fresh_prompt(300)
    p = c.prefill(prompt)
    assert p.ok and p.kv_transfer_params, p
    return prompt, dict(p.kv_transfer_params)


def _missing_block_ids(c: Cluster) -> tuple[list[int], dict[str, Any]]:
    prompt, params = _real_params(c)
    del params["remote_block_ids"]
    return prompt, params


def _port_wrong_type(c: Cluster) -> tuple[list[int], dict[str, Any]]:
    prompt, params = _real_params(c)
    return prompt, dict(params, remote_port="abc")


def _unknown_engine(c: Cluster) -> tuple[list[int], dict[str, Any]]:
    prompt, params = _real_params(c)
    return prompt, dict(params, remote_engine_id=str(uuid.uuid4()))


def _bad_host(c: Cluster) -> tuple[list[int], dict[str, Any]]:
    # A new engine id too: otherwise a connector may (rightly) reuse the handshake it already
    # has for P's engine id and never look at the host.
    prompt, params = _real_params(c)
    return prompt, dict(params, remote_host="no-such-host.invalid", remote_engine_id=str(uuid.uuid4()))


def _decode_params_to_consumer(c: Cluster) -> tuple[list[int], dict[str, Any]]:
    return fresh_prompt(300), dict(PREFILL_PARAMS)  # do_remote_decode sent to D, a kv_consumer


# vLLM's NixlConnector kills D's engine on a missing remote_block_ids: that case runs last.
MALFORMED: dict[str, Callable[[Cluster], tuple[list[int], dict[str, Any]]]] = {
    "do_remote_decode_on_consumer": _decode_params_to_consumer,
    "unknown_engine_id": _unknown_engine,
    "unresolvable_host": _bad_host,
    "remote_port_wrong_type": _port_wrong_type,
    "missing_remote_block_ids": _missing_block_ids,
}


def _failed(res: CompletionResult) -> bool:
    """HTTP error, finish_reason "error", or (streaming) an error event in the stream."""
    return res.status >= 400 or res.finish_reason == "error" or res.error is not None


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_params_fail_cleanly(cluster: Cluster, case: str, stream: bool) -> None:
    assert_alive(cluster)
    prompt, params = MALFORMED[case](cluster)
    res = complete(cluster.d_url, prompt, MAX_TOKENS, params, stream=stream)
    assert res.status != 599, f"connection to D broke: {res.error}; see {cluster.log_path('decode')}"
    assert _failed(res), f"{case}: D accepted malformed kv_transfer_params {params}: {res}"
    assert_alive(cluster)
    assert_good_pd(cluster)
    assert_alive(cluster)


def _prom(url: str) -> dict[str, float]:
    """The Prometheus samples of a vLLM server's /metrics, summed over label sets."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=5.0).text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        key = name.split("{", 1)[0]
        out[key] = out.get(key, 0.0) + float(value)
    return out


def test_prometheus_metrics_show_the_transfer(cluster: Cluster, connector: str) -> None:
    """D's /metrics carries NixlConnector's metric names (same names, same buckets, so
    dashboards keep working) and counts this request's transfer: one more transfer, its
    exact bytes, its descriptors. kvbridge also exports its handshake time and held blocks."""
    n_tokens = 600
    before = _prom(cluster.d_url)
    offset = cluster.log_offset("decode")
    pd = cluster.pd_request(fresh_prompt(n_tokens), MAX_TOKENS)
    assert pd.decode.ok, pd.decode
    after: dict[str, float] = {}

    def counted() -> bool:
        nonlocal after
        after = _prom(cluster.d_url)
        return after.get("vllm:nixl_xfer_time_seconds_count", 0) > before.get("vllm:nixl_xfer_time_seconds_count", 0)

    deadline = time.monotonic() + 15.0  # vLLM publishes stats with the engine's next output
    while not counted() and time.monotonic() < deadline:
        time.sleep(0.25)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    for name in ("vllm:nixl_xfer_time_seconds", "vllm:nixl_post_time_seconds", "vllm:nixl_bytes_transferred",
                 "vllm:nixl_num_descriptors"):  # fmt: skip
        assert delta.get(f"{name}_count") == 1, f"{name}: one transfer expected, got {delta.get(f'{name}_count')}"
    for name in ("vllm:nixl_num_failed_transfers_total", "vllm:nixl_num_kv_expired_reqs_total"):
        assert name in after, f"{name} missing from D's /metrics"
        assert delta[name] == 0, f"{name} rose: {delta[name]}"
    if connector == "kvbridge":
        assert delta["vllm:nixl_bytes_transferred_sum"] == expected_kv_bytes(n_tokens)
        assert delta["vllm:nixl_num_descriptors_sum"] >= 1
        assert 0 < delta["vllm:nixl_xfer_time_seconds_sum"] < 5.0
        assert after.get("vllm:kvbridge_handshake_time_seconds_count", 0) >= 1, "the first handshake is recorded"
        p = _prom(cluster.p_url)
        assert "vllm:kvbridge_held_blocks" in p and "vllm:nixl_num_kv_expired_reqs_total" in p
    # vLLM's periodic stats line (every 10 s) reports the interval's transfers.
    line = ""
    deadline = time.monotonic() + 25.0
    while not line and time.monotonic() < deadline:
        with open(cluster.log_path("decode"), "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        line = next((ln for ln in text.splitlines() if "KV Transfer metrics:" in ln), "")
        time.sleep(0.5)
    assert "Num successful transfers=" in line and "Throughput (MB/s)=" in line, f"no KV Transfer metrics line in {cluster.log_path('decode')}"
    if connector == "kvbridge":
        assert "Num successful transfers=0," not in line, line

"""The proxy's decisions, with the network replaced (httpx.MockTransport): which server gets a
request, retries on another prefill server, the local fallback, ejection and re-admission,
typed errors for decode failures, /metrics and /health. Real vLLM servers with one of two P
servers killed mid-run: ``test_vllm_proxy.py``."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import REPO  # noqa: F401  (puts kvbridge on sys.path)

from kvbridge._proxy_pool import Pool
from kvbridge.proxy import build_app

P1, P2, D1, D2 = "http://p1:1", "http://p2:1", "http://d1:1", "http://d2:1"


class Upstreams:
    """Fake vLLM servers: P answers with kv_transfer_params naming itself, D echoes what it got."""

    def __init__(self) -> None:
        self.down: set[str] = set()  # unreachable
        self.status: dict[str, int] = {}  # HTTP status to answer with
        self.calls: list[tuple[str, str, dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if base in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(self.status.get(base, 200))
        body = json.loads(request.content or b"{}")
        self.calls.append((base, request.url.path, body))
        status = self.status.get(base, 200)
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "boom"}})
        if base.startswith("http://p"):
            return httpx.Response(200, json={"choices": [{"text": "x"}], "kv_transfer_params": {"remote_engine_id": base}})
        if body.get("stream"):
            sse = httpx.ByteStream(b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n")  # a body still to stream, as a server's
            return httpx.Response(200, stream=sse, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"served_by": base, "kv_transfer_params": body.get("kv_transfer_params")})

    def legs(self, role: str) -> list[str]:
        return [b for b, path, _ in self.calls if b.startswith(f"http://{role}") and path != "/health"]


def client(up: Upstreams, **kw) -> TestClient:  # noqa: ANN003
    kw.setdefault("health_interval", 3600.0)  # probes only when a test says so
    app = build_app([P1, P2], [D1, D2], transport=httpx.MockTransport(up), **kw)
    return TestClient(app)


def ask(c: TestClient, stream: bool = False) -> httpx.Response:
    return c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4, "stream": stream})


def test_a_dead_prefill_server_is_retried_elsewhere_then_ejected() -> None:
    up = Upstreams()
    up.down.add(P1)
    with client(up, policy="round_robin") as c:
        for _ in range(4):
            r = ask(c)
            assert r.status_code == 200, r.text
            assert r.json()["kv_transfer_params"] == {"remote_engine_id": P2}  # D got P2's params
        # P1 failed twice (its first /health probe, then the first request: eject_after=2)
        # and took no more requests; that request was retried on P2.
        assert up.legs("p") == [P2] * 4 and len(up.calls) == 8
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["servers"]["prefill"][P1]["healthy"] is False
        m = c.get("/metrics").text
        assert "kvbridge_proxy_prefill_retries_total 1.0" in m
        assert f'kvbridge_proxy_upstream_requests_total{{backend="{P1}",outcome="error",role="prefill"}} 1.0' in m
        assert 'kvbridge_proxy_ejections_total{role="prefill"} 1.0' in m
        assert f'kvbridge_proxy_backend_healthy{{backend="{P1}",role="prefill"}} 0.0' in m
        assert 'kvbridge_proxy_requests_total{outcome="ok",route="completions"} 4.0' in m


def test_every_prefill_failing_falls_back_to_decode_or_fails_clearly() -> None:
    up = Upstreams()
    up.status.update({P1: 500, P2: 503})
    with client(up) as c:
        r = ask(c)
        assert r.status_code == 200 and r.json()["kv_transfer_params"] is None  # D prefilled itself
        assert "kvbridge_proxy_local_prefill_fallbacks_total 1.0" in c.get("/metrics").text
    with client(up, local_fallback=False) as c:
        r = ask(c)
        assert r.status_code == 503 and "prefill server" in r.json()["error"]["message"]


def test_a_bad_request_is_not_retried() -> None:
    up = Upstreams()
    up.status[P1] = 400
    with client(up, policy="round_robin") as c:
        r = ask(c)
        assert r.status_code == 400 and up.legs("p") == [P1] and up.legs("d") == []


@pytest.mark.parametrize("how", ["down", "timeout", "500"])
def test_decode_failures_are_clear_errors(how: str) -> None:
    up = Upstreams()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host.startswith("d") and request.url.path != "/health":
            if how == "down":
                raise httpx.ConnectError("refused", request=request)
            if how == "timeout":
                raise httpx.ReadTimeout("slow", request=request)
            return httpx.Response(500, json={"error": {"message": "engine dead"}})
        return up(request)

    with TestClient(build_app([P1], [D1], transport=httpx.MockTransport(handler), health_interval=3600.0)) as c:
        r = ask(c)
        assert r.status_code == {"down": 502, "timeout": 504, "500": 500}[how], r.text
        if how != "500":
            assert D1 in r.json()["error"]["message"]
        assert 'kvbridge_proxy_requests_total{outcome="error",route="completions"} 1.0' in c.get("/metrics").text


def test_streams_are_relayed_and_chat_works() -> None:
    up = Upstreams()
    with client(up) as c:
        r = ask(c, stream=True)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["kv_transfer_params"]["remote_engine_id"] in (P1, P2)
        # P got one token, unstreamed, asked to keep the KV; the request id reached both legs.
        p_body = next(b for base, _, b in up.calls if base.startswith("http://p"))
        assert p_body["max_tokens"] == 1 and p_body["stream"] is False and p_body["kv_transfer_params"]["do_remote_decode"]


def test_health_probes_eject_and_readmit() -> None:
    up = Upstreams()
    up.status[D2] = 503
    with client(up, health_interval=0.05) as c:
        import time

        deadline = time.monotonic() + 5
        while c.get("/health").json()["servers"]["decode"][D2]["healthy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/health").json()["servers"]["decode"][D2]["healthy"] is False
        for _ in range(3):
            assert ask(c).json()["served_by"] == D1  # the ejected D gets nothing
        up.status.pop(D2)
        while not c.get("/health").json()["servers"]["decode"][D2]["healthy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/health").json()["servers"]["decode"][D2]["healthy"] is True


def test_least_outstanding_and_round_robin_choice() -> None:
    pool = Pool("decode", ["a", "b", "c"])
    a, b, c = pool.backends
    a.outstanding, b.outstanding, c.outstanding = 2, 0, 1
    assert pool.pick() is b
    b.outstanding = 5
    assert pool.pick() is c
    rr = Pool("decode", ["a", "b"], policy="round_robin")
    assert [rr.pick().url for _ in range(4)] == ["a", "b", "a", "b"]
    # Ejected servers are skipped while another is healthy, tried when none is.
    assert rr.failed(rr.backends[0], "x", 1.0) is False and rr.failed(rr.backends[0], "x", 2.0) is True
    assert {rr.pick().url for _ in range(3)} == {"b"}
    rr.failed(rr.backends[1], "y", 3.0)
    rr.failed(rr.backends[1], "y", 4.0)
    assert rr.pick().url == "a"  # none healthy: the longest-ejected first
    assert rr.pick(exclude=rr.backends) is None

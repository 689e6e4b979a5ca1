"""OpenAI-compatible proxy for vLLM prefill/decode (P/D) disaggregation.

Usage:
    python -m kvbridge.proxy --host 127.0.0.1 --port 8000 [--mode push] [--policy round_robin] [--warmup] \\
        --prefill http://127.0.0.1:8100 [URL ...] --decode http://127.0.0.1:8200 [URL ...]

For each ``/v1/completions`` or ``/v1/chat/completions`` request (streamed or not) the proxy
  1. sends the request to a prefill server with ``max_tokens=1``, ``stream=false`` and
     ``kv_transfer_params={"do_remote_decode": true, ...}``;
  2. takes ``kv_transfer_params`` from P's JSON reply and sends the original request, with those
     params, to a decode server;
  3. returns D's reply unchanged, streaming (SSE) or not.

Running it in production:
- **Choice.** ``--policy least_outstanding`` (default: the server with the fewest requests in
  flight, ties in turn) or ``round_robin``, per role.
- **Health.** Every ``--health-interval`` seconds each server's ``/health`` is probed. A server
  that fails ``--eject-after`` times in a row (requests or probes) is ejected: no new request
  goes to it while another of its role is healthy; it is re-admitted once ``/health`` answers.
- **Prefill failures.** A P that cannot be reached, times out, answers 5xx or returns no
  ``kv_transfer_params`` is counted a failure and the prefill is retried on another P (at most
  ``--prefill-attempts`` tries). With every P failing, D prefills the request itself (its
  ``kv_transfer_params`` dropped; ``--no-local-fallback`` turns that off: the client then gets
  a 503). A P's 4xx (the request itself is bad) is returned as is.
- **Decode failures** return a clear JSON error (502 unreachable or broken, 504 timeout):
  every upstream call has ``--timeout`` seconds (connect: 10 s), so nothing hangs.
- ``/metrics``: Prometheus text (requests and upstream calls by outcome, retries, fallbacks,
  ejections, latency histograms, per-server health and in-flight gauges).
- ``/health``: 200 while at least one D (and one P, or the local fallback) is healthy, with the
  servers' state as JSON; 503 otherwise, and until ``--warmup`` is done.
- ``--warmup``: at start, one 1-token request through every P x D pair, so each D has
  handshaken every P (and loaded its NIXL metadata) before the first client request.
- Logs carry the request id (the client's ``X-Request-Id`` or a fresh one, also sent to P and D).

With ``--mode push`` (kvbridge push mode on both engines, e.g. ``KVBridgePushConnector``) the
two legs overlap: the proxy gives P and D the same fresh ``transfer_id`` and sends them at the
same time, D with P's coordinates (engine id, side-channel host and port, TP size), learnt from
that P's first reply (its first request runs P then D, as in pull mode). In push mode a P failure
is not retried (D has registered with that P): D's leg is cancelled and the client gets P's error.

Imports only the standard library, fastapi, httpx, uvicorn and prometheus_client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvbridge._proxy_metrics import ProxyMetrics
from kvbridge._proxy_pool import POLICIES, Backend, Pool

log = logging.getLogger("kvbridge.proxy")

PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
FORWARDED_HEADERS = ("authorization", "x-request-id")
PUSH_COORDS = ("remote_engine_id", "remote_host", "remote_port", "tp_size")


def error_response(status: int, message: str, err_type: str = "ProxyError") -> JSONResponse:
    """An OpenAI-style JSON error."""
    body = {"error": {"message": message, "type": err_type, "code": status}}
    return JSONResponse(body, status_code=status)


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request P gets: one token, no streaming, ask it to keep the KV for a remote decode."""
    req = dict(body, max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_PARAMS))
    if "max_completion_tokens" in req:
        req["max_completion_tokens"] = 1
    req.pop("stream_options", None)
    return req


def push_prefill_params(transfer_id: str) -> dict[str, Any]:
    """P's params in push mode: hold the KV for a remote decode, matched by ``transfer_id``."""
    return {"do_remote_decode": True, "do_remote_prefill": False, "transfer_mode": "push", "transfer_id": transfer_id}


def push_decode_params(coords: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    """D's params in push mode: register blocks with the P at ``coords``."""
    return {"do_remote_prefill": True, "do_remote_decode": False, "transfer_mode": "push", "transfer_id": transfer_id,
            **{k: coords[k] for k in PUSH_COORDS}}  # fmt: skip


class PrefillFailed(Exception):
    """A prefill leg that failed: ``response`` is what the client gets if nothing else works,
    ``retry`` whether another server may succeed (unreachable, timeout, 5xx, no params)."""

    def __init__(self, response: Response, why: str, retry: bool) -> None:
        super().__init__(why)
        self.response, self.why, self.retry = response, why, retry


def build_app(
    prefill_urls: list[str],
    decode_urls: list[str],
    timeout: float = 600.0,
    mode: str = "pull",
    policy: str = "least_outstanding",
    eject_after: int = 2,
    health_interval: float = 2.0,
    prefill_attempts: int = 3,
    local_fallback: bool = True,
    warmup: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The proxy app (see the module doc); ``transport`` replaces the network (tests)."""
    if mode not in ("pull", "push"):
        raise ValueError(f"mode must be 'pull' or 'push', not {mode!r}")
    P, D = Pool("prefill", prefill_urls, policy, eject_after), Pool("decode", decode_urls, policy, eject_after)
    metrics = ProxyMetrics([P, D])
    coords: dict[str, dict[str, Any]] = {}
    state = {"ready": not warmup}
    # Drop idle upstream connections well before vLLM's server closes them (5 s by default), so a
    # request never goes out on a connection the server is closing.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0)
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits, transport=transport)

    async def probe(pool: Pool, b: Backend) -> None:
        try:
            r = await client.get(f"{b.url}/health", timeout=max(1.0, min(health_interval, 5.0)))
            ok, why = r.status_code == 200, f"/health answered {r.status_code}"
        except httpx.HTTPError as e:
            ok, why = False, f"/health unreachable: {e!r}"
        was = b.healthy
        pool.probed(b, ok, why, time.monotonic())
        if was and not b.healthy:
            metrics.ejections.labels(pool.role).inc()

    async def health_loop() -> None:
        while True:
            await asyncio.gather(*(probe(pool, b) for pool in (P, D) for b in pool.backends))
            await asyncio.sleep(health_interval)

    async def warm() -> None:
        try:
            model = None
            with contextlib.suppress(Exception):
                model = (await client.get(f"{D.backends[0].url}/v1/models")).json()["data"][0]["id"]
            body: dict[str, Any] = {"prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0.0}
            if model:
                body["model"] = model
            for p in P.backends:
                for d in D.backends:
                    rid = f"warmup-{uuid.uuid4().hex[:8]}"
                    try:
                        params = await prefill_on(p, "/v1/completions", prefill_body(body), {"x-request-id": rid})
                        r = await client.post(f"{d.url}/v1/completions", json=dict(body, kv_transfer_params=params),
                                              headers={"x-request-id": rid})  # fmt: skip
                        log.info("warmup %s -> %s: %s", p.url, d.url, r.status_code)
                    except (PrefillFailed, httpx.HTTPError) as e:
                        log.warning("warmup %s -> %s failed: %s", p.url, d.url, getattr(e, "why", repr(e)))
        finally:
            state["ready"] = True

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(health_loop())]
        if warmup:
            tasks.append(asyncio.create_task(warm()))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await client.aclose()

    app = FastAPI(title="kvbridge P/D proxy", lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        ok = state["ready"] and bool(D.healthy()) and (bool(P.healthy()) or local_fallback)
        servers = {pool.role: {b.url: {"healthy": b.healthy, "outstanding": b.outstanding, "fails": b.fails,
                                       "last_error": b.last_error} for b in pool.backends} for pool in (P, D)}  # fmt: skip
        return JSONResponse({"ok": ok, "ready": state["ready"], "servers": servers}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> Response:
        d = D.pick()
        if d is None:
            return error_response(503, "no decode server")
        try:
            resp = await client.get(f"{d.url}/v1/models")
        except httpx.HTTPError as e:
            return error_response(502, f"decode server {d.url} unreachable: {e!r}")
        return Response(resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type"))

    def failed(pool: Pool, b: Backend, why: str) -> None:
        metrics.upstream.labels(pool.role, b.url, "error").inc()
        if pool.failed(b, why, time.monotonic()):
            metrics.ejections.labels(pool.role).inc()

    async def prefill_on(p: Backend, path: str, p_body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        """One prefill on ``p``: its kv_transfer_params, or PrefillFailed."""
        p.outstanding += 1
        t0 = time.monotonic()
        try:
            resp = await client.post(f"{p.url}{path}", json=p_body, headers=headers)
        except httpx.TimeoutException as e:
            raise PrefillFailed(error_response(504, f"prefill server {p.url} timed out: {e!r}"), "timeout", True) from e
        except httpx.HTTPError as e:
            raise PrefillFailed(error_response(502, f"prefill server {p.url} unreachable: {e!r}"), repr(e), True) from e
        finally:
            p.outstanding -= 1
        if resp.status_code >= 400:
            msg = f"prefill server {p.url} failed ({resp.status_code}): {resp.text}"
            raise PrefillFailed(error_response(resp.status_code, msg), f"HTTP {resp.status_code}", resp.status_code >= 500)
        try:
            params = resp.json().get("kv_transfer_params")
        except (ValueError, AttributeError):
            params = None
        if not params:
            raise PrefillFailed(error_response(502, f"prefill server {p.url} returned no kv_transfer_params"), "no params", True)
        P.succeeded(p)
        metrics.upstream.labels("prefill", p.url, "ok").inc()
        metrics.prefill.observe(time.monotonic() - t0)
        return params

    async def prefill_any(path: str, p_body: dict[str, Any], headers: dict[str, str], rid: str) -> tuple[Backend | None, Any]:
        """Prefill on the first server that succeeds: (server, params); else (None, the
        failure) where the failure is a PrefillFailed, or None if no server could be tried."""
        tried: list[Backend] = []
        last: PrefillFailed | None = None
        while len(tried) < max(1, prefill_attempts):
            p = P.pick(exclude=tried)
            if p is None:
                break
            if tried:
                metrics.retries.inc()
                log.warning("req=%s retrying the prefill on %s (%s failed: %s)", rid, p.url, tried[-1].url, last and last.why)
            tried.append(p)
            try:
                return p, await prefill_on(p, path, p_body, headers)
            except PrefillFailed as e:
                last = e
                if not e.retry:
                    metrics.upstream.labels("prefill", p.url, "rejected").inc()
                    return None, e
                failed(P, p, e.why)
        return None, last

    async def open_decode(d: Backend, path: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        return await client.send(client.build_request("POST", f"{d.url}{path}", json=body, headers=headers), stream=True)

    async def disaggregate(request: Request, path: str, route: str) -> Response:
        t0 = time.monotonic()
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "request body is not valid JSON", "BadRequestError")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object", "BadRequestError")
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        rid = headers.setdefault("x-request-id", uuid.uuid4().hex)
        d = D.pick()
        if d is None:
            metrics.requests.labels(route, "error").inc()
            return error_response(503, "no decode server")
        d.outstanding += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                d.outstanding -= 1

        try:
            return await disaggregate_on(d, body, headers, rid, path, route, t0, release)
        except BaseException:
            release()
            raise

    async def disaggregate_on(d: Backend, body: dict[str, Any], headers: dict[str, str], rid: str, path: str, route: str,
                              t0: float, release: Any) -> Response:  # fmt: skip
        def give_up(resp: Response) -> Response:
            release()
            metrics.requests.labels(route, "error").inc()
            return resp

        outcome, p_url = "ok", "-"
        p_body = prefill_body(body)
        d_task: asyncio.Task[httpx.Response] | None = None
        if mode == "push":
            transfer_id = uuid.uuid4().hex
            p_body["kv_transfer_params"] = push_prefill_params(transfer_id)
            p = P.pick()
            if p is None:
                return give_up(error_response(503, "no prefill server"))
            if p.url in coords:
                # Both legs at once: D registers while P prefills.
                d_body = dict(body, kv_transfer_params=push_decode_params(coords[p.url], transfer_id))
                d_task = asyncio.create_task(open_decode(d, path, d_body, headers))
            try:
                params = await prefill_on(p, path, p_body, headers)
            except PrefillFailed as e:
                if e.retry:
                    failed(P, p, e.why)
                if d_task is not None:
                    d_task.cancel()
                    with contextlib.suppress(BaseException):
                        await (await d_task).aclose()
                return give_up(e.response)
            p_url = p.url
            if all(k in params for k in PUSH_COORDS):
                coords[p.url] = {k: params[k] for k in PUSH_COORDS}
            d_body = dict(body, kv_transfer_params=params)
        else:
            p, got = await prefill_any(path, p_body, headers, rid)
            if p is not None:
                p_url, d_body = p.url, dict(body, kv_transfer_params=got)
            elif got is not None and not got.retry:
                return give_up(got.response)  # the request itself is bad (P's 4xx)
            elif local_fallback:
                # No P could prefill: D computes the prompt itself.
                log.warning("req=%s no prefill server succeeded (%s): %s prefills locally", rid, got and got.why, d.url)
                metrics.fallbacks.inc()
                outcome, d_body = "fallback", {k: v for k, v in body.items() if k != "kv_transfer_params"}
            else:
                return give_up(got.response if got is not None else error_response(503, "no prefill server available"))
        try:
            d_resp = await (d_task if d_task is not None else open_decode(d, path, d_body, headers))
        except httpx.TimeoutException as e:
            failed(D, d, "timeout")
            return give_up(error_response(504, f"decode server {d.url} timed out: {e!r}"))
        except httpx.HTTPError as e:
            failed(D, d, repr(e))
            return give_up(error_response(502, f"decode server {d.url} unreachable: {e!r}"))
        metrics.latency.labels(route).observe(time.monotonic() - t0)
        log.info("req=%s %s P=%s D=%s -> %d (%s) in %.1f ms", rid, path, p_url, d.url, d_resp.status_code, outcome,
                 (time.monotonic() - t0) * 1e3)  # fmt: skip
        media = d_resp.headers.get("content-type", "application/json")
        if not body.get("stream") or d_resp.status_code >= 400:
            try:
                content = await d_resp.aread()
            except httpx.HTTPError as e:
                failed(D, d, repr(e))
                return give_up(error_response(502, f"decode server {d.url} broke off its reply: {e!r}"))
            finally:
                await d_resp.aclose()
            release()
            finish(d, d_resp.status_code, route, outcome)
            return Response(content, status_code=d_resp.status_code, media_type=media)

        async def relay() -> AsyncIterator[bytes]:
            broke = None
            try:
                async for chunk in d_resp.aiter_raw():
                    yield chunk
            except httpx.HTTPError as e:
                broke = repr(e)
                log.warning("req=%s decode stream from %s broke: %s", rid, d.url, broke)
                err = {"error": {"message": f"decode server {d.url} broke off the stream: {broke}", "type": "ProxyError", "code": 502}}
                yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                release()
                await d_resp.aclose()
                if broke:
                    failed(D, d, broke)
                    metrics.requests.labels(route, "error").inc()
                else:
                    finish(d, d_resp.status_code, route, outcome)

        return StreamingResponse(relay(), status_code=d_resp.status_code, media_type=media)

    def finish(d: Backend, status: int, route: str, outcome: str) -> None:
        if status >= 500:
            failed(D, d, f"HTTP {status}")
            outcome = "error"
        else:
            D.succeeded(d)
            metrics.upstream.labels("decode", d.url, "ok").inc()
            outcome = outcome if status < 400 else "error"
        metrics.requests.labels(route, outcome).inc()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await disaggregate(request, "/v1/completions", "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await disaggregate(request, "/v1/chat/completions", "chat")

    app.state.pools = (P, D)
    app.state.metrics = metrics
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kvbridge P/D disaggregation proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill servers")
    parser.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode servers")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request upstream timeout (s)")
    parser.add_argument("--mode", choices=("pull", "push"), default="pull", help="kvbridge transfer mode of the engines")
    parser.add_argument("--policy", choices=POLICIES, default="least_outstanding", help="how a server is chosen, per role")
    parser.add_argument("--eject-after", type=int, default=2, help="failures in a row that eject a server")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between /health probes")
    parser.add_argument("--prefill-attempts", type=int, default=3, help="prefill servers tried per request (pull)")
    parser.add_argument("--no-local-fallback", dest="local_fallback", action="store_false",
                        help="with every prefill server failing, answer 503 instead of letting D prefill")  # fmt: skip
    parser.add_argument("--warmup", action="store_true", help="handshake every P x D pair at start (a 1-token request each)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(args.prefill, args.decode, args.timeout, args.mode, args.policy, args.eject_after, args.health_interval,
                    args.prefill_attempts, args.local_fallback, args.warmup)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()

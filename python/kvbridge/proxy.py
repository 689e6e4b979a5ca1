"""OpenAI-compatible proxy for vLLM prefill/decode (P/D) disaggregation.

Usage:
    python -m kvbridge.proxy --host 127.0.0.1 --port 8000 [--mode push] \\
        --prefill http://127.0.0.1:8100 [URL ...] --decode http://127.0.0.1:8200 [URL ...]

For each ``/v1/completions`` or ``/v1/chat/completions`` request the proxy
  1. sends the request to a prefill server (round-robin) with ``max_tokens=1``, ``stream=false``
     and ``kv_transfer_params={"do_remote_decode": true, ...}``;
  2. takes ``kv_transfer_params`` from P's JSON reply and sends the original request, with those
     params, to a decode server (round-robin);
  3. returns D's reply unchanged, streaming (SSE) or not.
If P fails, or replies without ``kv_transfer_params``, the client gets a JSON error
(``{"error": {"message", "type", "code"}}``) with P's status (502 when P said 200 or was unreachable).

With ``--mode push`` (kvbridge push mode on both engines, e.g. ``KVBridgePushConnector``)
the two legs overlap: the proxy gives P and D the same fresh ``transfer_id`` and sends
them at the same time, D with P's coordinates (engine id, side-channel host and port, TP
size), so D registers its blocks while P prefills and P writes them as soon as it can.
The proxy learns a P server's coordinates from its first reply (that first request runs
P then D, as in pull mode). If P fails, D's leg is cancelled and the client gets P's error.
``/health`` and ``/v1/models`` are forwarded to a decode server. Both phases carry the same
``X-Request-Id`` header (the client's, or a fresh one).

Imports only the standard library, fastapi, httpx and uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

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


PUSH_COORDS = ("remote_engine_id", "remote_host", "remote_port", "tp_size")


def push_prefill_params(transfer_id: str) -> dict[str, Any]:
    """P's params in push mode: hold the KV for a remote decode, matched by ``transfer_id``."""
    return {"do_remote_decode": True, "do_remote_prefill": False, "transfer_mode": "push", "transfer_id": transfer_id}


def push_decode_params(coords: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    """D's params in push mode: register blocks with the P at ``coords``."""
    return {"do_remote_prefill": True, "do_remote_decode": False, "transfer_mode": "push", "transfer_id": transfer_id,
            **{k: coords[k] for k in PUSH_COORDS}}  # fmt: skip


def build_app(prefill_urls: list[str], decode_urls: list[str], timeout: float = 600.0, mode: str = "pull") -> FastAPI:
    """The proxy app, round-robin over ``prefill_urls`` and ``decode_urls``; ``mode`` is
    "pull" (P, then D with P's params) or "push" (both at once, see the module doc)."""
    if not prefill_urls or not decode_urls:
        raise ValueError("need at least one prefill and one decode URL")
    if mode not in ("pull", "push"):
        raise ValueError(f"mode must be 'pull' or 'push', not {mode!r}")
    coords: dict[str, dict[str, Any]] = {}
    prefills: Iterator[str] = itertools.cycle([u.rstrip("/") for u in prefill_urls])
    decodes: Iterator[str] = itertools.cycle([u.rstrip("/") for u in decode_urls])
    # Drop idle upstream connections well before vLLM's server closes them (5 s by default), so a
    # request never goes out on a connection the server is closing.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0)
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="kvbridge P/D proxy", lifespan=lifespan)

    async def forward_get(path: str) -> Response:
        url = next(decodes)
        try:
            resp = await client.get(f"{url}{path}")
        except httpx.HTTPError as e:
            return error_response(502, f"decode server {url} unreachable: {e!r}")
        media = resp.headers.get("content-type", "application/json")
        return Response(resp.content, status_code=resp.status_code, media_type=media)

    @app.get("/health")
    async def health() -> Response:
        return await forward_get("/health")

    @app.get("/v1/models")
    async def models() -> Response:
        return await forward_get("/v1/models")

    async def disaggregate(request: Request, path: str) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "request body is not valid JSON", "BadRequestError")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object", "BadRequestError")
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        headers.setdefault("x-request-id", uuid.uuid4().hex)

        p_url, d_url = next(prefills), next(decodes)
        p_body = prefill_body(body)
        transfer_id = uuid.uuid4().hex
        if mode == "push":
            p_body["kv_transfer_params"] = push_prefill_params(transfer_id)

        async def prefill() -> tuple[dict[str, Any] | None, Response | None]:
            try:
                p_resp = await client.post(f"{p_url}{path}", json=p_body, headers=headers)
            except httpx.HTTPError as e:
                return None, error_response(502, f"prefill server {p_url} unreachable: {e!r}")
            if p_resp.status_code >= 400:
                return None, error_response(p_resp.status_code, f"prefill server {p_url} failed ({p_resp.status_code}): {p_resp.text}")
            try:
                params = p_resp.json().get("kv_transfer_params")
            except ValueError:
                params = None
            if not params:
                return None, error_response(502, f"prefill server {p_url} returned no kv_transfer_params")
            if mode == "push" and all(k in params for k in PUSH_COORDS):
                coords[p_url] = {k: params[k] for k in PUSH_COORDS}
            return params, None

        async def send_decode(kv_params: dict[str, Any]) -> httpx.Response:
            d_req = client.build_request("POST", f"{d_url}{path}", json=dict(body, kv_transfer_params=kv_params), headers=headers)
            return await client.send(d_req, stream=True)

        if mode == "push" and p_url in coords:
            # Both legs at once: D registers while P prefills.
            p_task = asyncio.create_task(prefill())
            d_task = asyncio.create_task(send_decode(push_decode_params(coords[p_url], transfer_id)))
            _, p_err = await p_task
            if p_err is not None:
                d_task.cancel()
                with contextlib.suppress(BaseException):
                    r = await d_task
                    await r.aclose()
                return p_err
            try:
                d_resp = await d_task
            except httpx.HTTPError as e:
                return error_response(502, f"decode server {d_url} unreachable: {e!r}")
        else:
            # Phase 1: prefill. Phase 2: decode with P's params; relay D's reply as is.
            kv_params, p_err = await prefill()
            if p_err is not None or kv_params is None:
                return p_err or error_response(502, "prefill failed")
            try:
                d_resp = await send_decode(kv_params)
            except httpx.HTTPError as e:
                return error_response(502, f"decode server {d_url} unreachable: {e!r}")
        media = d_resp.headers.get("content-type", "application/json")
        if not body.get("stream") or d_resp.status_code >= 400:
            try:
                content = await d_resp.aread()
            finally:
                await d_resp.aclose()
            return Response(content, status_code=d_resp.status_code, media_type=media)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in d_resp.aiter_raw():
                    yield chunk
            except httpx.HTTPError as e:
                log.warning("decode stream from %s broke: %r", d_url, e)
            finally:
                await d_resp.aclose()

        return StreamingResponse(relay(), status_code=d_resp.status_code, media_type=media)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await disaggregate(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await disaggregate(request, "/v1/chat/completions")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kvbridge P/D disaggregation proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill servers")
    parser.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode servers")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request upstream timeout (s)")
    parser.add_argument("--mode", choices=("pull", "push"), default="pull", help="kvbridge transfer mode of the engines")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(args.prefill, args.decode, args.timeout, args.mode)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()

"""The proxy in front of real vLLM servers (two P, one D, kvbridge pull, float16): one P is
killed (SIGKILL) while requests are in flight, and no client request fails.

- ``--warmup``: before the first client request D has handshaken both P servers.
- Requests run two at a time; after a few have finished, P1 is killed. Prefills that hit
  the dead P are retried on P2 (or, with no P left, D would prefill itself), the dead P is
  ejected by the failures and its failing ``/health``, and every request gets its tokens.
  D runs with ``kv_load_failure_policy=recompute``: a P that dies after answering but before
  D's READ costs D a recompute, not the request.
- After the kill, a request through P2 is bit-identical to D alone (tokens and
  log-probabilities), and ``/metrics`` shows P1 unhealthy, no failed client request, and
  the retries that saved the requests caught mid-kill.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from helpers import fresh_prompt, log_dir_for
from helpers import figure as record

import kvbridge
from kvbridge.testing.cluster import Cluster, same_generation

pytestmark = pytest.mark.slow

N_REQUESTS, KILL_AFTER, TOKENS, MAX_TOKENS = 16, 4, 600, 24


@pytest.fixture
def cluster(model_dir) -> Cluster:  # noqa: ANN001
    c = Cluster(
        model_dir, connector="kvbridge", log_dir=log_dir_for(__name__), p_port=8390, d_port=8395, proxy_port=8396,
        side_ports=(6100, 6140), dtype="float16", n_prefill=2, kv_load_failure_policy="recompute",
        proxy_args=("--warmup", "--health-interval", "0.5"),
    )  # fmt: skip
    with c:
        yield c


def metric(text: str, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + sel + '}') if sel else ''} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_killing_a_prefill_server_mid_run_fails_no_request(cluster: Cluster) -> None:
    c = cluster
    p1, p2 = c.procs["prefill"].url, c.procs["prefill2"].url
    # --warmup: D handshook both P servers before the proxy said it was healthy.
    d = kvbridge.inspect("127.0.0.1", c.side_ports[1], 10.0)
    assert d["handshakes_ok"] == 2 and d["handshakes_failed"] == 0, d
    results: list[object] = [None] * N_REQUESTS
    done = threading.Semaphore(0)

    def run(i: int) -> None:
        try:
            results[i] = c.proxy_request(fresh_prompt(TOKENS), MAX_TOKENS)
        except Exception as e:  # noqa: BLE001  (recorded as a failed request)
            results[i] = e
        done.release()

    queue = list(range(N_REQUESTS))

    def worker() -> None:
        while queue:
            run(queue.pop(0))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(KILL_AFTER):
        assert done.acquire(timeout=300)
    killed_at = time.monotonic()
    c.kill("prefill")  # SIGKILL P1's whole process tree, requests in flight
    for t in threads:
        t.join(timeout=600)
    failed = [(i, r) for i, r in enumerate(results) if not getattr(r, "ok", False)]
    assert not failed, failed
    m = httpx.get(f"{c.proxy_url}/metrics", timeout=10).text
    record(
        f"proxy_failover requests={N_REQUESTS} killed_after={KILL_AFTER} "
        f"retries={metric(m, 'kvbridge_proxy_prefill_retries_total'):.0f} "
        f"fallbacks={metric(m, 'kvbridge_proxy_local_prefill_fallbacks_total'):.0f} "
        f"p1_errors={metric(m, 'kvbridge_proxy_upstream_requests_total', backend=p1, outcome='error', role='prefill'):.0f} "
        f"p2_ok={metric(m, 'kvbridge_proxy_upstream_requests_total', backend=p2, outcome='ok', role='prefill'):.0f} "
        f"secs_after_kill={time.monotonic() - killed_at:.1f}"
    )
    assert metric(m, "kvbridge_proxy_requests_total", outcome="error", route="completions") == 0, m
    assert metric(m, "kvbridge_proxy_backend_healthy", backend=p1, role="prefill") == 0.0, m
    assert metric(m, "kvbridge_proxy_backend_healthy", backend=p2, role="prefill") == 1.0, m
    health = httpx.get(f"{c.proxy_url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["servers"]["prefill"][p1]["healthy"] is False
    # After the kill every request is P2's, and P/D stays exact.
    prompt = fresh_prompt(TOKENS)
    res = c.proxy_request(prompt, MAX_TOKENS, logprobs=2)
    ref = c.reference(prompt, MAX_TOKENS)
    assert res.ok and ref.ok and same_generation(res, ref, exact=True), (res, ref)
    m2 = httpx.get(f"{c.proxy_url}/metrics", timeout=10).text
    p2_ok = "kvbridge_proxy_upstream_requests_total"
    assert metric(m2, p2_ok, backend=p2, outcome="ok", role="prefill") == metric(m, p2_ok, backend=p2, outcome="ok", role="prefill") + 1

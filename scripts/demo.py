#!/usr/bin/env python3
"""Real prefill/decode disaggregated generation with vLLM and kvbridge (the `make demo` job).

Usage: python scripts/demo.py [--connector kvbridge|nixl] [--lengths 1 64 ...] [--log-dir DIR]

Makes a tiny Llama model (scripts/make_model.py) in $KVBRIDGE_CACHE/tiny-llama, starts a prefill
and a decode vLLM server with the chosen KV connector plus the kvbridge proxy, sends one prompt
of random token ids per length through the proxy and prints, per prompt: TTFT through the proxy,
KV bytes D read and the transfer time (from D's ``kvbridge-xfer`` log lines; "-" when there is
none, e.g. with ``--connector nixl``), and whether the greedy tokens equal those of a single
instance (the same prompt sent straight to D, which runs without prefix caching).
Exits non-zero on any mismatch or error; every process it started is stopped in all cases.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
try:  # an installed kvbridge wheel, or a source tree already on sys.path
    import kvbridge.testing  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))

from kvbridge.testing.cluster import Cluster, random_prompt  # noqa: E402
from make_model import make_model  # noqa: E402  (scripts/ is on sys.path: it holds this file)

DEFAULT_LENGTHS = [1, 64, 128, 129, 512, 2048]


def default_model_dir() -> Path:
    cache = Path(os.environ.get("KVBRIDGE_CACHE", Path.home() / ".cache" / "kvbridge"))
    return cache / "tiny-llama"


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connector", choices=["kvbridge", "nixl"], default="kvbridge")
    ap.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="prompt lengths (tokens)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model-dir", type=Path, default=default_model_dir())
    ap.add_argument("--log-dir", type=Path, default=None, help="default: <repo>/out/demo/<connector>")
    ap.add_argument("--seed", type=int, default=None, help="prompt seed (default: from the clock)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _raise_exit)  # so `finally` stops the servers

    log_dir = args.log_dir or REPO / "out" / "demo" / args.connector
    seed = args.seed if args.seed is not None else int(time.time())
    model = make_model(args.model_dir)
    print(f"model: {model}\nconnector: {args.connector}   logs: {log_dir}", flush=True)

    failures = 0
    cluster = Cluster(model, connector=args.connector, log_dir=log_dir)
    t0 = time.monotonic()
    try:
        print("starting prefill + decode servers and the proxy (1-2 min) ...", flush=True)
        cluster.start()
        print(f"ready in {time.monotonic() - t0:.0f} s: P {cluster.p_url}  D {cluster.d_url}  "
              f"proxy {cluster.proxy_url}\n", flush=True)  # fmt: skip
        columns = ["prompt tokens", "TTFT via proxy (ms)", "KV bytes", "transfer (ms)",
                   "tokens equal to single instance"]  # fmt: skip
        print("| " + " | ".join(columns) + " |")
        print("|" + "|".join("-" * (len(c) + 2) for c in columns) + "|", flush=True)
        for i, n in enumerate(args.lengths):
            prompt = random_prompt(n, seed * 1000 + i)
            offset = cluster.log_offset("decode")
            res = cluster.proxy_request(prompt, args.max_tokens, stream=True)
            xfers = cluster.xfer_since(offset, count=1, timeout=2.0 if args.connector == "kvbridge" else 0.0)
            ref = cluster.reference(prompt, args.max_tokens)
            equal = res.ok and ref.ok and res.tokens == ref.tokens and len(res.tokens) == args.max_tokens
            failures += not equal
            ttft = f"{res.ttft * 1e3:.1f}" if res.ok and res.ttft is not None else "error"
            kv_bytes = str(sum(x.bytes for x in xfers)) if xfers else "-"
            xfer_ms = f"{sum(x.secs for x in xfers) * 1e3:.2f}" if xfers else "-"
            cells = [str(n), ttft, kv_bytes, xfer_ms, "yes" if equal else "NO"]
            print("| " + " | ".join(v.rjust(len(c)) for v, c in zip(cells, columns)) + " |", flush=True)
            for r in (res, ref):
                if not r.ok:
                    print(f"    request failed: status={r.status} finish={r.finish_reason} {r.error}", flush=True)
    except Exception as e:  # report, then stop everything
        print(f"\ndemo failed: {e}", file=sys.stderr)
        failures += 1
    finally:
        cluster.stop()
    print(f"\n{'OK' if failures == 0 else f'FAILED ({failures})'}: logs in {log_dir}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

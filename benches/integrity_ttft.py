#!/usr/bin/env python3
"""``kv_integrity``'s cost in real vLLM, per mode, against decode-side TTFT.

Usage: python benches/integrity_ttft.py [--reps 20] [--tokens 2048]
                                        [--out benches/results/integrity_ttft.json]

For each mode (off, sampled, full) it starts P + D (kvbridge pull, float16, prefix caching
off) on the embedded tiny model, sends two warm-up requests, then ``--reps`` fresh prompts
of ``--tokens`` tokens with the explicit two-phase flow, and records D's TTFT (from sending
the D request to its first token). From D's counters (``kvbridge.inspect``) it takes what the
check itself added to the load's path: the microseconds spent digesting and comparing what
landed (``integrity_check_us``) plus the microseconds loads were held back from vLLM because
they landed before P's digests (``integrity_held_us``). ``cost_over_ttft`` is that time per
load over the median TTFT of the same mode: the figure the ``sampled`` default is held to
(below 2%). The TTFT medians of the modes are recorded too, but on a 2-core VM they differ by
more than the check costs, so they are not a measurement of it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import kvbridge.testing  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "scripts"))

from kvbridge.testing.cluster import Cluster, random_prompt  # noqa: E402
from make_model import make_model  # noqa: E402


def run_mode(model: Path, mode: str, reps: int, tokens: int, seed: int) -> dict[str, float]:
    with Cluster(model, "kvbridge", kv_integrity=mode, dtype="float16", p_port=8130, d_port=8230,
                 proxy_port=8030, side_ports=(5630, 5730)) as c:  # fmt: skip
        for i in range(2):
            c.pd_request(random_prompt(tokens, seed + 1000 + i), max_tokens=2)
        before = c.integrity("decode")
        ttfts = []
        for i in range(reps):
            r = c.pd_request(random_prompt(tokens, seed + i), max_tokens=2)
            if r.ttft is None or not r.decode.ok:
                raise RuntimeError(f"{mode}: request {i} failed: {r.decode.error}")
            ttfts.append(r.ttft * 1e3)
        after = c.integrity("decode")
    d = {k: after[k] - before.get(k, 0) for k in after}
    loads = d.get("integrity_verified_loads", 0) + d.get("integrity_unverified_loads", 0)
    med = statistics.median(ttfts)
    cost_ms = (d.get("integrity_check_us", 0) + d.get("integrity_held_us", 0)) / 1e3 / max(loads, 1)
    return {
        "ttft_median_ms": med,
        "ttft_p90_ms": sorted(ttfts)[int(0.9 * (len(ttfts) - 1))],
        "n": reps,
        "loads_checked": d.get("integrity_verified_loads", 0),
        "loads_unverified": d.get("integrity_unverified_loads", 0),
        "blocks_checked": d.get("integrity_checked_blocks", 0),
        "mismatched_blocks": d.get("integrity_mismatched_blocks", 0),
        "check_ms_per_load": d.get("integrity_check_us", 0) / 1e3 / max(loads, 1),
        "held_loads": d.get("integrity_held_loads", 0),
        "held_ms_per_load": d.get("integrity_held_us", 0) / 1e3 / max(loads, 1),
        "cost_ms_per_load": cost_ms,
        "cost_over_ttft": cost_ms / med if mode != "off" else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "integrity_ttft.json"))
    ap.add_argument("--model-dir", default=str(Path(os.environ.get("KVBRIDGE_CACHE", Path.home() / ".cache" / "kvbridge")) / "tiny-llama"))
    args = ap.parse_args()
    print(f"integrity_ttft: seed {args.seed}", flush=True)
    model = make_model(args.model_dir)
    out: dict[str, object] = {"date": time.strftime("%Y-%m-%d %H:%M"), "tokens": args.tokens, "seed": args.seed}
    for mode in ("off", "sampled", "full"):
        out[mode] = r = run_mode(model, mode, args.reps, args.tokens, args.seed)
        print(mode, json.dumps(r), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

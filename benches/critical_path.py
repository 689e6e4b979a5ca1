#!/usr/bin/env python3
"""kvbridge's critical path inside vLLM against NixlConnector, in one run (issue 16's targets).

Usage: python benches/critical_path.py [--pairs 3] [--nixl-pairs 2] [--reps 12]
                                       [--out benches/results/critical_path.json]

For each configuration it starts ``--pairs`` fresh P + D server pairs (prefix caching off) and
on each pair:
  1. sends a first request (512 tokens); for kvbridge, D's log gives first contact
     (``kvbridge: first contact``: from the request reaching D's worker to its READ being
     posted) and, when D had to handshake on the request path, its breakdown (side-channel
     fetch, payload check + plan, NIXL ``load_remote_md``);
  2. after ``--warmup`` unrecorded requests (0 by default), sends ``--reps`` fresh prompts at 512 and at 2048 tokens, one at a time (explicit
     two-phase flow, float16, tokens checked against D alone: exact here): decode-side TTFT
     (median, max);
  3. reads D's own transfer metrics, which both connectors report under NixlConnector's
     names (``vllm:nixl_xfer_time_seconds``: from post to D observing completion;
     ``vllm:nixl_bytes_transferred``; ``vllm:nixl_post_time_seconds``), and the post times
     (kvbridge: per transfer from ``kvbridge-xfer`` lines; NixlConnector: the P90 of each
     ``KV Transfer metrics`` log window).

Configurations: ``kvbridge-peers`` (D lists P in ``kv_peers``: first contact at start-up),
``kvbridge`` (first contact on the first request, as NixlConnector does) and ``nixl``.
The scheduler-side overhead ratio is read from ``benches/results/connector_overhead.json``
(``make bench-overhead``). Writes JSON with the fields ``first_contact_ms_p50``,
``read_ms_per_mib_kvbridge``, ``read_ms_per_mib_nixl``, ``post_ms_p90``, ``tail_ratio_512``,
``sched_overhead_ratio`` and the per-pair details, and prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benches"))
from pd_ttft import Bench, _raise_exit, summarize  # noqa: E402

from kvbridge.testing.cluster import Cluster  # noqa: E402
from make_model import make_model  # noqa: E402

MIB = 1 << 20
P_SIDE_PORT = 5600
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "kvbridge-peers": ("kvbridge", {"kv_peers": [f"127.0.0.1:{P_SIDE_PORT}"]}),
    "kvbridge": ("kvbridge", {}),
    "nixl": ("nixl", {}),
}
FIRST_RE = re.compile(r"kvbridge: first contact .*?first_contact_ms=([0-9.eE+\-]+)")
HANDSHAKE_RE = re.compile(r"kvbridge: handshake finished[^\n]*")
LOAD_RE = re.compile(r"kvbridge: peer loaded .*?load_ms=([0-9.eE+\-]+)")
POST_RE = re.compile(r"kvbridge-xfer .*?post_ms=([0-9.eE+\-]+)")
WINDOW_POST_P90_RE = re.compile(r"P90 post time \(ms\)['\"]?[=:] ?([0-9.eE+\-]+)")


def log_text(cluster: Cluster, name: str = "decode") -> str:
    return cluster.log_path(name).read_text(errors="replace")


def wait_for(pattern: re.Pattern[str], cluster: Cluster, timeout: float) -> list[re.Match[str]]:
    deadline = time.monotonic() + timeout
    while True:
        found = list(pattern.finditer(log_text(cluster)))
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def scrape(cluster: Cluster) -> dict[str, float]:
    """D's transfer histograms' sums and counts (both connectors fill them)."""
    import httpx

    text = httpx.get(f"{cluster.d_url}/metrics", timeout=10.0).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        for key in ("vllm:nixl_xfer_time_seconds", "vllm:nixl_post_time_seconds", "vllm:nixl_bytes_transferred"):
            for suffix in ("_sum", "_count"):
                if line.startswith(key + suffix + "{") or line.startswith(key + suffix + " "):
                    k = key.split(":", 1)[1] + suffix
                    out[k] = out.get(k, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def one_pair(conn: str, model: Path, log_dir: Path, reps: int, seed: int, warmup: int = 0) -> dict[str, Any]:
    kind, extra = CONFIGS[conn]
    # float16: P/D is bit-identical to D alone here (bf16 on this AMX CPU gives near-ties), so
    # every token check is exact.
    cluster = Cluster(model, connector=kind, log_dir=log_dir, max_model_len=4096, extra_config=extra,
                      side_ports=(P_SIDE_PORT, 5700), dtype="float16")  # fmt: skip
    try:
        cluster.start()
        if conn == "kvbridge-peers":
            # D warmed P up at start-up (its log says so once the handshake finished).
            if not wait_for(HANDSHAKE_RE, cluster, 60.0):
                raise RuntimeError(f"D never warmed up P; see {cluster.log_path('decode')}")
        bench = Bench(cluster, 16, seed)
        first = bench.sample(512)
        out: dict[str, Any] = {"first_request_ttft_ms": first["ttft_ms"]}
        if kind == "kvbridge":
            fc = wait_for(FIRST_RE, cluster, 5.0)
            out["first_contact_ms"] = float(fc[0].group(1)) if fc else None
            out["handshakes"] = [
                {k: float(m.group(1)) for k in ("fetch_ms", "plan_ms", "total_ms") if (m := re.search(k + r"=([0-9.eE+\-]+)", line))}
                for line in HANDSHAKE_RE.findall(log_text(cluster))
            ]
            out["peer_load_ms"] = [float(x) for x in LOAD_RE.findall(log_text(cluster))]
        for _ in range(warmup):  # a fresh vLLM's first requests are slow whatever the connector
            bench.sample(512, check=True)
        before = scrape(cluster)
        offset = cluster.log_offset("decode")
        for n in (512, 2048):
            samples = [bench.sample(n) for _ in range(reps)]
            out[f"ttft_{n}"] = summarize([s["ttft_ms"] for s in samples])
            out[f"ttft_{n}_samples"] = [round(s["ttft_ms"], 2) for s in samples]
            out[f"tokens_equal_{n}"] = all(s["tokens_equal"] is not False for s in samples)
        time.sleep(11.0)  # one more stats interval, so the last transfers are logged
        after = scrape(cluster)
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        out["transfers"] = d.get("nixl_xfer_time_seconds_count", 0.0)
        mib = d.get("nixl_bytes_transferred_sum", 0.0) / MIB
        out["read_ms_per_mib"] = d["nixl_xfer_time_seconds_sum"] * 1e3 / mib if mib else None
        out["post_ms_mean"] = (d["nixl_post_time_seconds_sum"] * 1e3 / out["transfers"]) if out["transfers"] else None
        with open(cluster.log_path("decode"), "rb") as fh:
            fh.seek(offset)
            tail = fh.read().decode(errors="replace")
        if kind == "kvbridge":
            out["post_ms"] = [float(x) for x in POST_RE.findall(tail)]
        else:
            out["post_ms_p90_windows"] = [float(x) for x in WINDOW_POST_P90_RE.findall(tail)]
        out["mismatches"] = bench.mismatches
        return out
    finally:
        cluster.stop()


def p90(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(conn: str, key: str) -> float | None:
        xs = [r[key] for r in results.get(conn, []) if r.get(key) is not None]
        return statistics.median(xs) if xs else None

    posts = [x for r in results.get("kvbridge-peers", []) + results.get("kvbridge", []) for x in r.get("post_ms", [])]
    nixl_posts = [x for r in results.get("nixl", []) for x in r.get("post_ms_p90_windows", [])]
    tails = [r["ttft_512"]["max_over_median"] for r in results.get("kvbridge-peers", [])]
    overhead = None
    oh = REPO / "benches" / "results" / "connector_overhead.json"
    if oh.exists():
        # The worst (largest) scheduler-side ratio over the in-flight counts measured.
        try:
            rows = json.loads(oh.read_text())["results"]
            sched = {(r["connector"], r["in_flight"]): r["median_us"] for r in rows if r.get("side") == "scheduler"}
            ratios = [v / sched[("nixl", n)] for (c, n), v in sched.items() if c == "kvbridge" and ("nixl", n) in sched]
            overhead = max(ratios) if ratios else None
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            overhead = None
    return {
        "first_contact_ms_p50": med("kvbridge-peers", "first_contact_ms"),
        "first_contact_ms_p50_on_demand": med("kvbridge", "first_contact_ms"),
        "read_ms_per_mib_kvbridge": med("kvbridge-peers", "read_ms_per_mib"),
        "read_ms_per_mib_nixl": med("nixl", "read_ms_per_mib"),
        "post_ms_p90": p90(posts),
        "post_ms_p90_nixl_windows_max": max(nixl_posts) if nixl_posts else None,
        "tail_ratio_512": max(tails) if tails else None,
        "tail_ratio_512_median_over_pairs": statistics.median(tails) if tails else None,
        "first_request_ttft_ms": {c: med(c, "first_request_ttft_ms") for c in results},
        "ttft_512_median_ms": {c: statistics.median(r["ttft_512"]["median"] for r in rs) for c, rs in results.items()},
        "ttft_2048_median_ms": {c: statistics.median(r["ttft_2048"]["median"] for r in rs) for c, rs in results.items()},
        "sched_overhead_ratio": overhead,
    }


def markdown(s: dict[str, Any]) -> str:
    def f(x: Any, d: int = 2) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    rows = [
        ("first contact, kv_peers (ms, p50 over pairs)", f(s["first_contact_ms_p50"]), "≤ 10"),
        ("first contact, on demand (ms, p50 over pairs)", f(s["first_contact_ms_p50_on_demand"]), "—"),
        ("READ ms/MiB in vLLM, kvbridge", f(s["read_ms_per_mib_kvbridge"], 3), "≤ nixl"),
        ("READ ms/MiB in vLLM, NixlConnector", f(s["read_ms_per_mib_nixl"], 3), "baseline"),
        ("post time p90 (ms), kvbridge", f(s["post_ms_p90"], 3), "≤ 0.2"),
        ("post time p90 (ms), NixlConnector (worst 10 s window)", f(s["post_ms_p90_nixl_windows_max"], 3), "baseline"),
        ("TTFT max / median at 512 tokens (worst pair)", f(s["tail_ratio_512"]), "≤ 2"),
        ("scheduler overhead vs NixlConnector", f(s["sched_overhead_ratio"]), "≤ 0.5"),
    ]
    lines = ["| measure | value | target |", "|---|---:|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| connector | first-request TTFT (ms) | TTFT 512 median (ms) | TTFT 2048 median (ms) |", "|---|---:|---:|---:|"]
    for c in s["first_request_ttft_ms"]:
        lines.append(f"| {c} | {f(s['first_request_ttft_ms'][c], 1)} | {f(s['ttft_512_median_ms'][c], 1)} | "
                     f"{f(s['ttft_2048_median_ms'][c], 1)} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="fresh server pairs per kvbridge configuration")
    ap.add_argument("--nixl-pairs", type=int, default=2, help="fresh server pairs for NixlConnector")
    ap.add_argument("--reps", type=int, default=12, help="prompts per length per pair")
    ap.add_argument("--warmup", type=int, default=0,
                    help="unrecorded 512-token requests after the first one, before measuring (every configuration alike)")
    ap.add_argument("--only", choices=tuple(CONFIGS), nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benches" / "results" / "critical_path.json")
    ap.add_argument("--log-dir", type=Path, default=REPO / "out" / "bench-critical")
    ap.add_argument("--model-dir", type=Path,
                    default=Path(os.environ.get("KVBRIDGE_CACHE", Path.home() / ".cache" / "kvbridge")) / "tiny-llama")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _raise_exit)
    model = make_model(args.model_dir)
    seed = int(time.time()) * 100_000
    results: dict[str, list[dict[str, Any]]] = {}
    # Interleave the configurations pair by pair, so drift on this noisy box hits all alike.
    conns = args.only or list(CONFIGS)
    rounds = max(args.pairs, args.nixl_pairs)
    for i in range(rounds):
        for conn in conns:
            if i >= (args.nixl_pairs if conn == "nixl" else args.pairs):
                continue
            print(f"== {conn}, pair {i + 1}", flush=True)
            r = one_pair(conn, args.model_dir, args.log_dir / f"{conn}-{i}", args.reps, seed, args.warmup)
            seed += 10_000
            results.setdefault(conn, []).append(r)
            print(f"   first request {r['first_request_ttft_ms']:.1f} ms, first contact {r.get('first_contact_ms')}, "
                  f"TTFT 512 {r['ttft_512']['median']:.1f} (max {r['ttft_512']['max']:.1f}), "
                  f"READ {r['read_ms_per_mib']} ms/MiB", flush=True)  # fmt: skip
    s = summary(results)
    doc = {
        "bench": "critical_path",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"pairs": args.pairs, "nixl_pairs": args.nixl_pairs, "reps": args.reps, "warmup": args.warmup,
                   "lengths": [512, 2048],
                   "model": "tiny-llama (scripts/make_model.py)", "prefix_caching": False},  # fmt: skip
        **s,
        "pairs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n" + markdown(s))
    print(f"\nresults: {args.out}")
    # kvbridge's single requests must match D alone; the baseline's mismatches are reported.
    return 1 if any(r["mismatches"] for c, rs in results.items() if c != "nixl" for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())

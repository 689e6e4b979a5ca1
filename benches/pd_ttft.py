#!/usr/bin/env python3
"""Decode-side TTFT, throughput and idle CPU of P/D disaggregation: kvbridge (plain and with
P-side staging) vs vLLM's NixlConnector, in one run.

Usage: python benches/pd_ttft.py [--only kvbridge kvbridge-staged kvbridge-hostbuf nixl] [--reps 8]
                                 [--lengths 512 2048] [--conc 4 8] [--rounds 3]
                                 [--out benches/results/pd_ttft.json] [--plot docs/img/pd_ttft.png]
       python benches/pd_ttft.py --from-json RESULTS.json [--plot PNG]

For each configuration it starts P + D (prefix caching off) + proxy and:
  1. sends a warm-up request; its decode-side TTFT (it includes the first handshake) is reported
     as "first request";
  2. for each length, sends ``--reps`` fresh random prompts with the explicit two-phase flow
     (P with max_tokens=1, then D streaming with P's kv_transfer_params) and records the
     decode-side TTFT: from sending the D request to D's first token. Tokens are checked
     against a D-local run of the same prompt (every sample up to ``--check-all-upto``
     tokens, the first beyond);
  3. with ``--conc``, for each length and concurrency, ``--rounds`` rounds of that many
     simultaneous two-phase requests: decode-side TTFT per request, output tokens per second
     per round;
  4. measures the CPU seconds each instance's process tree uses in ``--idle-secs`` (10) s with
     no requests.
For kvbridge it also reads D's ``kvbridge-xfer`` log lines (transfer time, bytes).
Writes a JSON file and prints markdown tables. Exits non-zero if a kvbridge single request's
tokens differ (concurrent requests decode in batches whose numerics differ from a batch of
one, for vLLM's connector too: those are reported, not fatal) or a request fails. Timings
are only comparable on the same machine under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
try:  # an installed kvbridge wheel, or a source tree already on sys.path
    import kvbridge.testing  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "scripts"))

from kvbridge.testing.cluster import Cluster, cpu_delta, cpu_snapshot, random_prompt  # noqa: E402
from make_model import make_model  # noqa: E402

#: name → (Cluster connector, kv_connector_extra_config)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "kvbridge": ("kvbridge", {}),
    "kvbridge-staged": ("kvbridge", {"kv_staging_blocks": 512}),
    # Host buffers on both sides (kv_buffer_device="cpu" on a GPU; forced here on DRAM): the
    # cost of P's and D's extra copies.
    "kvbridge-hostbuf": ("kvbridge", {"kv_host_buffer": True}),
    "nixl": ("nixl", {}),
}
CONNECTORS = tuple(CONFIGS)
MIB = 1 << 20


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def summarize(ms: list[float]) -> dict[str, float]:
    """median / min / max / max-over-median of a list of milliseconds."""
    med = statistics.median(ms)
    return {"median": med, "min": min(ms), "max": max(ms), "max_over_median": max(ms) / med if med else 0.0}


def idle_cpu(cluster: Cluster, seconds: float) -> dict[str, float]:
    """CPU seconds each instance's process tree uses over ``seconds`` with no requests."""
    names = ("prefill", "decode")
    before = {n: cpu_snapshot(cluster.pid(n)) for n in names}
    time.sleep(seconds)
    after = {n: cpu_snapshot(cluster.pid(n)) for n in names}
    return {n: cpu_delta(before[n], after[n]) for n in names}


class Bench:
    """Runs the measurements for one connector on a started cluster."""

    def __init__(self, cluster: Cluster, max_tokens: int, seed: int) -> None:
        self.c = cluster
        self.max_tokens = max_tokens
        self.seed = seed
        self.mismatches = 0

    def sample(self, n_tokens: int, check: bool = True) -> dict[str, Any]:
        """One fresh prompt through P then D; TTFT, token check and (kvbridge) transfer stats."""
        self.seed += 1
        prompt = random_prompt(n_tokens, self.seed)
        offset = self.c.log_offset("decode")
        pd = self.c.pd_request(prompt, self.max_tokens)
        if not pd.decode.ok or pd.ttft is None:
            raise RuntimeError(f"decode request failed ({n_tokens} tokens): {pd.decode}")
        xfers = self.c.xfer_since(offset, count=1, timeout=2.0) if self.c.connector == "kvbridge" else []
        out: dict[str, Any] = {"ttft_ms": pd.ttft * 1e3, "tokens_equal": self.check(prompt, pd.tokens) if check else None,
                               "prefill_ms": pd.prefill.latency * 1e3}  # fmt: skip
        if xfers:
            out["xfer_ms"] = sum(x.secs for x in xfers) * 1e3
            out["xfer_bytes"] = sum(x.bytes for x in xfers)
        return out

    def check(self, prompt: list[int], tokens: list[int], count: bool = True) -> bool:
        """Tokens equal to D computing the prompt alone (counted in ``mismatches`` if not and
        ``count``: concurrent requests decode in batches whose numerics differ from a
        batch of one, for vLLM's own connector too, so only single requests count)."""
        ref = self.c.reference(prompt, self.max_tokens)
        equal = ref.ok and tokens == ref.tokens
        self.mismatches += count and not equal
        return equal

    def round(self, n_tokens: int, conc: int, check: bool) -> dict[str, Any]:
        """``conc`` fresh prompts at once, each P then D (the two-phase flow, one thread per
        request). Decode-side TTFT per request, and output tokens per second of the round."""
        prompts = []
        for _ in range(conc):
            self.seed += 1
            prompts.append(random_prompt(n_tokens, self.seed))
        results: list[Any] = [None] * conc

        def one(i: int) -> None:
            try:
                results[i] = self.c.pd_request(prompts[i], self.max_tokens)
            except Exception as e:  # noqa: BLE001 — recorded as a failed request
                results[i] = e

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        ttfts, failed, tokens, equal = [], 0, 0, []
        for p, r in zip(prompts, results):
            if isinstance(r, Exception) or not r.decode.ok or r.ttft is None:
                failed += 1
                continue
            ttfts.append(r.ttft * 1e3)
            tokens += len(r.tokens)
            if check:
                equal.append(self.check(p, r.tokens, count=conc == 1))
        return {"ttft_ms": ttfts, "failed": failed, "tokens_per_s": tokens / wall, "wall_s": wall,
                "tokens_equal": equal}  # fmt: skip

    def matrix(self, lengths: list[int], concs: list[int], rounds: int, check_all_upto: int) -> dict[str, Any]:
        """Every (length, concurrency) cell: ``rounds`` rounds of ``conc`` simultaneous requests."""
        cells: dict[str, Any] = {}
        for n in lengths:
            for conc in concs:
                rs = [self.round(n, conc, check=(i == 0 or n <= check_all_upto)) for i in range(rounds)]
                ttfts = [t for r in rs for t in r["ttft_ms"]]
                checked = [e for r in rs for e in r["tokens_equal"]]
                cell: dict[str, Any] = {
                    "rounds": rs,
                    "failed": sum(r["failed"] for r in rs),
                    "tokens_checked": len(checked),
                    "token_mismatches": checked.count(False),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                }
                if ttfts:
                    cell["ttft_ms"] = summarize(ttfts)
                cells[f"{n}/{conc}"] = cell
                t = cell.get("ttft_ms", {})
                print(f"  {n} tok x{conc}: median {t.get('median', float('nan')):.1f} ms, max {t.get('max', float('nan')):.1f}, "
                      f"{cell['tokens_per_s']:.1f} tok/s, {cell['token_mismatches']}/{len(checked)} mismatched, "
                      f"{cell['failed']} failed", flush=True)  # fmt: skip
        return cells

    def run(self, lengths: list[int], reps: int, idle_secs: float, check_all_upto: int = 1 << 30) -> dict[str, Any]:
        first = self.sample(lengths[0])
        print(f"  first request ({lengths[0]} tokens): {first['ttft_ms']:.1f} ms", flush=True)
        result: dict[str, Any] = {"first_request": first, "lengths": {}}
        for n in lengths:
            samples = [self.sample(n, check=(i == 0 or n <= check_all_upto)) for i in range(reps)]
            ttfts = [s["ttft_ms"] for s in samples]
            entry: dict[str, Any] = {"samples": samples, "ttft_ms": summarize(ttfts),
                                     "tokens_equal": all(s["tokens_equal"] is not False for s in samples)}  # fmt: skip
            xfer = [s for s in samples if "xfer_ms" in s]
            if xfer:
                med_ms = statistics.median(s["xfer_ms"] for s in xfer)
                entry["xfer_ms_median"] = med_ms
                entry["xfer_bytes"] = statistics.median(s["xfer_bytes"] for s in xfer)
                entry["xfer_ms_per_mib"] = statistics.median(
                    s["xfer_ms"] / (s["xfer_bytes"] / MIB) for s in xfer if s["xfer_bytes"]
                ) if any(s["xfer_bytes"] for s in xfer) else None  # fmt: skip
            result["lengths"][str(n)] = entry
            t = entry["ttft_ms"]
            print(f"  {n} tokens: median {t['median']:.1f} ms (min {t['min']:.1f}, max {t['max']:.1f}), "
                  f"tokens equal: {entry['tokens_equal']}", flush=True)  # fmt: skip
        time.sleep(2.0)  # let the last request's bookkeeping settle
        result["idle_cpu_s"] = idle_cpu(self.c, idle_secs)
        result["idle_secs"] = idle_secs
        print(f"  idle CPU over {idle_secs:.0f} s: P {result['idle_cpu_s']['prefill']:.2f} s, "
              f"D {result['idle_cpu_s']['decode']:.2f} s", flush=True)  # fmt: skip
        return result


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: dict[str, Any], lengths: list[int]) -> str:
    """The results as markdown tables."""
    conns = [c for c in CONNECTORS if c in results]
    lines = ["| connector | prompt tokens | median TTFT (ms) | min | max | max/median | "
             "median xfer (ms) | xfer ms/MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in conns:
        for n in lengths:
            e = results[c]["lengths"][str(n)]
            t = e["ttft_ms"]
            lines.append(f"| {c} | {n} | {t['median']:.1f} | {t['min']:.1f} | {t['max']:.1f} | "
                         f"{t['max_over_median']:.2f} | {fmt(e.get('xfer_ms_median'), 2)} | "
                         f"{fmt(e.get('xfer_ms_per_mib'), 2)} |")  # fmt: skip
    lines += ["", "| connector | first-request TTFT (ms) | idle CPU-s / 10 s, P | idle CPU-s / 10 s, D |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for c in conns:
        r = results[c]
        scale = 10.0 / r["idle_secs"]
        lines.append(f"| {c} | {r['first_request']['ttft_ms']:.1f} | {r['idle_cpu_s']['prefill'] * scale:.2f} | "
                     f"{r['idle_cpu_s']['decode'] * scale:.2f} |")  # fmt: skip
    if any("cells" in results[c] for c in conns):
        lines += ["", "| connector | tokens / conc. | median TTFT (ms) | max | max/median | output tok/s | "
                  "vs nixl (median) | mismatches / checked | failed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        base = results.get("nixl", {}).get("cells", {})
        for c in conns:
            for key, cell in results[c].get("cells", {}).items():
                t = cell.get("ttft_ms")
                b = base.get(key, {}).get("ttft_ms")
                ratio = f"{t['median'] / b['median']:.2f}" if t and b and c != "nixl" else "—"
                lines.append(f"| {c} | {key} | {fmt(t and t['median'])} | {fmt(t and t['max'])} | "
                             f"{fmt(t and t['max_over_median'], 2)} | {cell['tokens_per_s']:.1f} | {ratio} | "
                             f"{cell['token_mismatches']} / {cell['tokens_checked']} | {cell['failed']} |")  # fmt: skip
    if "nixl" in results:
        x = results["nixl"]
        for name in conns:
            if name == "nixl":
                continue
            k = results[name]
            lines += ["", f"| {name} / nixl | ratio |", "|---|---:|"]
            for n in lengths:
                a, b = k["lengths"][str(n)]["ttft_ms"]["median"], x["lengths"][str(n)]["ttft_ms"]["median"]
                lines.append(f"| median TTFT, {n} tokens | {a / b:.2f} |")
            a, b = k["first_request"]["ttft_ms"], x["first_request"]["ttft_ms"]
            lines.append(f"| first-request TTFT | {a / b:.2f} |")
            for inst, label in (("prefill", "P"), ("decode", "D")):
                a, b = k["idle_cpu_s"][inst], x["idle_cpu_s"][inst]
                lines.append(f"| idle CPU, {label} | {fmt(a / b if b else None, 2)} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Median decode-side TTFT per (length, concurrency), one bar per configuration (log scale)."""
    sys.path.insert(0, str(REPO / "benches"))
    from plan_vs_numpy import png_bars

    names = list(results)
    keys: list[str] = []
    for r in results.values():
        for n in r["lengths"]:
            keys.append(f"{n}/1") if f"{n}/1" not in keys else None
        for k in r.get("cells", {}):
            keys.append(k) if k not in keys else None

    def med(r: dict[str, Any], key: str) -> float:
        n, conc = key.split("/")
        cell = r["lengths"].get(n) if conc == "1" else r.get("cells", {}).get(key)
        return (cell or {}).get("ttft_ms", {}).get("median", 0.0) / 1e3

    groups = [(f"{k.split('/')[0]} tok, c={k.split('/')[1]}", [med(results[nm], k) for nm in names]) for k in keys]
    png_bars(path, groups, names, "Decode-side TTFT, median (P/D on 2 vCPUs; lower is better)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=CONNECTORS, nargs="+", default=None, help="run these configurations only")
    ap.add_argument("--reps", type=int, default=8, help="prompts per length (>= 1)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--conc", type=int, nargs="+", default=[],
                    help="also run these concurrencies (rounds of simultaneous requests) at every length")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per (length, concurrency) cell")
    ap.add_argument("--check-all-upto", type=int, default=2048,
                    help="check every sample's tokens up to this length, the first round beyond")
    ap.add_argument("--idle-secs", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=REPO / "benches" / "results" / "pd_ttft.json")
    ap.add_argument("--log-dir", type=Path, default=REPO / "out" / "bench")
    ap.add_argument("--plot", type=Path, default=None, help="also draw the medians as a PNG")
    ap.add_argument("--from-json", type=Path, default=None, help="only print the tables (and --plot) from a results file")
    ap.add_argument("--model-dir", type=Path,
                    default=Path(os.environ.get("KVBRIDGE_CACHE", Path.home() / ".cache" / "kvbridge")) / "tiny-llama")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _raise_exit)  # so `finally` stops the servers
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        print(markdown(doc["results"], doc["config"]["lengths"]))
        if args.plot:
            plot(doc["results"], args.plot)
        return 0

    model = make_model(args.model_dir)
    conns = args.only or list(CONNECTORS)
    results: dict[str, Any] = {}
    mismatches: dict[str, int] = {}
    seed = int(time.time()) * 100_000
    for conn in conns:
        print(f"== {conn}: starting P + D + proxy (logs: {args.log_dir / conn})", flush=True)
        max_len = max(args.lengths) + args.max_tokens + 64
        kind, extra = CONFIGS[conn]
        cluster = Cluster(model, connector=kind, log_dir=args.log_dir / conn, max_model_len=max(4096, max_len), extra_config=extra)
        try:
            cluster.start()
            bench = Bench(cluster, args.max_tokens, seed)
            results[conn] = bench.run(args.lengths, args.reps, args.idle_secs, args.check_all_upto)
            if args.conc:
                results[conn]["cells"] = bench.matrix(args.lengths, args.conc, args.rounds, args.check_all_upto)
            mismatches[conn] = bench.mismatches
            seed = bench.seed + 1
        finally:
            cluster.stop()

    doc = {
        "bench": "pd_ttft",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"reps": args.reps, "lengths": args.lengths, "max_tokens": args.max_tokens, "conc": args.conc,
                   "rounds": args.rounds,
                   "model": "tiny-llama (scripts/make_model.py)", "prefix_caching": False},  # fmt: skip
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n" + markdown(results, args.lengths))
    if args.plot:
        plot(results, args.plot)
    print(f"\nresults: {args.out}")
    for conn, n in mismatches.items():
        if n:
            print(f"{conn}: {n} sample(s) with tokens different from the D-local reference")
    # The baseline's own mismatches are reported, not fatal; kvbridge's are.
    return 1 if any(n for c, n in mismatches.items() if c != "nixl") else 0


if __name__ == "__main__":
    sys.exit(main())

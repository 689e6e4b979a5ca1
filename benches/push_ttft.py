#!/usr/bin/env python3
"""Push vs pull: client TTFT through the proxy, kvbridge push (layer-wise on/off), kvbridge
pull, vLLM's NixlConnector and (if it runs) vLLM's NixlPushConnector, in one run.

Usage: python benches/push_ttft.py [--reps 5] [--lengths 512 2048] [--conc 1 4]
                                   [--only NAME ...] [--out benches/results/push_ttft.json]

TTFT is measured at the client of the proxy (streaming), because push overlaps the P and D
legs: the proxy sends both at once, so a "decode-side" TTFT would hide P's prefill for push
and not for pull. For each configuration it starts P + D (prefix caching off, P on core 0,
D on core 1) + the proxy, warms up (the first push request also teaches the proxy P's
coordinates), then for each length and concurrency sends ``--reps`` rounds of ``conc``
simultaneous fresh prompts. Tokens are checked against D computing alone (every sample up to
``--check-all-upto`` tokens, the first round beyond); a request that fails or times out
(``--timeout``) is recorded as such. Writes JSON and prints
a markdown table; ratios are against kvbridge pull measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
try:
    import kvbridge.testing  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "scripts"))

from kvbridge.testing.cluster import Cluster, CompletionResult, completion_body, post_completion, random_prompt  # noqa: E402
from make_model import make_model  # noqa: E402

#: name → (Cluster connector, kv_connector_extra_config)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "kvbridge-push-layerwise": ("kvbridge-push", {"push_layerwise": True}),
    "kvbridge-push-whole": ("kvbridge-push", {"push_layerwise": False}),
    "kvbridge-pull": ("kvbridge", {}),
    "nixl": ("nixl", {}),
    "nixl-push": ("nixl-push", {}),
}


def proxy_request(c: Cluster, prompt: list[int], max_tokens: int, timeout: float) -> CompletionResult:
    out: list[CompletionResult] = []
    t = threading.Thread(target=lambda: out.append(post_completion(c.proxy_url, completion_body(prompt, max_tokens, None, True))), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else CompletionResult(status=599, error=f"no reply in {timeout:.0f} s (stalled)")


def run_config(name: str, model: Path, args: argparse.Namespace, seed: list[int]) -> dict[str, Any]:
    connector, extra = CONFIGS[name]
    log_dir = REPO / "out" / "bench-push" / name
    res: dict[str, Any] = {"connector": connector, "extra_config": extra, "cells": {}}
    max_len = max(args.lengths) + 64
    c = Cluster(model, connector=connector, log_dir=log_dir, extra_config=extra, prefix_caching=False,
                p_port=8160, d_port=8260, proxy_port=8060, side_ports=(5660, 5760),
                max_model_len=max(4096, max_len))  # fmt: skip
    try:
        c.start()
    except Exception as e:  # noqa: BLE001 — record why a configuration cannot run
        res["error"] = f"did not start: {e}"[:2000]
        return res
    try:
        for _ in range(2):
            seed[0] += 1
            w = proxy_request(c, random_prompt(256, seed[0]), 4, args.timeout)
            if not w.ok:
                res["error"] = f"warm-up failed: {w.error or w.status}"[:2000]
                return res
        stalled = False
        for n in args.lengths:
            for conc in args.conc:
                if stalled:
                    res["cells"][f"{n}/{conc}"] = {"samples_ms": [], "token_mismatches": 0, "failed": ["skipped: an earlier cell stalled"]}
                    continue
                ttfts, bad, failed, checked = [], 0, [], 0
                for rep in range(args.reps):
                    prompts = []
                    for _ in range(conc):
                        seed[0] += 1
                        prompts.append(random_prompt(n, seed[0]))
                    results: list[CompletionResult | None] = [None] * conc

                    def one(i: int) -> None:
                        results[i] = proxy_request(c, prompts[i], args.max_tokens, args.timeout)

                    ts = [threading.Thread(target=one, args=(i,)) for i in range(conc)]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                    for p, r in zip(prompts, results):
                        if r is None or not r.ok or r.ttft is None:
                            failed.append((r.error or str(r.status))[:200] if r else "none")
                            continue
                        ttfts.append(r.ttft * 1e3)
                        if rep == 0 or n <= args.check_all_upto:
                            ref = c.reference(p, args.max_tokens)
                            bad += int(ref.tokens != r.tokens)
                            checked += 1
                    if len(failed) >= 2:
                        break  # a stalled connector: do not wait out every sample
                cell: dict[str, Any] = {"samples_ms": ttfts, "token_mismatches": bad, "tokens_checked": checked, "failed": failed}
                if ttfts:
                    cell.update(median=statistics.median(ttfts), max=max(ttfts))
                res["cells"][f"{n}/{conc}"] = cell
                stalled = len(failed) >= 2
                print(f"{name} {n} tok c={conc}: {cell.get('median', float('nan')):.1f} ms median, "
                      f"{cell.get('max', float('nan')):.1f} max, {bad} mismatches, {len(failed)} failed", flush=True)  # fmt: skip
    finally:
        c.stop()
    return res


def table(out: dict[str, Any]) -> str:
    base = out["configs"].get("kvbridge-pull", {}).get("cells", {})
    rows = ["| configuration | tokens / conc. | median TTFT | max | vs kvbridge pull (median) | mismatches | failed |",
            "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in out["configs"].items():
        if "error" in r and not r.get("cells"):
            rows.append(f"| {name} | — | — | — | — | — | {r['error'][:120]} |")
            continue
        for key, cell in r["cells"].items():
            med = cell.get("median")
            b = base.get(key, {}).get("median")
            ratio = f"{med / b:.2f}" if med and b else "—"
            fmt = (lambda x: f"{x:.1f} ms" if x is not None else "—")  # noqa: E731
            rows.append(f"| {name} | {key} | {fmt(med)} | {fmt(cell.get('max'))} | {ratio} | {cell['token_mismatches']} | {len(cell['failed'])} |")
    return "\n".join(rows)


def plot(out: dict[str, Any], path: Path) -> None:
    """Median TTFT per (length, concurrency), one bar per configuration (log scale)."""
    from plan_vs_numpy import png_bars

    names = [n for n, r in out["configs"].items() if r.get("cells")]
    keys = list(next((r["cells"] for r in out["configs"].values() if r.get("cells")), {}))
    groups = []
    for k in keys:
        n, conc = k.split("/")
        groups.append((f"{n} tok, c={conc}", [out["configs"][nm]["cells"].get(k, {}).get("median", 0.0) / 1e3 for nm in names]))
    png_bars(path, groups, names, "Client TTFT through the proxy, median (push vs pull; lower is better)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--conc", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--check-all-upto", type=int, default=2048,
                    help="check every sample's tokens up to this length; longer prompts: the first round only")
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS))
    ap.add_argument("--out", type=Path, default=REPO / "benches" / "results" / "push_ttft.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "push_ttft.png")
    ap.add_argument("--from-json", type=Path, help="only redraw the table and plot from a results file")
    args = ap.parse_args()
    if args.from_json:
        out = json.loads(args.from_json.read_text())
        print(table(out))
        plot(out, args.plot)
        return
    model = make_model(Path.home() / ".cache" / "kvbridge" / "tiny-llama")
    seed = [int(time.time())]
    out: dict[str, Any] = {"host": platform.node(), "args": {k: str(v) for k, v in vars(args).items()}, "configs": {}}
    for name in args.only or list(CONFIGS):
        out["configs"][name] = run_config(name, model, args, seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    print(table(out))
    plot(out, args.plot)


if __name__ == "__main__":
    main()

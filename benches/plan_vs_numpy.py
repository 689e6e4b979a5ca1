"""Transfer-plan benchmarks: kvbridge's plan vs vLLM's numpy descriptor code, and
coalescing vs per-block descriptors vs raw NIXL over real transfers.

1. Plan build (per peer, at handshake) and per-request descriptor computation for 32 and 80
   layers x 1k, 10k and 100k blocks. kvbridge: ``examples/plan_bench`` (Rust, release).
   vLLM: its numpy implementation, run here in the same script — the all-attention path of
   ``_compute_desc_ids`` / ``_get_block_descs_ids`` (``region_ids * num_blocks + block_ids``,
   for the local and the remote side) and, for the build, the ``Nx3`` descriptor arrays of
   ``_build_fa_local``/``_build_fa_remote``.
2. Descriptor count and READ throughput, contiguous vs fragmented block ids, coalesced vs
   per-block, against raw NIXL moving the same bytes as one descriptor per layer:
   ``examples/coalesce_bench`` (two NIXL agents, UCX over loopback, DRAM).

Writes ``benches/results/plan_bench.json`` and ``docs/img/plan_bench.png`` and prints the
markdown tables used in ``docs/benchmarks.md``. Run with ``make bench-plan``.
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / "target" / "release" / "examples"


def vllm_build(layers: int, n: int) -> float:
    """vLLM's handshake-time descriptor arrays (local + remote), timed."""

    def one() -> np.ndarray:
        bases = np.arange(layers, dtype=np.uint64) * np.uint64(n * 65536) + np.uint64(1 << 40)
        addrs = (bases[:, None] + np.arange(n, dtype=np.uint64)[None, :] * np.uint64(32768)).reshape(-1)
        out = np.empty((addrs.shape[0], 3), dtype=np.uint64)
        out[:, 0] = addrs
        out[:, 1] = 32768
        out[:, 2] = 0
        return out

    reps = 5 if n >= 100_000 else 20
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        one(), one()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def vllm_request(layers: int, n: int, block_ids: np.ndarray) -> float:
    """vLLM's per-request descriptor ids (``_get_block_descs_ids``), local and remote."""
    region_ids = np.arange(layers)[:, None]
    remote = np.arange(1, n + 1)
    reps = 5 if n >= 100_000 else 20
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for ids in (block_ids, remote):
            (region_ids * (n + 1) + np.asarray(ids)[None, :]).flatten()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def build_examples() -> None:
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "kvbridge-core", "--example", "plan_bench"], cwd=REPO, check=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "kvbridge-nixl", "--example", "coalesce_bench"], cwd=REPO, check=True)


def png_bars(path: Path, groups: list[tuple[str, list[float]]], legend: list[str], title: str) -> None:
    """A grouped bar chart (log scale) as a PNG, with no plotting library: 3x5 digits font."""
    W, H, M = 900, 420, 50
    img = [[(255, 255, 255)] * W for _ in range(H)]
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    vals = [v for _, vs in groups for v in vs if v > 0]
    lo, hi = np.log10(min(vals)) - 0.2, np.log10(max(vals)) + 0.2

    def rect(x0: int, y0: int, x1: int, y1: int, c: tuple[int, int, int]) -> None:
        for y in range(max(0, y0), min(H, y1)):
            row = img[y]
            for x in range(max(0, x0), min(W, x1)):
                row[x] = c

    rect(M, H - M, W - 10, H - M + 1, (0, 0, 0))
    rect(M, 10, M + 1, H - M, (0, 0, 0))
    for dec in range(int(np.ceil(lo)), int(np.floor(hi)) + 1):  # gridline per decade
        y = int(H - M - (dec - lo) / (hi - lo) * (H - M - 20))
        rect(M, y, W - 10, y + 1, (220, 220, 220))
    gw = (W - M - 20) / len(groups)
    bw = int(gw * 0.8 / len(legend))
    for gi, (_, vs) in enumerate(groups):
        for si, v in enumerate(vs):
            if v <= 0:
                continue
            h = int((np.log10(v) - lo) / (hi - lo) * (H - M - 20))
            x0 = int(M + 5 + gi * gw + si * bw)
            rect(x0, H - M - h, x0 + bw - 2, H - M, colours[si % len(colours)])
    for si, _ in enumerate(legend):  # legend swatches, top right
        rect(W - 150, 15 + 14 * si, W - 140, 25 + 14 * si, colours[si % len(colours)])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in img)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    path.with_suffix(".txt").write_text(
        f"{title}\nlog-scale bars, left to right per group: {', '.join(legend)}\ngroups: {', '.join(g for g, _ in groups)}\n"
    )


def main() -> int:
    build_examples()
    rows = []
    for layers in (32, 80):
        for n in (1_000, 10_000, 100_000):
            out = subprocess.run([str(BIN / "plan_bench"), str(layers), str(n)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            rng = np.random.default_rng(7)
            r["vllm_build_s"] = vllm_build(layers, n)
            r["vllm_request_contiguous_s"] = vllm_request(layers, n, np.arange(1, n + 1))
            r["vllm_request_fragmented_s"] = vllm_request(layers, n, rng.permutation(np.arange(1, n + 1)))
            r["vllm_descs"] = layers * n
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    env = dict(os.environ, UCX_NET_DEVICES=os.environ.get("UCX_NET_DEVICES", "lo"))
    out = subprocess.run([str(BIN / "coalesce_bench"), "256"], capture_output=True, text=True, env=env, check=True)
    xfers = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    res = REPO / "benches" / "results" / "plan_bench.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps({"plan": rows, "transfer": xfers, "when": time.strftime("%F %T")}, indent=1))

    print("| layers | blocks | build kvbridge | build vLLM numpy | ratio | request kvbridge (contig / frag) "
          "| request vLLM numpy (contig / frag) | ratio (contig / frag) | descriptors kvbridge (contig / frag) | vLLM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ms = lambda s: f"{s * 1e3:.3g} ms"  # noqa: E731
    for r in rows:
        print(
            f"| {r['layers']} | {r['blocks']} | {ms(r['build_s'])} | {ms(r['vllm_build_s'])} | {r['build_s'] / r['vllm_build_s']:.3f}x "
            f"| {ms(r['contiguous_coalesced_s'])} / {ms(r['fragmented_coalesced_s'])} "
            f"| {ms(r['vllm_request_contiguous_s'])} / {ms(r['vllm_request_fragmented_s'])} "
            f"| {r['contiguous_coalesced_s'] / r['vllm_request_contiguous_s']:.3f}x / "
            f"{r['fragmented_coalesced_s'] / r['vllm_request_fragmented_s']:.2f}x "
            f"| {r['contiguous_coalesced_descs']} / {r['fragmented_coalesced_descs']} | {r['vllm_descs']} |"
        )
    print()
    raw = next(x for x in xfers if x["case"].startswith("raw"))
    print("| case | bytes | descriptors | post | total | GiB/s | vs raw NIXL |")
    print("|---|---|---|---|---|---|---|")
    for x in xfers:
        print(f"| {x['case']} | {x['bytes']} | {x['descriptors']} | {ms(x['post_s'])} | {ms(x['total_s'])} "
              f"| {x['gib_s']:.2f} | {x['gib_s'] / raw['gib_s']:.2f}x |")  # fmt: skip
    png_bars(
        REPO / "docs" / "img" / "plan_bench.png",
        [(f"{r['layers']}L/{r['blocks']}", [r["contiguous_coalesced_s"], r["fragmented_coalesced_s"],
                                             r["vllm_request_contiguous_s"], r["vllm_request_fragmented_s"]]) for r in rows],  # fmt: skip
        ["kvbridge contiguous", "kvbridge fragmented", "vLLM numpy contiguous", "vLLM numpy fragmented"],
        "per-request descriptor computation (seconds, log scale)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

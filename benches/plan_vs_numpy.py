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
import subprocess
import sys
import time
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
    """A grouped bar chart, log scale, drawn with Pillow (a vLLM dependency, so no plotting
    library to install)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, L, B, T = 960, 460, 80, 60, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    vals = [v for _, vs in groups for v in vs if v > 0]
    lo, hi = np.floor(np.log10(min(vals))), np.ceil(np.log10(max(vals)))
    y_of = lambda v: H - B - (np.log10(v) - lo) / (hi - lo) * (H - B - T)  # noqa: E731
    d.text((L, 10), title, fill="black", font=font)
    for dec in range(int(lo), int(hi) + 1):
        y = y_of(10.0**dec)
        d.line([(L, y), (W - 10, y)], fill="#dddddd")
        d.text((5, y - 6), f"{10.0**dec * 1e3:g} ms", fill="black", font=font)
    d.line([(L, T), (L, H - B), (W - 10, H - B)], fill="black")
    gw = (W - L - 20) / len(groups)
    bw = gw * 0.8 / len(legend)
    for gi, (label, vs) in enumerate(groups):
        for si, v in enumerate(vs):
            if v > 0:
                x0 = L + 5 + gi * gw + si * bw
                d.rectangle([x0, y_of(v), x0 + bw - 2, H - B], fill=colours[si % len(colours)])
        d.text((L + 5 + gi * gw, H - B + 8), label, fill="black", font=font)
    for si, name in enumerate(legend):
        y = T + 4 + 16 * si
        d.rectangle([W - 230, y, W - 220, y + 10], fill=colours[si % len(colours)])
        d.text((W - 214, y - 1), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


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
        "Per-request descriptor computation (log scale), by layers/blocks: lower is better",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

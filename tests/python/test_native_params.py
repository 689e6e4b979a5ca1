"""kv_transfer_params handed to the native scheduler as the request's dict (its known keys
read straight from it) behave exactly as the same params given as JSON text: the same
classification, the same ParamsError messages, the same scheduling decisions. No vLLM
server: the native module only (seconds)."""

from __future__ import annotations

import json
import time

import pytest
from helpers import REPO  # noqa: F401  (puts kvbridge on sys.path)
from kvbridge import _native


def _pull(**kw: object) -> dict:
    d = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "P", "remote_request_id": "p-1",
         "remote_block_ids": [[3, 4, 5]], "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1,
         "remote_num_tokens": 300, "remote_epoch": 7, "remote_blocks_expiry_time": time.time() + 60}  # fmt: skip
    d.update(kw)
    return d


def _push(**kw: object) -> dict:
    d = {"do_remote_prefill": True, "transfer_mode": "push", "remote_engine_id": "P", "remote_host": "h",
         "remote_port": 5600, "tp_size": 2, "transfer_id": "t-1"}  # fmt: skip
    d.update(kw)
    return d


class _Str(str):
    pass


CASES = [
    {}, {"do_remote_decode": True}, {"do_remote_decode": True, "transfer_id": "t"}, {"do_remote_decode": True, "transfer_id": 5},
    {"do_remote_prefill": None, "do_remote_decode": None}, {"x": 1}, _pull(), _pull(remote_block_ids=[7, 8]),
    _pull(remote_block_ids=(7, 8)), _pull(remote_block_ids=[[1], [2]]), _pull(remote_block_ids=[-1]),
    _pull(remote_block_ids=[2**32]), _pull(remote_block_ids=[1.0]), _pull(remote_block_ids="1,2"), _pull(remote_block_ids=None),
    _pull(remote_port="5600"), _pull(remote_port=70000), _pull(remote_port=0), _pull(remote_port=True),
    _pull(remote_port=2**70), _pull(remote_port=5600.0), _pull(remote_host="bad host!"), _pull(remote_host=42),
    _pull(remote_host=_Str("10.0.0.1")), _pull(remote_engine_id=""), _pull(remote_engine_id=None), _pull(do_remote_decode=True),
    _pull(tp_size=0), _pull(tp_size=None), _pull(tp_size=5000), _pull(remote_epoch=-3), _pull(remote_num_tokens=1.5),
    _pull(remote_blocks_expiry_time=-1), _pull(remote_blocks_expiry_time=float("inf")), _pull(remote_blocks_expiry_time="x"),
    _pull(remote_staged=True), _pull(remote_staged=1), _pull(transfer_mode="pull"), _pull(transfer_mode="sideways"),
    _pull(transfer_mode=3), _pull(do_remote_prefill="yes"), _pull(extra={"nested": [1, {"a": None}]}), _push(),
    _push(transfer_id=None), _push(transfer_id="x" * 300), _push(transfer_id=5), _push(remote_host="-h"),
]  # fmt: skip


def _outcome(params: object) -> tuple[str, str]:
    try:
        return ("ok", _native.validate_kv_transfer_params(params))
    except _native.ParamsError as e:
        return ("ParamsError", str(e))


@pytest.mark.parametrize("i", range(len(CASES)))
def test_dict_and_json_text_validate_alike(i: int) -> None:
    d = CASES[i]
    # json.dumps with allow_nan writes inf as Infinity, which JSON parsers refuse; the
    # native conversion maps it to null, as it always did.
    text = json.dumps(d).replace("Infinity", "null")
    assert _outcome(d) == _outcome(text), d


def _sched(role: str, mode: str = "pull") -> _native.Scheduler:
    cfg = {"kv_role": role, "engine_id": "E", "kv_connector_extra_config": {"transfer_mode": mode, "side_channel_host": "127.0.0.1",
           "side_channel_port": 5700}}  # fmt: skip
    return _native.Scheduler(json.dumps(cfg), "{}")


def _drive(s: _native.Scheduler, rid: str, params: object) -> list[object]:
    """The calls vLLM makes for a request; returns what each answered (minus the epoch)."""
    out: list[object] = []
    s.on_new_request(rid, params)
    n, load = s.get_num_new_matched_tokens(rid, 384, 0, params)
    out.append((n, load))
    s.update_state_after_alloc(rid, [11, 12, 13], n)
    out.append(len(s.build_connector_meta()))
    out.append(s.get_num_new_matched_tokens(rid, 384, 0, params))  # acted on once
    acc = json.loads(s.accounting())
    acc.pop("epoch")
    out.append(acc)
    out.append(s.update_connector_output({rid}, [rid]))
    delay, ret = s.request_finished(rid, [11, 12, 13], "FINISHED_LENGTH_CAPPED", 384, params)
    if ret is not None:
        ret = {k: v for k, v in ret.items() if k not in ("remote_epoch", "remote_blocks_expiry_time")}
    out.append((delay, ret))
    out.append(len(s.build_connector_meta()))
    return out


@pytest.mark.parametrize("role,mode", [("kv_consumer", "pull"), ("kv_producer", "pull"), ("kv_consumer", "push"), ("kv_producer", "push")])
def test_scheduler_decides_alike_for_dict_and_text(role: str, mode: str) -> None:
    by_dict, by_text = _sched(role, mode), _sched(role, mode)
    for i, d in enumerate(CASES):
        text = json.dumps(d).replace("Infinity", "null")
        assert _drive(by_dict, f"r{i}", d) == _drive(by_text, f"r{i}", text), d


def test_update_connector_output_takes_sets_and_lists() -> None:
    s = _sched("kv_consumer")
    assert s.update_connector_output(set(), ()) == []
    assert s.update_connector_output({"a"}, ["b"]) == []
    with pytest.raises(TypeError):
        s.update_connector_output([1], [])

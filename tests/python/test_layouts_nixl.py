"""The layout matrix over real NIXL (UCX over loopback, DRAM), with caches built by vLLM's
own ``create_kv_cache_views`` on CPU tensors, as vLLM 0.32 builds them for GPU backends.

Each case gives P and D a ``KVCacheLayout`` (all six), a TP size, a block size (and a kernel
block size) and a K/V packing; every TP rank gets its own native ``Worker`` (its own NIXL
agent and ZMQ side channel), labelled by ``kvbridge._layout.geometry`` exactly as the vLLM
connector labels it. P's scheduler finishes a prefill, D's scheduler gets P's
``kv_transfer_params``, D's workers READ. Then, for every D rank:

- every token's K and V for every head the rank holds equals the reference (random
  float16 values, so bytes were moved: D's cache held a sentinel before);
- every other byte of D's cache (other blocks, the null block, the other layers' gaps)
  still holds the sentinel;
- D reported the load and P released its blocks.

No vLLM server: vLLM's cache-view code and the native module (about a minute).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import pytest
import torch
from helpers import REPO  # noqa: F401  (puts kvbridge on sys.path)
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from kvbridge import _layout, _native, nixl_lib_dir

LAYERS, HEAD, NUM_BLOCKS, SENTINEL = 2, 16, 24, 0x5A
L = KVCacheLayout


@dataclass
class Side:
    layout: KVCacheLayout
    tp: int = 1
    block: int = 16
    kernel: int | None = None  # kernel block size (None: = block)
    packing: str = "kv_in_c"  # "kv_in_c" | "kv_slots" (FlashInfer NVFP4) | "kv_planes" (B12X, ROCm)


@dataclass
class Case:
    name: str
    p: Side
    d: Side
    heads: int = 4
    mla: bool = False
    tokens: int = 128


@dataclass
class Rank:
    worker: _native.Worker
    raw: torch.Tensor
    views: list[torch.Tensor]
    heads: list[int]
    spec: object
    ports: list[int] = field(default_factory=list)


def _spec(s: Side, heads: int, mla: bool) -> object:
    local = heads // s.tp if s.tp <= heads else 1
    if mla:
        return MLAAttentionSpec(block_size=s.block, num_kv_heads=1, head_size=2 * HEAD, dtype=torch.float16)
    if s.packing == "kv_slots":
        return FullAttentionSpec(block_size=s.block, num_kv_heads=local, head_size=HEAD, dtype=torch.float16,
                                 num_head_slots=2 * local, state_content_bytes=HEAD * 2)  # fmt: skip
    if s.packing == "kv_planes":
        return FullAttentionSpec(block_size=s.block, num_kv_heads=local, head_size=HEAD, dtype=torch.float16,
                                 num_head_slots=2, state_content_bytes=local * HEAD * 2)  # fmt: skip
    return FullAttentionSpec(block_size=s.block, num_kv_heads=local, head_size=HEAD, dtype=torch.float16)


def _heads_of(rank: int, tp: int, heads: int) -> list[int]:
    if tp <= heads:
        n = heads // tp
        return list(range(rank * n, rank * n + n))
    return [rank // (tp // heads)]


def _views(s: Side, spec: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rank's backing buffer and per-layer views, as vLLM's allocate_kv_cache makes them."""
    page = spec.page_size_bytes
    fixed = (None, page * LAYERS if s.layout.is_block_outermost else None, None, None, None)
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, LAYERS, s.layout, fixed_strides=fixed)
    size = page * LAYERS * NUM_BLOCKS
    raw = torch.full((size,), SENTINEL, dtype=torch.uint8).view(torch.int8)
    kvt = KVCacheTensor(size=size, layers=[f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)],
                        layer_stride=layer_stride, block_stride=block_stride)  # fmt: skip
    return raw, create_kv_cache_views(raw, spec, NUM_BLOCKS, s.layout, kvt, kernel_block_size=s.kernel)


def _logical(view: torch.Tensor, s: Side, spec: object, mla: bool) -> torch.Tensor:
    """The view as ``[kernel blocks, heads, tokens, K|V content]`` whatever the packing."""
    if mla or s.packing == "kv_in_c":
        return view
    b, h, n, c = view.shape
    if s.packing == "kv_slots":  # [B, 2 * kvh, N, D] -> [B, kvh, N, 2 * D]
        kvh = h // 2
        return torch.cat([view[:, :kvh], view[:, kvh:]], dim=3)
    kvh = spec.num_kv_heads  # planes: [B, 2, N, kvh * D] -> [B, kvh, N, 2 * D]
    k, v = view[:, 0].unflatten(2, (kvh, c // kvh)), view[:, 1].unflatten(2, (kvh, c // kvh))
    return torch.cat([k, v], dim=3).permute(0, 2, 1, 3)


def _write(view: torch.Tensor, s: Side, spec: object, mla: bool, kb: torch.Tensor, slot: torch.Tensor, val: torch.Tensor) -> None:
    """Write ``val`` ([tokens, heads, 2 * D]) at (kernel block, slot) per token through the view."""
    if mla or s.packing == "kv_in_c":
        view[kb, :, slot, :] = val
        return
    d = val.shape[2] // 2
    if s.packing == "kv_slots":
        kvh = view.shape[1] // 2
        view[kb, :kvh, slot, :] = val[:, :, :d]
        view[kb, kvh:, slot, :] = val[:, :, d:]
        return
    view[kb, 0, slot, :] = val[:, :, :d].flatten(1)
    view[kb, 1, slot, :] = val[:, :, d:].flatten(1)


def _engine(role: str, engine: str, s: Side, heads: int, mla: bool, port: int) -> tuple[_native.Scheduler, list[Rank]]:
    cfg = json.dumps({"kv_role": role, "engine_id": engine, "kv_connector_extra_config": {
        "side_channel_host": "127.0.0.1", "side_channel_port": port, "handshake_timeout": 5}})  # fmt: skip
    compat = {"vllm_version": "0.32.0", "model": "layout-matrix", "dtype": "float16", "cache_dtype": "auto",
              "num_layers": LAYERS, "num_kv_heads": heads, "head_size": HEAD, "block_size": s.block, "attn_backend": ""}  # fmt: skip
    ranks = []
    for r in range(s.tp):
        info = json.dumps({"tp_size": s.tp, "tp_rank": r, "dp_rank": 0, "compat": compat})
        spec = _spec(s, heads, mla)
        raw, views = _views(s, spec)
        w = _native.Worker(cfg, info, nixl_lib_dir())
        tensors = []
        for li, v in enumerate(views):
            name = f"model.layers.{li}.self_attn.attn"
            local = heads // s.tp if s.tp <= heads else 1
            for ptr, shape, stride, geo in _layout.geometry(name, v, "mla" if mla else "attention", 0, 0, heads, local, HEAD, None, spec):
                tensors.append((name, ptr, shape, stride, v.element_size(), "cpu", 0, json.dumps(geo)))
        w.register_kv_caches(tensors, NUM_BLOCKS)
        ranks.append(Rank(w, raw, views, [0] if mla else _heads_of(r, s.tp, heads), spec))
    sched = _native.Scheduler(cfg, json.dumps({"tp_size": s.tp, "tp_rank": 0, "dp_rank": 0, "compat": compat}))
    return sched, ranks


def _slots(s: Side, blocks: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    kbs = s.kernel or s.block
    ratio = s.block // kbs
    t = torch.arange(tokens)
    logical = torch.tensor(blocks)[t // s.block]
    return logical * ratio + (t % s.block) // kbs, t % kbs


def _step(sched: _native.Scheduler, ranks: list[Rank]) -> list[tuple[set[str], set[str], set[str]]]:
    """One engine step: the scheduler's metadata to every rank, then each rank's finished sets."""
    md = sched.build_connector_meta()
    out = []
    for r in ranks:
        r.worker.start_load_kv(md)
        s, v, f = r.worker.get_finished(False)
        out.append((set(s), set(v), set(f)))
    return out


def _run(case: Case, ports: tuple[int, int]) -> dict:
    heads = 1 if case.mla else case.heads
    ref = [torch.randint(-2048, 2048, (heads, case.tokens, 2 * HEAD)).to(torch.float16) / 64 for _ in range(LAYERS)]
    np_, nd = case.tokens // case.p.block, case.tokens // case.d.block
    p_blocks = random.Random(1).sample(range(1, NUM_BLOCKS), np_)
    d_blocks = random.Random(2).sample(range(1, NUM_BLOCKS), nd)
    p_sched, p_ranks = _engine("kv_producer", f"P-{ports[0]}", case.p, case.heads, case.mla, ports[0])
    d_sched, d_ranks = _engine("kv_consumer", f"D-{ports[1]}", case.d, case.heads, case.mla, ports[1])
    # P's forward: every rank writes its heads of every token.
    kb, slot = _slots(case.p, p_blocks, case.tokens)
    for r in p_ranks:
        for li, v in enumerate(r.views):
            _write(v, case.p, r.spec, case.mla, kb, slot, ref[li][r.heads].permute(1, 0, 2))
    dec = {"do_remote_decode": True}
    p_sched.get_num_new_matched_tokens("p-req", case.tokens, 0, dec)
    _step(p_sched, p_ranks)
    delay, params = p_sched.request_finished("p-req", p_blocks, "FINISHED_LENGTH_CAPPED", case.tokens, dec)
    assert delay and params, f"{case.name}: P must hold its blocks for D"
    n, is_async = d_sched.get_num_new_matched_tokens("d-req", case.tokens, 0, params)
    assert n == case.tokens and is_async, f"{case.name}: D matched {n}"
    d_sched.update_state_after_alloc("d-req", d_blocks, n)
    loaded, released, t0 = set(), set(), time.monotonic()
    while time.monotonic() - t0 < 20 and not (len(loaded) == len(d_ranks) and len(released) == len(p_ranks)):
        for i, (_, recving, failed) in enumerate(_step(d_sched, d_ranks)):
            assert not failed, f"{case.name}: D rank {i}: load failed"
            if "d-req" in recving:
                loaded.add(i)
        for i, (sending, _, _) in enumerate(_step(p_sched, p_ranks)):
            if "p-req" in sending:
                released.add(i)
        time.sleep(0.005)
    assert len(loaded) == len(d_ranks) and len(released) == len(p_ranks), f"{case.name}: D loaded {loaded}, P released {released}"
    # Each engine's scheduler learns of it once every rank has reported (vLLM aggregates).
    d_sched.update_connector_output([], ["d-req"])
    p_sched.update_connector_output(["p-req"], [])
    stats = [json.loads(r.worker.take_xfer_stats() or "{}") for r in d_ranks]
    # Every D rank: the tokens of its heads equal the reference, nothing else was written.
    kb, slot = _slots(case.d, d_blocks, case.tokens)
    for ri, r in enumerate(d_ranks):
        for li, v in enumerate(r.views):
            got = _logical(v, case.d, r.spec, case.mla)[kb, :, slot, :]
            want = ref[li][r.heads].permute(1, 0, 2)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{case.name}: D rank {ri} layer {li} differs"
        # Put the sentinel back where the request's tokens went: the whole buffer must then
        # be the sentinel again (nothing else was written).
        blank = r.raw.clone()
        blank16 = blank.view(torch.float16)
        fill = torch.full((case.tokens, len(r.heads), 2 * HEAD), SENTINEL * 0x101, dtype=torch.int16).view(torch.float16)
        for v in r.views:
            _write(torch.as_strided(blank16, v.shape, v.stride(), v.storage_offset()), case.d, r.spec, case.mla, kb, slot, fill)
        assert bool((blank.view(torch.uint8) == SENTINEL).all()), f"{case.name}: D rank {ri} wrote outside the request's tokens"
    return {"descriptors": sum(sum(s.get("num_descriptors", [])) for s in stats),
            "bytes": sum(sum(s.get("bytes_transferred", [])) for s in stats)}  # fmt: skip


SIX = [L.LBHNC, L.LBNHC, L.LHBNC, L.BLHNC, L.BLNHC, L.BHLNC]
#: (P TP, D TP, heads, P block, D block): the TP and block-size axes the issue names.
SHAPES = [(1, 2, 4, 16, 32), (2, 1, 4, 32, 16), (1, 4, 4, 16, 64), (4, 2, 4, 64, 16), (2, 4, 2, 16, 16), (1, 1, 4, 32, 64)]
CASES = [
    Case(f"{lp.name}->{ld.name} tp{tp_p}->{tp_d} h{h} bs{bp}->{bd}", Side(lp, tp_p, bp), Side(ld, tp_d, bd), heads=h)
    for i, lp in enumerate(SIX)
    for j, ld in enumerate(SIX)
    for (tp_p, tp_d, h, bp, bd) in [SHAPES[(i + j) % len(SHAPES)]]
] + [
    Case("LBHNC kernel 16 / logical 32 -> LBNHC 32", Side(L.LBHNC, 2, 32, 16), Side(L.LBNHC, 1, 32)),
    Case("LBNHC 16 -> LBHNC kernel 16 / logical 32 tp1->2", Side(L.LBNHC, 1, 16), Side(L.LBHNC, 2, 32, 16)),
    Case("MLA LBHNC tp2->1 bs16->32", Side(L.LBHNC, 2, 16), Side(L.LBHNC, 1, 32), mla=True),
    Case("MLA BLHNC tp1->2 bs32->16", Side(L.BLHNC, 1, 32), Side(L.LBHNC, 2, 16), mla=True),
    Case("K/V head slots (NVFP4-style) tp1->2 bs16->32", Side(L.LBHNC, 1, 16, packing="kv_slots"),
         Side(L.BLHNC, 2, 32, packing="kv_slots")),  # fmt: skip
    Case("K/V planes (B12X/ROCm-style) tp2->1 bs32->16", Side(L.LBHNC, 2, 32, packing="kv_planes"),
         Side(L.LBHNC, 1, 16, packing="kv_planes")),  # fmt: skip
]

_PORT = [random.Random().randrange(21000, 29000, 16)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layout_matrix_is_byte_exact(case: Case) -> None:
    _PORT[0] += 16
    got = _run(case, (_PORT[0], _PORT[0] + 8))
    assert got["bytes"] > 0 and got["descriptors"] > 0, f"{case.name}: no transfer recorded: {got}"


def test_cross_layer_blocks_need_fewer_descriptors() -> None:
    """Block-outermost (cross-layer) caches read a block's every layer with one descriptor:
    equal geometry, 8 scattered blocks, 2 layers. Counted, not timed."""
    counts = {}
    for lay in (L.LBHNC, L.BLHNC):
        _PORT[0] += 16
        c = Case(f"{lay.name} 1->1", Side(lay, 1, 16), Side(lay, 1, 16))
        counts[lay.name] = _run(c, (_PORT[0], _PORT[0] + 8))["descriptors"]
    print(f"FIGURE descriptors per request (8 blocks, 2 layers): LBHNC {counts['LBHNC']}, BLHNC {counts['BLHNC']}")
    assert counts["BLHNC"] * 2 <= counts["LBHNC"], counts

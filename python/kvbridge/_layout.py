"""How kvbridge labels a vLLM KV cache for the transfer plan: which axis of each layer's
cache tensor is the block, the K/V split, the head, the token slot and the content.

vLLM 0.32 describes every cache group with a ``KVCacheLayout`` (``vllm/v1/kv_cache_layout.py``):
a stride permutation of the logical ``[L, B, H, N, C]``. ``create_kv_cache_views`` hands each
layer a 4-D view in *logical* order ``[B, H, N, C]`` whose strides carry the permutation, so
the labels come from the view's own strides and the layer's ``AttentionSpec``:

- ``LBHNC``/``LBNHC``: one region per layer; ``LHBNC`` (heads outside the block axis): one
  region per head; ``BLHNC``/``BLNHC``/``BHLNC`` (block outermost, cross-layer): each
  layer's view spans its block with gaps, and the plan fuses the layers of a block into
  one range, so one descriptor carries a block's every layer.
- Kernel blocks smaller than the logical block: the view's block axis counts kernel blocks
  (``N`` is the kernel block size); the Rust layout derives the ratio.
- Where K and V sit (per backend family, from the spec): packed in ``C`` (FlashAttention,
  FlashInfer, FlexAttention, Triton: ``C = head_size + head_size_v``); as head slots
  ``[K heads | V heads]`` (FlashInfer NVFP4: ``num_head_slots = 2 * num_kv_heads``); or as two
  planes with every head inside ``C`` (B12X, ROCm: ``num_head_slots = 2``,
  ``C = num_kv_heads * head_size`` bytes).
- vLLM-CPU's kernel stores K dim-major inside the block; ``cpu_cache_layout`` probes it.

A cache none of this describes is registered opaque (equal TP, block size and layout on
both sides only), and the reason is logged.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

if TYPE_CHECKING:
    import torch

logger = init_logger("vllm.kvbridge")

#: One registration: ``(data_ptr, shape, strides, geometry)`` (strides in elements).
View = tuple[int, list[int], list[int], dict[str, Any]]

_CPU_LAYOUTS: dict[tuple[str, str, int, int, str], str | None] = {}  # probe results, per kernel and shape


def cpu_cache_layout(isa: str, dtype: "torch.dtype", cache_tensor_dtype: "torch.dtype", block_tokens: int, head_size: int,
                      cache_dtype: str) -> str | None:  # fmt: skip
    """How vLLM's CPU kernel (``isa``) stores K and V in a ``[blocks, heads, tokens,
    2 * head_size]`` block, found by writing one-hot K and V rows through the kernel's own
    ``cpu_attn_reshape_and_cache`` into a scratch block and seeing where they land:

    - ``"k_dim_major"``: K as ``[head_size, tokens]``, then V as ``[tokens, head_size]``
      (the ``vec``/``vec16`` kernels in vLLM 0.32);
    - ``"token_major"``: K as ``[tokens, head_size]``, then V likewise;
    - ``None``: anything else (e.g. AMX tiles): the cache is then registered opaque.
    """
    key = (isa, f"{dtype}/{cache_tensor_dtype}", block_tokens, head_size, cache_dtype)
    if key in _CPU_LAYOUTS:
        return _CPU_LAYOUTS[key]
    import torch
    from vllm import _custom_ops as ops

    t, d = block_tokens, head_size
    samples = sorted({(0, 0), (1, 0), (0, 1), (t - 1, d - 1), (t // 2 + 1, d // 3), (min(33, t - 1), 5 % d)})
    found: dict[str, bool] = {"k_dim_major": True, "token_major": True}
    try:
        cache = torch.zeros(1, 1, t, 2 * d, dtype=cache_tensor_dtype)
        kc, vc = cache.view(1, 1, 2 * t, d).chunk(2, dim=2)
        for tok, dim in samples:
            cache.zero_()
            k = torch.zeros(1, 1, d, dtype=dtype)
            v = torch.zeros(1, 1, d, dtype=dtype)
            k[0, 0, dim], v[0, 0, dim] = 1.0, 2.0
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.tensor([tok], dtype=torch.int64), isa,
                                           k_scale=1.0, v_scale=1.0, kv_cache_dtype=cache_dtype)  # fmt: skip
            flat = cache.reshape(-1).float()
            nz = torch.nonzero(flat).flatten().tolist()
            got = sorted((int(i), float(flat[i])) for i in nz)
            v_at = t * d + tok * d + dim
            for name, k_at in (("k_dim_major", dim * t + tok), ("token_major", tok * d + dim)):
                want = sorted([(k_at, 1.0), (v_at, 2.0)])
                found[name] = found[name] and [i for i, _ in got] == [i for i, _ in want] and all(
                    (x > 0) == (y > 0) for (_, x), (_, y) in zip(got, want)
                )
    except Exception as e:  # noqa: BLE001 — an unknown kernel: fall back to opaque
        logger.warning("kvbridge: could not probe the CPU KV layout of isa %s: %s", isa, e)
        found = {}
    layout = next((n for n, ok in found.items() if ok), None)
    _CPU_LAYOUTS[key] = layout
    logger.info("kvbridge: CPU attention kernel %s stores K/V %s", isa, layout or "in an unknown order (registered opaque)")
    return layout


def _attention_4d(t: "torch.Tensor", spec: Any, local_heads: int, head_size: int) -> tuple[list[int], list[int], list[str]] | str:
    """Shape, strides and axes of a 4-D ``[B, H, N, C]`` attention view, or why not."""
    b, h, n, c = t.shape
    sb, sh, sn, sc = t.stride()
    slots = getattr(spec, "num_head_slots", None)
    kvh = int(getattr(spec, "num_kv_heads", local_heads) or local_heads)
    content_bytes = getattr(spec, "state_content_bytes", None)
    item = t.element_size()
    if sc != 1 and c != 1:
        return f"content axis has stride {sc}"
    if slots is None and content_bytes is None:
        if h != local_heads:
            return f"{h} heads in the view, {local_heads} KV heads on this rank"
        return [b, h, n, c], [sb, sh, sn, sc], ["block", "head", "token", "dim"]
    if slots == 2 * kvh and h == slots and content_bytes == c * item:
        # [K heads | V heads] as head slots: [B, 2, kvh, N, C].
        return [b, 2, kvh, n, c], [sb, kvh * sh, sh, sn, sc], ["block", "kv", "head", "token", "dim"]
    if slots == 2 and h == 2 and kvh > 0 and c % kvh == 0 and content_bytes == c * item:
        # Two planes, every head inside C: [B, 2, N, kvh, C / kvh].
        d = c // kvh
        return [b, 2, n, kvh, d], [sb, sh, sn, d, 1], ["block", "kv", "token", "head", "dim"]
    return f"head slots {slots} / content bytes {content_bytes} with {kvh} KV heads is not a known K/V packing"


def geometry(name: str, t: "torch.Tensor", kind: str, window: int, group: int, total_heads: int, local_heads: int,
             head_size: int, cpu_layout: str | None, spec: Any = None) -> list[View]:  # fmt: skip
    """The views of one layer's cache tensor to register, each with its axes labelled.

    ``spec`` is the layer's ``KVCacheSpec`` (``None``: plain K|V packing is assumed).
    vLLM-CPU's cache is ``[blocks, heads, tokens, 2 * head_size]`` with the kernel's own
    interior (``cpu_layout``, see ``cpu_cache_layout``; ``"unknown"`` when the probe failed,
    ``None`` for any other backend): with K dim-major, K and V are registered as two views
    of the buffer (``kv_part``).
    """
    shape, stride = list(t.shape), list(t.stride())
    geo: dict[str, Any] = {"group": group, "window": window}
    ptr = t.data_ptr()
    packed_cpu = (
        t.device.type == "cpu" and len(shape) == 4 and shape[1] == local_heads and shape[3] == 2 * head_size and stride[3] == 1
        and stride[2] == 2 * head_size
    )  # fmt: skip
    if kind == "attention" and packed_cpu and cpu_layout is not None:
        b, h, n, _ = shape
        geo.update(kind="attention", total_heads=total_heads)
        if cpu_layout == "token_major":
            return [(ptr, [b, h, 2, n, head_size], [stride[0], stride[1], n * head_size, head_size, 1],
                     {**geo, "axes": ["block", "head", "kv", "token", "dim"]})]  # fmt: skip
        k_view = ([b, h, head_size, n], [stride[0], stride[1], n, 1], {**geo, "axes": ["block", "head", "dim", "token"], "kv_part": "k"})
        v_view = ([b, h, n, head_size], [stride[0], stride[1], head_size, 1], {**geo, "axes": ["block", "head", "token", "dim"], "kv_part": "v"})
        return [(ptr, *k_view), (ptr + n * head_size * t.element_size(), *v_view)]
    if kind == "state" and len(shape) >= 2:
        # A Mamba/GDN layer's page ([blocks, ...] bytes: conv state, then SSM state, then
        # padding): one opaque block per request, moved whole between equal TP sizes.
        return [(ptr, shape, stride, {**geo, "kind": "state"})]
    if kind == "mla" and len(shape) == 3:
        return [(ptr, shape, stride, {**geo, "axes": ["block", "token", "dim"], "kind": "mla"})]
    if kind == "mla" and len(shape) == 4 and shape[1] == 1:
        return [(ptr, shape, stride, {**geo, "axes": ["block", "head", "token", "dim"], "kind": "mla"})]
    why = "not a 4-D [B, H, N, C] view"
    if kind == "attention" and len(shape) == 4:
        if cpu_layout == "unknown":
            why = "vLLM-CPU cache whose kernel interior is unknown"
        else:
            got = _attention_4d(t, spec, local_heads, head_size)
            if not isinstance(got, str):
                s, st, axes = got
                return [(ptr, s, st, {**geo, "kind": "attention", "total_heads": total_heads, "axes": axes})]
            why = got
    logger.warning("kvbridge: layer %s cache (shape %s, stride %s) registered opaque: %s; P and D then need equal TP, "
                   "block size and layout", name, shape, stride, why)  # fmt: skip
    return [(ptr, shape, stride, geo)]

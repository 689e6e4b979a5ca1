"""What the vLLM connector tells the native layer about its engine: the connector config
as JSON, the engine facts (TP/DP/PP ranks, model and cache facts P and D must share), and
the KV-cache groups and per-layer specs of vLLM's ``KVCacheConfig``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import vllm

from kvbridge import _native

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def _config_json(vllm_config: "VllmConfig", mode: str | None = None) -> str:
    ktc = vllm_config.kv_transfer_config
    extra = dict(ktc.kv_connector_extra_config or {})
    if mode is not None:
        given = extra.get("transfer_mode", mode)
        if given != mode:
            raise _native.ConfigError(f"transfer_mode {given!r} contradicts the connector class, which is {mode!r} mode")
        extra["transfer_mode"] = mode
    return json.dumps({
        "kv_role": ktc.kv_role,
        "engine_id": ktc.engine_id,
        "kv_connector_extra_config": extra,
        "kv_load_failure_policy": getattr(ktc, "kv_load_failure_policy", "fail"),
        "kv_buffer_device": getattr(ktc, "kv_buffer_device", None) or "cuda",
    })


def _cuda_device(vllm_config: "VllmConfig") -> int | None:
    """The CUDA device this worker runs on (None on CPU engines). kvbridge makes its context
    current before the NIXL agent starts, so UCX initialises with CUDA support."""
    if str(getattr(vllm_config.device_config, "device_type", "cpu")) != "cuda":
        return None
    import torch

    return int(torch.cuda.current_device()) if torch.cuda.is_available() else None


def _kv_groups(kv_cache_config: "KVCacheConfig | None") -> list[dict[str, Any]]:
    """vLLM's KV-cache groups as both sides must agree on them (kind, sliding window,
    layers). One full-attention group is reported as none (older peers send none)."""
    if kv_cache_config is None:
        return []
    out = []
    for g in kv_cache_config.kv_cache_groups:
        kind, window = _classify(g.kv_cache_spec)
        group = {"kind": kind, "sliding_window": window, "num_layers": len(g.layer_names)}
        if kind == "state":
            # vLLM appends speculative scratch blocks to a request's running-state block.
            group["spec_blocks"] = int(getattr(g.kv_cache_spec, "num_speculative_blocks", 0) or 0)
            # vLLM-CPU picks the conv state's layout per CPU (SD or DS): both sides must agree.
            group["layout"] = str(getattr(g.kv_cache_spec, "mamba_type", "")).rsplit(".", 1)[-1] + "/" + _conv_layout()
        out.append(group)
    if len(out) == 1 and out[0]["kind"] == "attention" and out[0]["sliding_window"] == 0:
        return []
    return out


def _conv_layout() -> str:
    """vLLM's Mamba conv-state layout (``VLLM_SSM_CONV_STATE_LAYOUT``: "SD" or "DS")."""
    import os

    return os.environ.get("VLLM_SSM_CONV_STATE_LAYOUT", "") or "default"


#: Speculators that keep no KV of their own: D may run them while P runs none.
_NO_DRAFT_KV = ("ngram", "ngram_gpu", "suffix")


def _spec_decode(vllm_config: "VllmConfig") -> str:
    """The speculative-decoding setup whose KV a transfer must carry, for the compatibility
    check (vLLM #49230): empty without a speculator, or with one that keeps no KV (n-gram,
    suffix: only D needs it, P runs none); else the method and the draft model, which P and
    D must share so that the draft layers' KV is transferred with the rest, never dropped."""
    sc = getattr(vllm_config, "speculative_config", None)
    method = str(getattr(sc, "method", "") or "") if sc is not None else ""
    if not method or method in _NO_DRAFT_KV:
        return ""
    model = str(getattr(sc, "model", "") or "").rstrip("/").rsplit("/", 1)[-1]
    return f"{method}:{model}"


def _engine_info(vllm_config: "VllmConfig", tp_rank: int, cuda_device: int | None = None,
                 kv_cache_config: "KVCacheConfig | None" = None, pp_rank: int = 0) -> str:  # fmt: skip
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    return json.dumps({
        "cuda_device": cuda_device,
        "tp_size": pc.tensor_parallel_size,
        "tp_rank": tp_rank,
        "dp_rank": getattr(pc, "data_parallel_index", None) or getattr(pc, "data_parallel_rank", 0) or 0,
        "pp_size": pc.pipeline_parallel_size,
        "pp_rank": pp_rank,
        "compat": {
            "vllm_version": vllm.__version__,
            "model": str(mc.model),
            "dtype": str(mc.dtype),
            "cache_dtype": str(cc.cache_dtype),
            # The model's, not this pipeline stage's: P and D may cut stages differently.
            "num_layers": mc.get_total_num_hidden_layers(),
            "num_kv_heads": mc.get_total_num_kv_heads(),
            "head_size": mc.get_head_size(),
            "block_size": cc.block_size,
            "attn_backend": "",
            "kv_groups": _kv_groups(kv_cache_config),
            "spec_decode": _spec_decode(vllm_config),
        },
    })


def _classify(spec: Any) -> tuple[str, int]:
    """(kind, sliding window) of a KV-cache spec: "attention", "mla" or "state".

    ``UniformTypeKVCacheSpecs`` wraps per-layer specs of one type: it is classified by them
    (vLLM's NixlConnector failed DeepSeek-V4 at handshake by classifying the wrapper).
    """
    from vllm.v1 import kv_cache_interface as kci

    if isinstance(spec, kci.UniformTypeKVCacheSpecs):
        kinds = {_classify(s) for s in spec.kv_cache_specs.values()}
        if len(kinds) != 1:
            raise _native.ConfigError(f"a UniformTypeKVCacheSpecs group mixes cache kinds {sorted(kinds)}")
        return kinds.pop()
    if isinstance(spec, kci.MambaSpec):
        return ("state", 0)
    if isinstance(spec, getattr(kci, "SlidingWindowMLASpec", ())):
        return ("mla", int(spec.sliding_window))
    if isinstance(spec, kci.MLAAttentionSpec):
        return ("mla", 0)
    if isinstance(spec, kci.SlidingWindowSpec):
        return ("attention", int(spec.sliding_window))
    if isinstance(spec, kci.FullAttentionSpec):
        return ("attention", 0)
    raise _native.ConfigError(
        f"kvbridge cannot transfer KV-cache spec {type(spec).__name__} (supported: full attention, sliding window, MLA, "
        "and their UniformTypeKVCacheSpecs)"
    )


def _layer_specs(kv_cache_config: "KVCacheConfig | None") -> dict[str, tuple[int, str, int, Any]]:
    """layer name -> (KV-cache group, kind, window, spec), from vLLM's KV-cache config."""
    out: dict[str, tuple[int, str, int, Any]] = {}
    if kv_cache_config is None:
        return out
    groups = kv_cache_config.kv_cache_groups
    for gi, g in enumerate(groups):
        if not getattr(g, "enable_kv_transfer", True):
            raise _native.ConfigError(
                f"KV-cache group {gi} ({type(g.kv_cache_spec).__name__}) is marked not transferable (vLLM's HiSparse "
                "host-resident groups): kvbridge does not transfer such models yet"
            )
        spec = g.kv_cache_spec
        for layer in g.layer_names:
            inner = spec.kv_cache_specs.get(layer, spec) if hasattr(spec, "kv_cache_specs") else spec
            kind, window = _classify(inner)
            out[layer] = (gi, kind, window, inner)
    return out

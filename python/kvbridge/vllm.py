"""vLLM connectors: ``KVBridgeConnector``, thin ``KVConnectorBase_V1`` classes over Rust.

Use it with::

    --kv-transfer-config '{"kv_connector":"KVBridgeConnector",
                           "kv_connector_module_path":"kvbridge.vllm",
                           "kv_role":"kv_producer"}'      # or "kv_consumer" on decode

``KVBridgeConnector`` is pull mode (D reads P's blocks) unless
``kv_connector_extra_config.transfer_mode`` says ``"push"``; ``KVBridgePullConnector``
and ``KVBridgePushConnector`` fix the mode (push: P writes into blocks D registered,
layer by layer while it computes; see docs/push-mode.md).

Every method turns vLLM objects into plain data and forwards to ``kvbridge._native``;
the scheduler-to-worker metadata is opaque bytes that Rust writes and Rust reads.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.logger import init_logger

from kvbridge import _layout, _native, nixl_lib_dir
from kvbridge._engine import _config_json, _cuda_device, _engine_info, _kv_groups, _layer_specs
from kvbridge._events import LeaseEvents
from kvbridge._logging import setup_vllm_logging
from kvbridge._ranks import share_rank_table
from kvbridge.metrics import KVBridgeKVConnectorStats, KVBridgePromMetrics

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger("vllm.kvbridge")
setup_vllm_logging()


class KVBridgeMetadata(KVConnectorMetadata):
    """One step's scheduler→worker metadata: msgpack bytes built and read by Rust."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def _block_hash_is_slot() -> bool:
    """True if vLLM's ``KVCacheBlock.block_hash`` is its ``_block_hash`` slot (vLLM 0.32's
    plain property), so ``_unhashed_block_ids`` may read the slot directly."""
    try:
        from vllm.v1.core.kv_cache_utils import KVCacheBlock

        b, mark = KVCacheBlock(block_id=0), object()
        b._block_hash = mark
        return b.block_hash is mark and (b.reset_hash() or b.block_hash is None)
    except Exception:  # noqa: BLE001 — another vLLM: use its method
        return False


def _get_unhashed_method() -> Any:
    try:
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks

        return KVCacheBlocks.get_unhashed_block_ids
    except Exception:  # noqa: BLE001
        return None


_BLOCK_HASH_SLOT = _block_hash_is_slot()
_GET_UNHASHED = _get_unhashed_method()


def _unhashed_block_ids(blocks: "KVCacheBlocks") -> list[int]:
    """``blocks.get_unhashed_block_ids()``, faster (0.35 vs 1.0 µs for 16 blocks): vLLM's method reads each block's
    ``block_hash`` property; this reads the slot behind it (when vLLM's classes are as
    checked at import, and the method is vLLM's own), else calls the method."""
    groups = blocks.blocks
    if _BLOCK_HASH_SLOT and len(groups) == 1 and type(blocks).get_unhashed_block_ids is _GET_UNHASHED:
        return [b.block_id for b in groups[0] if b._block_hash is None]
    return blocks.get_unhashed_block_ids()


def _status_names() -> dict[Any, str]:
    try:
        from vllm.v1.request import RequestStatus

        return {s: s.name for s in RequestStatus}
    except Exception:  # noqa: BLE001
        return {}


#: ``status.name`` by status (an IntEnum: a dict lookup is cheaper than ``.name``).
_STATUS_NAMES = _status_names()


class KVBridgeConnector(KVConnectorBase_V1, SupportsHMA):
    """P/D connector over NIXL: pull mode (D reads P's blocks) by default, push mode (P
    writes into D's registered blocks) with ``transfer_mode="push"`` (see
    docs/architecture.md and docs/push-mode.md).

    ``SupportsHMA``: vLLM's hybrid KV-cache manager stays on. Each KV-cache group's block
    ids travel as their own list, and a sliding-window group's are cut to its window."""

    #: Forced transfer mode (None: from kv_connector_extra_config, default "pull").
    _MODE: str | None = None

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = _config_json(vllm_config, self._MODE)
        self._sched: _native.Scheduler | None = None
        self._worker: _native.Worker | None = None
        self._idle_step = False
        self._push = False
        self._staging = False
        self._host_buffer = False
        #: P with kv_integrity on: its prefills are digested after the step completing them.
        self._integrity = False
        #: Worker: the caches are on a GPU (push WRITEs are then fenced with CUDA events).
        self._cuda_caches = False
        #: Push, staging, host buffer or integrity: build_connector_meta reports completing prefills.
        self._completing = False
        #: Trailing prompt tokens P leaves to D (1 with state layers), and P's requests cut so.
        self._backoff = 0
        self._truncated: set[str] = set()
        #: Host buffer or integrity, P: prefills scheduled in chunks so far, as (prompt length, block ids).
        self._chunked: dict[str, tuple[int, list[list[int]]]] = {}
        #: P with --kv-events-config: events for the blocks it offers to remote readers.
        self._events: LeaseEvents | None = None
        if role == KVConnectorRole.SCHEDULER:
            # The scheduler process may have no CUDA context: the device type decides
            # whether kv_buffer_device="cpu" means a host buffer (the workers' too).
            gpu = 0 if str(getattr(vllm_config.device_config, "device_type", "cpu")) == "cuda" else None
            self._sched = _native.Scheduler(cfg, _engine_info(vllm_config, 0, gpu, kv_cache_config))
            self._push = self._sched.transfer_mode == "push"
            self._staging = self._sched.staging_slots > 0
            self._host_buffer = self._sched.host_buffer
            # kv_integrity: P digests each prefill after the step that completes it.
            self._integrity = self._sched.kv_integrity != "off" and vllm_config.kv_transfer_config.is_kv_producer
            self._completing = self._push or self._staging or self._host_buffer or self._integrity
            if vllm_config.kv_transfer_config.is_kv_producer:
                self._backoff = int(any(g["kind"] == "state" for g in _kv_groups(kv_cache_config)))
                if getattr(getattr(vllm_config, "kv_events_config", None), "enable_kv_cache_events", False):
                    self._events = LeaseEvents(vllm_config.cache_config.block_size, "GPU" if gpu is not None else "CPU")
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

            info = _engine_info(vllm_config, get_tensor_model_parallel_rank(), _cuda_device(vllm_config), kv_cache_config,
                                get_pp_group().rank_in_group)  # fmt: skip
            self._worker = _native.Worker(cfg, info, nixl_lib_dir())
            self._push = self._worker.layerwise_push

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._sched is not None
        # kv_transfer_params go to Rust as the dict itself: its few known keys are read
        # there natively (no json.dumps), once per request.
        params = request.kv_transfer_params
        if params is None:
            return 0, False
        return self._sched.get_num_new_matched_tokens(request.request_id, request.num_prompt_tokens, num_computed_tokens, params)

    def _truncate_for_remote_decode(self, request: "Request") -> None:
        """P, a model with state (Mamba/GDN) layers: drop the prompt's last token, so P's
        state is h(N-1) and D applies token N once (vLLM #37310: applied twice when P had
        computed it). Once per request, even if it is preempted and scheduled again."""
        n = self._backoff
        if request.num_prompt_tokens <= n or request.prompt_token_ids is None:
            return
        self._truncated.add(request.request_id)
        del request.prompt_token_ids[-n:]
        del request._all_token_ids[-n:]
        request.num_prompt_tokens -= n
        request.max_tokens = 1

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self._sched is not None
        if request.kv_transfer_params is None:
            return
        if len(blocks.blocks) > 1:
            # Hybrid allocator: each KV-cache group's unhashed blocks (Rust clips windows).
            groups = blocks.get_unhashed_block_ids_all_groups() if num_external_tokens > 0 else ([],)
            self._sched.update_state_after_alloc_groups(request.request_id, groups, num_external_tokens)
            return
        unhashed = _unhashed_block_ids(blocks) if num_external_tokens > 0 else []
        self._sched.update_state_after_alloc(request.request_id, unhashed, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._sched is not None
        if self._completing:
            # Requests whose prefill completes in this step: layer-wise push writes them as
            # they compute; staging and the host buffer copy them out after the forward.
            completing = []
            for r in scheduler_output.scheduled_new_reqs:
                n = scheduler_output.num_scheduled_tokens.get(r.req_id, 0)
                prompt = len(r.prompt_token_ids or ())
                blocks = [list(g) for g in r.block_ids] if r.block_ids else []
                if prompt and r.num_computed_tokens + n >= prompt and any(blocks):
                    completing.append((r.req_id, blocks, prompt))
                elif prompt and (self._host_buffer or self._integrity):
                    self._chunked[r.req_id] = (prompt, blocks)
            if self._chunked:
                # Host buffer, integrity: a chunked prefill completes in a later step, as a cached request.
                cached = scheduler_output.scheduled_cached_reqs
                for i, rid in enumerate(cached.req_ids):
                    if rid not in self._chunked:
                        continue
                    prompt, blocks = self._chunked[rid]
                    new = cached.new_block_ids[i]
                    if new:
                        if rid in cached.resumed_req_ids:
                            blocks = [list(g) for g in new]
                        else:
                            blocks = [old + list(g) for old, g in zip(blocks, new)]
                        self._chunked[rid] = (prompt, blocks)
                    if cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(rid, 0) >= prompt:
                        completing.append((rid, blocks, prompt))
                        del self._chunked[rid]
            if completing:
                self._sched.prefill_completing(completing)
        return KVBridgeMetadata(self._sched.build_connector_meta())

    def on_new_request(self, request: "Request") -> None:
        # D: renew P's lease on this request's blocks from now on, even while it waits.
        params = request.kv_transfer_params
        if params is not None and self._sched is not None:
            if self._backoff and params.get("do_remote_decode") and request.request_id not in self._truncated:
                self._truncate_for_remote_decode(request)
            self._sched.on_new_request(request.request_id, params)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._finished(request, block_ids if type(block_ids) is list else list(block_ids))

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """``SupportsHMA``: vLLM calls this (not ``request_finished``) with each KV-cache
        group's blocks; a sliding-window group's out-of-window blocks are already its null
        block, and P offers only the window's."""
        if len(block_ids) == 1:
            return self.request_finished(request, block_ids[0])
        return self._finished(request, [g if type(g) is list else list(g) for g in block_ids])

    def _finished(self, request: "Request", ids: list[int] | list[list[int]]) -> tuple[bool, dict[str, Any] | None]:
        """``request_finished``: one group's block ids, or a list per group."""
        assert self._sched is not None
        self._chunked.pop(request.request_id, None)
        if self._truncated:
            self._truncated.discard(request.request_id)
        params = request.kv_transfer_params
        if params is None:
            return False, None
        status = request.status
        name = _STATUS_NAMES.get(status) or status.name
        out = self._sched.request_finished(request.request_id, ids, name, request.num_computed_tokens, params)
        if self._events is not None and out[1] and "remote_block_ids" in out[1]:
            self._events.stored(request)
        return out

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self._sched is None:
            return
        sending = connector_output.finished_sending or ()
        recving = connector_output.finished_recving or ()
        if self._events is not None and sending:
            self._events.removed(sending)
        if sending or recving:
            hidden = self._sched.update_connector_output(sending, recving)
            if hidden:
                # Staged requests: their slots are free now, and vLLM freed their blocks
                # when they finished; it must not see them (it would look them up).
                connector_output.finished_sending = set(sending).difference(hidden) or None

    def has_pending_block_frees(self) -> bool:
        return self._sched is not None and self._sched.has_pending_block_frees()

    def take_events(self) -> list[Any]:
        """KV events (``--kv-events-config``): P's blocks offered to and released by remote
        readers (``kvbridge._events``)."""
        return self._events.take() if self._events is not None else []

    def has_pending_push_work(self) -> bool:
        """Push: blocks are held for writes in flight or registrations to come; keep the
        engine stepping so their completion is reported."""
        return self._push and self.has_pending_block_frees()

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        assert self._worker is not None
        layers = _layer_specs(self._kv_cache_config)
        mc, pc = self._vllm_config.model_config, self._vllm_config.parallel_config
        total_heads, head_size, tp = mc.get_total_num_kv_heads(), mc.get_head_size(), pc.tensor_parallel_size
        local_heads = total_heads // tp if tp <= total_heads else 1
        seen: set[tuple[int, int]] = set()
        tensors = []
        for name, t in kv_caches.items():
            group, kind, window, spec = layers.get(name, (0, "attention", 0, None))
            # Layers sharing one cache tensor: registered once per KV-cache group. Under the
            # hybrid allocator a layer of each group shares a tensor, and a block id belongs
            # to one group at a time: the tensor is read at the blocks of either.
            if (t.data_ptr(), group) in seen:
                continue
            seen.add((t.data_ptr(), group))
            # Probe the CPU kernel's K/V order for attention caches of its shape only (the
            # probe writes a block through the kernel: never a Mamba page).
            cpu_attn = kind == "attention" and t.device.type == "cpu" and t.dim() == 4 and t.shape[3] == 2 * head_size
            cpu_layout = (self._cpu_layout(t, head_size) or "unknown") if cpu_attn else None
            views = _layout.geometry(name, t, kind, window, group, total_heads, local_heads, head_size, cpu_layout, spec)
            for ptr, shape, stride, geometry in views:
                tensors.append((name, ptr, shape, stride, t.element_size(), t.device.type, t.device.index or 0,
                                json.dumps(geometry)))  # fmt: skip
        groups = _kv_groups(self._kv_cache_config)
        if groups:
            logger.info("kvbridge: %d KV-cache groups under vLLM's hybrid allocator: %s", len(groups),
                        ", ".join(f"{g['kind']}{'/window ' + str(g['sliding_window']) if g['sliding_window'] else ''} "
                                  f"x{g['num_layers']}" for g in groups))  # fmt: skip
        self._cuda_caches = any(t.device.type == "cuda" for t in kv_caches.values())
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config is not None else next(iter(kv_caches.values())).shape[0]
        self._worker.register_kv_caches(tensors, num_blocks)
        share_rank_table(self._worker, list(kv_caches))

    def _cpu_layout(self, t: "torch.Tensor", head_size: int) -> str | None:
        """The CPU attention kernel's K/V order for this cache (None: unknown, register opaque)."""
        try:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        except ImportError:
            return None
        mc, cc = self._vllm_config.model_config, self._vllm_config.cache_config
        block_tokens, cache_dtype = int(t.shape[2]), str(cc.cache_dtype)
        try:
            isa = _get_attn_isa(mc.dtype, block_tokens, head_size, cache_dtype)
        except Exception as e:  # noqa: BLE001
            logger.warning("kvbridge: unknown CPU attention kernel (%s); registering the cache opaque", e)
            return None
        return _layout.cpu_cache_layout(isa, mc.dtype, t.dtype, block_tokens, head_size, cache_dtype)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self._worker is not None
        md = self._get_connector_metadata()
        assert isinstance(md, KVBridgeMetadata)
        # vLLM runs steps with nothing scheduled with attn_metadata=None; on those the
        # worker may wait briefly for completions instead of spinning the engine loop.
        self._idle_step = getattr(forward_context, "attn_metadata", None) is None
        # GPU caches: this step's staging and host-buffer copies go on the forward's
        # stream and wait for it alone (not the whole device).
        self._worker.start_load_kv(md.data, self._stream())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete before the request is scheduled (async pull)

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        # Push, layer-wise: queue this layer's WRITEs (the Rust writer thread posts them).
        # On a GPU they wait for a CUDA event recorded now on the forward's stream, after
        # this layer's KV write. Pull: P's blocks are read in place; a no-op in Rust.
        if self._worker is not None:
            self._worker.save_kv_layer(layer_name, self._stream() if self._push else None)

    def wait_for_save(self) -> None:
        # Never blocks: the writes finish on the writer thread (on a GPU, after an event
        # recorded now on the forward's stream), and P's blocks stay held (delay_free)
        # until they have.
        if self._worker is not None:
            self._worker.wait_for_save(self._stream() if self._push else None)

    def _stream(self) -> int | None:
        """The current CUDA stream's handle when the caches are on a GPU, else None."""
        if not self._cuda_caches:
            return None
        import torch

        return int(torch.cuda.current_stream().cuda_stream)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sending, recving, failed = self._worker.get_finished(self._idle_step)
        self._idle_step = False
        return KVConnectorTransferResults(finished_sending=set(sending), finished_recving=set(recving), failed_recving=set(failed))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return (r.finished_sending or None), (r.finished_recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set(self._worker.get_block_ids_with_load_errors()) if self._worker is not None else set()

    def get_kv_connector_stats(self) -> KVBridgeKVConnectorStats | None:
        # Called by vLLM after every step; the Rust side answers None without allocating
        # when nothing happened.
        raw = self._worker.take_xfer_stats() if self._worker is not None else None
        return KVBridgeKVConnectorStats(data=json.loads(raw)) if raw else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVBridgeKVConnectorStats:
        return KVBridgeKVConnectorStats(data=data) if data is not None else KVBridgeKVConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVBridgePromMetrics:  # fmt: skip
        return KVBridgePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        # D: tell P which leases this engine will never read, so P frees them now (with
        # --shutdown-timeout, vLLM runs this once in-flight requests are done). Then
        # dropping the native objects releases NIXL handles, registrations and the
        # side-channel listener (RAII).
        if self._worker is not None:
            self._worker.shutdown(2.0)
        self._worker = None
        self._sched = None

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> str | None:
        """The layout asked of vLLM: ``kv_connector_extra_config.kv_cache_layout`` if set
        (e.g. ``"BLHNC"``: block-outermost, so one descriptor carries a block's every
        layer), else ``"LBHNC"`` as NixlConnector asks (heads contiguous per block: a TP
        split reads one range per head), except for MLA and vLLM-CPU (one layout, no
        preference). kvbridge labels whatever vLLM picks (``kvbridge._layout``): vLLM
        drops a preference the backend cannot honour, with a warning."""
        ktc = getattr(vllm_config, "kv_transfer_config", None)
        extra = (getattr(ktc, "kv_connector_extra_config", None) or {}) if ktc is not None else {}
        if extra.get("kv_cache_layout"):
            return str(extra["kv_cache_layout"])
        mc = getattr(vllm_config, "model_config", None)
        device = str(getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu"))
        if mc is None or getattr(mc, "use_mla", False) or device != "cuda":
            return None
        return "LBHNC"

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise push posts each layer's WRITEs from ``save_kv_layer``, which a full
        CUDA-graph replay never calls: vLLM must then capture piecewise graphs."""
        mode = cls._MODE or (extra_config or {}).get("transfer_mode", "pull")
        return mode == "push" and bool((extra_config or {}).get("push_layerwise", True)) and (extra_config or {}).get(
            "kv_host_buffer"
        ) is not True


class KVBridgePullConnector(KVBridgeConnector):
    """Pull mode: D READs P's blocks once P has prefilled."""

    _MODE = "pull"


class KVBridgePushConnector(KVBridgeConnector):
    """Push mode: D registers its blocks with P up front; P WRITEs them, layer by layer
    while it computes when D registered early (``push_layerwise``, default on)."""

    _MODE = "push"


__all__ = ["KVBridgeConnector", "KVBridgeMetadata", "KVBridgePullConnector", "KVBridgePushConnector"]

"""Per-request connector overhead: vLLM's NixlConnector vs kvbridge, same process, same
synthetic request stream.

Both connectors are built the way vLLM builds them (``EngineArgs(...).create_engine_config()``
on the embedded tiny model, decode side, ``kv_consumer``) and driven through the calls vLLM's
scheduler makes for a remote-prefill request: ``on_new_request``, ``get_num_new_matched_tokens``,
``update_state_after_alloc``, ``build_connector_meta`` (once per step), ``update_connector_output``
(the load finished) and ``request_finished``. Each step admits one request with P's
``kv_transfer_params`` (16 blocks, 2048 tokens) and retires the oldest, keeping ``IN_FLIGHT``
requests in flight. Worker side, per idle step: ``start_load_kv`` with that step's (empty)
metadata and ``get_finished``, on a worker whose KV caches are registered with NIXL.

No I/O happens in the timed calls (the decode side would only start loads in its worker,
which is timed separately on idle steps: real loads need a prefill engine, see
``benches/pd_ttft.py``). Prints a markdown table and writes
``benches/results/connector_overhead.json``.

    python benches/connector_overhead.py [--steps 3000] [--in-flight 1,64,512]
"""

from __future__ import annotations

if __name__ == "__main__":
    import argparse
    import json
    import os
    import statistics
    import sys
    import time
    from pathlib import Path

    REPO = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(REPO / "scripts"))
    sys.path.insert(0, str(REPO / "tests" / "python"))
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("KVBRIDGE_LOG", "warn")

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--in-flight", default="1,64,512")
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "connector_overhead.json"))
    args = ap.parse_args()

    import torch
    from make_model import make_model
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request, RequestStatus

    cache = Path(os.environ.get("KVBRIDGE_CACHE", Path.home() / ".cache" / "kvbridge"))
    model = make_model(cache / "tiny-llama")

    def vllm_config(connector: str, module: str | None) -> object:
        cfg = {"kv_connector": connector, "kv_role": "kv_consumer"}
        if module:
            cfg["kv_connector_module_path"] = module
        ea = EngineArgs(model=str(model), dtype="bfloat16", max_model_len=4096, enforce_eager=True,
                        enable_prefix_caching=False, kv_transfer_config=cfg)  # fmt: skip
        cfg = ea.create_engine_config()
        cfg.cache_config.kv_cache_layout = "LBHNC"  # the CPU cache [blocks, heads, tokens, content] (the engine core resolves this)
        return cfg

    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(4)]  # the tiny model: 4 layers, 2 KV heads x 64
    NUM_BLOCKS = 256

    def kv_cache_config() -> KVCacheConfig:
        spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
        per_layer = NUM_BLOCKS * spec.page_size_bytes
        return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[KVCacheTensor(size=per_layer, layers=[n], layer_stride=per_layer, block_stride=spec.page_size_bytes) for n in LAYERS],
                             kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])  # fmt: skip

    def make_connector(name: str, role: KVConnectorRole) -> object:
        if name == "nixl":
            from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

            return NixlConnector(vllm_config("NixlConnector", None), role, kv_cache_config())
        from kvbridge.vllm import KVBridgeConnector

        return KVBridgeConnector(vllm_config("KVBridgeConnector", "kvbridge.vllm"), role, kv_cache_config())

    BLOCKS = 16
    TOKENS = BLOCKS * 128
    PROMPT = list(range(1, TOKENS + 1))
    SP = SamplingParams(max_tokens=16)

    def params(i: int) -> dict:
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "prefill-engine",
                "remote_request_id": f"p-{i}", "remote_block_ids": list(range(100, 100 + BLOCKS)),
                "remote_host": "127.0.0.1", "remote_port": 5999, "tp_size": 1,
                "remote_blocks_expiry_time": time.time() + 3600}  # fmt: skip

    def empty_output() -> SchedulerOutput:
        return SchedulerOutput(
            scheduled_new_reqs=[], scheduled_cached_reqs=CachedRequestData.make_empty(), num_scheduled_tokens={},
            total_num_scheduled_tokens=0, scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
            finished_req_ids=set(), free_encoder_mm_hashes=[],
        )  # fmt: skip

    def run_scheduler(name: str, in_flight: int, steps: int) -> dict:
        c = make_connector(name, KVConnectorRole.SCHEDULER)
        # Everything the engine would have built already (requests, block lists, outputs) is
        # made up front: only the connector's calls are timed.
        total = in_flight + steps
        reqs = []
        for i in range(total):
            r = Request(f"d-{i}", PROMPT, SP, None)
            r.kv_transfer_params = params(i)
            ids = list(range(1 + (i % 1000) * BLOCKS, 1 + (i % 1000) * BLOCKS + BLOCKS))
            blocks = KVCacheBlocks(blocks=([KVCacheBlock(block_id=b) for b in ids],))
            reqs.append((r, ids, blocks, KVConnectorOutput(finished_recving={r.request_id})))
        out = empty_output()
        per_call = {k: 0.0 for k in ("on_new_request", "get_num_new_matched_tokens", "update_state_after_alloc",
                                     "build_connector_meta", "update_connector_output", "request_finished")}  # fmt: skip
        clock = time.perf_counter

        def admit(i: int, timed: bool) -> None:
            r, ids, blocks, _ = reqs[i]
            t0 = clock()
            if hasattr(c, "on_new_request"):
                c.on_new_request(r)
            t1 = clock()
            n, _async = c.get_num_new_matched_tokens(r, 0)
            t2 = clock()
            c.update_state_after_alloc(r, blocks, n or 0)
            t3 = clock()
            r.status = RequestStatus.WAITING_FOR_REMOTE_KVS
            if timed:
                per_call["on_new_request"] += t1 - t0
                per_call["get_num_new_matched_tokens"] += t2 - t1
                per_call["update_state_after_alloc"] += t3 - t2

        def retire(i: int) -> None:
            r, ids, _, output = reqs[i]
            t0 = clock()
            c.update_connector_output(output)
            t1 = clock()
            r.status = RequestStatus.FINISHED_LENGTH_CAPPED
            c.request_finished(r, ids)
            t2 = clock()
            per_call["update_connector_output"] += t1 - t0
            per_call["request_finished"] += t2 - t1

        for i in range(in_flight):
            admit(i, False)
        c.build_connector_meta(out)
        times: list[float] = []
        warm = steps // 10
        for step in range(steps):
            if step == warm:
                per_call = {k: 0.0 for k in per_call}
            t0 = clock()
            admit(in_flight + step, True)
            tb = clock()
            c.build_connector_meta(out)
            per_call["build_connector_meta"] += clock() - tb
            retire(step)
            times.append(clock() - t0)
        times = times[warm:]
        n = len(times)
        return {"connector": name, "side": "scheduler", "in_flight": in_flight, "steps": n,
                "median_us": statistics.median(times) * 1e6, "p99_us": sorted(times)[int(n * 0.99)] * 1e6,
                "per_call_us": {k: v / n * 1e6 for k, v in per_call.items()}}  # fmt: skip

    def init_tp_group() -> None:
        """A one-process TP group (gloo), as vLLM's CPU worker makes before building connectors."""
        from vllm.config import set_current_vllm_config
        from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel, model_parallel_is_initialized

        if model_parallel_is_initialized():
            return
        with set_current_vllm_config(vllm_config("NixlConnector", None)):
            init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method="tcp://127.0.0.1:29533",
                                         backend="gloo")  # fmt: skip
            initialize_model_parallel(1, 1)

    def run_worker(name: str, steps: int) -> dict:
        init_tp_group()
        c = make_connector(name, KVConnectorRole.WORKER)
        # 4 layers of [num_blocks, kv_heads, block, 2*head] bf16 (vLLM CPU layout) in DRAM.
        caches = {n: torch.zeros((NUM_BLOCKS, 2, 128, 128), dtype=torch.bfloat16) for n in LAYERS}
        c.register_kv_caches(caches)
        sched = make_connector(name, KVConnectorRole.SCHEDULER)
        md = sched.build_connector_meta(empty_output())
        times: list[float] = []
        for _ in range(steps):
            t0 = time.perf_counter()
            c.bind_connector_metadata(md)
            c.start_load_kv(None)
            c.get_finished(set())
            c.clear_connector_metadata()
            times.append(time.perf_counter() - t0)
        times = times[steps // 10 :]
        c.shutdown()
        return {"connector": name, "side": "worker-idle-step", "in_flight": 0, "steps": len(times),
                "median_us": statistics.median(times) * 1e6, "p99_us": sorted(times)[int(len(times) * 0.99)] * 1e6}  # fmt: skip

    results = []
    for n in [int(x) for x in args.in_flight.split(",")]:
        for name in ("nixl", "kvbridge"):
            results.append(run_scheduler(name, n, args.steps))
            print(json.dumps(results[-1]), flush=True)
    for name in ("nixl", "kvbridge"):
        results.append(run_worker(name, args.steps))
        print(json.dumps(results[-1]), flush=True)

    print("\n| side | in flight | NixlConnector median (µs) | kvbridge median (µs) | kvbridge / Nixl | p99 Nixl / kvbridge (µs) |")
    print("|---|---:|---:|---:|---:|---:|")
    by = {(r["connector"], r["side"], r["in_flight"]): r for r in results}
    for (conn, side, n), r in by.items():
        if conn != "nixl":
            continue
        k = by[("kvbridge", side, n)]
        print(f"| {side} | {n} | {r['median_us']:.1f} | {k['median_us']:.1f} | **{k['median_us'] / r['median_us']:.3f}** "
              f"| {r['p99_us']:.0f} / {k['p99_us']:.0f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "results": results}, indent=1))

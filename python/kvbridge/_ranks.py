"""Where each rank of a vLLM engine listens, shared among its ranks at start-up.

Every worker binds its own side-channel listener, at its own host (its node's
``VLLM_NIXL_SIDE_CHANNEL_HOST`` / ``side_channel_host``, or its entry of
``side_channel_hosts``) and port (keyed by DP, PP and TP rank). Right after registering
its caches, each worker all-gathers ``(dp, pp, tp, host, port)`` over vLLM's world CPU group
(the same collective vLLM uses at start-up) and hands its engine's rows to the native
worker, which serves the table in every handshake: a decode rank that reads from P rank
``q`` asks P's rank 0 first and dials ``q`` where the table says, on whichever node it runs.

With pipeline parallelism each rank also shares its layer names: a P rank read by several
of this engine's stages then expects a notification from each of them.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

logger = init_logger("vllm.kvbridge.ranks")


def share_rank_table(worker: Any, layers: list[str] | None = None) -> None:
    """All-gather each rank's address (and ``layers``, its cache's layer names) and set this
    engine's (DP rank's) table, and its stages' layers, on ``worker``.

    A single-rank engine keeps the table its config describes. A failure keeps it too,
    with a warning: correct whenever every rank runs on one host (and, with several
    pipeline stages, P then frees on the first D stage's word: logged)."""
    try:
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_world_group

        if not dist.is_initialized():
            return
        group = get_world_group().cpu_group
        n = dist.get_world_size(group)
        if n <= 1:
            return
        mine = worker.rank_addr()
        rows: list[Any] = [None] * n
        dist.all_gather_object(rows, (*mine, sorted(layers or [])), group=group)
    except Exception as e:  # noqa: BLE001
        logger.warning("kvbridge: could not exchange side-channel addresses among ranks (%s); "
                       "serving the configured table", e)  # fmt: skip
        return
    table = sorted({(pp, tp, host, port) for dp, pp, tp, host, port, _ in rows if dp == mine[0]})
    worker.set_rank_table(table)
    stages: dict[int, set[str]] = {}
    for dp, pp, _tp, _h, _p, names in rows:
        if dp == mine[0]:
            stages.setdefault(pp, set()).update(names)
    if len(stages) > 1:
        worker.set_stage_layers([sorted(stages.get(pp, ())) for pp in range(max(stages) + 1)])
        logger.info("kvbridge: pipeline stages' layers: %s", "; ".join(f"pp{pp}: {len(v)}" for pp, v in sorted(stages.items())))
    logger.info("kvbridge: rank table %s", ", ".join(f"pp{pp}/tp{tp}@{h}:{p}" for pp, tp, h, p in table))

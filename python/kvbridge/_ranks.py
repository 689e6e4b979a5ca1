"""Where each rank of a vLLM engine listens, shared among its ranks at start-up.

Every worker binds its own side-channel listener, at its own host (its node's
``VLLM_NIXL_SIDE_CHANNEL_HOST`` / ``side_channel_host``, or its entry of
``side_channel_hosts``) and port (keyed by DP, PP and TP rank). Right after registering
its caches, each worker all-gathers ``(dp, pp, tp, host, port)`` over vLLM's world CPU group
(the same collective vLLM uses at start-up) and hands its engine's rows to the native
worker, which serves the table in every handshake: a decode rank that reads from P rank
``q`` asks P's rank 0 first and dials ``q`` where the table says, on whichever node it runs.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

logger = init_logger("vllm.kvbridge.ranks")


def share_rank_table(worker: Any) -> None:
    """All-gather each rank's address and set this engine's (DP rank's) table on ``worker``.

    A single-rank engine keeps the table its config describes. A failure keeps it too,
    with a warning: correct whenever every rank runs on one host."""
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
        dist.all_gather_object(rows, mine, group=group)
    except Exception as e:  # noqa: BLE001
        logger.warning("kvbridge: could not exchange side-channel addresses among ranks (%s); "
                       "serving the configured table", e)  # fmt: skip
        return
    table = sorted({(pp, tp, host, port) for dp, pp, tp, host, port in rows if dp == mine[0]})
    worker.set_rank_table(table)
    logger.info("kvbridge: rank table %s", ", ".join(f"pp{pp}/tp{tp}@{h}:{p}" for pp, tp, h, p in table))

"""KV events for KV-aware routers: which prompt blocks a prefill engine holds for decode
engines to read.

vLLM publishes KV events (``--kv-events-config``) from its scheduler each step: its own
block pool's (only with prefix caching on) plus whatever the connector's ``take_events()``
returns. kvbridge adds, on P:

- ``BlockStored`` when it offers a finished prefill's blocks for transfer (the lease
  starts): the prompt's full blocks, with their hashes, token ids and block size;
- ``BlockRemoved`` with the same hashes when the lease ends (D read them, D released them,
  or the lease expired): the blocks can no longer be pulled.

Both carry ``ownership="kvbridge"`` (vLLM's own events leave it unset), so a router can tell
"held for a remote reader" from "cached". Hashes are vLLM's own block hashes as it publishes
them (``maybe_convert_block_hash``: 64-bit ints by default) when vLLM computed them (prefix
caching on); otherwise a chain of SHA-256 hashes of the token ids, truncated to 64 bits
(``parent`` then tokens), computed here. ``medium`` is where the blocks live: ``"GPU"`` for
device caches, ``"CPU"`` otherwise.
"""

from __future__ import annotations

import hashlib
from typing import Any

OWNERSHIP = "kvbridge"
#: Leases remembered at most (a removal for a request not remembered is not published).
MAX_HELD = 65_536


def _chain_hashes(tokens: list[int], block_size: int, n_blocks: int) -> list[int]:
    out: list[int] = []
    parent = b""
    for i in range(n_blocks):
        chunk = tokens[i * block_size : (i + 1) * block_size]
        h = hashlib.sha256(parent + b"".join(t.to_bytes(4, "little", signed=False) for t in chunk)).digest()
        parent = h
        out.append(int.from_bytes(h[:8], "big"))
    return out


def block_hashes(request: Any, block_size: int) -> tuple[list[int | bytes], list[int]]:
    """The hashes and token ids of ``request``'s full prompt blocks."""
    tokens = list(getattr(request, "prompt_token_ids", None) or [])
    n = len(tokens) // block_size
    vllm_hashes = list(getattr(request, "block_hashes", None) or [])[:n]
    if n and len(vllm_hashes) == n:
        try:
            from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

            return [maybe_convert_block_hash(h) for h in vllm_hashes], tokens[: n * block_size]
        except ImportError:
            pass
    return list(_chain_hashes(tokens, block_size, n)), tokens[: n * block_size]


class LeaseEvents:
    """Pending events of one scheduler connector (P side)."""

    def __init__(self, block_size: int, medium: str) -> None:
        self.block_size = block_size
        self.medium = medium
        self._held: dict[str, list[int | bytes]] = {}
        self._pending: list[Any] = []

    def stored(self, request: Any) -> None:
        """``request``'s blocks are offered to remote readers."""
        from vllm.distributed.kv_events import BlockStored

        hashes, tokens = block_hashes(request, self.block_size)
        if not hashes or len(self._held) >= MAX_HELD:
            return
        self._held[request.request_id] = hashes
        self._pending.append(BlockStored(
            block_hashes=hashes, parent_block_hash=None, token_ids=tokens, block_size=self.block_size,
            lora_id=None, medium=self.medium, lora_name=None, ownership=OWNERSHIP,
        ))  # fmt: skip

    def removed(self, req_ids: Any) -> None:
        """Leases that ended (read, released or expired)."""
        from vllm.distributed.kv_events import BlockRemoved

        for r in req_ids:
            hashes = self._held.pop(r, None)
            if hashes:
                self._pending.append(BlockRemoved(block_hashes=hashes, medium=self.medium, ownership=OWNERSHIP))

    def take(self) -> list[Any]:
        out, self._pending = self._pending, []
        return out

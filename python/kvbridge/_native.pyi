"""Type stubs for kvbridge._native (the Rust extension module)."""
from typing import Any, Iterable, Optional, Sequence, Union

__version__: str
#: True only in test builds (cargo feature ``fault-inject``): ``KVBRIDGE_TEST_FAULT_DIR`` is honoured.
FAULT_INJECTION: bool

class KvbridgeError(Exception): ...
class ConfigError(KvbridgeError): ...
class ParamsError(KvbridgeError): ...
class RoleError(KvbridgeError): ...
class WireError(KvbridgeError): ...
class HandshakeError(KvbridgeError): ...
class PlanError(KvbridgeError): ...
class PushError(KvbridgeError): ...
class TransportError(KvbridgeError): ...
class NixlRuntimeMissing(TransportError): ...

class Scheduler:
    """Scheduler-side connector (pull or push mode, from transfer_mode). Pure state machine; no I/O."""
    def __init__(self, kv_transfer_config: str, engine_info: str) -> None: ...
    @property
    def engine_id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def transfer_mode(self) -> str: ...
    def prefill_completing(self, reqs: list[tuple[str, Sequence[list[int]], int]]) -> None:
        """P: (req_id, block ids per KV-cache group, num_tokens) of requests whose prefill completes in this step (push, staging, host buffer, integrity)."""
    def get_num_new_matched_tokens(self, req_id: str, num_prompt_tokens: int, num_computed_tokens: int, kv_transfer_params: Optional[Union[dict[str, Any], str]] = None) -> tuple[int, bool]:
        """kv_transfer_params: the request's dict (converted natively) or JSON text."""
    def update_state_after_alloc(self, req_id: str, unhashed_block_ids: list[int], num_external_tokens: int) -> None: ...
    def update_state_after_alloc_groups(self, req_id: str, unhashed_block_ids: Sequence[list[int]], num_external_tokens: int) -> None:
        """The unhashed blocks of each KV-cache group (hybrid models)."""
    def build_connector_meta(self) -> bytes: ...
    def on_new_request(self, req_id: str, kv_transfer_params: Optional[Union[dict[str, Any], str]] = None) -> None: ...
    def accounting(self) -> str:
        """JSON: held/loading requests and blocks as this scheduler sees them."""
    def request_finished(self, req_id: str, block_ids: Union[list[int], Sequence[list[int]]], finish_reason: str, num_computed_tokens: int, kv_transfer_params: Optional[Union[dict[str, Any], str]] = None) -> tuple[bool, Optional[dict[str, Any]]]:
        """(delay_free_blocks, the kv_transfer_params to return to the client, or None)."""
    def update_connector_output(self, finished_sending: Iterable[str], finished_recving: Iterable[str]) -> list[str]:
        """Returns the ids of ``finished_sending`` vLLM must not see (staged requests). Any iterables of str (sets, lists)."""
        ...
    @property
    def staging_slots(self) -> int:
        """Staging slots (``kv_staging_blocks`` on a pull-mode producer; 0: off)."""
        ...
    @property
    def kv_integrity(self) -> str:
        """``kv_integrity``: ``"off"``, ``"sampled"`` or ``"full"``."""
        ...
    @property
    def host_buffer(self) -> bool:
        """Host-buffer transfers (``kv_buffer_device="cpu"`` on a GPU engine, or ``kv_host_buffer``)."""
        ...
    def has_pending_block_frees(self) -> bool: ...

class Worker:
    """Worker-side connector: NIXL agent, registered KV caches, handshake listener."""
    def __init__(self, kv_transfer_config: str, engine_info: str, nixl_lib_dir: Optional[str] = None) -> None: ...
    def register_kv_caches(
        self, tensors: list[tuple[str, int, list[int], list[int], int, str, int, str | None]], num_blocks: int
    ) -> None:
        """Each tensor: (name, data_ptr, shape, stride, itemsize, device type, device index,
        geometry JSON: {"axes": [...], "kind": ..., "group": n, "window": n, "total_heads": n} or None)."""
    def start_load_kv(self, metadata: bytes, stream: int | None = None) -> None: ...
    def get_finished(self, idle: bool = False) -> tuple[list[str], list[str], list[str]]: ...
    @property
    def layerwise_push(self) -> bool:
        """Push mode with layer-wise writes (``save_kv_layer`` posts during the forward)."""
    def save_kv_layer(self, layer_name: str, stream: Optional[int] = None) -> None:
        """Push, P: the layer is computed; queue its WRITEs (never blocks). ``stream``: the
        forward's CUDA stream handle (GPU caches): the WRITEs wait for an event recorded on it."""
    def wait_for_save(self, stream: Optional[int] = None) -> None:
        """Push, P: the forward ended (never blocks; blocks stay held until the writes end).
        ``stream``: as for ``save_kv_layer``, fencing the end-of-forward WRITEs."""
    def get_block_ids_with_load_errors(self) -> list[int]: ...
    def shutdown(self, timeout: float = 2.0) -> int:
        """D: release the leases this engine will never read (P frees them now); returns how many."""
    def rank_addr(self) -> tuple[int, int, int, str, int]:
        """This rank's side-channel address: (dp_rank, pp_rank, tp_rank, host, port)."""
    def rank_table(self) -> list[tuple[int, int, str, int]]:
        """The engine's rank table served in handshakes: (pp_rank, tp_rank, host, port)."""
    def set_rank_table(self, table: list[tuple[int, int, str, int]]) -> None:
        """Replace the rank table (what the engine's ranks reported at start-up)."""
    def accounting(self) -> str:
        """JSON: blocks held for remote peers, loads in flight, lease/heartbeat counters."""
    def stats(self) -> str:
        """Counters as JSON, with a "push" object in push mode."""
    def take_xfer_stats(self) -> Optional[str]:
        """JSON of the transfer stats since the last call (vLLM's NixlKVConnectorStats keys
        plus "handshake_duration" and "held_blocks"), or None when nothing happened."""

def validate_kv_transfer_params(params: Union[str, dict[str, Any]]) -> str:
    """"none", "remote_decode", "remote_prefill" or "push_prefill" for JSON text or a dict
    (decoded as the Scheduler decodes a request's dict); raises ParamsError."""
def nixl_runtime_available(lib_dir: Optional[str] = None) -> bool: ...
def init_logging(level: Optional[str] = None, to_python: bool = True) -> None:
    """Route Rust logs to logging.getLogger("kvbridge") (to_python) or stderr; first call wins."""
def stop_logging() -> int:
    """Stop forwarding to Python (at exit); returns the lines dropped on a full queue."""
def inspect(host: str, port: int, timeout: float = 2.0) -> str:
    """JSON accounting of the worker listening at host:port (see kvbridge.inspect)."""

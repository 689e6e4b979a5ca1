//! The one seam between the sans-IO core and real I/O: a transport moves bytes between
//! registered regions and carries short notifications. `kvbridge-nixl` implements it over
//! NIXL; unit tests use an in-process double.
use crate::error::TransportError;
use crate::layout::KvLayout;
use crate::plan::Piece;
use crate::wire::AgentMetadata;

/// Identifies a posted transfer within one transport.
pub type XferId = u64;

/// The state of a posted transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XferPoll {
    /// Still in flight.
    Pending,
    /// Completed successfully (a failure is an `Err` from [`Transport::poll`]).
    Done,
}

/// Statistics a transport can report about a finished transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XferInfo {
    /// Bytes moved.
    pub bytes: u64,
    /// Transfer descriptors (contiguous pieces) the transfer was posted as.
    pub descriptors: u64,
}

/// A data mover between registered memory regions of this and remote agents, with
/// notifications; implemented over NIXL by `kvbridge-nixl`.
pub trait Transport: Send {
    /// This agent's name as peers must address it.
    fn agent_name(&self) -> &str;
    /// Opaque transport metadata a peer loads to reach us (NIXL: `get_local_md`).
    fn local_metadata(&mut self) -> Result<Vec<u8>, TransportError>;
    /// Register the KV regions' memory.
    fn register(&mut self, layout: &KvLayout) -> Result<(), TransportError>;
    /// Load a peer's transport metadata under the key `peer`.
    /// Idempotent per key; several keys may name the same remote agent.
    fn add_remote(&mut self, peer: &str, md: &AgentMetadata) -> Result<(), TransportError>;
    /// Forget a peer (after a failure, so the next request re-handshakes).
    fn remove_remote(&mut self, peer: &str);
    /// READ `pieces` from remote `peer` into local memory; `notif` reaches the peer when
    /// the transfer completes.
    fn read(&mut self, peer: &str, pieces: &[Piece], notif: &[u8]) -> Result<XferId, TransportError>;
    /// WRITE local memory into remote `peer`'s (push mode): each piece's `local` range is
    /// the source, `remote` the destination; `notif` reaches the peer once the data landed.
    fn write(&mut self, peer: &str, pieces: &[Piece], notif: &[u8]) -> Result<XferId, TransportError>;
    /// Whether transfer `xfer` is still running; an error when it failed.
    fn poll(&mut self, xfer: XferId) -> Result<XferPoll, TransportError>;
    /// Release a transfer's handle (done, failed or abandoned).
    fn release(&mut self, xfer: XferId);
    /// Send a notification without a transfer.
    fn notify(&mut self, peer: &str, msg: &[u8]) -> Result<(), TransportError>;
    /// Notifications received since the last call.
    fn take_notifs(&mut self) -> Result<Vec<Vec<u8>>, TransportError>;
    /// Copy device memory to host memory, synchronously (P-side staging of GPU caches):
    /// `copies` are `(device address, host address, bytes)` on device `device_id`.
    /// `stream`: the CUDA stream the engine's forward ran on (a `CUstream` handle); the
    /// copies are queued on it, after the forward's KV writes, and only it is waited for.
    /// None: wait for the whole device context first. The default refuses: a transport
    /// without device support never stages VRAM.
    fn copy_device_to_host(&mut self, device_id: u64, copies: &[(u64, u64, u64)], stream: Option<u64>) -> Result<(), TransportError> {
        let _ = (device_id, copies, stream);
        Err(TransportError::new("unsupported", "this transport cannot copy device memory to the host".to_string()))
    }
    /// Copy host memory to device memory, synchronously (D's host buffer, after a read):
    /// `copies` are `(device address, host address, bytes)` on device `device_id`, queued
    /// on `stream` (the engine's, so its next forward is ordered after them) and waited
    /// for there; None: on the legacy stream, then the whole context. The default refuses.
    fn copy_host_to_device(&mut self, device_id: u64, copies: &[(u64, u64, u64)], stream: Option<u64>) -> Result<(), TransportError> {
        let _ = (device_id, copies, stream);
        Err(TransportError::new("unsupported", "this transport cannot copy host memory to a device".to_string()))
    }
}

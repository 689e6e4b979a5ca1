//! [`NixlError`]: what the NIXL transport can fail with, and its conversion to the core's
//! error types.
use thiserror::Error;

/// Errors from the NIXL transport. Converted to the core's `TransportError` at the seam.
#[derive(Debug, Error)]
pub enum NixlError {
    /// The NIXL runtime library could not be found or loaded.
    #[error("NIXL runtime (libnixl_capi.so) not found; searched {searched:?}. Run `make setup` or point KVBRIDGE_NIXL_LIB_DIR (or NIXL_LIB_DIR) at the nixl-cu12 wheel's .nixl_cu12.mesonpy.libs directory")]
    RuntimeMissing {
        /// Each place tried, with why it failed.
        searched: Vec<String>,
    },
    /// A NIXL call failed.
    #[error("NIXL {op} failed: {source}")]
    Nixl {
        /// What was being done (e.g. "post transfer").
        op: &'static str,
        /// NIXL's error.
        #[source]
        source: nixl_sys::NixlError,
    },
    /// A configured backend has no plugin: (backend, the plugins available).
    #[error("NIXL backend {0:?} is not available (available plugins: {1:?})")]
    BackendUnavailable(String, Vec<String>),
    /// A transfer or notification named a peer not loaded (no handshake yet, or forgotten).
    #[error("unknown remote engine {0:?} (no handshake yet)")]
    UnknownRemote(String),
    /// The peer's NIXL metadata belongs to another agent than its handshake announced.
    #[error("peer metadata names agent {got:?} but the handshake announced {want:?}")]
    AgentMismatch {
        /// The agent name the handshake announced.
        want: String,
        /// The agent name in the metadata.
        got: String,
    },
    /// The peer's NIXL metadata is malformed (refused before NIXL parses it).
    #[error("peer NIXL metadata refused: {0}")]
    BadMetadata(&'static str),
    /// A transfer id this transport does not know (never posted, or already released).
    #[error("unknown transfer id {0}")]
    UnknownXfer(u64),
    /// A transfer was posted before the KV caches were registered.
    #[error("KV caches not registered")]
    NotRegistered,
    /// CUDA memory or a CUDA device was asked for, but no CUDA driver is present.
    #[error("CUDA tensors need the CUDA driver (libcuda), which is not present")]
    CudaUnavailable,
    /// A tensor said to be on a GPU is not CUDA device memory.
    #[error("pointer {ptr:#x} is not CUDA device memory (CUresult {code})")]
    NotDeviceMemory {
        /// The tensor's address.
        ptr: u64,
        /// The driver's `CUresult` from querying the pointer (0: it answered, with another
        /// memory type).
        code: i64,
    },
    /// A CUDA device could not be used (context or copy failed).
    #[error("cannot make CUDA device {ordinal}'s context current: {reason}")]
    CudaDevice {
        /// The device's ordinal.
        ordinal: u32,
        /// The driver's error.
        reason: String,
    },
}

impl NixlError {
    pub(crate) fn nixl(op: &'static str) -> impl FnOnce(nixl_sys::NixlError) -> Self {
        move |source| Self::Nixl { op, source }
    }

    /// A short stable name for the error's kind (`"nixl"`, `"cuda"`, ...), carried as the
    /// core's `TransportError` kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RuntimeMissing { .. } => "runtime_missing",
            Self::Nixl { .. } => "nixl",
            Self::BackendUnavailable(..) => "backend_unavailable",
            Self::UnknownRemote(_) => "unknown_remote",
            Self::AgentMismatch { .. } => "agent_mismatch",
            Self::BadMetadata(_) => "bad_metadata",
            Self::UnknownXfer(_) => "unknown_xfer",
            Self::NotRegistered => "not_registered",
            Self::CudaUnavailable | Self::NotDeviceMemory { .. } | Self::CudaDevice { .. } => "cuda",
        }
    }
}

impl From<NixlError> for kvbridge_core::error::TransportError {
    fn from(e: NixlError) -> Self {
        kvbridge_core::error::TransportError::new(e.kind(), e.to_string())
    }
}

impl From<NixlError> for kvbridge_core::Error {
    fn from(e: NixlError) -> Self {
        kvbridge_core::Error::Transport(e.into())
    }
}

use thiserror::Error;

/// Errors from the NIXL transport. Converted to the core's `TransportError` at the seam.
#[derive(Debug, Error)]
pub enum NixlError {
    #[error("NIXL runtime (libnixl_capi.so) not found; searched {searched:?}. Run `make setup` or point KVBRIDGE_NIXL_LIB_DIR (or NIXL_LIB_DIR) at the nixl-cu12 wheel's .nixl_cu12.mesonpy.libs directory")]
    RuntimeMissing { searched: Vec<String> },
    #[error("NIXL {op} failed: {source}")]
    Nixl {
        op: &'static str,
        #[source]
        source: nixl_sys::NixlError,
    },
    #[error("NIXL backend {0:?} is not available (available plugins: {1:?})")]
    BackendUnavailable(String, Vec<String>),
    #[error("unknown remote engine {0:?} (no handshake yet)")]
    UnknownRemote(String),
    #[error("peer metadata names agent {got:?} but the handshake announced {want:?}")]
    AgentMismatch { want: String, got: String },
    #[error("unknown transfer id {0}")]
    UnknownXfer(u64),
    #[error("KV caches not registered")]
    NotRegistered,
    #[error("CUDA tensors need the CUDA driver (libcuda), which is not present")]
    CudaUnavailable,
    #[error("pointer {ptr:#x} is not CUDA device memory (CUresult {code})")]
    NotDeviceMemory { ptr: u64, code: i64 },
    #[error("cannot make CUDA device {ordinal}'s context current: {reason}")]
    CudaDevice { ordinal: u32, reason: String },
}

impl NixlError {
    pub(crate) fn nixl(op: &'static str) -> impl FnOnce(nixl_sys::NixlError) -> Self {
        move |source| Self::Nixl { op, source }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::RuntimeMissing { .. } => "runtime_missing",
            Self::Nixl { .. } => "nixl",
            Self::BackendUnavailable(..) => "backend_unavailable",
            Self::UnknownRemote(_) => "unknown_remote",
            Self::AgentMismatch { .. } => "agent_mismatch",
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

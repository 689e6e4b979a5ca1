//! Typed errors for the connector core. One enum per concern, folded into [`Error`].
use thiserror::Error;

/// A local configuration problem: fails at start-up, says what to change.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid kv_role {0:?}: expected \"kv_producer\", \"kv_consumer\" or \"kv_both\"")]
    InvalidRole(String),
    #[error("invalid transfer_mode {0:?}: expected \"pull\" or \"push\"")]
    InvalidMode(String),
    #[error("invalid value for {key}: {reason}")]
    InvalidValue { key: String, reason: String },
    #[error("config is not valid JSON: {0}")]
    Json(String),
}

/// A malformed `kv_transfer_params` dict on one request. Fails that request only.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParamsError {
    #[error("kv_transfer_params must be a JSON object, got {0}")]
    NotAnObject(String),
    #[error("kv_transfer_params: missing field {0:?}")]
    MissingField(&'static str),
    #[error("kv_transfer_params: field {field:?} must be {expected}, got {got}")]
    WrongType { field: &'static str, expected: &'static str, got: String },
    #[error("kv_transfer_params: invalid remote_host {0:?}")]
    BadHost(String),
    #[error("kv_transfer_params: {0}")]
    Invalid(String),
}

/// A request whose parameters contradict this engine's role.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RoleError {
    #[error("do_remote_prefill sent to a kv_producer engine: only a kv_consumer (decode) engine can load KV from a remote prefill")]
    RemotePrefillOnProducer,
    #[error("do_remote_decode sent to a kv_consumer engine: only a kv_producer (prefill) engine can hold KV for a remote decode")]
    RemoteDecodeOnConsumer,
    #[error("do_remote_prefill and do_remote_decode are both true")]
    BothDirections,
}

/// Wire-format (msgpack) problems: a peer sent bytes we cannot use.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("unsupported wire version {got} (this build speaks {want})")]
    Version { got: u32, want: u32 },
}

/// Handshake with a remote engine failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("handshake with {addr} timed out after {timeout_ms} ms (is the prefill engine up, and is remote_host/remote_port right?)")]
    Timeout { addr: String, timeout_ms: u64 },
    #[error("handshake with {addr} failed: {reason}")]
    Io { addr: String, reason: String },
    #[error("incompatible peer at {addr}: {detail} (P and D must run the same model, dtype, cache dtype, vLLM and kvbridge versions and transfer mode; enforce_handshake_compat=false on both sides overrides this)")]
    Incompatible { addr: String, detail: String },
    #[error("peer at {addr} is engine {actual:?}, but the request named remote_engine_id {expected:?}")]
    EngineMismatch { addr: String, expected: String, actual: String },
    #[error("peer at {addr} answered with an error: {reason}")]
    Rejected { addr: String, reason: String },
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// The transfer plan cannot be built or applied.
/// A push registration (D → P) that P refuses. Peer-controlled: never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("push registration for engine {got:?}, but this is engine {want:?}")]
    WrongEngine { got: String, want: String },
    #[error("push registration {transfer:?} from {engine} rank {rank} arrived twice")]
    Duplicate { transfer: String, engine: String, rank: u32 },
    #[error("push registration is invalid: {0}")]
    Invalid(String),
    #[error("push request {0:?} was aborted on the prefill side")]
    Aborted(String),
    #[error("too many unmatched push registrations ({0}); refusing more")]
    Overloaded(usize),
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PlanError {
    #[error("incompatible KV layout: {0}")]
    Layout(String),
    #[error("block id {block} out of range ({side} side has {num_blocks} blocks)")]
    BlockOutOfRange { side: &'static str, block: u64, num_blocks: u64 },
    #[error("block count mismatch: {local} local blocks to fill but {remote} remote blocks offered")]
    BlockCountMismatch { local: usize, remote: usize },
    #[error("no KV caches registered")]
    NotRegistered,
}

/// An error reported by a transport (NIXL or a test double), as plain text plus a kind.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("transport error ({kind}): {message}")]
pub struct TransportError {
    pub kind: &'static str,
    pub message: String,
}

impl TransportError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// Everything the core can fail with.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error(transparent)]
    Role(#[from] RoleError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Push(#[from] PushError),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

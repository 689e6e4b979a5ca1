//! Typed errors for the connector core. One enum per concern, folded into [`Error`](enum@Error).
use thiserror::Error;

/// A local configuration problem: fails at start-up, says what to change.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// `kv_role` is not one of the known roles; holds the value given.
    #[error("invalid kv_role {0:?}: expected \"kv_producer\", \"kv_consumer\" or \"kv_both\"")]
    InvalidRole(String),
    /// `transfer_mode` is neither `"pull"` nor `"push"`; holds the value given.
    #[error("invalid transfer_mode {0:?}: expected \"pull\" or \"push\"")]
    InvalidMode(String),
    /// A setting has a value out of range or of the wrong type.
    #[error("invalid value for {key}: {reason}")]
    InvalidValue {
        /// Name of the offending setting.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// The config text could not be parsed as JSON; holds the parser's message.
    #[error("config is not valid JSON: {0}")]
    Json(String),
}

/// A malformed `kv_transfer_params` dict on one request. Fails that request only.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParamsError {
    /// The params are not a JSON object; holds what was found (or the JSON parse error).
    #[error("kv_transfer_params must be a JSON object, got {0}")]
    NotAnObject(String),
    /// A required field is absent; holds the field name.
    #[error("kv_transfer_params: missing field {0:?}")]
    MissingField(&'static str),
    /// A field is present but has the wrong JSON type.
    #[error("kv_transfer_params: field {field:?} must be {expected}, got {got}")]
    WrongType {
        /// Name of the field.
        field: &'static str,
        /// The type the field must have.
        expected: &'static str,
        /// What was found instead.
        got: String,
    },
    /// `remote_host` is not a usable host name or address; holds the value given.
    #[error("kv_transfer_params: invalid remote_host {0:?}")]
    BadHost(String),
    /// Any other inconsistency in the params; holds the explanation.
    #[error("kv_transfer_params: {0}")]
    Invalid(String),
}

/// A request whose parameters contradict this engine's role.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RoleError {
    /// `do_remote_prefill` arrived at a `kv_producer` (prefill) engine.
    #[error("do_remote_prefill sent to a kv_producer engine: only a kv_consumer (decode) engine can load KV from a remote prefill")]
    RemotePrefillOnProducer,
    /// `do_remote_decode` arrived at a `kv_consumer` (decode) engine.
    #[error("do_remote_decode sent to a kv_consumer engine: only a kv_producer (prefill) engine can hold KV for a remote decode")]
    RemoteDecodeOnConsumer,
    /// A request set both `do_remote_prefill` and `do_remote_decode`.
    #[error("do_remote_prefill and do_remote_decode are both true")]
    BothDirections,
}

/// Wire-format (msgpack) problems: a peer sent bytes we cannot use.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// A message is larger than this side accepts.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the message, in bytes.
        size: usize,
        /// Largest accepted size, in bytes.
        limit: usize,
    },
    /// Bytes could not be decoded as the expected message.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// The message type being decoded.
        what: &'static str,
        /// The decoder's error message.
        reason: String,
    },
    /// A value could not be encoded to msgpack.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// The message type being encoded.
        what: &'static str,
        /// The encoder's error message.
        reason: String,
    },
    /// The message carries a wire version this build does not speak.
    #[error("unsupported wire version {got} (this build speaks {want})")]
    Version {
        /// Version found in the message.
        got: u32,
        /// Version this build speaks ([`crate::wire::WIRE_VERSION`]).
        want: u32,
    },
}

/// Handshake with a remote engine failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The peer did not answer within the handshake timeout.
    #[error("handshake with {addr} timed out after {timeout_ms} ms (is the prefill engine up, and is remote_host/remote_port right?)")]
    Timeout {
        /// The peer's `host:port`.
        addr: String,
        /// The timeout that expired, in milliseconds.
        timeout_ms: u64,
    },
    /// Resolving, binding, connecting, sending or receiving failed.
    #[error("handshake with {addr} failed: {reason}")]
    Io {
        /// The peer's (or, for a bind, the listener's) `host:port`.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The peer runs a different model, dtype, version or transfer mode.
    #[error("incompatible peer at {addr}: {detail} (P and D must run the same model, dtype, cache dtype, vLLM and kvbridge versions and transfer mode; enforce_handshake_compat=false on both sides overrides this)")]
    Incompatible {
        /// The peer's `host:port`.
        addr: String,
        /// Which property differs between the two sides.
        detail: String,
    },
    /// The peer's engine id is not the `remote_engine_id` the request named.
    #[error("peer at {addr} is engine {actual:?}, but the request named remote_engine_id {expected:?}")]
    EngineMismatch {
        /// The peer's `host:port`.
        addr: String,
        /// Engine id the request named.
        expected: String,
        /// Engine id the peer announced.
        actual: String,
    },
    /// The peer answered with an error, or with metadata that contradicts the request.
    #[error("peer at {addr} answered with an error: {reason}")]
    Rejected {
        /// The peer's address.
        addr: String,
        /// The peer's error, or what contradicts the request.
        reason: String,
    },
    /// The peer's reply could not be decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// A push registration (D → P) that P refuses. Peer-controlled: never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The registration targets another prefill engine.
    #[error("push registration for engine {got:?}, but this is engine {want:?}")]
    WrongEngine {
        /// Target engine id named in the registration.
        got: String,
        /// This engine's id.
        want: String,
    },
    /// The same D engine and rank registered the same transfer twice.
    #[error("push registration {transfer:?} from {engine} rank {rank} arrived twice")]
    Duplicate {
        /// The transfer key (`xfer:<transfer_id>`, or `req:<request id>` without a transfer id).
        transfer: String,
        /// The registering (decode) engine's id.
        engine: String,
        /// The registering engine's TP rank.
        rank: u32,
    },
    /// The registration is inconsistent (TP sizes, rank count); holds the explanation.
    #[error("push registration is invalid: {0}")]
    Invalid(String),
    /// The request was aborted on P before D registered; holds the request id.
    #[error("push request {0:?} was aborted on the prefill side")]
    Aborted(String),
    /// Too many registrations wait for their P request; holds how many wait.
    #[error("too many unmatched push registrations ({0}); refusing more")]
    Overloaded(usize),
}

/// The transfer plan cannot be built or applied.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The KV caches cannot be described or matched; holds the explanation.
    #[error("incompatible KV layout: {0}")]
    Layout(String),
    /// A block id is past the end of a cache.
    #[error("block id {block} out of range ({side} side has {num_blocks} blocks)")]
    BlockOutOfRange {
        /// Which cache: `"local"` or `"remote"`.
        side: &'static str,
        /// The offending block id.
        block: u64,
        /// Number of blocks in that cache.
        num_blocks: u64,
    },
    /// The local and remote block lists have different lengths.
    #[error("block count mismatch: {local} local blocks to fill but {remote} remote blocks offered")]
    BlockCountMismatch {
        /// Number of local blocks to fill.
        local: usize,
        /// Number of remote blocks offered.
        remote: usize,
    },
    /// A transfer was planned before the KV caches were registered.
    #[error("no KV caches registered")]
    NotRegistered,
}

/// An error reported by a transport (NIXL or a test double), as plain text plus a kind.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("transport error ({kind}): {message}")]
pub struct TransportError {
    /// A short machine-readable category, e.g. `"nixl"`, `"timeout"`, `"lease"`.
    pub kind: &'static str,
    /// The human-readable description.
    pub message: String,
}

impl TransportError {
    /// Makes an error of `kind` with `message`.
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// Everything the core can fail with.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A configuration problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A malformed `kv_transfer_params`.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// A request that contradicts the engine's role.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// A wire-format problem.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A failed handshake.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A transfer plan that cannot be built or applied.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A transport failure.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A refused push registration.
    #[error(transparent)]
    Push(#[from] PushError),
    /// Anything else; holds the message.
    #[error("{0}")]
    Other(String),
}

/// `Result` with the core's [`Error`](enum@Error) as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

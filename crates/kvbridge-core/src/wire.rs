//! Versioned msgpack (rmp-serde) types that cross a process boundary: scheduler→worker
//! metadata, the handshake, and transfer notifications. Every decode checks a size limit
//! first and returns a typed [`WireError`].
// Peer and user data is decoded here: no indexing that could panic on it.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use crate::compat::{compat_diff, compat_hash, describe_mismatch};
use crate::config::CompatInfo;
use crate::error::WireError;
use crate::layout::Region;

/// Bumped on any incompatible change to the types below; part of the compatibility hash.
pub const WIRE_VERSION: u32 = 5;
/// The kvbridge version, also hashed: P and D must run the same release.
pub const KVBRIDGE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Largest side-channel reply (handshake payload, heartbeat reply, envelope) accepted
/// from a peer, in bytes.
pub const MAX_HANDSHAKE_BYTES: usize = 64 << 20;
/// Largest transfer notification ([`Notif`]) accepted, in bytes.
pub const MAX_NOTIF_BYTES: usize = 64 << 10;
/// Largest scheduler→worker [`ConnectorMetadata`] accepted, in bytes.
pub const MAX_METADATA_BYTES: usize = 256 << 20;

/// Encodes `v` as msgpack with named fields; `what` names the type in errors.
pub fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, WireError> {
    rmp_serde::to_vec_named(v).map_err(|e| WireError::Encode { what, reason: e.to_string() })
}

/// Decodes a msgpack `T` from `bytes`, refusing more than `limit` bytes first; `what`
/// names the type in errors.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8], limit: usize) -> Result<T, WireError> {
    if bytes.len() > limit {
        return Err(WireError::TooLarge { size: bytes.len(), limit });
    }
    rmp_serde::from_slice(bytes).map_err(|e| WireError::Decode { what, reason: e.to_string() })
}

// ---------------------------------------------------------------------------------------
// Scheduler → worker

/// Where a request's KV lives on the prefill side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteRef {
    /// The prefill engine's id (`remote_engine_id`).
    pub engine_id: String,
    /// The prefill engine's side-channel host.
    pub host: String,
    /// P's base side-channel port; rank q listens at `port + q`.
    pub port: u16,
    /// P's id for the request (`remote_request_id`).
    pub request_id: String,
    /// P's block ids, one list per KV-cache group, covering the whole prompt.
    pub block_ids: Vec<Vec<u32>>,
    /// The prefill engine's TP size.
    pub tp_size: u32,
    /// The prefill engine's incarnation that produced the blocks (0: unknown). A peer
    /// answering the handshake with another epoch has restarted: the blocks are gone.
    #[serde(default)]
    pub epoch: u64,
    /// When P's lease on the blocks ends, on P's clock (Unix seconds; 0: unknown).
    #[serde(default)]
    pub expiry_unix: f64,
    /// `block_ids` are slots of P's staging buffer (its advertised `staging_regions`).
    #[serde(default)]
    pub staged: bool,
}

/// One request the worker must load (pull: READ remote blocks into `local_block_ids`).
/// Zero local blocks is legal: the worker still notifies P so it frees its blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecvReq {
    /// D's (vLLM's) request id.
    pub req_id: String,
    /// D's blocks to fill, one list per KV-cache group: the end of the request's blocks
    /// (a local prefix hit covers the rest).
    pub local_block_ids: Vec<Vec<u32>>,
    /// The prompt length in tokens (aligns blocks of different sizes).
    pub num_tokens: u64,
    /// True when nothing is loaded (full local prefix hit, or an abort before
    /// allocation): the worker only notifies P and reports nothing to vLLM.
    pub notify_only: bool,
    /// Where the KV is read from.
    pub remote: RemoteRef,
}

/// One request whose blocks P holds for remote readers until notified or expired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendLease {
    /// P's request id.
    pub req_id: String,
    /// Unix time (seconds) after which the worker releases the blocks anyway.
    pub expiry_unix: f64,
    /// How many remote worker ranks must report before the blocks are free.
    pub expected_readers: u32,
    /// Blocks held (accounting only).
    #[serde(default)]
    pub num_blocks: u32,
}

/// P, pull with staging: copy a request's blocks into staging slots once this step's
/// forward is done (`wait_for_save`), so vLLM can free the blocks when the request ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageReq {
    /// P's request id.
    pub req_id: String,
    /// vLLM's (logical) block ids, in prompt order.
    pub block_ids: Vec<u32>,
    /// The staging slots, one per block (never 0).
    pub slots: Vec<u32>,
}

/// A request the scheduler already knows failed (bad params, role error): the worker
/// reports it as a failed load so vLLM ends it with an error and frees its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedReq {
    /// The request id.
    pub req_id: String,
    /// Why it failed; the worker fails the load with this message.
    pub reason: String,
}

/// Push, P side: a request whose blocks P writes into the blocks D registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushSend {
    /// P's request id.
    pub req_id: String,
    /// The proxy's transfer id (empty: match on the base request id).
    pub transfer_id: String,
    /// P's block ids holding the KV, one list per KV-cache group.
    pub block_ids: Vec<Vec<u32>>,
    /// Prompt tokens whose KV is written.
    pub num_tokens: u64,
    /// Unix time after which P releases the blocks if no D rank registered.
    pub expiry_unix: f64,
    /// The blocks are held for the worker (vLLM waits for `finished_sending`).
    pub hold: bool,
    /// The request ended without a usable prefill (abort, error): registrations for it
    /// are refused, and held blocks are released once no write is in flight.
    pub aborted: bool,
}

/// Push, D side: register these blocks with the prefill engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRecv {
    /// D's request id.
    pub req_id: String,
    /// The proxy's transfer id (empty: match on the base request id).
    pub transfer_id: String,
    /// D's blocks to be written, one list per KV-cache group.
    pub local_block_ids: Vec<Vec<u32>>,
    /// The prompt length in tokens.
    pub num_tokens: u64,
    /// Nothing to receive (full local prefix hit, or D gave up before allocating): P is
    /// only told, so it frees its blocks now.
    pub notify_only: bool,
    /// The prefill engine's id.
    pub engine_id: String,
    /// The prefill engine's side-channel host.
    pub host: String,
    /// P's base side-channel port; rank q listens at `port + q`.
    pub port: u16,
    /// The prefill engine's TP size.
    pub tp_size: u32,
}

/// Per-step metadata from the scheduler to every worker; opaque bytes to Python.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectorMetadata {
    /// The wire version ([`WIRE_VERSION`]); checked on decode.
    pub version: u32,
    /// D, pull: requests to load from a prefill engine.
    pub reqs_to_recv: Vec<RecvReq>,
    /// P, pull: requests whose blocks to hold for remote readers.
    pub reqs_to_send: Vec<SendLease>,
    /// Requests the scheduler already failed; the worker reports them as failed loads.
    pub reqs_failed: Vec<FailedReq>,
    /// Push, P: requests that finished (their blocks wait for D's registrations).
    #[serde(default)]
    pub push_finished: Vec<PushSend>,
    /// Push, P: requests whose prefill completes in this step (layer-wise writes).
    #[serde(default)]
    pub push_saves: Vec<PushSend>,
    /// Push, D: registrations to send.
    #[serde(default)]
    pub push_register: Vec<PushRecv>,
    /// Push, D: requests aborted while waiting for P's writes; their blocks are released
    /// (reported in `finished_sending`) once no write can still land in them.
    #[serde(default)]
    pub push_aborted: Vec<String>,
    /// The scheduler's incarnation (random per start; 0: unknown). Workers advertise it
    /// in handshakes and heartbeat replies.
    #[serde(default)]
    pub epoch: u64,
    /// D: lease heartbeats to send now, one batch per remote engine.
    #[serde(default)]
    pub heartbeats: Vec<HeartbeatTarget>,
    /// D: requests whose leases started being renewed since the last step (nothing is
    /// sent for them now): the worker adds them to the leases it releases on shutdown.
    #[serde(default)]
    pub tracked: Vec<HeartbeatTarget>,
    /// P, pull with staging: blocks to copy into staging slots after this step's forward.
    #[serde(default)]
    pub stage: Vec<StageReq>,
    /// P with `kv_integrity`: blocks to digest after this step's forward.
    #[serde(default)]
    pub digest: Vec<crate::integrity::DigestReq>,
}

/// D → one remote engine: "I still want these requests' blocks".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatTarget {
    /// The prefill engine's id.
    pub engine_id: String,
    /// The prefill engine's side-channel host.
    pub host: String,
    /// P's base side-channel port; rank q listens at `port + q`.
    pub port: u16,
    /// The prefill engine's TP size.
    pub tp_size: u32,
    /// P's request ids.
    pub request_ids: Vec<String>,
}

impl ConnectorMetadata {
    /// True when there is nothing for the workers to do this step.
    pub fn is_empty(&self) -> bool {
        self.reqs_to_recv.is_empty()
            && self.reqs_to_send.is_empty()
            && self.reqs_failed.is_empty()
            && self.push_finished.is_empty()
            && self.push_saves.is_empty()
            && self.push_register.is_empty()
            && self.push_aborted.is_empty()
            && self.heartbeats.is_empty()
            && self.tracked.is_empty()
            && self.stage.is_empty()
            && self.digest.is_empty()
    }
    /// Encodes as msgpack.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        encode("ConnectorMetadata", self)
    }
    /// Decodes, checking the size limit and the wire version; empty bytes give an empty
    /// value.
    pub fn from_bytes(b: &[u8]) -> Result<Self, WireError> {
        if b.is_empty() {
            return Ok(Self::default());
        }
        let m: Self = decode("ConnectorMetadata", b, MAX_METADATA_BYTES)?;
        if m.version != WIRE_VERSION {
            return Err(WireError::Version { got: m.version, want: WIRE_VERSION });
        }
        Ok(m)
    }
}

// ---------------------------------------------------------------------------------------
// Handshake (ZMQ side channel)

/// What one worker rank advertises to peers: who it is, its transport metadata, and
/// the full geometry of every registered region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    /// The engine's id.
    pub engine_id: String,
    /// The worker's transport (NIXL) agent name.
    pub agent_name: String,
    /// This worker's TP rank.
    pub tp_rank: u32,
    /// The engine's TP size.
    pub tp_size: u32,
    /// Logical (scheduler) block size in tokens.
    pub block_size: u32,
    /// Kernel blocks per logical block.
    pub blocks_per_logical: u32,
    /// The registered KV-cache regions, with their full geometry.
    pub regions: Vec<Region>,
    /// The transport's (NIXL) agent metadata, opaque bytes for the peer to load.
    #[serde(with = "serde_bytes")]
    pub nixl_md: Vec<u8>,
    /// P, pull with staging: the staging buffer, as regions with the cache's geometry
    /// (one per cache region, `num_blocks` = staging slots + 1); empty without staging.
    #[serde(default)]
    pub staging_regions: Vec<Region>,
}

impl AgentMetadata {
    /// The advertised cache layout (push mode: P plans from D's side with it).
    pub fn layout(&self) -> crate::layout::KvLayout {
        crate::layout::KvLayout {
            regions: self.regions.clone(),
            num_blocks: self.regions.first().map(|r| r.num_blocks).unwrap_or(0),
            blocks_per_logical: self.blocks_per_logical,
        }
    }
}

/// A request for a worker's [`HandshakePayload`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeRequest {
    /// The wire version ([`WIRE_VERSION`]).
    pub version: u32,
    /// The requester's engine id, for logs.
    pub from_engine: String,
    /// The requester's TP rank, for logs.
    pub from_tp_rank: u32,
}

/// Everything a side-channel listener answers. Travels as the body of a
/// [`SideEnvelope`], decoded only once the envelope's version and hash are checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SideRequest {
    /// Answered with a [`HandshakePayload`].
    Handshake(HandshakeRequest),
    /// Push mode: answered with a [`RegisterAck`].
    Register(PushRegistration),
    /// Lease renewal from a decode engine: answered with a [`HeartbeatReply`].
    Heartbeat(HeartbeatRequest),
    /// Debug/metrics view of the blocks this worker holds: answered with JSON text.
    Inspect,
    /// `kv_integrity`: a request's block digests, answered with a
    /// [`DigestSet`](crate::integrity::DigestSet).
    Digests(crate::integrity::DigestsRequest),
}

/// Upper bound on a side-channel request (a push registration is the largest).
pub const MAX_SIDE_REQUEST_BYTES: usize = MAX_REGISTRATION_BYTES + (64 << 10);
/// Upper bound on request ids in one heartbeat.
pub const MAX_HEARTBEAT_IDS: usize = 65_536;
/// Upper bound on the length of each request id in a heartbeat, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 1024;

/// The outer layer of every side-channel request. The listener decodes only this (the
/// body stays bytes), refuses an unknown version or a different compatibility hash with
/// the differing fields named, and only then decodes the body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideEnvelope {
    /// The wire version ([`WIRE_VERSION`]); an unknown one is refused.
    pub version: u32,
    /// The sender's compatibility hash (empty: a diagnostic client; only `Inspect` is
    /// then answered).
    pub compat_hash: String,
    /// The sender's engine id.
    pub from_engine: String,
    /// The facts behind the hash, so a refusal can name what differs.
    pub compat: Option<CompatInfo>,
    /// The sender's kvbridge version ([`KVBRIDGE_VERSION`]).
    pub kvbridge_version: String,
    /// The sender's transfer mode (`"pull"` or `"push"`).
    pub mode: String,
    /// A msgpack [`SideRequest`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// The outer layer of every side-channel answer: an error (with the listener's compat
/// facts when the hashes differ), or the kind-specific answer as bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SideReply {
    /// Why the request was refused, other than a compatibility mismatch.
    pub error: Option<String>,
    /// Set when the refusal is a compatibility mismatch.
    pub incompatible: Option<String>,
    /// The kind-specific answer (see [`SideRequest`]); empty when refused.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// D → P rank: renew the leases of these requests (P's ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// P's request ids to renew.
    pub request_ids: Vec<String>,
    /// The reader will never read these (it is shutting down): end their leases now.
    #[serde(default)]
    pub release: bool,
}

impl HeartbeatRequest {
    /// Refuses too many ids, or ids that are too long.
    pub fn check(&self) -> Result<(), WireError> {
        if self.request_ids.len() > MAX_HEARTBEAT_IDS || self.request_ids.iter().any(|r| r.len() > MAX_REQUEST_ID_BYTES) {
            return Err(WireError::Decode { what: "HeartbeatRequest", reason: "too many or too long request ids".into() });
        }
        Ok(())
    }
}

/// P rank → D: the state of each request named in a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The P engine's incarnation (0: unknown).
    pub epoch: u64,
    /// Still held: (request id, seconds left on the renewed lease).
    pub held: Vec<(String, f64)>,
    /// Released on the readers' word (the normal end).
    pub released: Vec<String>,
    /// Released because the lease ran out: reading now would read blocks that may
    /// already hold another request's KV.
    pub expired: Vec<String>,
    /// Not known to this rank (yet: its lease may still be on the way from P's scheduler).
    pub unknown: Vec<String>,
}

/// A P rank's answer to a push registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterAck {
    /// True when the registration was accepted.
    pub ok: bool,
    /// Why it was refused (`None` when accepted).
    pub error: Option<String>,
}

/// The answer: the hash first, then the agent metadata as still-encoded bytes, so an
/// incompatible peer's metadata is never decoded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HandshakePayload {
    /// The serving engine's compatibility hash ([`compat_hash`]).
    pub compat_hash: String,
    /// The msgpack [`AgentMetadata`], decoded only once the hash matches.
    #[serde(with = "serde_bytes")]
    pub agent_metadata: Vec<u8>,
    /// Set when the listener cannot answer (e.g. caches not registered yet).
    pub error: Option<String>,
    /// The facts the hash covers, so a mismatch can name the fields that differ.
    #[serde(default)]
    pub compat: Option<CompatInfo>,
    /// The serving engine's kvbridge version ([`KVBRIDGE_VERSION`]).
    #[serde(default)]
    pub kvbridge_version: String,
    /// The serving engine's transfer mode (`"pull"` or `"push"`).
    #[serde(default)]
    pub mode: String,
    /// The serving engine's incarnation (see [`ConnectorMetadata::epoch`]; 0: unknown).
    #[serde(default)]
    pub epoch: u64,
    /// The server's clock when it answered (Unix seconds): D estimates the clock offset
    /// it needs to compare P's lease expiry times with its own clock.
    #[serde(default)]
    pub now_unix: f64,
    /// Every rank of the serving engine (its DP rank), where its listener is
    /// ([`crate::ranks`]); empty: the single-node port arithmetic.
    #[serde(default)]
    pub ranks: Vec<crate::ranks::RankAddr>,
}

// ---------------------------------------------------------------------------------------
// Notifications (over NIXL, reader → holder)

/// "I am done with request X": sent by a D rank to the P rank it read from, attached to
/// the READ (or alone, when zero blocks had to be read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notif {
    /// The wire version ([`WIRE_VERSION`]).
    pub version: u32,
    /// The request id as the receiving engine knows it (P's in pull, D's in push).
    pub request_id: String,
    /// The sending engine's id.
    pub from_engine: String,
    /// The sending worker's TP rank.
    pub from_tp_rank: u32,
    /// Whether the transfer succeeded.
    pub ok: bool,
    /// How many notifications the receiving rank gets for this request in all (one per
    /// reading rank of D): it frees the blocks after the last.
    pub expected: u32,
}

impl Notif {
    /// Encodes as msgpack.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        encode("Notif", self)
    }
    /// Decodes, refusing more than [`MAX_NOTIF_BYTES`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, WireError> {
        decode("Notif", b, MAX_NOTIF_BYTES)
    }
}

// ---------------------------------------------------------------------------------------
// Push mode (D → P over the side channel)

/// Upper bound on a push registration: block ids for ~1M blocks.
pub const MAX_REGISTRATION_BYTES: usize = 8 << 20;
/// Upper bound on block ids in a registration, per KV-cache group.
pub const MAX_REGISTRATION_BLOCKS: usize = 1 << 20;

/// "Write request X's KV into these blocks of mine": sent by each D worker rank to every
/// P rank it maps to, as soon as D has allocated the blocks (P may not have finished yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRegistration {
    /// The wire version ([`WIRE_VERSION`]).
    pub version: u32,
    /// Chosen by the proxy and given to both P and D; empty: match on the base request id.
    pub transfer_id: String,
    /// D's request id: the notification P sends after writing names it.
    pub request_id: String,
    /// The P engine this registration is for (checked by P).
    pub target_engine_id: String,
    /// The registering decode engine's id.
    pub engine_id: String,
    /// The registering D rank's side-channel host (P handshakes with it for D's metadata).
    pub host: String,
    /// The registering D rank's own side-channel port.
    pub port: u16,
    /// D's TP size.
    pub tp_size: u32,
    /// The registering D worker's TP rank.
    pub tp_rank: u32,
    /// D's blocks, one list per KV-cache group, covering the end of the prompt (a local
    /// prefix hit covers the start).
    pub block_ids: Vec<Vec<u32>>,
    /// The prompt length in tokens.
    pub num_tokens: u64,
}

impl PushRegistration {
    /// Encodes as msgpack.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        encode("PushRegistration", self)
    }
    /// Decode and check everything that does not need P's state.
    pub fn from_bytes(b: &[u8]) -> Result<Self, WireError> {
        let r: Self = decode("PushRegistration", b, MAX_REGISTRATION_BYTES)?;
        r.check()?;
        Ok(r)
    }

    /// Everything checkable without P's state: version, ids, TP rank and size, sizes.
    pub fn check(&self) -> Result<(), WireError> {
        if self.version != WIRE_VERSION {
            return Err(WireError::Version { got: self.version, want: WIRE_VERSION });
        }
        let bad = |reason: &str| WireError::Decode { what: "PushRegistration", reason: reason.into() };
        if self.request_id.is_empty() || self.engine_id.is_empty() {
            return Err(bad("empty request or engine id"));
        }
        if self.tp_size == 0 || self.tp_rank >= self.tp_size || self.tp_size > 4096 {
            return Err(bad("bad TP rank/size"));
        }
        if self.block_ids.is_empty() || self.block_ids.len() > 16 || self.block_ids.iter().any(|g| g.len() > MAX_REGISTRATION_BLOCKS) {
            return Err(bad("bad block id lists"));
        }
        if self.transfer_id.len() > crate::params::MAX_TRANSFER_ID || self.port == 0 || !crate::params::valid_host(&self.host) {
            return Err(bad("bad transfer id or address"));
        }
        Ok(())
    }
}

/// vLLM appends `-<8 hex digits>` to a client's request id; P and D see different
/// suffixes for the same client request. The base id strips it (as vLLM's
/// `get_base_request_id` does).
pub fn base_request_id(id: &str) -> &str {
    match id.rsplit_once('-') {
        Some((base, tail)) if !base.is_empty() && tail.len() == 8 && tail.bytes().all(|b| b.is_ascii_hexdigit()) => base,
        _ => id,
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;

//! Versioned msgpack (rmp-serde) types that cross a process boundary: scheduler→worker
//! metadata, the handshake, and transfer notifications. Every decode checks a size limit
//! first and returns a typed [`WireError`].
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{CompatInfo, TransferMode};
use crate::error::WireError;
use crate::layout::Region;

/// Bumped on any incompatible change to the types below; part of the compatibility hash.
pub const WIRE_VERSION: u32 = 4;
/// The kvbridge version, also hashed: P and D must run the same release.
pub const KVBRIDGE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Limits on what we accept from a peer.
pub const MAX_HANDSHAKE_BYTES: usize = 64 << 20;
pub const MAX_NOTIF_BYTES: usize = 64 << 10;
pub const MAX_METADATA_BYTES: usize = 256 << 20;

pub fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, WireError> {
    rmp_serde::to_vec_named(v).map_err(|e| WireError::Encode { what, reason: e.to_string() })
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8], limit: usize) -> Result<T, WireError> {
    if bytes.len() > limit {
        return Err(WireError::TooLarge { size: bytes.len(), limit });
    }
    rmp_serde::from_slice(bytes).map_err(|e| WireError::Decode { what, reason: e.to_string() })
}

/// Compatibility hash: sha256 over the wire version, kvbridge version, transfer mode and
/// the model/cache facts. Compared before anything else in a handshake.
pub fn compat_hash(info: &CompatInfo, mode: TransferMode) -> String {
    let mut h = Sha256::new();
    h.update(format!("kvbridge/{KVBRIDGE_VERSION}/wire{WIRE_VERSION}/{}\n", mode.as_str()));
    // Block sizes may differ between P and D (the transfer plan maps them), so they are
    // not part of the hash. serde_json of a struct is field-ordered, so this is canonical.
    let info = CompatInfo { block_size: 0, ..info.clone() };
    h.update(serde_json::to_vec(&info).unwrap_or_default());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// Scheduler → worker

/// Where a request's KV lives on the prefill side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRef {
    pub engine_id: String,
    pub host: String,
    pub port: u16,
    pub request_id: String,
    /// P's block ids, one list per KV-cache group, covering the whole prompt.
    pub block_ids: Vec<Vec<u32>>,
    pub tp_size: u32,
}

/// One request the worker must load (pull: READ remote blocks into `local_block_ids`).
/// Zero local blocks is legal: the worker still notifies P so it frees its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecvReq {
    pub req_id: String,
    /// D's blocks to fill, one list per KV-cache group: the end of the request's blocks
    /// (a local prefix hit covers the rest).
    pub local_block_ids: Vec<Vec<u32>>,
    /// The prompt length in tokens (aligns blocks of different sizes).
    pub num_tokens: u64,
    /// True when nothing is loaded (full local prefix hit, or an abort before
    /// allocation): the worker only notifies P and reports nothing to vLLM.
    pub notify_only: bool,
    pub remote: RemoteRef,
}

/// One request whose blocks P holds for remote readers until notified or expired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendLease {
    pub req_id: String,
    /// Unix time (seconds) after which the worker releases the blocks anyway.
    pub expiry_unix: f64,
    /// How many remote worker ranks must report before the blocks are free.
    pub expected_readers: u32,
}

/// A request the scheduler already knows failed (bad params, role error): the worker
/// reports it as a failed load so vLLM ends it with an error and frees its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedReq {
    pub req_id: String,
    pub reason: String,
}

/// Push, P side: a request whose blocks P writes into the blocks D registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushSend {
    pub req_id: String,
    /// The proxy's transfer id (empty: match on the base request id).
    pub transfer_id: String,
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
    pub req_id: String,
    pub transfer_id: String,
    pub local_block_ids: Vec<Vec<u32>>,
    pub num_tokens: u64,
    /// Nothing to receive (full local prefix hit, or D gave up before allocating): P is
    /// only told, so it frees its blocks now.
    pub notify_only: bool,
    pub engine_id: String,
    pub host: String,
    /// P's base side-channel port; rank q listens at `port + q`.
    pub port: u16,
    pub tp_size: u32,
}

/// Per-step metadata from the scheduler to every worker; opaque bytes to Python.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectorMetadata {
    pub version: u32,
    pub reqs_to_recv: Vec<RecvReq>,
    pub reqs_to_send: Vec<SendLease>,
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
}

impl ConnectorMetadata {
    pub fn is_empty(&self) -> bool {
        self.reqs_to_recv.is_empty()
            && self.reqs_to_send.is_empty()
            && self.reqs_failed.is_empty()
            && self.push_finished.is_empty()
            && self.push_saves.is_empty()
            && self.push_register.is_empty()
            && self.push_aborted.is_empty()
    }
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        encode("ConnectorMetadata", self)
    }
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
    pub engine_id: String,
    pub agent_name: String,
    pub tp_rank: u32,
    pub tp_size: u32,
    /// Logical (scheduler) block size in tokens.
    pub block_size: u32,
    /// Kernel blocks per logical block.
    pub blocks_per_logical: u32,
    pub regions: Vec<Region>,
    #[serde(with = "serde_bytes")]
    pub nixl_md: Vec<u8>,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeRequest {
    pub version: u32,
    /// The requester's engine id, for logs.
    pub from_engine: String,
    pub from_tp_rank: u32,
}

/// Everything a side-channel listener answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SideRequest {
    /// Answered with a [`HandshakePayload`].
    Handshake(HandshakeRequest),
    /// Push mode: answered with a [`RegisterAck`].
    Register(PushRegistration),
}

/// A P rank's answer to a push registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterAck {
    pub ok: bool,
    pub error: Option<String>,
}

/// The answer: the hash first, then the agent metadata as still-encoded bytes, so an
/// incompatible peer's metadata is never decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakePayload {
    pub compat_hash: String,
    #[serde(with = "serde_bytes")]
    pub agent_metadata: Vec<u8>,
    /// Set when the listener cannot answer (e.g. caches not registered yet).
    pub error: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Notifications (over NIXL, reader → holder)

/// "I am done with request X": sent by a D rank to the P rank it read from, attached to
/// the READ (or alone, when zero blocks had to be read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notif {
    pub version: u32,
    pub request_id: String,
    pub from_engine: String,
    pub from_tp_rank: u32,
    pub ok: bool,
    /// How many notifications the receiving rank gets for this request in all (one per
    /// reading rank of D): it frees the blocks after the last.
    pub expected: u32,
}

impl Notif {
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        encode("Notif", self)
    }
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
    pub version: u32,
    /// Chosen by the proxy and given to both P and D; empty: match on the base request id.
    pub transfer_id: String,
    /// D's request id: the notification P sends after writing names it.
    pub request_id: String,
    /// The P engine this registration is for (checked by P).
    pub target_engine_id: String,
    pub engine_id: String,
    pub host: String,
    pub port: u16,
    pub tp_size: u32,
    pub tp_rank: u32,
    /// D's blocks, one list per KV-cache group, covering the end of the prompt (a local
    /// prefix hit covers the start).
    pub block_ids: Vec<Vec<u32>>,
    pub num_tokens: u64,
}

impl PushRegistration {
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
mod tests {
    use super::*;

    #[test]
    fn metadata_roundtrip_and_limits() {
        let m = ConnectorMetadata {
            version: WIRE_VERSION,
            reqs_to_recv: vec![RecvReq {
                req_id: "r".into(),
                local_block_ids: vec![vec![1, 2]],
                num_tokens: 20,
                notify_only: false,
                remote: RemoteRef {
                    engine_id: "p".into(),
                    host: "h".into(),
                    port: 1,
                    request_id: "x".into(),
                    block_ids: vec![vec![5, 6]],
                    tp_size: 1,
                },
            }],
            reqs_to_send: vec![SendLease { req_id: "s".into(), expiry_unix: 1.5, expected_readers: 1 }],
            reqs_failed: vec![],
            ..Default::default()
        };
        let b = m.to_bytes().unwrap();
        assert_eq!(ConnectorMetadata::from_bytes(&b).unwrap(), m);
        assert!(ConnectorMetadata::from_bytes(&[]).unwrap().is_empty());
        assert!(matches!(ConnectorMetadata::from_bytes(b"\xc1garbage"), Err(WireError::Decode { .. })));
        let big = vec![0u8; MAX_NOTIF_BYTES + 1];
        assert!(matches!(Notif::from_bytes(&big), Err(WireError::TooLarge { .. })));
        let mut old = m.clone();
        old.version = 99;
        assert!(matches!(ConnectorMetadata::from_bytes(&old.to_bytes().unwrap()), Err(WireError::Version { .. })));
    }

    #[test]
    fn compat_hash_depends_on_model_facts() {
        let a = CompatInfo { model: "m".into(), block_size: 16, ..Default::default() };
        let mut b = a.clone();
        assert_eq!(compat_hash(&a, TransferMode::Pull), compat_hash(&b, TransferMode::Pull));
        b.block_size = 32;
        assert_eq!(compat_hash(&a, TransferMode::Pull), compat_hash(&b, TransferMode::Pull), "block sizes may differ");
        b.head_size = 64;
        assert_ne!(compat_hash(&a, TransferMode::Pull), compat_hash(&b, TransferMode::Pull));
    }
}

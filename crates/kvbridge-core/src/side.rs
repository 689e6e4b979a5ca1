//! The side channel's messages, sans-IO: who an engine speaks as ([`Identity`], which
//! stamps every request's [`SideEnvelope`]), what a listener answers to each request
//! ([`answer`]: pure apart from the handlers, so it is fuzzed directly) and how a client
//! opens a [`SideReply`] ([`open_reply`]). The sockets, tasks and timers are
//! `kvbridge-driver`'s (`side_channel`).
// Peer and user data is decoded here: no indexing that could panic on it.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]
use std::sync::{Arc, Mutex};

use crate::config::CompatInfo;
use crate::error::{HandshakeError, WireError};
use crate::integrity::{DigestSet, DigestsRequest};
use crate::wire::{
    self, HandshakePayload, HeartbeatReply, HeartbeatRequest, PushRegistration, RegisterAck, SideEnvelope, SideReply, SideRequest,
    MAX_HANDSHAKE_BYTES, MAX_REQUEST_ID_BYTES, MAX_SIDE_REQUEST_BYTES,
};

/// The handshake payload a listener serves; set when caches are (re)registered. Its
/// `now_unix` is stamped per answer.
pub type PayloadCell = Arc<Mutex<Option<HandshakePayload>>>;

/// Push mode (P): called on the side-channel thread with each decoded registration;
/// `Err` is sent back to the D rank as the reason it was refused.
pub type RegisterHandler = Arc<dyn Fn(PushRegistration) -> Result<(), String> + Send + Sync>;
/// P: a decode engine (`from_engine`) renews its leases.
pub type HeartbeatHandler = Arc<dyn Fn(&str, HeartbeatRequest) -> HeartbeatReply + Send + Sync>;
/// The accounting view (JSON text) served to `Inspect` requests.
pub type InspectHandler = Arc<dyn Fn() -> String + Send + Sync>;
/// P with `kv_integrity`: a request's block digests.
pub type DigestsHandler = Arc<dyn Fn(&DigestsRequest) -> DigestSet + Send + Sync>;

/// What a listener does with each kind of request beyond handshakes.
#[derive(Clone, Default)]
pub struct Handlers {
    /// Push registrations (P); `None`: they are refused.
    pub register: Option<RegisterHandler>,
    /// Lease heartbeats (P); `None`: answered with an error.
    pub heartbeat: Option<HeartbeatHandler>,
    /// `Inspect` requests; `None`: answered with an error.
    pub inspect: Option<InspectHandler>,
    /// Digest requests (`kv_integrity`); `None`: answered with a `missing` set.
    pub digests: Option<DigestsHandler>,
}

/// Who this side channel speaks for: stamped on every request it sends, and checked on
/// every request it serves.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// This engine's id.
    pub engine_id: String,
    /// Empty: accept any hash (tools and tests).
    pub compat_hash: String,
    /// The facts behind `compat_hash`, sent so a refusal can name what differs.
    pub compat: Option<CompatInfo>,
    /// This engine's transfer mode (`"pull"` or `"push"`).
    pub mode: String,
    /// Refuse requests whose hash differs (`enforce_handshake_compat`).
    pub enforce: bool,
}

impl Identity {
    /// `req` in this identity's envelope, encoded.
    pub fn envelope(&self, req: &SideRequest) -> Result<Vec<u8>, WireError> {
        wire::encode(
            "SideEnvelope",
            &SideEnvelope {
                version: wire::WIRE_VERSION,
                compat_hash: self.compat_hash.clone(),
                from_engine: self.engine_id.clone(),
                compat: self.compat.clone(),
                kvbridge_version: wire::KVBRIDGE_VERSION.to_string(),
                mode: self.mode.clone(),
                body: wire::encode("SideRequest", req)?,
            },
        )
    }
}

/// Unwrap a [`SideReply`]: its body, or the refusal as a typed error.
pub fn open_reply(addr: &str, reply: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    let r: SideReply = wire::decode("SideReply", reply, MAX_HANDSHAKE_BYTES)?;
    match (r.incompatible, r.error) {
        (Some(detail), _) => Err(HandshakeError::Incompatible { addr: addr.to_string(), detail }),
        (None, Some(reason)) => Err(HandshakeError::Rejected { addr: addr.to_string(), reason }),
        (None, None) => Ok(r.body),
    }
}

fn reply_err(error: String) -> Vec<u8> {
    wire::encode("SideReply", &SideReply { error: Some(error), ..Default::default() }).unwrap_or_default()
}

fn reply_ok(body: Vec<u8>) -> Vec<u8> {
    wire::encode("SideReply", &SideReply { body, ..Default::default() }).unwrap_or_default()
}

/// Answer one side-channel request (a msgpack [`SideEnvelope`]) as a listener with
/// `identity` at `now_unix` (stamped on handshake payloads): pure apart from the
/// handlers, so it is fuzzed directly. In order: the size
/// limit, the envelope, its version, the compatibility hash, then the body.
pub fn answer(identity: &Identity, payload: &PayloadCell, handlers: &Handlers, bytes: &[u8], now_unix: f64) -> Vec<u8> {
    let env: SideEnvelope = match wire::decode("SideEnvelope", bytes, MAX_SIDE_REQUEST_BYTES) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "kvbridge: malformed side-channel request");
            return reply_err(format!("malformed side-channel request: {e}"));
        }
    };
    if env.version != wire::WIRE_VERSION {
        return reply_err(format!("wire version {} not supported (this engine speaks {})", env.version, wire::WIRE_VERSION));
    }
    if env.compat_hash.is_empty() {
        // A diagnostic client: only the (tiny) inspect request is answered.
        return match wire::decode::<SideRequest>("SideRequest", &env.body, 64) {
            Ok(SideRequest::Inspect) => match &handlers.inspect {
                Some(h) => reply_ok(h().into_bytes()),
                None => reply_err("this listener has no accounting view".into()),
            },
            _ => reply_err("a request without a compatibility hash can only inspect".into()),
        };
    }
    if !identity.compat_hash.is_empty() && env.compat_hash != identity.compat_hash {
        let detail = wire::describe_mismatch(
            &identity.compat.clone().unwrap_or_default(),
            &identity.mode,
            env.compat.as_ref(),
            &env.kvbridge_version,
            &env.mode,
        );
        if identity.enforce {
            tracing::warn!(from = %env.from_engine, %detail, "kvbridge: refusing a request from an incompatible engine");
            return wire::encode("SideReply", &SideReply { incompatible: Some(detail), ..Default::default() }).unwrap_or_default();
        }
        tracing::warn!(from = %env.from_engine, %detail, "kvbridge: compatibility hash differs but enforce_handshake_compat=false; serving");
    }
    let req = match wire::decode::<SideRequest>("SideRequest", &env.body, MAX_SIDE_REQUEST_BYTES) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(from = %env.from_engine, error = %e, "kvbridge: malformed side-channel request body");
            return reply_err(format!("malformed side-channel request: {e}"));
        }
    };
    match req {
        SideRequest::Register(_) if handlers.register.is_none() => {
            reply_ok(ack(Err("this engine does not accept push registrations".into())))
        }
        SideRequest::Register(reg) => {
            // Re-check what decoding alone does not (version, sizes, ranks).
            let res = match (reg.check(), &handlers.register) {
                (Ok(()), Some(h)) => h(reg),
                (Err(e), _) => Err(format!("malformed registration: {e}")),
                (Ok(()), None) => Err("no handler".into()),
            };
            if let Err(e) = &res {
                tracing::warn!(error = %e, "kvbridge: push registration refused");
            }
            reply_ok(ack(res))
        }
        SideRequest::Heartbeat(hb) => match (hb.check(), &handlers.heartbeat) {
            (Err(e), _) => reply_err(e.to_string()),
            (Ok(()), None) => reply_err("this engine holds no leases".into()),
            (Ok(()), Some(h)) => match wire::encode("HeartbeatReply", &h(&env.from_engine, hb)) {
                Ok(b) => reply_ok(b),
                Err(e) => reply_err(e.to_string()),
            },
        },
        SideRequest::Inspect => match &handlers.inspect {
            Some(h) => reply_ok(h().into_bytes()),
            None => reply_err("this listener has no accounting view".into()),
        },
        SideRequest::Digests(r) => {
            let set = match &handlers.digests {
                _ if r.key.len() > MAX_REQUEST_ID_BYTES + 16 => DigestSet::missing("request key too long"),
                Some(h) => h(&r),
                None => DigestSet::missing("this engine keeps no KV digests (kv_integrity=off)"),
            };
            match wire::encode("DigestSet", &set) {
                Ok(b) => reply_ok(b),
                Err(e) => reply_err(e.to_string()),
            }
        }
        SideRequest::Handshake(r) if r.version != wire::WIRE_VERSION => {
            reply_err(format!("wire version {} not supported (want {})", r.version, wire::WIRE_VERSION))
        }
        SideRequest::Handshake(r) => {
            tracing::debug!(from = %r.from_engine, rank = r.from_tp_rank, "kvbridge: serving handshake");
            match payload.lock().ok().and_then(|p| p.clone()) {
                Some(mut p) => {
                    p.now_unix = now_unix;
                    match wire::encode("HandshakePayload", &p) {
                        Ok(b) => reply_ok(b),
                        Err(e) => reply_err(e.to_string()),
                    }
                }
                None => reply_err("KV caches not registered yet".into()),
            }
        }
    }
}

fn ack(res: Result<(), String>) -> Vec<u8> {
    let a = match res {
        Ok(()) => RegisterAck { ok: true, error: None },
        Err(e) => RegisterAck { ok: false, error: Some(e) },
    };
    wire::encode("RegisterAck", &a).unwrap_or_default()
}

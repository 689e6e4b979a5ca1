//! The handshake side channel: ZeroMQ (the `zeromq` crate) on a small tokio runtime.
//! This is the only module of the core that does network I/O.
//!
//! Each worker binds a ROUTER socket on the configured host only; a peer connects with a
//! DEALER and sends a msgpack [`SideEnvelope`] (version, compatibility hash, sender) whose
//! body is a [`SideRequest`]: a handshake (answered with a [`HandshakePayload`]), a push
//! registration (a [`RegisterAck`]), a lease heartbeat (a [`HeartbeatReply`]) or an
//! accounting query (JSON). The envelope is checked before the body is decoded; every
//! answer is a [`SideReply`]. Frames are size-capped by the vendored zeromq codec, every
//! request has a deadline, and a panicking socket task is caught and turned into an error.
use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::runtime::Runtime;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::config::CompatInfo;
use crate::error::{HandshakeError, WireError};
use crate::wire::{
    self, HandshakePayload, HandshakeRequest, HeartbeatReply, HeartbeatRequest, PushRegistration, RegisterAck, SideEnvelope, SideReply,
    SideRequest, MAX_HANDSHAKE_BYTES, MAX_SIDE_REQUEST_BYTES,
};

/// Resolve a host name to a literal IP for zeromq endpoints (`localhost` → `127.0.0.1`).
pub fn resolve_host(host: &str, port: u16) -> Result<String, String> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = h.parse::<std::net::IpAddr>() {
        return Ok(match ip {
            std::net::IpAddr::V6(v6) => format!("tcp://[{v6}]:{port}"),
            v4 => format!("tcp://{v4}:{port}"),
        });
    }
    let addrs: Vec<_> = (h, port).to_socket_addrs().map_err(|e| format!("cannot resolve {host:?}: {e}"))?.collect();
    let a = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).ok_or_else(|| format!("{host:?} resolves to nothing"))?;
    Ok(match a {
        std::net::SocketAddr::V6(v6) => format!("tcp://[{}]:{port}", v6.ip()),
        std::net::SocketAddr::V4(v4) => format!("tcp://{}:{port}", v4.ip()),
    })
}

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

/// What a listener does with each kind of request beyond handshakes.
#[derive(Clone, Default)]
pub struct Handlers {
    /// Push registrations (P); `None`: they are refused.
    pub register: Option<RegisterHandler>,
    /// Lease heartbeats (P); `None`: answered with an error.
    pub heartbeat: Option<HeartbeatHandler>,
    /// `Inspect` requests; `None`: answered with an error.
    pub inspect: Option<InspectHandler>,
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
    fn envelope(&self, req: &SideRequest) -> Result<Vec<u8>, WireError> {
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

/// Owns the runtime (one worker thread, parked when idle) and the listener task.
pub struct SideChannel {
    rt: Option<Runtime>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    identity: Identity,
}

impl SideChannel {
    /// A side channel with an empty [`Identity`] (accepts any hash; for tools and tests).
    pub fn new() -> std::io::Result<Self> {
        Self::with_identity(Identity::default())
    }

    /// A side channel that speaks for `identity`; starts its runtime thread.
    pub fn with_identity(identity: Identity) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("kvbridge-side")
            .enable_all()
            .build()?;
        Ok(Self { rt: Some(rt), listener: Mutex::new(None), identity })
    }

    fn rt(&self) -> &Runtime {
        // Present from `new` until `drop`.
        self.rt.as_ref().expect("side-channel runtime")
    }

    /// Who this side channel speaks for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Bind `host:port` (that address only) and serve `payload` to every handshake
    /// request. Returns the bound endpoint, or an error if the port cannot be bound.
    pub fn serve(&self, host: &str, port: u16, payload: PayloadCell) -> Result<String, HandshakeError> {
        self.serve_with(host, port, payload, Handlers::default())
    }

    /// [`serve`](Self::serve), also answering registrations, heartbeats and inspection
    /// with `handlers`.
    pub fn serve_with(&self, host: &str, port: u16, payload: PayloadCell, handlers: Handlers) -> Result<String, HandshakeError> {
        let endpoint = resolve_host(host, port).map_err(|reason| HandshakeError::Io { addr: format!("{host}:{port}"), reason })?;
        let mut sock = RouterSocket::new();
        let bound = self
            .rt()
            .block_on(sock.bind(&endpoint))
            .map_err(|e| HandshakeError::Io { addr: endpoint.clone(), reason: format!("cannot bind handshake listener: {e}") })?;
        let ep = endpoint.clone();
        let identity = Arc::new(self.identity.clone());
        let handle = self.rt().spawn(async move {
            // Supervise: a panic inside the zeromq socket (peer-triggered) must not
            // leave the engine without a listener.
            let mut sock = Some(sock);
            loop {
                let s = match sock.take() {
                    Some(s) => s,
                    None => {
                        let mut s = RouterSocket::new();
                        if let Err(e) = s.bind(&ep).await {
                            tracing::error!(endpoint = %ep, error = %e, "kvbridge: cannot re-bind handshake listener");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                        s
                    }
                };
                let res = tokio::spawn(serve_loop(s, identity.clone(), payload.clone(), handlers.clone())).await;
                if let Err(e) = res {
                    tracing::error!(endpoint = %ep, error = %e, "kvbridge: handshake listener crashed; restarting");
                }
            }
        });
        if let Ok(mut l) = self.listener.lock() {
            if let Some(old) = l.replace(handle) {
                old.abort();
            }
        }
        tracing::info!(endpoint = %bound, "kvbridge: handshake listener up");
        Ok(endpoint)
    }

    /// Fetch a peer's handshake payload; `done` runs on the side-channel thread with the
    /// raw payload bytes or a typed error. Timeouts and connection errors are retried
    /// `retries` times, backing off from 100 ms. Never blocks the caller.
    pub fn fetch(
        &self,
        host: String,
        port: u16,
        req: HandshakeRequest,
        timeout: Duration,
        retries: u32,
        done: impl FnOnce(Result<Vec<u8>, HandshakeError>) + Send + 'static,
    ) {
        self.request(host, port, SideRequest::Handshake(req), timeout, retries, done);
    }

    /// Push mode (D): send a registration to a P rank; `done` gets `Ok(())` once P
    /// accepted it, or the reason it was refused or could not be delivered. Not retried
    /// (a registration that did arrive would be refused as a duplicate).
    pub fn register(
        &self,
        host: String,
        port: u16,
        reg: PushRegistration,
        timeout: Duration,
        done: impl FnOnce(Result<(), String>) + Send + 'static,
    ) {
        self.request(host, port, SideRequest::Register(reg), timeout, 0, move |res| {
            done(res.map_err(|e| e.to_string()).and_then(|b| match wire::decode::<RegisterAck>("RegisterAck", &b, 64 << 10) {
                Ok(RegisterAck { ok: true, .. }) => Ok(()),
                Ok(RegisterAck { error, .. }) => Err(error.unwrap_or_else(|| "refused".into())),
                Err(e) => Err(e.to_string()),
            }))
        });
    }

    /// D: renew leases on a P rank. Not retried: the next heartbeat is the retry.
    pub fn heartbeat(
        &self,
        host: String,
        port: u16,
        req: HeartbeatRequest,
        timeout: Duration,
        done: impl FnOnce(Result<HeartbeatReply, HandshakeError>) + Send + 'static,
    ) {
        self.request(host, port, SideRequest::Heartbeat(req), timeout, 0, move |res| {
            done(res.and_then(|b| Ok(wire::decode::<HeartbeatReply>("HeartbeatReply", &b, MAX_HANDSHAKE_BYTES)?)))
        });
    }

    /// The accounting view (JSON text) of the worker listening at `host:port`.
    pub fn inspect_blocking(&self, host: &str, port: u16, timeout: Duration) -> Result<String, HandshakeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.request(host.to_string(), port, SideRequest::Inspect, timeout, 0, move |r| {
            let _ = tx.send(r);
        });
        let bytes = rx
            .recv()
            .unwrap_or_else(|_| Err(HandshakeError::Io { addr: format!("{host}:{port}"), reason: "side channel stopped".into() }))?;
        String::from_utf8(bytes).map_err(|e| HandshakeError::Io { addr: format!("{host}:{port}"), reason: e.to_string() })
    }

    fn request(
        &self,
        host: String,
        port: u16,
        req: SideRequest,
        timeout: Duration,
        retries: u32,
        done: impl FnOnce(Result<Vec<u8>, HandshakeError>) + Send + 'static,
    ) {
        let addr = format!("{host}:{port}");
        let body = self.identity.envelope(&req);
        self.rt().spawn(async move {
            let body = match body {
                Ok(b) => b,
                Err(e) => return done(Err(e.into())),
            };
            let mut attempt = 0u32;
            let res = loop {
                let (h, b) = (host.clone(), body.clone());
                let task = tokio::spawn(async move { fetch_once(&h, port, b).await });
                let res = match tokio::time::timeout(timeout, task).await {
                    Err(_) => Err(HandshakeError::Timeout { addr: addr.clone(), timeout_ms: timeout.as_millis() as u64 }),
                    Ok(Err(join)) => Err(HandshakeError::Io { addr: addr.clone(), reason: format!("side-channel task failed: {join}") }),
                    Ok(Ok(r)) => r,
                };
                let transient = matches!(res, Err(HandshakeError::Timeout { .. } | HandshakeError::Io { .. }));
                if !transient || attempt >= retries {
                    break res;
                }
                let backoff = Duration::from_millis(100u64 << attempt.min(6));
                tracing::debug!(%addr, attempt, ?backoff, "kvbridge: side-channel request failed; retrying");
                tokio::time::sleep(backoff).await;
                attempt += 1;
            };
            done(res.and_then(|reply| open_reply(&addr, &reply)));
        });
    }

    /// Blocking variant of [`fetch`](Self::fetch), for tools and tests.
    pub fn fetch_blocking(&self, host: &str, port: u16, req: HandshakeRequest, timeout: Duration) -> Result<Vec<u8>, HandshakeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.fetch(host.to_string(), port, req, timeout, 0, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| Err(HandshakeError::Io { addr: format!("{host}:{port}"), reason: "side channel stopped".into() }))
    }
}

/// Unwrap a [`SideReply`]: its body, or the refusal as a typed error.
fn open_reply(addr: &str, reply: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    let r: SideReply = wire::decode("SideReply", reply, MAX_HANDSHAKE_BYTES)?;
    match (r.incompatible, r.error) {
        (Some(detail), _) => Err(HandshakeError::Incompatible { addr: addr.to_string(), detail }),
        (None, Some(reason)) => Err(HandshakeError::Rejected { addr: addr.to_string(), reason }),
        (None, None) => Ok(r.body),
    }
}

impl Drop for SideChannel {
    fn drop(&mut self) {
        if let Ok(mut l) = self.listener.lock() {
            if let Some(h) = l.take() {
                h.abort();
            }
        }
        // Never blocks, so it is safe even when the last owner is a side-channel task.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// How long the listener waits to hand one reply to a peer's connection before dropping
/// that peer. A 64 MiB handshake payload takes well under a second even at 1 Gb/s.
pub const REPLY_SEND_TIMEOUT: Duration = Duration::from_secs(2);

async fn serve_loop(mut sock: RouterSocket, identity: Arc<Identity>, payload: PayloadCell, handlers: Handlers) {
    loop {
        let msg = match sock.recv().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "kvbridge: handshake recv error");
                continue;
            }
        };
        let frames = msg.into_vec();
        if frames.len() < 2 {
            continue;
        }
        let id = frames[0].clone();
        let reply = answer(&identity, &payload, &handlers, &frames[frames.len() - 1]);
        let mut out = ZmqMessage::from(Bytes::from(reply));
        out.push_front(id.clone());
        // One listener serves every peer in turn, so a peer that stops reading (its TCP
        // window full) must not hold the loop: past the timeout it is dropped.
        match tokio::time::timeout(REPLY_SEND_TIMEOUT, sock.send(out)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "kvbridge: side-channel reply failed"),
            Err(_) => {
                tracing::warn!(
                    timeout_ms = REPLY_SEND_TIMEOUT.as_millis() as u64,
                    "kvbridge: a side-channel peer did not read its reply in time; dropping it"
                );
                sock.disconnect_peer(id);
            }
        }
    }
}

fn reply_err(error: String) -> Vec<u8> {
    wire::encode("SideReply", &SideReply { error: Some(error), ..Default::default() }).unwrap_or_default()
}

fn reply_ok(body: Vec<u8>) -> Vec<u8> {
    wire::encode("SideReply", &SideReply { body, ..Default::default() }).unwrap_or_default()
}

/// Answer one side-channel request (a msgpack [`SideEnvelope`]) as a listener with
/// `identity`: pure apart from the handlers, so it is fuzzed directly. In order: the size
/// limit, the envelope, its version, the compatibility hash, then the body.
pub fn answer(identity: &Identity, payload: &PayloadCell, handlers: &Handlers, bytes: &[u8]) -> Vec<u8> {
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
        SideRequest::Handshake(r) if r.version != wire::WIRE_VERSION => {
            reply_err(format!("wire version {} not supported (want {})", r.version, wire::WIRE_VERSION))
        }
        SideRequest::Handshake(r) => {
            tracing::debug!(from = %r.from_engine, rank = r.from_tp_rank, "kvbridge: serving handshake");
            match payload.lock().ok().and_then(|p| p.clone()) {
                Some(mut p) => {
                    p.now_unix = now_unix();
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

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn ack(res: Result<(), String>) -> Vec<u8> {
    let a = match res {
        Ok(()) => RegisterAck { ok: true, error: None },
        Err(e) => RegisterAck { ok: false, error: Some(e) },
    };
    wire::encode("RegisterAck", &a).unwrap_or_default()
}

async fn fetch_once(host: &str, port: u16, body: Vec<u8>) -> Result<Vec<u8>, HandshakeError> {
    let addr = format!("{host}:{port}");
    let endpoint = resolve_host(host, port).map_err(|reason| HandshakeError::Io { addr: addr.clone(), reason })?;
    let mut sock = DealerSocket::new();
    // zeromq-rs connects eagerly; retry briefly so a listener that is just starting works.
    let mut last = String::new();
    let mut connected = false;
    for attempt in 0..8u32 {
        match sock.connect(&endpoint).await {
            Ok(()) => {
                connected = true;
                break;
            }
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt + 1))).await;
            }
        }
    }
    if !connected {
        return Err(HandshakeError::Io { addr, reason: format!("cannot connect: {last}") });
    }
    sock.send(ZmqMessage::from(Bytes::from(body))).await.map_err(|e| HandshakeError::Io { addr: addr.clone(), reason: e.to_string() })?;
    let reply = sock.recv().await.map_err(|e| HandshakeError::Io { addr: addr.clone(), reason: e.to_string() })?;
    let frames = reply.into_vec();
    let last = frames.last().ok_or_else(|| HandshakeError::Io { addr: addr.clone(), reason: "empty reply".into() })?;
    if last.len() > MAX_HANDSHAKE_BYTES {
        return Err(crate::error::WireError::TooLarge { size: last.len(), limit: MAX_HANDSHAKE_BYTES }.into());
    }
    Ok(last.to_vec())
}

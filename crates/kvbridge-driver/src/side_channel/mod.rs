//! The side channel: ZeroMQ (the `zeromq` crate) on a small tokio runtime.
//!
//! Each worker binds a ROUTER socket on the configured host only ([`serve`]); a peer
//! connects with a DEALER and sends a msgpack `SideEnvelope` whose body is a handshake, a
//! push registration, a lease heartbeat or an accounting query. What a listener answers is
//! decided sans-IO by [`kvbridge_core::side::answer`]; this module owns the sockets, the
//! tasks and the deadlines:
//! - one connection per peer, reused by every request to it ([`pool`]);
//! - every request has a deadline, and a request past it is cancelled: its task ends and
//!   the connection it held is closed;
//! - host names are resolved on the blocking pool, never on the runtime's one thread
//!   ([`resolve`]);
//! - frames are size-capped by the vendored zeromq codec.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvbridge_core::error::HandshakeError;
use kvbridge_core::integrity::{DigestSet, DigestsRequest};
use kvbridge_core::side::open_reply;
pub use kvbridge_core::side::{Handlers, HeartbeatHandler, Identity, InspectHandler, PayloadCell, RegisterHandler};
use kvbridge_core::wire::{
    self, HandshakeRequest, HeartbeatReply, HeartbeatRequest, PushRegistration, RegisterAck, SideRequest, MAX_HANDSHAKE_BYTES,
};
use tokio::runtime::Runtime;
use zeromq::{RouterSocket, Socket};

pub mod pool;
pub mod resolve;
pub mod serve;

pub use resolve::{resolve_host, system_resolver, Resolver};
pub use serve::REPLY_SEND_TIMEOUT;

use serve::AbortOnDrop;

/// Owns the runtime (one worker thread, parked when idle), the listener task and the
/// connection pool.
pub struct SideChannel {
    rt: Option<Runtime>,
    listener: Mutex<Option<AbortOnDrop>>,
    identity: Identity,
    pool: Arc<pool::Pool>,
}

impl SideChannel {
    /// A side channel with an empty [`Identity`] (accepts any hash; for tools and tests).
    pub fn new() -> std::io::Result<Self> {
        Self::with_identity(Identity::default())
    }

    /// A side channel that speaks for `identity`; starts its runtime thread.
    pub fn with_identity(identity: Identity) -> std::io::Result<Self> {
        Self::with_resolver(identity, system_resolver())
    }

    /// [`with_identity`](Self::with_identity), resolving host names with `resolver`.
    pub fn with_resolver(identity: Identity, resolver: Resolver) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            // Name lookups (each bounded by its request's deadline, but a hung system
            // resolver keeps its thread) and nothing else.
            .max_blocking_threads(8)
            .thread_name("kvbridge-side")
            .enable_all()
            .build()?;
        let pool = Arc::new(pool::Pool::new(resolver));
        let weak = Arc::downgrade(&pool);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(pool::IDLE_CLOSE / 4);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(p) => p.reap(pool::IDLE_CLOSE),
                    None => return,
                }
            }
        });
        Ok(Self { rt: Some(rt), listener: Mutex::new(None), identity, pool })
    }

    fn rt(&self) -> Result<&Runtime, HandshakeError> {
        self.rt.as_ref().ok_or_else(|| HandshakeError::Io { addr: String::new(), reason: "side channel stopped".into() })
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
        let rt = self.rt()?;
        // The previous listener (if any) lets go of its port first.
        if let Ok(mut l) = self.listener.lock() {
            l.take();
        }
        let mut sock = RouterSocket::new();
        let bound = rt
            .block_on(async {
                // A replaced listener's socket closes once its aborted task is dropped.
                let mut tries = 0;
                loop {
                    match sock.bind(&endpoint).await {
                        Err(_) if tries < 20 => tries += 1,
                        res => break res,
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .map_err(|e| HandshakeError::Io { addr: endpoint.clone(), reason: format!("cannot bind handshake listener: {e}") })?;
        let identity = Arc::new(self.identity.clone());
        let handle = rt.spawn(serve::supervise(sock, endpoint.clone(), identity, payload, handlers));
        if let Ok(mut l) = self.listener.lock() {
            *l = Some(AbortOnDrop(handle));
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

    /// D, `kv_integrity`: a request's block digests from a P rank. Not retried (a lost
    /// reply leaves the load unverified, not failed).
    pub fn digests(
        &self,
        host: String,
        port: u16,
        req: DigestsRequest,
        timeout: Duration,
        done: impl FnOnce(Result<DigestSet, HandshakeError>) + Send + 'static,
    ) {
        self.request(host, port, SideRequest::Digests(req), timeout, 0, move |res| {
            done(res.and_then(|b| Ok(wire::decode::<DigestSet>("DigestSet", &b, MAX_HANDSHAKE_BYTES)?)))
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

    /// Blocking variant of [`fetch`](Self::fetch), for tools and tests.
    pub fn fetch_blocking(&self, host: &str, port: u16, req: HandshakeRequest, timeout: Duration) -> Result<Vec<u8>, HandshakeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.fetch(host.to_string(), port, req, timeout, 0, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| Err(HandshakeError::Io { addr: format!("{host}:{port}"), reason: "side channel stopped".into() }))
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
        let body = match (self.identity.envelope(&req), self.rt()) {
            (Ok(b), Ok(rt)) => (b, rt),
            (Err(e), _) => return done(Err(e.into())),
            (_, Err(e)) => return done(Err(e)),
        };
        let (body, rt) = body;
        let pool = self.pool.clone();
        rt.spawn(async move {
            let mut attempt = 0u32;
            let res = loop {
                // The deadline drops the call, and with it the connection it holds.
                let res = match tokio::time::timeout(timeout, pool.call(&host, port, body.clone())).await {
                    Err(_) => Err(HandshakeError::Timeout { addr: addr.clone(), timeout_ms: timeout.as_millis() as u64 }),
                    Ok(r) => r,
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

    /// Side-channel connections open now (pooled or in use), at most one per peer.
    pub fn open_connections(&self) -> usize {
        self.pool.open()
    }

    /// Connections opened so far (a reused connection is not counted again).
    pub fn connections_opened(&self) -> u64 {
        self.pool.opened()
    }

    /// Tasks alive on the side channel's runtime (the listener's, the reaper, requests in
    /// flight and the zeromq sockets' own).
    pub fn tasks_alive(&self) -> usize {
        self.rt.as_ref().map_or(0, |rt| rt.metrics().num_alive_tasks())
    }
}

impl Drop for SideChannel {
    fn drop(&mut self) {
        if let Ok(mut l) = self.listener.lock() {
            l.take();
        }
        // Never blocks, so it is safe even when the last owner is a side-channel task.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

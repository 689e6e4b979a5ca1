//! The handshake side channel: ZeroMQ (the `zeromq` crate) on a small tokio runtime.
//! This is the only module of the core that does network I/O.
//!
//! Each worker binds a ROUTER socket; a peer connects with a DEALER and sends a msgpack
//! [`SideRequest`]: a handshake request, answered with a msgpack [`HandshakePayload`], or
//! (push mode) a D rank's [`PushRegistration`], answered with a [`RegisterAck`] once the
//! registration handler accepted or refused it. Every request has a deadline, and a
//! panicking socket task is caught and turned into an error.
use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::runtime::Runtime;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::error::HandshakeError;
use crate::wire::{
    self, HandshakePayload, HandshakeRequest, PushRegistration, RegisterAck, SideRequest, MAX_HANDSHAKE_BYTES, MAX_REGISTRATION_BYTES,
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

/// The payload a listener serves; updated when caches are (re)registered.
pub type PayloadCell = Arc<Mutex<Option<Vec<u8>>>>;

/// Push mode (P): called on the side-channel thread with each decoded registration;
/// `Err` is sent back to the D rank as the reason it was refused.
pub type RegisterHandler = Arc<dyn Fn(PushRegistration) -> Result<(), String> + Send + Sync>;

/// Owns the runtime (one worker thread, parked when idle) and the listener task.
pub struct SideChannel {
    rt: Option<Runtime>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl SideChannel {
    pub fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("kvbridge-side")
            .enable_all()
            .build()?;
        Ok(Self { rt: Some(rt), listener: Mutex::new(None) })
    }

    fn rt(&self) -> &Runtime {
        // Present from `new` until `drop`.
        self.rt.as_ref().expect("side-channel runtime")
    }

    /// Bind `host:port` and serve `payload` to every handshake request. Returns the bound
    /// endpoint, or an error if the port cannot be bound.
    pub fn serve(&self, host: &str, port: u16, payload: PayloadCell) -> Result<String, HandshakeError> {
        self.serve_with(host, port, payload, None)
    }

    /// [`serve`](Self::serve), also accepting push registrations when `on_register` is set.
    pub fn serve_with(
        &self,
        host: &str,
        port: u16,
        payload: PayloadCell,
        on_register: Option<RegisterHandler>,
    ) -> Result<String, HandshakeError> {
        let endpoint = resolve_host(host, port).map_err(|reason| HandshakeError::Io { addr: format!("{host}:{port}"), reason })?;
        let mut sock = RouterSocket::new();
        let bound = self
            .rt()
            .block_on(sock.bind(&endpoint))
            .map_err(|e| HandshakeError::Io { addr: endpoint.clone(), reason: format!("cannot bind handshake listener: {e}") })?;
        let ep = endpoint.clone();
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
                let p = payload.clone();
                let res = tokio::spawn(serve_loop(s, p, on_register.clone())).await;
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
    /// raw payload bytes or a typed error. Never blocks the caller.
    pub fn fetch(
        &self,
        host: String,
        port: u16,
        req: HandshakeRequest,
        timeout: Duration,
        done: impl FnOnce(Result<Vec<u8>, HandshakeError>) + Send + 'static,
    ) {
        self.request(host, port, SideRequest::Handshake(req), timeout, done);
    }

    /// Push mode (D): send a registration to a P rank; `done` gets `Ok(())` once P
    /// accepted it, or the reason it was refused or could not be delivered.
    pub fn register(
        &self,
        host: String,
        port: u16,
        reg: PushRegistration,
        timeout: Duration,
        done: impl FnOnce(Result<(), String>) + Send + 'static,
    ) {
        self.request(host, port, SideRequest::Register(reg), timeout, move |res| {
            done(res.map_err(|e| e.to_string()).and_then(|b| match wire::decode::<RegisterAck>("RegisterAck", &b, 64 << 10) {
                Ok(RegisterAck { ok: true, .. }) => Ok(()),
                Ok(RegisterAck { error, .. }) => Err(error.unwrap_or_else(|| "refused".into())),
                Err(e) => Err(e.to_string()),
            }))
        });
    }

    fn request(
        &self,
        host: String,
        port: u16,
        req: SideRequest,
        timeout: Duration,
        done: impl FnOnce(Result<Vec<u8>, HandshakeError>) + Send + 'static,
    ) {
        let addr = format!("{host}:{port}");
        self.rt().spawn(async move {
            let a2 = addr.clone();
            let task = tokio::spawn(async move { fetch_once(&host, port, &req).await });
            let res = match tokio::time::timeout(timeout, task).await {
                Err(_) => Err(HandshakeError::Timeout { addr: a2, timeout_ms: timeout.as_millis() as u64 }),
                Ok(Err(join)) => Err(HandshakeError::Io { addr: a2, reason: format!("handshake task failed: {join}") }),
                Ok(Ok(r)) => r,
            };
            done(res);
        });
    }

    /// Blocking variant of [`fetch`](Self::fetch), for tools and tests.
    pub fn fetch_blocking(&self, host: &str, port: u16, req: HandshakeRequest, timeout: Duration) -> Result<Vec<u8>, HandshakeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.fetch(host.to_string(), port, req, timeout, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| Err(HandshakeError::Io { addr: format!("{host}:{port}"), reason: "side channel stopped".into() }))
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

async fn serve_loop(mut sock: RouterSocket, payload: PayloadCell, on_register: Option<RegisterHandler>) {
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
        let body = &frames[frames.len() - 1];
        let reply = match wire::decode::<SideRequest>("SideRequest", body, MAX_REGISTRATION_BYTES) {
            Err(e) => {
                tracing::warn!(error = %e, "kvbridge: malformed side-channel request");
                err_payload(format!("malformed handshake request: {e}"))
            }
            Ok(SideRequest::Register(_)) if on_register.is_none() => ack(Err("this engine does not accept push registrations".into())),
            Ok(SideRequest::Register(reg)) => {
                // Re-check what decoding alone does not (version, sizes, ranks).
                let checked = reg.check().map(|()| reg).map_err(|e| e.to_string());
                let res = match (checked, &on_register) {
                    (Ok(reg), Some(h)) => h(reg),
                    (Err(e), _) => Err(format!("malformed registration: {e}")),
                    (Ok(_), None) => Err("no handler".into()),
                };
                if let Err(e) = &res {
                    tracing::warn!(error = %e, "kvbridge: push registration refused");
                }
                ack(res)
            }
            Ok(SideRequest::Handshake(r)) if r.version != wire::WIRE_VERSION => {
                err_payload(format!("wire version {} not supported (want {})", r.version, wire::WIRE_VERSION))
            }
            Ok(SideRequest::Handshake(r)) => {
                tracing::debug!(from = %r.from_engine, rank = r.from_tp_rank, "kvbridge: serving handshake");
                match payload.lock().ok().and_then(|p| p.clone()) {
                    Some(p) => p,
                    None => err_payload("KV caches not registered yet".into()),
                }
            }
        };
        let mut out = ZmqMessage::from(Bytes::from(reply));
        out.push_front(id);
        if let Err(e) = sock.send(out).await {
            tracing::debug!(error = %e, "kvbridge: handshake reply failed");
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

fn err_payload(reason: String) -> Vec<u8> {
    wire::encode("HandshakePayload", &HandshakePayload { compat_hash: String::new(), agent_metadata: Vec::new(), error: Some(reason) })
        .unwrap_or_default()
}

async fn fetch_once(host: &str, port: u16, req: &SideRequest) -> Result<Vec<u8>, HandshakeError> {
    let addr = format!("{host}:{port}");
    let endpoint = resolve_host(host, port).map_err(|reason| HandshakeError::Io { addr: addr.clone(), reason })?;
    let mut sock = DealerSocket::new();
    // zeromq-rs connects eagerly; retry briefly so a listener that is just starting works.
    let mut last = String::new();
    let mut connected = false;
    for attempt in 0..20u32 {
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
    let body = wire::encode("SideRequest", req)?;
    sock.send(ZmqMessage::from(Bytes::from(body))).await.map_err(|e| HandshakeError::Io { addr: addr.clone(), reason: e.to_string() })?;
    let reply = sock.recv().await.map_err(|e| HandshakeError::Io { addr: addr.clone(), reason: e.to_string() })?;
    let frames = reply.into_vec();
    let last = frames.last().ok_or_else(|| HandshakeError::Io { addr: addr.clone(), reason: "empty reply".into() })?;
    if last.len() > MAX_HANDSHAKE_BYTES {
        return Err(crate::error::WireError::TooLarge { size: last.len(), limit: MAX_HANDSHAKE_BYTES }.into());
    }
    Ok(last.to_vec())
}

//! One side-channel connection per peer (`host:port`), reused by its handshakes,
//! heartbeats and push registrations, and re-established when it fails.
//!
//! A request takes the peer's connection (waiting for the one before it: the peer's
//! listener answers in turn anyway), sends, waits for the reply and puts the connection
//! back. The connection is *moved into* the request, so a request that is cancelled — its
//! deadline passed — drops it, which closes the socket: a late reply can never be read as
//! the answer to the next request, and a peer that never answers holds no socket of ours.
//! A pooled connection that fails (the peer restarted or dropped us) is replaced by a
//! fresh one for one more try within the same deadline. Connections idle for
//! [`IDLE_CLOSE`] are closed by the reaper.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvbridge_core::error::{HandshakeError, WireError};
use kvbridge_core::wire::MAX_HANDSHAKE_BYTES;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::resolve::{resolve_async, Resolver};

/// A pooled connection unused this long is closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);

struct Peer {
    conn: tokio::sync::Mutex<Option<DealerSocket>>,
    last_used: Mutex<Instant>,
}

/// The connections of one side channel.
pub(crate) struct Pool {
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    resolver: Resolver,
    /// Connections opened so far (a reused one is not counted again).
    opened: AtomicU64,
}

fn io(addr: &str, reason: impl ToString) -> HandshakeError {
    HandshakeError::Io { addr: addr.to_string(), reason: reason.to_string() }
}

impl Pool {
    pub fn new(resolver: Resolver) -> Self {
        Self { peers: Mutex::new(HashMap::new()), resolver, opened: AtomicU64::new(0) }
    }

    fn peer(&self, key: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(Peer { conn: tokio::sync::Mutex::new(None), last_used: Mutex::new(Instant::now()) }))
            .clone()
    }

    /// Send `body` to `host:port` and return the reply's last frame. Cancel-safe: dropping
    /// the future closes the connection it was using.
    pub async fn call(&self, host: &str, port: u16, body: Vec<u8>) -> Result<Vec<u8>, HandshakeError> {
        let key = format!("{host}:{port}");
        let peer = self.peer(&key);
        let mut slot = peer.conn.lock().await;
        if let Ok(mut t) = peer.last_used.lock() {
            *t = Instant::now();
        }
        let body = Bytes::from(body);
        let (sock, reply) = match slot.take() {
            Some(sock) => match exchange(sock, body.clone(), &key).await {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::debug!(addr = %key, error = %e, "kvbridge: side-channel connection failed; reconnecting");
                    exchange(self.connect(host, port, &key).await?, body, &key).await?
                }
            },
            None => exchange(self.connect(host, port, &key).await?, body, &key).await?,
        };
        *slot = Some(sock);
        Ok(reply)
    }

    async fn connect(&self, host: &str, port: u16, key: &str) -> Result<DealerSocket, HandshakeError> {
        let endpoint = resolve_async(&self.resolver, host, port).await.map_err(|r| io(key, r))?;
        let mut sock = DealerSocket::new();
        // zeromq-rs connects eagerly; retry briefly so a listener that is just starting
        // works (the caller's deadline bounds the whole).
        let mut last = String::new();
        for attempt in 0..8u32 {
            match sock.connect(&endpoint).await {
                Ok(()) => {
                    self.opened.fetch_add(1, Ordering::Relaxed);
                    return Ok(sock);
                }
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt + 1))).await;
                }
            }
        }
        Err(io(key, format!("cannot connect: {last}")))
    }

    /// Connections opened so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Open connections: pooled, or in use by a request.
    pub fn open(&self) -> usize {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.values().filter(|p| p.conn.try_lock().map_or(true, |c| c.is_some())).count()
    }

    /// Close connections idle for `idle` and forget peers with none.
    pub fn reap(&self, idle: Duration) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|_, p| {
            let stale = p.last_used.lock().map_or(true, |t| t.elapsed() >= idle);
            match p.conn.try_lock() {
                Ok(mut c) if stale => {
                    c.take();
                    false
                }
                Ok(c) => c.is_some(),
                Err(_) => true, // in use
            }
        });
    }
}

/// One request on `sock`: the socket back with the reply, or an error (the socket is
/// dropped, closing it).
async fn exchange(mut sock: DealerSocket, body: Bytes, addr: &str) -> Result<(DealerSocket, Vec<u8>), HandshakeError> {
    sock.send(ZmqMessage::from(body)).await.map_err(|e| io(addr, e))?;
    let reply = sock.recv().await.map_err(|e| io(addr, e))?;
    let frames = reply.into_vec();
    let last = frames.last().ok_or_else(|| io(addr, "empty reply"))?;
    if last.len() > MAX_HANDSHAKE_BYTES {
        return Err(WireError::TooLarge { size: last.len(), limit: MAX_HANDSHAKE_BYTES }.into());
    }
    let out = last.to_vec();
    Ok((sock, out))
}

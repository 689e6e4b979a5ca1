//! The listener: one ROUTER socket on the configured host, answering each request in turn
//! with [`kvbridge_core::side::answer`], supervised so a crash of the socket task (a
//! peer-triggered bug in the zeromq crate) restarts it instead of leaving the engine deaf.
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvbridge_core::side::{answer, Handlers, Identity, PayloadCell};
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::clock::now_unix;

/// Serve on `sock` (bound to `endpoint`) until aborted, re-binding after a crash.
pub(crate) async fn supervise(sock: RouterSocket, endpoint: String, identity: Arc<Identity>, payload: PayloadCell, handlers: Handlers) {
    let mut sock = Some(sock);
    loop {
        let s = match sock.take() {
            Some(s) => s,
            None => {
                let mut s = RouterSocket::new();
                if let Err(e) = s.bind(&endpoint).await {
                    tracing::error!(%endpoint, error = %e, "kvbridge: cannot re-bind handshake listener");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                s
            }
        };
        // Aborting the supervisor aborts the socket task too (the guard), so a replaced or
        // dropped listener never keeps its port.
        let task = AbortOnDrop(tokio::spawn(serve_loop(s, identity.clone(), payload.clone(), handlers.clone())));
        if let Err(e) = task.join().await {
            tracing::error!(%endpoint, error = %e, "kvbridge: handshake listener crashed; restarting");
        }
    }
}

/// A task handle that aborts its task when dropped.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    async fn join(mut self) -> Result<(), tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
        let Some(id) = frames.first().cloned() else { continue };
        let Some(body) = frames.last() else { continue };
        let reply = answer(&identity, &payload, &handlers, body, now_unix());
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

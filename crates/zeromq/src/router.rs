use crate::backend::GenericSocketBackend;
use crate::codec::*;
use crate::endpoint::Endpoint;
use crate::error::{ZmqError, ZmqResult};
use crate::fair_queue::FairQueue;
use crate::message::*;
use crate::transport::AcceptStopHandle;
use crate::util::PeerIdentity;
use crate::{MultiPeerBackend, SocketEvent, SocketOptions, SocketRecv, SocketSend, SocketType};
use crate::{Socket, SocketBackend};

use async_trait::async_trait;
use futures_channel::mpsc;
use futures_util::{SinkExt, StreamExt};

use std::collections::HashMap;
use std::convert::TryInto;
use std::sync::Arc;

pub struct RouterSocket {
    backend: Arc<GenericSocketBackend>,
    binds: HashMap<Endpoint, AcceptStopHandle>,
    fair_queue: FairQueue<ZmqFramedRead, PeerIdentity>,
}

impl RouterSocket {
    /// kvbridge patch: drop one peer (its connection closes and its queued input is
    /// discarded). kvbridge calls this when a reply to that peer cannot be written in
    /// time, so that a peer which never reads cannot stall the socket for the others.
    pub fn disconnect_peer(&self, peer_id: bytes::Bytes) {
        if let Ok(id) = PeerIdentity::try_from(peer_id) {
            self.backend.peer_disconnected(&id);
        }
    }
}

impl Drop for RouterSocket {
    fn drop(&mut self) {
        self.backend.shutdown();
    }
}

#[async_trait]
impl Socket for RouterSocket {
    fn with_options(options: SocketOptions) -> Self {
        let fair_queue = FairQueue::new(true);
        Self {
            backend: Arc::new(GenericSocketBackend::with_options(
                Some(fair_queue.inner()),
                SocketType::ROUTER,
                options,
            )),
            binds: HashMap::new(),
            fair_queue,
        }
    }

    fn backend(&self) -> Arc<dyn MultiPeerBackend> {
        self.backend.clone()
    }

    fn binds(&mut self) -> &mut HashMap<Endpoint, AcceptStopHandle> {
        &mut self.binds
    }

    fn monitor(&mut self) -> mpsc::Receiver<SocketEvent> {
        let (sender, receiver) = mpsc::channel(1024);
        self.backend.socket_monitor.lock().replace(sender);
        receiver
    }
}

#[async_trait]
impl SocketRecv for RouterSocket {
    async fn recv(&mut self) -> ZmqResult<ZmqMessage> {
        loop {
            match self.fair_queue.next().await {
                Some((peer_id, Ok(Message::Message(mut message)))) => {
                    message.push_front(peer_id.into());
                    return Ok(message);
                }
                // kvbridge patch: a peer sending anything but a message after the
                // handshake is dropped (upstream: `todo!()`, a panic).
                Some((peer_id, Ok(_))) => {
                    self.backend.peer_disconnected(&peer_id);
                }
                Some((peer_id, Err(_))) => {
                    self.backend.peer_disconnected(&peer_id);
                }
                None => return Err(ZmqError::NoMessage),
            };
        }
    }
}

#[async_trait]
impl SocketSend for RouterSocket {
    async fn send(&mut self, mut message: ZmqMessage) -> ZmqResult<()> {
        // kvbridge patch: no `assert!`/`unwrap` on the message, and no map guard held
        // across the write. Upstream awaited the write while holding the DashMap shard's
        // lock (a blocking lock): a peer that stopped reading then blocked every task that
        // touched that shard, such as accepting the next peer, and on a one-thread runtime
        // the whole socket, timers included. The peer is taken out of the map for the write
        // and put back after it; if the write fails, or the caller gives up on it (drops
        // this future, e.g. on a timeout), the peer is gone and its connection closed.
        if message.len() < 2 {
            return Err(ZmqError::Other("a ROUTER message needs a peer id and a body"));
        }
        let Some(id_frame) = message.pop_front() else {
            return Err(ZmqError::Other("a ROUTER message needs a peer id and a body"));
        };
        let peer_id: PeerIdentity = id_frame.try_into()?;
        let Some((peer_id, mut peer)) = self.backend.peers.remove(&peer_id) else {
            return Err(ZmqError::Other("Destination client not found by identity"));
        };
        match peer.send_queue.send(Message::Message(message)).await {
            Ok(()) => {
                self.backend.peers.insert(peer_id, peer);
                Ok(())
            }
            Err(e) => {
                self.backend.peer_disconnected(&peer_id);
                Err(e.into())
            }
        }
    }
}

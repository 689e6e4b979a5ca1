//! First contact: handshakes started before any request (`kv_peers`), and how long a
//! peer's first request waited from routing to its READ being posted.
use super::*;

impl PullWorker {
    /// Start handshaking with engine `engine_id` (TP size `remote_tp_size`), whose
    /// side channel is at `host:port` (its base port), before any request names it. The
    /// peer is then loaded and planned as if a request had asked; requests that arrive
    /// meanwhile queue behind it. Nothing if the peer is known or the TP sizes cannot map.
    pub fn warm_up(&mut self, engine_id: &str, host: &str, port: u16, remote_tp_size: u32, now_unix: f64) -> Vec<Action> {
        let peer = peer_key_at(engine_id, host, port);
        if self.engines.contains_key(&peer) {
            return Vec::new();
        }
        let Ok((tp, actions)) = self.handshake_actions(&peer, host, port, remote_tp_size) else { return Vec::new() };
        self.insert_handshaking(peer, engine_id.to_string(), tp, Vec::new(), now_unix);
        actions
    }

    /// The TP mapping to a remote engine of `remote_tp_size` ranks whose base side-channel
    /// port is `host:port`, and one handshake per remote rank this rank reads from.
    pub(super) fn handshake_actions(
        &self,
        peer: &str,
        host: &str,
        port: u16,
        remote_tp_size: u32,
    ) -> Result<(TpMapping, Vec<Action>), Error> {
        let tp = TpMapping::new(self.tp_size, self.tp_rank, remote_tp_size)?;
        let mut hs = Vec::with_capacity(tp.sources.len());
        for &rank in &tp.sources {
            let Some(p) = u16::try_from(rank).ok().and_then(|q| port.checked_add(q)) else {
                return Err(Error::Other(format!("remote_port {port} + rank {rank} overflows")));
            };
            hs.push(Action::Handshake { peer: peer.to_string(), rank, host: host.to_string(), port: p });
        }
        Ok((tp, hs))
    }

    /// `peer` is being handshaken (its actions issued), with `queued` waiting for it.
    pub(super) fn insert_handshaking(&mut self, peer: String, engine_id: String, tp: TpMapping, queued: Vec<RecvReq>, now_unix: f64) {
        let n = tp.sources.len();
        self.engines.insert(
            peer,
            Engine::Handshaking {
                engine_id,
                tp,
                mds: vec![None; n],
                added: vec![false; n],
                queued,
                plan: None,
                staged: None,
                epoch: 0,
                clock_offset: None,
                started_unix: now_unix,
            },
        );
    }

    /// If `req_id` was the first request routed to its peer: when it was routed (Unix
    /// seconds). The driver calls it once the READ is posted, to log first contact.
    pub fn take_first_contact(&mut self, req_id: &str) -> Option<f64> {
        self.first_contact.remove(req_id)
    }
}

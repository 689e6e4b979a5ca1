//! First contact: handshakes started before any request (`kv_peers`), and how long a
//! peer's first request waited from routing to its READ being posted.
use super::*;

impl PullWorker {
    /// Start handshaking with engine `engine_id` (TP size `remote_tp_size`), whose
    /// side channel is at `host:port` (its base port), before any request names it. The
    /// peer is then loaded and planned as if a request had asked; requests that arrive
    /// meanwhile queue behind it. Nothing if the peer is known or the TP sizes cannot map.
    pub fn warm_up(&mut self, engine_id: &str, host: &str, port: u16, remote_tp_size: u32, now_unix: f64) -> Vec<Action> {
        let peer = format!("{engine_id}@{host}:{port}");
        if self.engines.contains_key(&peer) {
            return Vec::new();
        }
        let Ok(tp) = TpMapping::new(self.tp_size, self.tp_rank, remote_tp_size) else { return Vec::new() };
        let mut actions = Vec::new();
        for &rank in &tp.sources {
            let Some(p) = u16::try_from(rank).ok().and_then(|q| port.checked_add(q)) else { return Vec::new() };
            actions.push(Action::Handshake { peer: peer.clone(), rank, host: host.to_string(), port: p });
        }
        let n = tp.sources.len();
        self.engines.insert(
            peer,
            Engine::Handshaking {
                engine_id: engine_id.to_string(),
                tp,
                mds: vec![None; n],
                added: vec![false; n],
                queued: Vec::new(),
                plan: None,
                staged: None,
                epoch: 0,
                clock_offset: None,
                started_unix: now_unix,
            },
        );
        actions
    }

    /// If `req_id` was the first request routed to its peer: when it was routed (Unix
    /// seconds). The driver calls it once the READ is posted, to log first contact.
    pub fn take_first_contact(&mut self, req_id: &str) -> Option<f64> {
        self.first_contact.remove(req_id)
    }
}

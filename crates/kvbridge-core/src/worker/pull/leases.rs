//! Pull mode and time: lease heartbeats, idle engines, READ deadlines, and when the
//! machine next needs waking ([`PullWorker::poll_timeout`], in the style of quinn-proto).
use super::*;

impl PullWorker {
    /// The P ranks this rank heartbeats for a remote engine of `remote_tp_size` ranks:
    /// the ones it reads from (together, D's ranks cover all of P's). Ranks are numbered
    /// `pp * remote_tp_size + tp`; before a handshake, stage 0's.
    pub fn heartbeat_ranks(&self, remote_tp_size: u32) -> Vec<u32> {
        TpMapping::new(self.tp_size, self.tp_rank, remote_tp_size).map(|t| t.sources).unwrap_or_default()
    }

    /// Where to send heartbeats (and releases) for engine `engine_id`, whose directory is
    /// `host:port`: each P rank this rank reads from (of every pipeline stage it reads), at
    /// the address its rank table gave (or, before any handshake or with no table,
    /// the port arithmetic on `host`).
    pub fn heartbeat_addrs(&self, engine_id: &str, host: &str, port: u16, remote_tp_size: u32) -> Vec<(u32, String, u16)> {
        let peer = peer_key_at(engine_id, host, port);
        let table = self.rank_addrs.get(&peer).map_or(&[][..], Vec::as_slice);
        let ranks = match self.engines.get(&peer) {
            Some(Engine::Ready { plan, .. }) if plan.tp.remote_tp_size == remote_tp_size => plan.sources.clone(),
            _ => self.heartbeat_ranks(remote_tp_size),
        };
        ranks
            .into_iter()
            .filter_map(|g| {
                let (pp, q) = crate::plan::stage_of(g, remote_tp_size);
                crate::ranks::resolve(table, host, port, pp, q, remote_tp_size).map(|(h, p)| (g, h, p))
            })
            .collect()
    }

    /// Pipeline parallel, `kv_integrity`: where to fetch the digests of a load from the ready
    /// peer whose directory is `host:port`: P rank (`pp`, `tp`), when it is the one P rank
    /// this rank reads (P and D cut stages and heads alike, so their regions can match).
    /// `None`: this rank reads other or several P ranks, or the peer is not ready.
    pub fn digest_source(&self, host: &str, port: u16, pp: u32, tp: u32) -> Option<(String, u16)> {
        let suffix = format!("@{host}:{port}");
        let (peer, plan) = self.engines.iter().find_map(|(k, e)| match e {
            Engine::Ready { plan, .. } if k.ends_with(&suffix) => Some((k, plan)),
            _ => None,
        })?;
        let p_tp = plan.tp.remote_tp_size;
        let g = pp.checked_mul(p_tp)?.checked_add(tp)?;
        if plan.sources != [g] {
            return None;
        }
        let table = self.rank_addrs.get(peer).map_or(&[][..], Vec::as_slice);
        crate::ranks::resolve(table, host, port, pp, tp, p_tp)
    }

    /// A heartbeat to `peer` for P's requests `ids` was answered (or not). Held leases
    /// get a local deadline (measured from when the heartbeat was sent, so it errs
    /// early); expired ones fail their request before (or, if in flight, after) the READ,
    /// since the blocks may already hold another request's KV.
    pub fn on_heartbeat_reply(&mut self, peer: &str, res: Result<HeartbeatReply, HandshakeError>, sent_unix: f64, now_unix: f64) {
        let reply = match res {
            Ok(r) => r,
            Err(e) => {
                self.stats.heartbeats_failed += 1;
                tracing::debug!(peer, error = %e, "kvbridge: heartbeat failed");
                return;
            }
        };
        self.last_active.insert(peer.to_string(), now_unix);
        if self.deadlines.len() + reply.held.len() > LEASE_FACTS_CAP {
            self.deadlines.clear();
        }
        for (id, left) in reply.held {
            if left.is_finite() && left > 0.0 {
                let d = sent_unix + left;
                let e = self.deadlines.entry(lease_key(peer, &id)).or_insert(d);
                *e = e.max(d);
            }
        }
        if self.lost.len() + reply.expired.len() > LEASE_FACTS_CAP {
            self.lost.clear();
        }
        for id in reply.expired {
            let why = format!("P released this request's blocks when its lease ran out (request {id} at {peer})");
            let mut in_flight = false;
            for l in self.loading.values_mut().filter(|l| l.peer == peer && l.remote_request_id == id) {
                in_flight = true;
                l.error.get_or_insert(TransportError::new("lease", why.clone()));
            }
            if !in_flight {
                self.lost.insert(lease_key(peer, &id), why);
            }
        }
    }

    /// Forget ready peers not heard from for `ttl` seconds and with no READ in flight.
    pub fn evict_idle(&mut self, now_unix: f64, ttl: f64) -> Vec<Action> {
        let busy: std::collections::HashSet<&str> = self.loading.values().map(|l| l.peer.as_str()).collect();
        let idle: Vec<String> = self
            .engines
            .iter()
            .filter(|(p, e)| {
                matches!(e, Engine::Ready { .. })
                    && !busy.contains(p.as_str())
                    && self.last_active.get(*p).map_or(true, |&t| now_unix - t > ttl)
            })
            .map(|(p, _)| p.clone())
            .collect();
        let mut actions = Vec::new();
        for p in idle {
            tracing::info!(peer = %p, ttl, "kvbridge: forgetting a remote engine idle longer than engine_ttl");
            self.stats.engines_evicted += 1;
            self.last_active.remove(&p);
            actions.extend(self.forget(&p));
        }
        actions
    }

    /// Loads in flight on this rank: (requests, local blocks).
    pub fn loading_blocks(&self) -> (usize, u64) {
        (self.loading.len(), self.loading.values().map(|l| l.local_block_ids.len() as u64).sum())
    }

    /// Remote engines this rank has a plan for.
    pub fn ready_peers(&self) -> usize {
        self.engines.values().filter(|e| matches!(e, Engine::Ready { .. })).count()
    }

    /// When the READ of `req_id` must have finished (its start + `read_timeout_secs`).
    pub fn read_deadline(&self, req_id: &str) -> Option<f64> {
        self.loading.get(req_id).filter(|l| l.started_unix > 0.0).map(|l| l.started_unix + self.read_timeout_secs)
    }

    /// Time-driven work at `now`: expired leases freed, and (at most once a second)
    /// remote engines idle longer than `engine_ttl_secs` forgotten. Returns the actions
    /// that follow (remote ranks to unload).
    pub fn handle_timeout(&mut self, now_unix: f64) -> Vec<Action> {
        self.base.tick(now_unix);
        if now_unix < self.next_evict {
            return Vec::new();
        }
        self.next_evict = now_unix + EVICT_EVERY_SECS;
        self.evict_idle(now_unix, self.engine_ttl_secs)
    }

    /// When [`handle_timeout`](Self::handle_timeout) or a READ deadline next needs the
    /// driver (Unix seconds), or `None` when nothing is timed.
    pub fn poll_timeout(&self) -> Option<f64> {
        let reads = self.loading.values().filter(|l| l.started_unix > 0.0).map(|l| l.started_unix + self.read_timeout_secs);
        let evict = (!self.engines.is_empty()).then_some(self.next_evict);
        reads.chain(evict).chain(self.base.next_expiry()).reduce(f64::min)
    }
}

/// Idle engines are looked for at most this often.
const EVICT_EVERY_SECS: f64 = 1.0;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::SendLease;

    #[test]
    fn poll_timeout_names_the_next_lease_expiry_and_handle_timeout_acts_on_it() {
        let mut w = PullWorker::new("P".into(), 0, 1, "h".into(), true);
        assert_eq!(w.poll_timeout(), None, "nothing timed");
        let lease = |id: &str, expiry_unix| SendLease { req_id: id.into(), expiry_unix, expected_readers: 1, num_blocks: 2 };
        w.base.on_leases(&[lease("a", 130.0), lease("b", 110.0)]);
        assert_eq!(w.poll_timeout(), Some(110.0));
        assert!(w.handle_timeout(109.0).is_empty());
        assert!(w.base.take_finished().sending.is_empty(), "not yet");
        w.handle_timeout(110.5);
        assert_eq!(w.base.take_finished().sending, vec!["b".to_string()], "b's lease ran out");
        assert_eq!(w.poll_timeout(), Some(130.0));
        w.handle_timeout(131.0);
        assert_eq!(w.base.take_finished().sending, vec!["a".to_string()]);
        assert_eq!(w.poll_timeout(), None);
    }
}

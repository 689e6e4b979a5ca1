//! Pull mode's I/O: a step's metadata in (`start_load`), the state machine's actions out
//! (handshakes over the side channel, peers loaded, READs posted, notifications),
//! completions and notifications polled (`get_finished`), and D's lease heartbeats.
use std::collections::VecDeque;
use std::sync::Arc;

use kvbridge_core::config::{ConnectorConfig, TransferMode};
use kvbridge_core::error::{Error, HandshakeError, TransportError};
use kvbridge_core::transport::{Transport, XferId, XferPoll};
use kvbridge_core::wire::{self, ConnectorMetadata, HandshakeRequest, HeartbeatRequest, Notif, WIRE_VERSION};
use kvbridge_core::worker::pull::{peer_key_at, Action};
use kvbridge_core::worker::FinishedSets;

use super::{lock_ctl, now_unix, Shared, WorkerDriver};
use crate::side_channel::SideChannel;

/// Most peers, and request ids per peer, D remembers for its shutdown release.
const RELEASE_PEERS_CAP: usize = 4096;
const RELEASE_IDS_CAP: usize = 65_536;

/// Attempts to reach a `kv_peers` engine at start-up (about six minutes of backoff).
const WARM_UP_RETRIES: u32 = 60;

impl<T: Transport + 'static> WorkerDriver<T> {
    /// D: send the heartbeats in a step's metadata, to every P rank this rank reads from.
    fn send_heartbeats(&self, targets: Vec<wire::HeartbeatTarget>) {
        for t in targets {
            let addrs = self.shared.state().core.heartbeat_addrs(&t.engine_id, &t.host, t.port, t.tp_size);
            let peer = peer_key_at(&t.engine_id, &t.host, t.port);
            if let Ok(mut last) = self.last_heartbeats.lock() {
                if last.len() < RELEASE_PEERS_CAP || last.contains_key(&peer) {
                    last.insert(peer.clone(), t.clone());
                }
            }
            for (_, host, port) in addrs {
                let shared = Arc::downgrade(&self.shared);
                let peer = peer.clone();
                let sent = now_unix();
                self.shared.state().core.stats.heartbeats_sent += 1;
                let req = HeartbeatRequest { request_ids: t.request_ids.clone(), release: false };
                self.side.heartbeat(host, port, req, self.cfg.handshake_timeout, move |res| {
                    if let Some(shared) = shared.upgrade() {
                        shared.state().core.on_heartbeat_reply(&peer, res, sent, now_unix());
                    }
                });
            }
        }
    }

    /// D: requests the scheduler started renewing since the last batch join that batch's
    /// set, so a shutdown releases them too (a request read since is released harmlessly:
    /// P no longer holds it).
    fn remember_tracked(&self, targets: Vec<wire::HeartbeatTarget>) {
        let Ok(mut last) = self.last_heartbeats.lock() else { return };
        for t in targets {
            let peer = peer_key_at(&t.engine_id, &t.host, t.port);
            let full = last.len() >= RELEASE_PEERS_CAP;
            match last.get_mut(&peer) {
                Some(have) => {
                    have.tp_size = t.tp_size;
                    let new: Vec<String> = {
                        let seen: std::collections::HashSet<&str> = have.request_ids.iter().map(String::as_str).collect();
                        t.request_ids.into_iter().filter(|i| !seen.contains(i.as_str())).collect()
                    };
                    if have.request_ids.len() + new.len() <= RELEASE_IDS_CAP {
                        have.request_ids.extend(new);
                    }
                }
                None if !full => {
                    last.insert(peer, t);
                }
                None => {}
            }
        }
    }

    /// Bind a step's metadata (opaque bytes from the scheduler) and start loads.
    pub fn start_load(&self, metadata: &[u8]) -> Result<(), Error> {
        let mut md = ConnectorMetadata::from_bytes(metadata)?;
        self.set_epoch(md.epoch);
        if md.is_empty() {
            return Ok(());
        }
        let hb = std::mem::take(&mut md.heartbeats);
        if !hb.is_empty() {
            self.send_heartbeats(hb);
        }
        let tracked = std::mem::take(&mut md.tracked);
        if !tracked.is_empty() {
            self.remember_tracked(tracked);
        }
        let stage = std::mem::take(&mut md.stage);
        if !stage.is_empty() {
            if let Ok(mut v) = self.to_stage.lock() {
                v.extend(stage);
            }
        }
        self.integrity_metadata(&mut md);
        if self.cfg.host_buffer {
            // D: the blocks each load fills, for the copy to the cache once it is done.
            if let Ok(mut h) = self.host_loads.lock() {
                h.on_metadata(&md, self.cfg.null_block_id);
            }
        }
        self.start_push(&mut md);
        if md.reqs_to_recv.is_empty() && md.reqs_to_send.is_empty() && md.reqs_failed.is_empty() {
            return Ok(());
        }
        let actions = self.shared.state().core.on_metadata(md, now_unix());
        run(&self.shared, &self.side, &self.cfg, actions);
        Ok(())
    }

    /// D, `kv_peers`: learn the engine at `host:port` from its rank 0's handshake
    /// payload, then handshake, load and plan it as a first request would, so the first
    /// request finds it ready. A peer that cannot be reached is met on demand instead.
    pub(crate) fn warm_up(&self, host: String, port: u16) {
        let req = HandshakeRequest { version: WIRE_VERSION, from_engine: self.cfg.engine_id.clone(), from_tp_rank: self.cfg.tp_rank };
        let (shared, side, cfg) = (Arc::downgrade(&self.shared), self.side.clone(), self.cfg.clone());
        let h = host.clone();
        // P may still be starting: keep trying (backoff doubling to 6.4 s) for minutes.
        self.side.fetch(host, port, req, self.cfg.handshake_timeout, WARM_UP_RETRIES, move |res| {
            let Some(shared) = shared.upgrade() else { return };
            let md = res.map_err(Error::from).and_then(|b| {
                let p: wire::HandshakePayload = wire::decode("HandshakePayload", &b, wire::MAX_HANDSHAKE_BYTES)?;
                Ok(wire::decode::<wire::AgentMetadata>("AgentMetadata", &p.agent_metadata, wire::MAX_HANDSHAKE_BYTES)?)
            });
            match md {
                Ok(md) => {
                    tracing::info!(peer = %md.engine_id, host = %h, port, tp_size = md.tp_size, "kvbridge: warming up a peer (kv_peers)");
                    let actions = shared.state().core.warm_up(&md.engine_id, &h, port, md.tp_size, now_unix());
                    run(&shared, &side, &cfg, actions);
                }
                Err(e) => {
                    tracing::warn!(host = %h, port, error = %e, "kvbridge: cannot warm up a peer (kv_peers); it will be met on demand")
                }
            }
        });
    }

    pub(crate) fn poll_once(&self) -> FinishedSets {
        let now = now_unix();
        if self.work.is_some() && !self.cfg.role.can_consume() {
            // A push-mode P: nothing to poll here (the writer thread owns the transfers),
            // and the engine thread must not wait on the transport lock a WRITE post holds.
            let mut c = lock_ctl(&self.push);
            return FinishedSets { sending: c.sender.take_sending(), ..Default::default() };
        }
        // The READs in flight and their deadlines (state lock), then the transport's word
        // on each (transport lock), then the state machine's follow-up (state lock).
        let xfers: Vec<(XferId, String, String, Option<f64>)> = {
            let g = self.shared.state();
            g.xfers.iter().map(|(x, (r, k))| (*x, r.clone(), k.clone(), g.core.read_deadline(r))).collect()
        };
        let mut ended = Vec::new();
        let notifs = {
            let mut t = self.shared.transport();
            for (x, req, key, deadline) in xfers {
                let res = match t.poll(x) {
                    Ok(XferPoll::Pending) if deadline.is_some_and(|d| now > d) => {
                        Some(Err(TransportError::new("timeout", format!("READ for {req} did not finish in {:?}", self.read_timeout))))
                    }
                    Ok(XferPoll::Pending) => None,
                    Ok(XferPoll::Done) => Some(Ok(())),
                    Err(e) => Some(Err(e)),
                };
                if let Some(res) = res {
                    t.release(x);
                    ended.push((x, req, key, res));
                }
            }
            t.take_notifs().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "kvbridge: reading notifications failed");
                Vec::new()
            })
        };
        // Push (D): P's write notifications. Everything else is a pull reader's.
        let notifs = if self.cfg.mode == TransferMode::Push {
            let mut c = lock_ctl(&self.push);
            notifs.into_iter().filter(|n| !Notif::from_bytes(n).is_ok_and(|p| c.receiver.on_notif(&p))).collect()
        } else {
            notifs
        };
        // Staged READs: lay the bytes out into the cache before the load is reported; the
        // load's time then includes the copy (D cannot use the KV before it).
        let mut now = now;
        if !ended.is_empty() {
            if let Some(r) = self.shared.recv().as_mut() {
                let mut staged = false;
                for (x, _, _, res) in &ended {
                    staged |= r.finish(*x, res.is_ok());
                }
                if staged {
                    now = now_unix();
                }
            }
        }
        let mut follow = Vec::new();
        let mut out = {
            let mut g = self.shared.state();
            for (x, req, key, res) in ended {
                g.xfers.remove(&x);
                follow.extend(g.core.on_read_done(&req, &key, res, now));
            }
            for n in notifs {
                g.core.base.on_notif(&n, now);
            }
            follow.extend(g.core.handle_timeout(now));
            if !follow.is_empty() {
                drop(g);
                run(&self.shared, &self.side, &self.cfg, follow);
                g = self.shared.state();
            }
            g.core.base.take_finished()
        };
        if self.cfg.mode == TransferMode::Push {
            lock_ctl(&self.push).take_finished(now, self.cfg.null_block_id, &mut out);
        }
        if self.cfg.host_buffer {
            self.restore_loads(&mut out);
        }
        // After any copy into the cache: what landed is compared with P's digests.
        self.verify_loads(&mut out);
        out
    }
}

/// Execute actions until none are left. Handshakes go to the side channel; their
/// completion re-enters here on the side-channel thread. No lock is held across the
/// network or a NIXL call: each action takes the transport, then the state, in turn.
fn run<T: Transport + 'static>(shared: &Arc<Shared<T>>, side: &Arc<SideChannel>, cfg: &ConnectorConfig, actions: Vec<Action>) {
    let mut q: VecDeque<Action> = actions.into();
    while let Some(a) = q.pop_front() {
        match a {
            Action::Handshake { peer, rank, host, port } => {
                tracing::debug!(%peer, rank, %host, port, "kvbridge: handshake");
                let weak = Arc::downgrade(shared);
                let side2 = side.clone();
                let cfg2 = cfg.clone();
                let addr = format!("{host}:{port}");
                let req = HandshakeRequest { version: WIRE_VERSION, from_engine: cfg.engine_id.clone(), from_tp_rank: cfg.tp_rank };
                let t0 = std::time::Instant::now();
                let sent = now_unix();
                side.fetch(host, port, req, cfg.handshake_timeout, cfg.handshake_retries, move |res| {
                    let fetched_ms = t0.elapsed().as_secs_f64() * 1e3;
                    let recv = now_unix();
                    let Some(shared2) = weak.upgrade() else { return }; // the worker is gone
                    let _span = tracing::info_span!("handshake", %peer, rank).entered();
                    let mut plan_ms = 0.0;
                    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let t1 = std::time::Instant::now();
                        let follow = shared2.state().core.on_handshake_payload(&peer, rank, &addr, res, sent, recv);
                        plan_ms = t1.elapsed().as_secs_f64() * 1e3;
                        run(&shared2, &side2, &cfg2, follow);
                    }));
                    if handled.is_err() {
                        // Never leave requests queued behind a handshake that cannot finish.
                        tracing::error!(%peer, "kvbridge: internal error while completing a handshake; failing its requests");
                        let err = HandshakeError::Io { addr: addr.clone(), reason: "internal error completing the handshake".into() };
                        let follow = shared2.state().core.on_handshake_payload(&peer, rank, &addr, Err(err), sent, recv);
                        run(&shared2, &side2, &cfg2, follow);
                    }
                    // fetch: the side-channel round trip; plan: the payload checked and (once
                    // every rank answered) the plan built; total adds loading the peer into
                    // NIXL ("peer loaded") and posting what was queued behind it.
                    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
                    tracing::info!(fetch_ms = fetched_ms, plan_ms, total_ms, "kvbridge: handshake finished");
                });
            }
            Action::AddRemote { peer, rank, key, md } => {
                let t0 = std::time::Instant::now();
                let res = shared.transport().add_remote(&key, &md);
                if let Some(r) = shared.recv().as_mut() {
                    r.add_remote(&key, &md);
                }
                tracing::info!(%key, load_ms = t0.elapsed().as_secs_f64() * 1e3, ok = res.is_ok(), "kvbridge: peer loaded");
                q.extend(shared.state().core.on_remote_added(&peer, rank, res, now_unix()));
            }
            Action::RemoveRemote { key } => {
                shared.transport().remove_remote(&key);
                if let Some(r) = shared.recv().as_mut() {
                    r.remove_remote(&key);
                }
            }
            Action::Read { req_id, key, pieces, notif, bytes } => {
                let _span = tracing::debug_span!("read", request_id = %req_id, %key, bytes, descs = pieces.len()).entered();
                let now = now_unix();
                // A fragmented READ reads whole remote blocks into the receive staging.
                let t_prep = std::time::Instant::now();
                let staged = shared.recv().as_mut().and_then(|r| r.prepare(&key, &pieces));
                let prep_us = t_prep.elapsed().as_secs_f64() * 1e6;
                let post: &[_] = staged.as_ref().map_or(&pieces, |(reads, _)| reads);
                let t0 = std::time::Instant::now();
                let res = shared.transport().read(&key, post, &notif);
                let post_secs = t0.elapsed().as_secs_f64();
                let descs = post.len();
                if let Some((_, p)) = staged {
                    let (direct, posted) = (p.direct, p.posted);
                    match (&res, shared.recv().as_mut()) {
                        (Ok(x), Some(r)) => r.posted(*x, p),
                        (_, Some(r)) => r.abandon(p),
                        _ => {}
                    }
                    if res.is_ok() {
                        tracing::debug!(request_id = %req_id, %key, direct, posted, prep_us, "kvbridge: READ staged (whole remote blocks)");
                        shared.state().core.mark_staged(&req_id, direct, posted);
                    }
                }
                let mut g = shared.state();
                match res {
                    Ok(x) => {
                        tracing::debug!(request_id = %req_id, %key, bytes, descs, post_us = post_secs * 1e6, "kvbridge: READ posted");
                        g.core.mark_posted(&req_id, now, post_secs);
                        if let Some(t) = g.core.take_first_contact(&req_id) {
                            // From the request reaching this worker to its first READ posted:
                            // the handshake, peer load and plan, unless `kv_peers` did them.
                            let ms = (now_unix() - t) * 1e3;
                            tracing::info!(request_id = %req_id, %key, first_contact_ms = ms, "kvbridge: first contact");
                        }
                        g.xfers.insert(x, (req_id, key));
                    }
                    Err(e) => q.extend(g.core.on_read_done(&req_id, &key, Err(e), now)),
                }
            }
            Action::Notify { key, msg } => {
                let _span = tracing::debug_span!("notify", %key).entered();
                if let Err(e) = shared.transport().notify(&key, &msg) {
                    tracing::warn!(%key, error = %e, "kvbridge: notification failed");
                    shared.state().core.base.xfer.record_failed_notification();
                }
            }
        }
    }
}

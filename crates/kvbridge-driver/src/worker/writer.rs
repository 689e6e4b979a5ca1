//! P's writer thread (push mode, `kvbridge-push`): every push-mode NIXL call is made here.
//! It loads D ranks (a handshake per D rank, started when it registers, so it overlaps the
//! prefill), plans each write from D's advertised layout, posts WRITEs (per layer during a
//! layer-wise forward), polls them, and tells the `PushSender` when each D rank is done.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use kvbridge_core::config::ConnectorConfig;
use kvbridge_core::error::{Error, HandshakeError};
use kvbridge_core::plan::TransferPlan;
use kvbridge_core::transport::{Transport, XferPoll};
use kvbridge_core::wire::{AgentMetadata, HandshakeRequest, PushRegistration, WIRE_VERSION};
use kvbridge_core::worker::push::PushAction;
use kvbridge_core::worker::push_plan::{self, PushCtl};

use super::push_state::{DPeer, Job, Work, WriterState};
use super::{lock_ctl, now_unix, Shared};
use crate::side_channel::SideChannel;

/// P's writer thread: every push-mode NIXL call is made here.
pub(crate) struct Writer<T: Transport + 'static> {
    pub shared: Arc<Shared<T>>,
    pub side: Arc<SideChannel>,
    pub cfg: ConnectorConfig,
    pub push: Arc<Mutex<PushCtl>>,
    pub tx: mpsc::Sender<Work>,
    pub st: WriterState,
}

impl<T: Transport + 'static> Writer<T> {
    pub fn run(mut self, rx: mpsc::Receiver<Work>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Acquire) {
            // Poll in-flight WRITEs every 100 µs; otherwise wake on work, or every 20 ms
            // to expire leases and stale registrations. While a layer-wise forward runs,
            // only post (on each layer's message): this thread shares the engine's cores,
            // and polling every 100 µs then steals them from the forward it overlaps. The
            // notifications reach D when the WRITEs complete whether or not we poll.
            let wait = if self.st.wxfers.is_empty() || self.st.layers_done.is_some() {
                Duration::from_millis(20)
            } else {
                Duration::from_micros(100)
            };
            let first = match rx.recv_timeout(wait) {
                Ok(w) => Some(w),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let now = now_unix();
            for w in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                self.handle(w, now);
            }
            self.poll(now);
            let expired = lock_ctl(&self.push).sender.tick(now);
            for action in expired {
                self.dispatch(action, false, now);
            }
        }
    }

    fn handle(&mut self, w: Work, now: f64) {
        match w {
            Work::Registered(g) => self.st.geo = *g,
            Work::Connect(reg) => {
                let key = push_plan::d_key(&reg);
                if !self.st.d_peers.contains_key(&key) {
                    self.st.d_peers.insert(key.clone(), DPeer::Handshaking { pending: Vec::new() });
                    self.handshake(key, reg);
                }
            }
            Work::Action { action, layerwise } => self.dispatch(action, layerwise, now),
            Work::ForwardStart => self.st.layers_done = Some(vec![false; self.st.geo.num_layers.max(1)]),
            Work::Layer(i, fence) => {
                if !self.passed(fence, "layer") {
                    return; // posted (or failed) at the end of the forward instead
                }
                if let Some(d) = self.st.layers_done.as_mut().and_then(|d| d.get_mut(i)) {
                    *d = true;
                }
                self.post_pending();
            }
            Work::ForwardDone { computing, fence } => {
                self.st.layers_done = None;
                if self.passed(fence, "end of forward") {
                    self.post_pending();
                } else {
                    self.fail_unposted();
                }
                let mut actions = Vec::new();
                {
                    let mut c = lock_ctl(&self.push);
                    for r in &computing {
                        actions.extend(c.sender.on_computed(r));
                    }
                }
                for a in actions {
                    self.dispatch(a, false, now);
                }
            }
            Work::PeerDone { key, res } => {
                let pending = match self.st.d_peers.remove(&key) {
                    Some(DPeer::Handshaking { pending }) => pending,
                    _ => Vec::new(),
                };
                let loaded = res.and_then(|(plan, md)| {
                    let t0 = std::time::Instant::now();
                    self.shared.transport().add_remote(&key, &md).map_err(Error::from)?;
                    tracing::info!(%key, ms = t0.elapsed().as_secs_f64() * 1e3, "kvbridge: push peer loaded");
                    Ok(plan)
                });
                let (told, e) = match loaded {
                    Ok(Ok(plan)) => {
                        self.st.d_peers.insert(key, DPeer::Ready { plan });
                        for (a, lw) in pending {
                            self.dispatch(a, lw, now);
                        }
                        return;
                    }
                    // D is loaded but P cannot write its layout: tell each waiting request now
                    // (a failure notification), so D fails it at once. The peer is not kept:
                    // a later registration handshakes again.
                    Ok(Err(e)) => (true, e),
                    // D cannot be reached through NIXL: its requests fail at their
                    // registration timeout there.
                    Err(e) => (false, e),
                };
                if told {
                    tracing::error!(%key, error = %e, "kvbridge: cannot plan writes to the decode rank; failing its requests");
                } else {
                    tracing::error!(%key, error = %e, "kvbridge: cannot load the decode rank; its writes are dropped");
                }
                for (a, _) in pending {
                    let (PushAction::Write { reg, .. } | PushAction::Reject { reg, .. }) = &a;
                    if told {
                        self.notify(&key, &push_plan::notif(reg, &self.cfg.engine_id, self.cfg.tp_rank, false, 1));
                    }
                    if let PushAction::Write { p_req, .. } = a {
                        let mut c = lock_ctl(&self.push);
                        c.write_failed();
                        c.sender.on_write_done(&p_req);
                    }
                }
            }
        }
    }

    /// Fetch D rank `reg`'s handshake payload; check and plan on the side-channel thread,
    /// then hand the result back to the writer.
    fn handshake(&self, key: String, reg: PushRegistration) {
        let req = HandshakeRequest { version: WIRE_VERSION, from_engine: self.cfg.engine_id.clone(), from_tp_rank: self.cfg.tp_rank };
        let tx = self.tx.clone();
        let geo = self.st.geo.clone();
        let shared = Arc::downgrade(&self.shared);
        let null = self.cfg.null_block_id;
        let p_tp = self.cfg.tp_size;
        let addr = format!("{}:{}", reg.host, reg.port);
        tracing::debug!(%key, %addr, "kvbridge: push handshake with a decode rank");
        self.side.fetch(reg.host.clone(), reg.port, req, self.cfg.handshake_timeout, self.cfg.handshake_retries, move |res| {
            let out = (|| -> Result<(Result<Box<TransferPlan>, Error>, AgentMetadata), Error> {
                let bytes = res?;
                let shared = shared.upgrade().ok_or_else(|| Error::Other("the worker is shutting down".into()))?;
                let (md, _, _) = shared.state().core.check_payload(&reg.engine_id, &addr, &bytes)?;
                if md.tp_rank != reg.tp_rank || md.tp_size != reg.tp_size {
                    return Err(HandshakeError::Rejected {
                        addr: addr.clone(),
                        reason: format!(
                            "registered as rank {} of {}, handshake says {} of {}",
                            reg.tp_rank, reg.tp_size, md.tp_rank, md.tp_size
                        ),
                    }
                    .into());
                }
                // D is known and checked from here: a plan that cannot be made is D's to
                // hear about (a failure notification), not to wait out.
                let plan = (|| -> Result<Box<TransferPlan>, Error> {
                    let ranks = push_plan::p_ranks_for(md.tp_size, md.tp_rank, p_tp)?;
                    let p_mds = ranks.iter().map(|&q| geo.sibling_md(q)).collect::<Result<Vec<_>, _>>()?;
                    Ok(Box::new(TransferPlan::build_push(&md, &p_mds, null)?))
                })();
                Ok((plan, md))
            })();
            let _ = tx.send(Work::PeerDone { key, res: out });
        });
    }

    fn notify(&self, key: &str, msg: &[u8]) {
        if let Err(e) = self.shared.transport().notify(key, msg) {
            tracing::warn!(%key, error = %e, "kvbridge: push notification failed");
            lock_ctl(&self.push).xfer.record_failed_notification();
        }
    }

    fn dispatch(&mut self, action: PushAction, layerwise: bool, now: f64) {
        let reg = match &action {
            PushAction::Write { reg, .. } | PushAction::Reject { reg, .. } => reg,
        };
        let key = push_plan::d_key(reg);
        let plan = match self.st.d_peers.get_mut(&key) {
            Some(DPeer::Ready { plan }) => plan,
            Some(DPeer::Handshaking { pending }) => return pending.push((action, layerwise)),
            None => {
                let reg = reg.clone();
                self.st.d_peers.insert(key.clone(), DPeer::Handshaking { pending: vec![(action, layerwise)] });
                return self.handshake(key, reg);
            }
        };
        let me = (self.cfg.engine_id.as_str(), self.cfg.tp_rank);
        match action {
            PushAction::Reject { reg, reason } => {
                tracing::warn!(request_id = %reg.request_id, %reason, "kvbridge: telling the decode rank its request will not be written");
                let msg = push_plan::notif(&reg, me.0, me.1, false, 1);
                self.notify(&key, &msg);
            }
            PushAction::Write { p_req, p_blocks, reg, .. } => {
                let pieces = push_plan::write_pieces(plan, me.1, &p_blocks, &reg, self.cfg.coalesce_descriptors);
                let pieces = match pieces {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(request_id = %p_req, d_request = %reg.request_id, error = %e, "kvbridge: cannot plan the push write");
                        self.notify(&key, &push_plan::notif(&reg, me.0, me.1, false, 1));
                        let mut c = lock_ctl(&self.push);
                        c.write_failed();
                        c.sender.on_write_done(&p_req);
                        return;
                    }
                };
                if pieces.is_empty() {
                    // Nothing of ours to write (another rank holds it, or D needs nothing).
                    self.notify(&key, &push_plan::notif(&reg, me.0, me.1, true, 1));
                    lock_ctl(&self.push).sender.on_write_done(&p_req);
                    return;
                }
                let bytes = pieces.iter().map(|p| p.len).sum();
                let layers = if layerwise { self.st.geo.by_layer(pieces) } else { vec![pieces] };
                let writes = layers.iter().filter(|l| !l.is_empty()).count() as u32;
                let job = Job {
                    p_req,
                    key,
                    posted: layers.iter().map(Vec::is_empty).collect(),
                    layers,
                    layerwise,
                    notif_ok: push_plan::notif(&reg, me.0, me.1, true, writes),
                    notif_fail: push_plan::notif(&reg, me.0, me.1, false, writes),
                    in_flight: 0,
                    failed: false,
                    bytes,
                    started: now,
                    post_secs: 0.0,
                };
                self.st.next_job += 1;
                let id = self.st.next_job;
                self.st.jobs.insert(id, job);
                self.post(id);
            }
        }
    }

    /// Wait for a GPU fence (none: DRAM, nothing to wait for). False if it failed: what
    /// it guards must not be read, since the GPU may still be writing it.
    fn passed(&mut self, fence: Option<Box<dyn super::push_state::Fence>>, what: &str) -> bool {
        let Some(f) = fence else { return true };
        self.st.fences_waited += 1;
        match f.wait() {
            Ok(()) => true,
            Err(e) => {
                self.st.fences_failed += 1;
                tracing::error!(what, error = %e, "kvbridge: CUDA fence failed; the WRITEs it guards are not posted");
                false
            }
        }
    }

    /// The forward's fence failed: every WRITE not yet posted fails (D is told, P's blocks
    /// are released), none reads a cache the GPU may still be writing.
    fn fail_unposted(&mut self) {
        let ids: Vec<u64> = self.st.jobs.iter().filter(|(_, j)| !j.failed && j.posted.iter().any(|p| !p)).map(|(i, _)| *i).collect();
        for id in ids {
            let Some(job) = self.st.jobs.get_mut(&id) else { continue };
            job.failed = true;
            job.posted.iter_mut().for_each(|p| *p = true);
            if let Err(e) = self.shared.transport().notify(&job.key, &job.notif_fail) {
                tracing::warn!(key = %job.key, error = %e, "kvbridge: push notification failed");
            }
            self.maybe_finish(id);
        }
    }

    fn post_pending(&mut self) {
        let ids: Vec<u64> = self.st.jobs.iter().filter(|(_, j)| j.posted.iter().any(|p| !p)).map(|(i, _)| *i).collect();
        for id in ids {
            self.post(id);
        }
    }

    /// Post what job `id` may post now: every layer already computed (all of them when
    /// not layer-wise, or when no forward is running).
    fn post(&mut self, id: u64) {
        let Some(job) = self.st.jobs.get_mut(&id) else { return };
        let _span = tracing::debug_span!("write", request_id = %job.p_req, key = %job.key).entered();
        let mut g = self.shared.transport();
        let mut posts = 0;
        for i in 0..job.layers.len() {
            if job.posted[i] || job.failed {
                continue;
            }
            let ready = !job.layerwise || self.st.layers_done.as_ref().map_or(true, |d| d.get(i).copied().unwrap_or(true));
            if !ready {
                continue;
            }
            job.posted[i] = true;
            let t0 = std::time::Instant::now();
            let res = g.write(&job.key, &job.layers[i], &job.notif_ok);
            job.post_secs += t0.elapsed().as_secs_f64();
            match res {
                Ok(x) => {
                    job.in_flight += 1;
                    posts += 1;
                    self.st.wxfers.insert(x, id);
                }
                Err(e) => {
                    tracing::error!(request_id = %job.p_req, key = %job.key, error = %e, "kvbridge: push WRITE could not be posted; failing the decode side");
                    job.failed = true;
                    if let Err(e) = g.notify(&job.key, &job.notif_fail) {
                        tracing::warn!(key = %job.key, error = %e, "kvbridge: push notification failed");
                    }
                }
            }
        }
        if job.failed {
            job.posted.iter_mut().for_each(|p| *p = true);
        }
        drop(g);
        if posts > 0 {
            lock_ctl(&self.push).stats.write_posts += posts;
        }
        self.maybe_finish(id);
    }

    fn maybe_finish(&mut self, id: u64) {
        let done = self.st.jobs.get(&id).is_some_and(|j| j.in_flight == 0 && j.posted.iter().all(|&p| p));
        if !done {
            return;
        }
        let Some(job) = self.st.jobs.remove(&id) else { return };
        let now = now_unix();
        if job.failed {
            // The D rank may have restarted or gone: forget it, so its next registration
            // loads it afresh (as pull forgets a peer after a failed READ).
            if self.st.d_peers.remove(&job.key).is_some() {
                self.shared.transport().remove_remote(&job.key);
            }
        }
        let mut c = lock_ctl(&self.push);
        if job.failed {
            c.write_failed();
        } else {
            let descs = job.layers.iter().map(|l| l.len() as u64).sum();
            c.xfer.record_transfer(now - job.started, job.post_secs, job.bytes, descs);
            c.stats.writes_ok += 1;
            c.stats.bytes_written += job.bytes;
            c.stats.last_write_secs = (now - job.started).max(0.0);
            tracing::info!(request_id = %job.p_req, key = %job.key, bytes = job.bytes, secs = now - job.started, layerwise = job.layerwise, "kvbridge-push");
        }
        c.sender.on_write_done(&job.p_req);
    }

    fn poll(&mut self, now: f64) {
        if self.st.wxfers.is_empty() {
            return;
        }
        let timeout = self.cfg.kv_lease_duration.as_secs_f64();
        let mut ended = Vec::new();
        {
            let mut g = self.shared.transport();
            for (&x, &id) in &self.st.wxfers {
                let started = self.st.jobs.get(&id).map(|j| j.started).unwrap_or(now);
                let res = match g.poll(x) {
                    Ok(XferPoll::Pending) if now - started > timeout => Some(false),
                    Ok(XferPoll::Pending) => None,
                    Ok(XferPoll::Done) => Some(true),
                    Err(e) => {
                        tracing::error!(error = %e, "kvbridge: push WRITE failed");
                        Some(false)
                    }
                };
                if let Some(ok) = res {
                    g.release(x);
                    ended.push((x, id, ok));
                }
            }
            for &(x, id, ok) in &ended {
                self.st.wxfers.remove(&x);
                let Some(job) = self.st.jobs.get_mut(&id) else { continue };
                job.in_flight = job.in_flight.saturating_sub(1);
                if !ok && !job.failed {
                    job.failed = true;
                    job.posted.iter_mut().for_each(|p| *p = true);
                    if let Err(e) = g.notify(&job.key, &job.notif_fail) {
                        tracing::warn!(key = %job.key, error = %e, "kvbridge: push notification failed");
                    }
                }
            }
        }
        for (_, id, _) in ended {
            self.maybe_finish(id);
        }
    }
}

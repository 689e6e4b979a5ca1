//! The accounting view of one worker rank: blocks held for remote readers, loads in
//! flight and counters, served to `Inspect` requests and `kvbridge.inspect`. Takes only
//! the state lock, never the transport's.
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use kvbridge_core::transport::Transport;
use kvbridge_core::worker::push_plan::PushCtl;

use super::integrity::Integrity;
use super::{lock_ctl, Shared, WorkerDriver};

impl<T: Transport + 'static> WorkerDriver<T> {
    /// Blocks held for remote peers and loads in flight on this rank, with counters.
    pub fn accounting(&self) -> serde_json::Value {
        view(&self.shared, &self.push, &self.cfg.engine_id, self.cfg.tp_rank, &self.integrity)
    }
}

/// The accounting view of one worker rank (see [`WorkerDriver::accounting`]).
pub(crate) fn view<T: Transport>(
    shared: &Shared<T>,
    push: &Mutex<PushCtl>,
    engine: &str,
    rank: u32,
    integrity: &Integrity,
) -> serde_json::Value {
    let ic = &integrity.counters;
    let pending = integrity.pending();
    let (held_loads, held_us) = integrity.held();
    let g = shared.state();
    let (loading_requests, loading_blocks) = g.core.loading_blocks();
    let b = &g.core.base;
    let st = &g.core.stats;
    let mut v = serde_json::json!({
        "engine_id": engine,
        "tp_rank": rank,
        "held_requests": b.held_requests(),
        "held_blocks": b.held_blocks(),
        "loading_requests": loading_requests,
        "loading_blocks": loading_blocks,
        "reads_in_flight": g.xfers.len(),
        "expired_leases": b.expired_leases,
        "released_leases": b.released_leases,
        "heartbeats_received": b.heartbeats_received,
        "notifs_received": b.notifs_received,
        "heartbeats_sent": st.heartbeats_sent,
        "heartbeats_failed": st.heartbeats_failed,
        "leases_lost": st.leases_lost,
        "reads_ok": st.reads_ok,
        "reads_failed": st.reads_failed,
        "handshakes_ok": st.handshakes_ok,
        "handshakes_failed": st.handshakes_failed,
        "engines_evicted": st.engines_evicted,
        "ready_peers": g.core.ready_peers(),
        "integrity_verified_loads": ic.verified_loads.load(Relaxed),
        "integrity_checked_blocks": ic.checked_blocks.load(Relaxed),
        "integrity_mismatched_blocks": ic.mismatched_blocks.load(Relaxed),
        "integrity_failed_loads": ic.failed_loads.load(Relaxed),
        "integrity_unverified_loads": ic.unverified_loads.load(Relaxed),
        "integrity_digested_blocks": ic.digested_blocks.load(Relaxed),
        "integrity_pending_loads": pending,
        "integrity_held_loads": held_loads,
        "integrity_held_us": held_us,
        "integrity_check_us": ic.check_us.load(Relaxed),
    });
    drop(g);
    let c = lock_ctl(push);
    let push_held = c.sender.held();
    let push_blocks = c.sender.held_blocks();
    let d_waiting = c.receiver.waiting();
    let d_blocks: u64 = c.d_blocks.values().map(|b| b.len() as u64).sum();
    drop(c);
    if let Some(o) = v.as_object_mut() {
        // Push-mode holds count as held (P) and loading (D) too.
        let add = |o: &mut serde_json::Map<String, serde_json::Value>, k: &str, n: u64| {
            let cur = o.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            o.insert(k.into(), (cur + n).into());
        };
        add(o, "held_requests", push_held as u64);
        add(o, "held_blocks", push_blocks);
        add(o, "loading_requests", d_waiting as u64);
        add(o, "loading_blocks", d_blocks);
    }
    v
}

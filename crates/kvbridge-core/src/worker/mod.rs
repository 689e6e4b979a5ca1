//! Worker side (vLLM role WORKER, one per TP rank): pure state machines over actions.
//!
//! [`WorkerBase`] holds what every mode shares: the blocks this rank holds for remote
//! readers (leases), notifications, and the finished/failed sets reported to vLLM.
//! [`pull::PullWorker`] decides handshakes and READs; [`push::PushSender`] (P) and
//! [`push::PushReceiver`] (D) match and track push-mode WRITEs. `kvbridge-driver`'s
//! `WorkerDriver` executes the actions against a [`crate::transport::Transport`] and the
//! side channel.
// Peer and user data is decoded here: no indexing that could panic on it.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]
use std::collections::HashMap;

use crate::wire::{HeartbeatReply, HeartbeatRequest, Notif, SendLease};

pub mod host_loads;
pub mod pull;
pub mod push;
pub mod push_plan;
pub mod stats;

pub use pull::PullWorker;
pub use stats::XferStats;

/// What the worker reports to vLLM after a step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinishedSets {
    /// Requests whose blocks this rank no longer holds for a remote peer, so vLLM may free
    /// them (vLLM's `finished_sending`).
    pub sending: Vec<String>,
    /// Requests whose load ended, successfully or not (vLLM's `finished_recving`); a failed
    /// one is also listed in `failed_recving`.
    pub recving: Vec<String>,
    /// Requests whose load failed.
    pub failed_recving: Vec<String>,
    /// Local blocks of the failed loads, whose contents are not valid (vLLM's
    /// `get_block_ids_with_load_errors`); never the null block.
    pub invalid_block_ids: Vec<u32>,
}

#[derive(Debug, Clone)]
struct Lease {
    expiry_unix: f64,
    expected: u32,
    seen: u32,
    num_blocks: u32,
}

/// How a lease ended, as a heartbeat reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Every reader said it was done.
    Released,
    /// The lease ran out first: the blocks may already hold another request's KV.
    Expired,
}

/// Recently ended leases are remembered this long and this many, to answer heartbeats.
const ENDED_TTL_SECS: f64 = 600.0;
const ENDED_CAP: usize = 65_536;

/// Notifications for requests not (yet) leased are kept at most this long and this many,
/// so a chatty or hostile peer cannot grow memory without bound.
const EARLY_NOTIF_TTL_SECS: f64 = 600.0;
const EARLY_NOTIF_CAP: usize = 65_536;
/// A notification's `expected` count is peer-controlled: clamp it.
const MAX_READERS: u32 = 4096;

/// Lease and notification bookkeeping every worker mode shares, with the sets reported
/// to vLLM after each step.
#[derive(Debug, Default)]
pub struct WorkerBase {
    leases: HashMap<String, Lease>,
    /// Notifications that arrived before their lease: (count, first seen, expected).
    early: HashMap<String, (u32, f64, u32)>,
    /// Leases that ended recently: how, and when.
    ended: HashMap<String, (Ended, f64)>,
    pub(crate) out: FinishedSets,
    /// Leases that ran out before their readers were done (counter, for stats).
    pub expired_leases: u64,
    /// Leases released on the readers' word (the normal end).
    pub released_leases: u64,
    /// Heartbeats answered (P: decode engines renewing leases).
    pub heartbeats_received: u64,
    /// Well-formed notifications received from readers.
    pub notifs_received: u64,
    /// Notifications dropped: malformed, or over the bound on early ones.
    pub notifs_rejected: u64,
    /// Observations for vLLM's stats since the last collection.
    pub xfer: stats::XferStats,
    /// Staged requests whose copy failed: their lease ends (as expired) on arrival, so a
    /// heartbeat tells D the KV is gone.
    refused: std::collections::HashSet<String>,
}

impl WorkerBase {
    /// P: the scheduler says we hold these requests' blocks for remote readers.
    pub fn on_leases(&mut self, leases: &[SendLease]) {
        for l in leases {
            if self.refused.remove(&l.req_id) {
                self.end(&l.req_id, Ended::Expired, l.expiry_unix);
                continue;
            }
            let (seen, expected) = match self.early.remove(&l.req_id) {
                Some((n, _, e)) => (n, e),
                None => (0, l.expected_readers.clamp(1, MAX_READERS)),
            };
            if seen >= expected {
                self.end(&l.req_id, Ended::Released, l.expiry_unix);
            } else {
                self.leases.insert(l.req_id.clone(), Lease { expiry_unix: l.expiry_unix, expected, seen, num_blocks: l.num_blocks });
            }
        }
    }

    /// P: a reader notified us. Bytes are peer-controlled: bad ones are counted and dropped.
    pub fn on_notif(&mut self, bytes: &[u8], now_unix: f64) {
        let n = match Notif::from_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                self.notifs_rejected += 1;
                tracing::warn!(error = %e, "kvbridge: dropping malformed notification");
                return;
            }
        };
        self.notifs_received += 1;
        if !n.ok {
            tracing::warn!(request_id = %n.request_id, from = %n.from_engine, "kvbridge: remote reader reported a failed read; releasing blocks");
        }
        // Every reader of a request sends the same count: how many readers there are.
        let expected = n.expected.clamp(1, MAX_READERS);
        match self.leases.get_mut(&n.request_id) {
            Some(l) => {
                l.seen += 1;
                l.expected = expected;
                if l.seen >= l.expected {
                    self.leases.remove(&n.request_id);
                    self.end(&n.request_id, Ended::Released, now_unix);
                }
            }
            None if matches!(self.ended.get(&n.request_id), Some((Ended::Expired, _))) => {
                // The reader finished after the lease ran out: the blocks may have held
                // another request's KV by then. Count it (vLLM's
                // `num_notifications_after_expiry`); there is nothing left to free.
                tracing::warn!(request_id = %n.request_id, from = %n.from_engine, "kvbridge: notification after the lease expired");
                self.xfer.record_notification_after_expiry();
            }
            None => {
                // The READ can finish before this rank learns of the lease (metadata for the
                // lease arrives with the next step). Keep it, bounded.
                if self.early.len() >= EARLY_NOTIF_CAP {
                    self.notifs_rejected += 1;
                    return;
                }
                let e = self.early.entry(n.request_id).or_insert((0, now_unix, expected));
                e.0 += 1;
                e.2 = expected;
            }
        }
    }

    /// A lease ended: report the blocks free and remember how, for heartbeats.
    fn end(&mut self, req_id: &str, how: Ended, now_unix: f64) {
        match how {
            Ended::Released => self.released_leases += 1,
            Ended::Expired => {
                self.expired_leases += 1;
                self.xfer.record_kv_expired_req();
            }
        }
        if self.ended.len() >= ENDED_CAP {
            self.ended.retain(|_, (_, t)| now_unix - *t < ENDED_TTL_SECS / 10.0);
        }
        if self.ended.len() < ENDED_CAP {
            self.ended.insert(req_id.to_string(), (how, now_unix));
        }
        self.out.sending.push(req_id.to_string());
    }

    /// The KV of `req_id` could not be staged: end its lease as soon as it arrives.
    pub fn refuse_lease(&mut self, req_id: &str) {
        if self.refused.len() < EARLY_NOTIF_CAP {
            self.refused.insert(req_id.to_string());
        }
    }

    /// When the next lease runs out (Unix seconds), if any is held.
    pub fn next_expiry(&self) -> Option<f64> {
        self.leases.values().map(|l| l.expiry_unix).reduce(f64::min)
    }

    /// Release leases past expiry (the reader never came) and drop stale early notifs.
    pub fn tick(&mut self, now_unix: f64) {
        let expired: Vec<String> = self.leases.iter().filter(|(_, l)| l.expiry_unix <= now_unix).map(|(k, _)| k.clone()).collect();
        for r in expired {
            tracing::warn!(request_id = %r, "kvbridge: lease expired before any remote reader finished; releasing blocks");
            self.leases.remove(&r);
            self.end(&r, Ended::Expired, now_unix);
        }
        self.early.retain(|_, (_, t, _)| now_unix - *t < EARLY_NOTIF_TTL_SECS);
        self.ended.retain(|_, (_, t)| now_unix - *t < ENDED_TTL_SECS);
    }

    /// A decode engine renews its leases: each held one runs until at least
    /// `now + extend_secs`. The reply says, per request, how long it is held, or that it
    /// was released, expired, or is unknown here (its lease may not have arrived yet).
    pub fn on_heartbeat(&mut self, hb: &HeartbeatRequest, now_unix: f64, extend_secs: f64) -> HeartbeatReply {
        self.heartbeats_received += 1;
        let mut reply = HeartbeatReply::default();
        for id in &hb.request_ids {
            if hb.release && self.leases.remove(id).is_some() {
                tracing::info!(request_id = %id, "kvbridge: the remote reader released the lease (it is shutting down)");
                self.end(id, Ended::Released, now_unix);
                reply.released.push(id.clone());
            } else if let Some(l) = self.leases.get_mut(id) {
                l.expiry_unix = l.expiry_unix.max(now_unix + extend_secs);
                reply.held.push((id.clone(), l.expiry_unix - now_unix));
            } else {
                match self.ended.get(id) {
                    Some((Ended::Released, _)) => reply.released.push(id.clone()),
                    Some((Ended::Expired, _)) => reply.expired.push(id.clone()),
                    None => reply.unknown.push(id.clone()),
                }
            }
        }
        reply
    }

    /// Requests whose blocks this rank holds for remote readers.
    pub fn held_requests(&self) -> usize {
        self.leases.len()
    }

    /// Blocks this rank holds for remote readers.
    pub fn held_blocks(&self) -> u64 {
        self.leases.values().map(|l| u64::from(l.num_blocks)).sum()
    }

    /// What finished since the last call, leaving the sets empty.
    pub fn take_finished(&mut self) -> FinishedSets {
        std::mem::take(&mut self.out)
    }
}

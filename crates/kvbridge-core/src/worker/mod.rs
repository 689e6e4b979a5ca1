//! Worker side (vLLM role WORKER, one per TP rank): pure state machines over actions.
//!
//! [`WorkerBase`] holds what every mode shares: the blocks this rank holds for remote
//! readers (leases), notifications, and the finished/failed sets reported to vLLM.
//! [`pull::PullWorker`] decides handshakes and READs; [`push::PushSender`] (P) and
//! [`push::PushReceiver`] (D) match and track push-mode WRITEs. [`driver::WorkerDriver`] executes
//! the actions against a [`crate::transport::Transport`] and the side channel.
use std::collections::HashMap;

use crate::wire::{Notif, SendLease};

pub mod driver;
pub mod pull;
pub mod push;
pub mod push_io;

pub use driver::WorkerDriver;
pub use pull::PullWorker;

/// What the worker reports to vLLM after a step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinishedSets {
    pub sending: Vec<String>,
    pub recving: Vec<String>,
    pub failed_recving: Vec<String>,
    pub invalid_block_ids: Vec<u32>,
}

#[derive(Debug, Clone)]
struct Lease {
    expiry_unix: f64,
    expected: u32,
    seen: u32,
}

/// Notifications for requests not (yet) leased are kept at most this long and this many,
/// so a chatty or hostile peer cannot grow memory without bound.
const EARLY_NOTIF_TTL_SECS: f64 = 600.0;
const EARLY_NOTIF_CAP: usize = 65_536;
/// A notification's `expected` count is peer-controlled: clamp it.
const MAX_READERS: u32 = 4096;

#[derive(Debug, Default)]
pub struct WorkerBase {
    leases: HashMap<String, Lease>,
    /// Notifications that arrived before their lease: (count, first seen, expected).
    early: HashMap<String, (u32, f64, u32)>,
    pub(crate) out: FinishedSets,
    /// Counters for stats.
    pub expired_leases: u64,
    pub notifs_received: u64,
    pub notifs_rejected: u64,
}

impl WorkerBase {
    /// P: the scheduler says we hold these requests' blocks for remote readers.
    pub fn on_leases(&mut self, leases: &[SendLease]) {
        for l in leases {
            let (seen, expected) = match self.early.remove(&l.req_id) {
                Some((n, _, e)) => (n, e),
                None => (0, l.expected_readers.clamp(1, MAX_READERS)),
            };
            if seen >= expected {
                self.out.sending.push(l.req_id.clone());
            } else {
                self.leases.insert(l.req_id.clone(), Lease { expiry_unix: l.expiry_unix, expected, seen });
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
                    self.out.sending.push(n.request_id);
                }
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

    /// Release leases past expiry (the reader never came) and drop stale early notifs.
    pub fn tick(&mut self, now_unix: f64) {
        let expired: Vec<String> = self.leases.iter().filter(|(_, l)| l.expiry_unix <= now_unix).map(|(k, _)| k.clone()).collect();
        for r in expired {
            tracing::warn!(request_id = %r, "kvbridge: lease expired before any remote reader finished; releasing blocks");
            self.leases.remove(&r);
            self.expired_leases += 1;
            self.out.sending.push(r);
        }
        self.early.retain(|_, (_, t, _)| now_unix - *t < EARLY_NOTIF_TTL_SECS);
    }

    pub fn held_requests(&self) -> usize {
        self.leases.len()
    }

    pub fn take_finished(&mut self) -> FinishedSets {
        std::mem::take(&mut self.out)
    }
}

//! Push mode on the worker side, free of I/O: P writes a request's KV into blocks that D
//! registered, as soon as both are known.
//!
//! [`PushSender`] (P) matches D's [`PushRegistration`]s with P's finished requests. Either
//! may arrive first. They match on the proxy's transfer id, or, when there is none, on the
//! base request id (vLLM gives P and D different random suffixes). Its outputs are
//! [`PushAction`]s: start a WRITE, or tell a D rank that nothing will come (P aborted or
//! gave up), so D never waits on a write that was never posted. P's blocks are freed when
//! every D rank that maps to this P rank has been written (or failed), or when the lease
//! on them runs out with no write in flight.
//!
//! [`PushReceiver`] (D) waits for the writers' notifications, with a deadline: a
//! registration nobody answers fails the request instead of parking it forever.
use std::collections::{HashMap, HashSet};

use crate::error::PushError;
use crate::wire::{base_request_id, Notif, PushRegistration};

/// Unmatched registrations kept at most (a hostile or confused D cannot grow memory
/// without bound).
pub const MAX_ORPHANS: usize = 65_536;

/// What the push sender asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushAction {
    /// Write P request `p_req`'s blocks into the blocks of `reg` (one D rank).
    Write {
        /// The P request whose KV is written.
        p_req: String,
        /// P's blocks holding it, per KV cache group.
        p_blocks: Vec<Vec<u32>>,
        /// Tokens whose KV the blocks hold.
        num_tokens: u64,
        /// The D rank's registration: where to write.
        reg: PushRegistration,
    },
    /// Tell the D rank of `reg` that its request will not be written.
    Reject {
        /// The D rank's registration.
        reg: PushRegistration,
        /// Why nothing will be written, for D's error.
        reason: String,
    },
}

#[derive(Debug)]
struct Ready {
    p_req: String,
    blocks: Vec<Vec<u32>>,
    num_tokens: u64,
    expiry: f64,
    /// D ranks that will register with this P rank for the request (0: not known until
    /// the first registration says D's TP size).
    expected: u32,
    started: u32,
    done: u32,
    /// The request finished on P (its blocks are held for us until we release them).
    finished: bool,
    /// Layer-wise: the forward that computes the KV is running; registrations that
    /// arrive now wait for it to end.
    computing: bool,
    deferred: Vec<PushRegistration>,
}

/// How many D ranks register with each P rank, from D's TP size (0 if they do not map).
pub fn registrations_per_rank(p_tp: u32, d_tp: u32) -> u32 {
    crate::plan::TpMapping::new(d_tp, 0, p_tp).map(|t| t.notifs_per_remote_rank).unwrap_or(0)
}

/// The match key: the transfer id, else the base request id.
pub fn push_key(transfer_id: &str, request_id: &str) -> String {
    if transfer_id.is_empty() {
        format!("req:{}", base_request_id(request_id))
    } else {
        format!("xfer:{transfer_id}")
    }
}

/// P side: matches D's registrations with P's finished requests and decides the writes.
#[derive(Debug)]
pub struct PushSender {
    engine_id: String,
    /// This (P) engine's TP size.
    p_tp: u32,
    /// Finished requests whose blocks wait for (more) registrations, by key.
    ready: HashMap<String, Ready>,
    by_req: HashMap<String, String>,
    /// Registrations that arrived before P finished: (registration, received at).
    orphans: HashMap<String, Vec<(PushRegistration, f64)>>,
    orphan_count: usize,
    /// Keys of requests P aborted: later registrations are rejected at once.
    aborted: HashMap<String, f64>,
    /// (key, D engine, D rank) already registered: duplicates are refused.
    seen: HashSet<(String, String, u32)>,
    /// How long an unmatched registration or abort tombstone is kept.
    pub registration_ttl: f64,
    sending: Vec<String>,
    /// Requests whose lease ran out before every D rank was written (counter).
    pub expired: u64,
}

impl PushSender {
    /// A sender for P engine `engine_id` (registrations naming another engine are refused),
    /// keeping unmatched registrations `registration_ttl` seconds. TP size 1 until
    /// [`set_tp_size`](Self::set_tp_size).
    pub fn new(engine_id: String, registration_ttl: f64) -> Self {
        Self {
            engine_id,
            p_tp: 1,
            ready: HashMap::new(),
            by_req: HashMap::new(),
            orphans: HashMap::new(),
            orphan_count: 0,
            aborted: HashMap::new(),
            seen: HashSet::new(),
            registration_ttl,
            sending: Vec::new(),
            expired: 0,
        }
    }

    /// This (P) engine's TP size, which sets how many D ranks register with each P rank.
    pub fn set_tp_size(&mut self, p_tp: u32) {
        self.p_tp = p_tp.max(1);
    }

    fn write(p_tp: u32, r: &mut Ready, reg: PushRegistration) -> PushAction {
        if r.expected == 0 {
            r.expected = registrations_per_rank(p_tp, reg.tp_size).max(1);
        }
        r.started += 1;
        PushAction::Write { p_req: r.p_req.clone(), p_blocks: r.blocks.clone(), num_tokens: r.num_tokens, reg }
    }

    fn full(r: &Ready) -> bool {
        r.expected != 0 && r.started >= r.expected
    }

    /// Layer-wise: `p_req`'s prefill completes in the forward about to run. Registrations
    /// already here are claimed now (their writes go layer by layer); later ones wait for
    /// [`on_computed`](Self::on_computed).
    pub fn on_computing(&mut self, p_req: &str, transfer_id: &str, blocks: Vec<Vec<u32>>, num_tokens: u64) -> Vec<PushAction> {
        let key = push_key(transfer_id, p_req);
        if self.ready.contains_key(&key) || self.aborted.contains_key(&key) {
            return Vec::new();
        }
        let r = Ready {
            p_req: p_req.to_string(),
            blocks,
            num_tokens,
            expiry: f64::INFINITY,
            expected: 0,
            started: 0,
            done: 0,
            finished: false,
            computing: true,
            deferred: Vec::new(),
        };
        self.insert_ready(key, r)
    }

    /// Layer-wise: the forward ended; registrations that arrived during it are written now.
    pub fn on_computed(&mut self, p_req: &str) -> Vec<PushAction> {
        let Some(key) = self.by_req.get(p_req).cloned() else { return Vec::new() };
        let Some(r) = self.ready.get_mut(&key) else { return Vec::new() };
        r.computing = false;
        let p_tp = self.p_tp;
        std::mem::take(&mut r.deferred).into_iter().map(|reg| Self::write(p_tp, r, reg)).collect()
    }

    /// Attach waiting registrations to a new entry and index it.
    fn insert_ready(&mut self, key: String, mut r: Ready) -> Vec<PushAction> {
        let mut out = Vec::new();
        if let Some(regs) = self.orphans.remove(&key) {
            self.orphan_count -= regs.len();
            for (reg, _) in regs {
                if !Self::full(&r) {
                    out.push(Self::write(self.p_tp, &mut r, reg));
                } else {
                    out.push(PushAction::Reject { reg, reason: "more D ranks registered than the TP sizes allow".into() });
                }
            }
        }
        self.by_req.insert(r.p_req.clone(), key.clone());
        self.ready.insert(key, r);
        out
    }

    /// P finished prefilling `p_req`; its blocks are held until `expiry` for `expected`
    /// D ranks. Returns writes for registrations that were already waiting.
    pub fn on_finished(
        &mut self,
        p_req: &str,
        transfer_id: &str,
        blocks: Vec<Vec<u32>>,
        num_tokens: u64,
        expiry: f64,
        expected: u32,
    ) -> Vec<PushAction> {
        let key = push_key(transfer_id, p_req);
        if let Some(r) = self.ready.get_mut(&key) {
            if r.p_req == p_req && !r.finished {
                // Started layer-wise in the step that computed it: now it is held for us.
                r.finished = true;
                r.expiry = expiry;
                if expected != 0 {
                    r.expected = expected;
                }
                let out = self.on_computed(p_req);
                self.release_if_done(&key);
                return out;
            }
            // The transfer id came from the client: a second request reusing it must not
            // replace the first (whose blocks would then never be freed). Release its
            // blocks at once; its D side is not written and times out or fails.
            tracing::warn!(request_id = %p_req, key = %key, "kvbridge: push transfer id already in use; releasing this request's blocks");
            self.sending.push(p_req.to_string());
            return Vec::new();
        }
        let r = Ready {
            p_req: p_req.to_string(),
            blocks,
            num_tokens,
            expiry,
            expected,
            started: 0,
            done: 0,
            finished: true,
            computing: false,
            deferred: Vec::new(),
        };
        self.insert_ready(key, r)
    }

    /// A D rank registered its blocks. `Ok` with a write when P has already finished,
    /// `Ok(vec![])` when the registration waits for P, `Err` when it is refused (the
    /// driver answers the D rank with the reason).
    pub fn on_registration(&mut self, reg: PushRegistration, now: f64) -> Result<Vec<PushAction>, PushError> {
        if reg.target_engine_id != self.engine_id {
            return Err(PushError::WrongEngine { got: reg.target_engine_id, want: self.engine_id.clone() });
        }
        if registrations_per_rank(self.p_tp, reg.tp_size) == 0 {
            return Err(PushError::Invalid(format!(
                "D's TP size {} and this engine's {} do not divide one another",
                reg.tp_size, self.p_tp
            )));
        }
        let key = push_key(&reg.transfer_id, &reg.request_id);
        if self.aborted.contains_key(&key) {
            return Err(PushError::Aborted(reg.request_id));
        }
        let id = (key.clone(), reg.engine_id.clone(), reg.tp_rank);
        if self.seen.contains(&id) {
            return Err(PushError::Duplicate { transfer: key, engine: reg.engine_id, rank: reg.tp_rank });
        }
        if let Some(r) = self.ready.get_mut(&key) {
            if Self::full(r) || (r.expected == 0 && r.started + r.deferred.len() as u32 >= registrations_per_rank(self.p_tp, reg.tp_size)) {
                return Err(PushError::Invalid(format!("{key}: more D ranks registered than the TP sizes allow")));
            }
            self.seen.insert(id);
            if r.computing {
                r.deferred.push(reg);
                return Ok(Vec::new());
            }
            return Ok(vec![Self::write(self.p_tp, r, reg)]);
        }
        if self.orphan_count >= MAX_ORPHANS {
            return Err(PushError::Overloaded(self.orphan_count));
        }
        self.seen.insert(id);
        self.orphans.entry(key).or_default().push((reg, now));
        self.orphan_count += 1;
        Ok(Vec::new())
    }

    /// A WRITE of `p_req` to one D rank finished (or failed: the driver tells that D rank).
    /// Frees the blocks after the last expected one.
    pub fn on_write_done(&mut self, p_req: &str) {
        let Some(key) = self.by_req.get(p_req).cloned() else { return };
        let Some(r) = self.ready.get_mut(&key) else { return };
        r.done += 1;
        self.release_if_done(&key);
    }

    fn release_if_done(&mut self, key: &str) {
        if self.ready.get(key).is_some_and(|r| r.finished && r.expected != 0 && r.done >= r.expected) {
            self.release(key);
        }
    }

    fn release(&mut self, key: &str) {
        if let Some(r) = self.ready.remove(key) {
            self.by_req.remove(&r.p_req);
            self.sending.push(r.p_req);
        }
        self.seen.retain(|(k, _, _)| k != key);
    }

    /// P aborted (or failed) a request before it finished: registrations for it, now or
    /// later, are rejected so D fails at once instead of timing out.
    ///
    /// If layer-wise writes had started (the request is held for us), the blocks are
    /// released once those writes end; registrations not yet written are rejected.
    /// `hold`: vLLM holds the request's blocks for us; they are reported in
    /// [`take_sending`](Self::take_sending) once no write is in flight.
    pub fn on_aborted(&mut self, p_req: &str, transfer_id: &str, now: f64, hold: bool) -> Vec<PushAction> {
        let key = push_key(transfer_id, p_req);
        self.aborted.insert(key.clone(), now);
        let reason = format!("request {p_req} was aborted on the prefill side");
        let mut regs: Vec<PushRegistration> = self.orphans.remove(&key).unwrap_or_default().into_iter().map(|(r, _)| r).collect();
        self.orphan_count -= regs.len();
        if let Some(r) = self.ready.get_mut(&key).filter(|r| r.p_req == p_req) {
            regs.append(&mut r.deferred);
            r.finished = true;
            r.computing = false;
            r.expected = r.started;
            if r.started == 0 {
                self.release(&key);
            } else {
                self.release_if_done(&key);
            }
        } else if hold {
            self.sending.push(p_req.to_string());
        }
        regs.into_iter().map(|reg| PushAction::Reject { reg, reason: reason.clone() }).collect()
    }

    /// Expire leases (no write in flight), stale registrations and tombstones.
    pub fn tick(&mut self, now: f64) -> Vec<PushAction> {
        let expired: Vec<String> =
            self.ready.iter().filter(|(_, r)| r.finished && r.expiry <= now && r.started == r.done).map(|(k, _)| k.clone()).collect();
        for k in expired {
            tracing::warn!(key = %k, "kvbridge: push lease expired before every D rank registered; releasing blocks");
            self.expired += 1;
            self.release(&k);
        }
        let ttl = self.registration_ttl;
        let mut out = Vec::new();
        let mut dropped = 0;
        let seen = &mut self.seen;
        self.orphans.retain(|key, regs| {
            regs.retain(|(reg, t)| {
                let keep = now - *t < ttl;
                if !keep {
                    dropped += 1;
                    seen.remove(&(key.clone(), reg.engine_id.clone(), reg.tp_rank));
                    out.push(PushAction::Reject {
                        reg: reg.clone(),
                        reason: format!("no prefill request matched within {ttl:.0} s (unknown transfer id?)"),
                    });
                }
                keep
            });
            !regs.is_empty()
        });
        self.orphan_count -= dropped;
        self.aborted.retain(|_, t| now - *t < ttl);
        out
    }

    /// Requests whose blocks P may free now.
    pub fn take_sending(&mut self) -> Vec<String> {
        std::mem::take(&mut self.sending)
    }

    /// Requests P holds for D's registrations and writes.
    pub fn held(&self) -> usize {
        self.ready.len()
    }
    /// Blocks of the requests P holds for D's registrations and writes.
    pub fn held_blocks(&self) -> u64 {
        self.ready.values().map(|r| r.blocks.iter().map(|g| g.len() as u64).sum::<u64>()).sum()
    }
    /// D registrations not yet matched with a P request.
    pub fn waiting_registrations(&self) -> usize {
        self.orphan_count
    }
}

#[derive(Debug)]
struct Waiting {
    /// P ranks that write this D rank.
    expected: u32,
    /// Per P rank: (notifications seen, notifications that rank sends). A rank writing
    /// layer by layer sends one per layer write, each saying how many it sends in all.
    ranks: HashMap<u32, (u32, u32)>,
    deadline: f64,
}

/// At most this many notifications per P rank and request (layers × groups).
const MAX_NOTIFS_PER_RANK: u32 = 1 << 16;

/// D side: requests registered with P, waiting to be written.
#[derive(Debug, Default)]
pub struct PushReceiver {
    waiting: HashMap<String, Waiting>,
    recving: Vec<String>,
    failed: Vec<(String, String)>,
}

impl PushReceiver {
    /// `d_req` was registered with `expected` P ranks (each notifies once); fail it if
    /// they have not all written by `deadline`.
    pub fn on_registered(&mut self, d_req: &str, expected: u32, deadline: f64) {
        self.waiting.insert(d_req.to_string(), Waiting { expected: expected.max(1), ranks: HashMap::new(), deadline });
    }

    /// A registration could not be delivered or P refused it: fail the request now.
    pub fn on_registration_failed(&mut self, d_req: &str, reason: String) {
        if self.waiting.remove(d_req).is_some() {
            self.failed.push((d_req.to_string(), reason));
        }
    }

    /// A notification from a P rank. Returns false when it is not for a push request
    /// this rank waits on (the caller may handle it otherwise).
    pub fn on_notif(&mut self, n: &Notif) -> bool {
        let Some(w) = self.waiting.get_mut(&n.request_id) else { return false };
        if !n.ok {
            self.waiting.remove(&n.request_id);
            self.failed.push((n.request_id.clone(), format!("prefill engine {} rank {} failed to write", n.from_engine, n.from_tp_rank)));
            return true;
        }
        // The rank is the writer's word: never track more ranks than registrations sent,
        // so spoofed ranks can neither grow memory nor stand in for a missing writer.
        if !w.ranks.contains_key(&n.from_tp_rank) && w.ranks.len() >= w.expected as usize {
            tracing::warn!(request_id = %n.request_id, rank = n.from_tp_rank, "kvbridge: dropping a notification from an unexpected prefill rank");
            return true;
        }
        let e = w.ranks.entry(n.from_tp_rank).or_insert((0, 1));
        e.0 += 1;
        e.1 = n.expected.clamp(1, MAX_NOTIFS_PER_RANK);
        let done = w.ranks.values().filter(|(seen, want)| seen >= want).count() as u32;
        if done >= w.expected {
            self.waiting.remove(&n.request_id);
            self.recving.push(n.request_id.clone());
        }
        true
    }

    /// True while `d_req` waits for P's writes.
    pub fn is_waiting(&self, d_req: &str) -> bool {
        self.waiting.contains_key(d_req)
    }

    /// D aborted the request: forget it (late writes land in blocks vLLM frees only after
    /// the connector reports the request finished). True if it was waiting.
    pub fn on_abort(&mut self, d_req: &str) -> bool {
        self.waiting.remove(d_req).is_some()
    }

    /// Fail the requests whose deadline has passed.
    pub fn tick(&mut self, now: f64) {
        let late: Vec<String> = self.waiting.iter().filter(|(_, w)| w.deadline <= now).map(|(k, _)| k.clone()).collect();
        for r in late {
            self.waiting.remove(&r);
            tracing::warn!(request_id = %r, "kvbridge: push registration timed out: no prefill write arrived");
            self.failed.push((r, "push registration timed out".into()));
        }
    }

    /// (finished, failed with reason).
    pub fn take(&mut self) -> (Vec<String>, Vec<(String, String)>) {
        (std::mem::take(&mut self.recving), std::mem::take(&mut self.failed))
    }

    /// Requests waiting for P's writes.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
#[path = "push_tests.rs"]
mod tests;

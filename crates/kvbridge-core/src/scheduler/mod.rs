//! Scheduler side (vLLM role SCHEDULER): pure state machines, no I/O.
//!
//! [`SchedulerBase`] keeps the ledgers every transfer mode shares: leases on P, loads in
//! flight on D, requests already known to have failed, and the per-step lists that
//! become the [`ConnectorMetadata`] shipped to workers. [`pull::PullScheduler`] adds the
//! pull decisions (D reads from P), [`push::PushScheduler`] the push ones (P writes into
//! blocks D registered). [`new_scheduler`] picks one from the config.
// Peer and user data is decoded here: no indexing that could panic on it.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::config::ConnectorConfig;
use crate::error::ParamsError;
use crate::params::{KvParams, RemotePrefill, ReqParams};
use crate::wire::{ConnectorMetadata, FailedReq, HeartbeatTarget, PushRecv, PushSend, RecvReq, SendLease, StageReq, WIRE_VERSION};

pub mod pull;
pub mod push;

pub use pull::PullScheduler;
pub use push::PushScheduler;

/// The scheduler-side connector for `cfg`'s transfer mode (pull or push), behind the one
/// trait an engine drives.
pub fn new_scheduler(cfg: ConnectorConfig) -> Box<dyn SchedulerSide + Send + Sync> {
    match cfg.mode {
        crate::config::TransferMode::Pull => Box::new(PullScheduler::new(cfg)),
        crate::config::TransferMode::Push => Box::new(PushScheduler::new(cfg)),
    }
}

/// How a request finished, as vLLM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit max_tokens (the normal end of a P request with max_tokens=1).
    LengthCapped,
    /// Hit a stop condition.
    Stopped,
    /// Aborted by the client or the engine.
    Aborted,
    /// Ended with an error.
    Error,
}

impl FinishReason {
    /// vLLM's finish reason, by its short name (`length`, `stop`, `abort`) or its
    /// request status (`FINISHED_LENGTH_CAPPED`, ...); anything else is [`Error`](Self::Error).
    pub fn parse(s: &str) -> Self {
        match s {
            "length" | "FINISHED_LENGTH_CAPPED" => Self::LengthCapped,
            "stop" | "FINISHED_STOPPED" => Self::Stopped,
            "abort" | "FINISHED_ABORTED" => Self::Aborted,
            _ => Self::Error,
        }
    }
    /// True if the request ran to its end (length cap or stop), not aborted or failed.
    pub fn completed(self) -> bool {
        matches!(self, Self::LengthCapped | Self::Stopped)
    }
}

/// The answer to `get_num_new_matched_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched {
    /// Tokens the connector will provide beyond those computed locally.
    pub num_tokens: u64,
    /// True: they arrive asynchronously (the request waits in WAITING_FOR_REMOTE_KVS).
    pub load_async: bool,
}

impl Matched {
    /// Nothing to load: no external tokens.
    pub const NONE: Matched = Matched { num_tokens: 0, load_async: false };
}

/// What `request_finished` decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// True: keep the blocks until the workers report `finished_sending`.
    pub delay_free: bool,
    /// Returned to the client as `kv_transfer_params`.
    pub kv_transfer_params: Option<serde_json::Value>,
}

/// What optional decoded params ask for: absent params are [`KvParams::None`].
pub fn params_kind(params: Option<&Arc<ReqParams>>) -> Result<&KvParams, &ParamsError> {
    match params {
        None => Ok(&KvParams::None),
        Some(p) => p.kind.as_ref(),
    }
}

/// A remote engine at an address: (engine id, host, port).
type EngineAddr = (String, String, u16);

/// D: the leases to renew. A request is tracked from the moment it enters D (vLLM's
/// `on_new_request`, or its first match) until its load finishes or it ends; one batch per
/// remote engine goes out every `interval` seconds, inside the step's metadata (no
/// thread of its own).
#[derive(Debug, Default)]
pub struct Heartbeats {
    /// Per local request: its remote engine and P's request id (shared with `by_engine`).
    by_req: HashMap<String, (Arc<EngineAddr>, Arc<str>)>,
    by_engine: BTreeMap<Arc<EngineAddr>, (u32, BTreeSet<Arc<str>>)>,
    /// The engine last tracked: consecutive requests mostly name the same P, whose key is
    /// then shared instead of built again.
    last_engine: Option<Arc<EngineAddr>>,
    last_sent: f64,
    /// Requests tracked since the last step, per engine (for the workers' shutdown release).
    fresh: BTreeMap<Arc<EngineAddr>, (u32, Vec<Arc<str>>)>,
    /// Seconds between batches (vLLM: lease / 6).
    pub interval: f64,
}

impl Heartbeats {
    /// Renewals for leases of `lease_secs` seconds: a batch every sixth of that (at least
    /// 0.2 s).
    pub fn new(lease_secs: f64) -> Self {
        Self { interval: (lease_secs / 6.0).max(0.2), ..Default::default() }
    }

    /// Start renewing the lease P holds on `req_id`'s KV (`rp` names P and its request id);
    /// nothing if it is already tracked.
    pub fn track(&mut self, req_id: &str, rp: &RemotePrefill) {
        if self.by_req.contains_key(req_id) {
            return;
        }
        let key = match &self.last_engine {
            Some(k) if k.0 == rp.remote_engine_id && k.1 == rp.remote_host && k.2 == rp.remote_port => Arc::clone(k),
            _ => {
                let k = Arc::new((rp.remote_engine_id.clone(), rp.remote_host.clone(), rp.remote_port));
                self.last_engine = Some(Arc::clone(&k));
                k
            }
        };
        let remote: Arc<str> = Arc::from(rp.remote_request_id.as_str());
        match self.by_engine.get_mut(&*key) {
            Some(e) => {
                e.0 = rp.tp_size;
                e.1.insert(Arc::clone(&remote));
            }
            None => {
                self.by_engine.insert(Arc::clone(&key), (rp.tp_size, BTreeSet::from([Arc::clone(&remote)])));
            }
        }
        let fresh = self.fresh.entry(Arc::clone(&key)).or_insert_with(|| (rp.tp_size, Vec::new()));
        if fresh.1.len() < MAX_FRESH {
            fresh.1.push(Arc::clone(&remote));
        }
        self.by_req.insert(req_id.to_string(), (key, remote));
    }

    /// The requests tracked since the last call, one target per engine.
    pub fn take_fresh(&mut self) -> Vec<HeartbeatTarget> {
        std::mem::take(&mut self.fresh).into_iter().map(|(key, (tp_size, ids))| target(&key, tp_size, ids.iter())).collect()
    }

    /// Stop renewing `req_id`'s lease; true if it was being renewed.
    pub fn stop(&mut self, req_id: &str) -> bool {
        let Some((key, remote)) = self.by_req.remove(req_id) else { return false };
        if let Some(e) = self.by_engine.get_mut(&*key) {
            e.1.remove(&*remote);
            if e.1.is_empty() {
                self.by_engine.remove(&*key);
            }
        }
        true
    }

    /// Requests whose leases are being renewed.
    pub fn tracked(&self) -> usize {
        self.by_req.len()
    }

    /// The batches due at `now`, if any.
    pub fn due(&mut self, now_unix: f64) -> Vec<HeartbeatTarget> {
        if self.by_engine.is_empty() || now_unix - self.last_sent < self.interval {
            return Vec::new();
        }
        self.last_sent = now_unix;
        self.by_engine.iter().map(|(key, (tp_size, ids))| target(key, *tp_size, ids.iter())).collect()
    }
}

/// Most fresh requests one step reports per engine.
const MAX_FRESH: usize = 65_536;

fn target<'a>(key: &EngineAddr, tp_size: u32, ids: impl Iterator<Item = &'a Arc<str>>) -> HeartbeatTarget {
    HeartbeatTarget {
        engine_id: key.0.clone(),
        host: key.1.clone(),
        port: key.2,
        tp_size,
        request_ids: ids.map(|r| r.to_string()).collect(),
    }
}

/// A fresh engine incarnation: nonzero, different on every start. Drawn from the
/// standard library's per-process random hash keys (OS randomness; no clock read), mixed
/// with the pid.
pub fn fresh_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let mut x = h.finish() ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x & ((1u64 << 53) - 1)).max(1) // exact in JSON numbers
}

/// Ledgers shared by every scheduler variant.
#[derive(Debug, Default)]
pub struct SchedulerBase {
    /// This engine's incarnation, sent to workers (which advertise it) and in P's params.
    pub epoch: u64,
    /// D: leases to renew on remote engines.
    pub heartbeats: Heartbeats,
    /// P: blocks held per leased request (accounting).
    pub leased_blocks: HashMap<String, u32>,
    step_heartbeats: Vec<HeartbeatTarget>,
    /// P: requests whose blocks are held for a remote reader, with lease expiry.
    pub leased: HashMap<String, f64>,
    /// D: requests with a load in flight (parked in WAITING_FOR_REMOTE_KVS).
    pub loading: HashSet<String>,
    /// Requests rejected at matching time; failed when their blocks are allocated.
    pub rejected: HashMap<String, String>,
    step_recv: Vec<RecvReq>,
    step_send: Vec<SendLease>,
    step_failed: Vec<FailedReq>,
    step_push_finished: Vec<PushSend>,
    step_push_saves: Vec<PushSend>,
    step_push_register: Vec<PushRecv>,
    step_push_aborted: Vec<String>,
    step_stage: Vec<StageReq>,
    step_digest: Vec<crate::integrity::DigestReq>,
    /// P with a host buffer: requests whose blocks were ordered copied to it.
    host_copied: HashSet<String>,
}

/// P, pull with staging (`kv_staging_blocks`): which staging slots are free and which
/// requests hold them. Slot ids run from 1 (0 is never used: it reads as the null block).
#[derive(Debug, Default)]
pub struct Staging {
    capacity: u32,
    free: Vec<u32>,
    held: HashMap<String, Vec<u32>>,
    /// Held requests already handed to a reader (their lease runs on the workers).
    leased: HashSet<String>,
}

impl Staging {
    /// A pool of `capacity` slots, numbered `1..=capacity` (0: staging off).
    pub fn new(capacity: u32) -> Self {
        Self { capacity, free: (1..=capacity).rev().collect(), ..Default::default() }
    }
    /// True if there are any slots (staging is on).
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }
    /// Reserve `n` slots for `req_id` (None: not enough free, or it already holds some).
    pub fn reserve(&mut self, req_id: &str, n: usize) -> Option<Vec<u32>> {
        if n == 0 || n > self.free.len() || self.held.contains_key(req_id) {
            return None;
        }
        let slots = self.free.split_off(self.free.len() - n);
        self.held.insert(req_id.to_string(), slots.clone());
        Some(slots)
    }
    /// The slots `req_id` holds, if any.
    pub fn slots(&self, req_id: &str) -> Option<&[u32]> {
        if self.held.is_empty() {
            return None; // staging off, or nothing staged: no lookup
        }
        self.held.get(req_id).map(Vec::as_slice)
    }
    /// `req_id`'s slots were offered to a reader: their lease now runs on the workers.
    pub fn mark_leased(&mut self, req_id: &str) {
        if self.held.contains_key(req_id) {
            self.leased.insert(req_id.to_string());
        }
    }
    /// True once `req_id`'s slots were offered to a reader.
    pub fn is_leased(&self, req_id: &str) -> bool {
        self.leased.contains(req_id)
    }
    /// Return `req_id`'s slots to the pool; true if it held any.
    pub fn release(&mut self, req_id: &str) -> bool {
        self.leased.remove(req_id);
        match self.held.remove(req_id) {
            Some(slots) => {
                self.free.extend(slots);
                true
            }
            None => false,
        }
    }
    /// Slots free now.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }
    /// Requests holding slots.
    pub fn held_requests(&self) -> usize {
        self.held.len()
    }
    /// Slots in all (0: staging off).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }
}

impl SchedulerBase {
    /// Empty ledgers, a fresh epoch, and heartbeats paced by `cfg`'s lease duration.
    pub fn new(cfg: &ConnectorConfig) -> Self {
        Self { epoch: fresh_epoch(), heartbeats: Heartbeats::new(cfg.kv_lease_duration.as_secs_f64()), ..Default::default() }
    }

    /// Queue the heartbeats due at `now` into the next metadata.
    pub fn tick(&mut self, now_unix: f64) {
        let due = self.heartbeats.due(now_unix);
        if !due.is_empty() {
            self.step_heartbeats = due;
        }
    }

    /// D: queue a load, or a notify-only release of P's blocks (`reqs_to_recv`).
    pub fn push_recv(&mut self, r: RecvReq) {
        self.step_recv.push(r);
    }
    /// P: queue a lease on blocks held for a remote reader (`reqs_to_send`).
    pub fn push_send(&mut self, s: SendLease) {
        self.step_send.push(s);
    }
    /// D: queue `req_id`'s load as failed with `reason`; its worker reports it (`reqs_failed`).
    pub fn push_failed(&mut self, req_id: &str, reason: String) {
        self.step_failed.push(FailedReq { req_id: req_id.to_string(), reason });
    }

    /// Refuse a request at matching time. With tokens left to compute it is parked as an
    /// async load that its worker reports failed, so vLLM ends it with an error (or
    /// recomputes it, under kv_load_failure_policy=recompute); with none, it just runs.
    pub fn reject(&mut self, req_id: &str, num_prompt_tokens: u64, num_computed_tokens: u64, err: crate::error::Error) -> Matched {
        let reason = err.to_string();
        tracing::error!(request_id = %req_id, error = %reason, "kvbridge: rejecting request");
        let count = num_prompt_tokens.saturating_sub(num_computed_tokens);
        if count == 0 {
            return Matched::NONE;
        }
        self.rejected.insert(req_id.to_string(), reason);
        Matched { num_tokens: count, load_async: true }
    }

    /// Push, P: queue a producing request that finished or was aborted (`push_finished`).
    pub fn push_push_finished(&mut self, s: PushSend) {
        self.step_push_finished.push(s);
    }
    /// Push, P, layer-wise: queue a request whose prefill completes this step (`push_saves`).
    pub fn push_push_save(&mut self, s: PushSend) {
        self.step_push_saves.push(s);
    }
    /// Push, D: queue a registration of blocks with P, or a notify-only release (`push_register`).
    pub fn push_push_register(&mut self, r: PushRecv) {
        self.step_push_register.push(r);
    }
    /// Push, D: queue a request aborted while P may still write into it (`push_aborted`).
    pub fn push_push_aborted(&mut self, req_id: &str) {
        self.step_push_aborted.push(req_id.to_string());
    }
    /// P: queue a copy of a completed prefill's blocks into staging slots or the host buffer
    /// (`stage`).
    pub fn push_stage(&mut self, s: StageReq) {
        self.step_stage.push(s);
    }
    /// P with `kv_integrity`: digest a completed prefill's blocks after this step's forward,
    /// kept under `key`; D is told to read `offered` (staging slots, or the blocks).
    pub fn order_digest(&mut self, key: String, block_ids: &[u32], offered: &[u32]) {
        self.step_digest.push(crate::integrity::DigestReq {
            key,
            block_ids: block_ids.to_vec(),
            offered: offered.to_vec(),
            group_lens: Vec::new(),
        });
    }
    /// [`order_digest`](Self::order_digest) for several KV-cache groups (each already cut
    /// to what the transfer carries): a block is digested in its own group's regions.
    pub fn order_group_digest(&mut self, key: String, groups: &[Vec<u32>]) {
        let ids: Vec<u32> = groups.concat();
        let group_lens = groups.iter().map(|g| u32::try_from(g.len()).unwrap_or(u32::MAX)).collect();
        self.step_digest.push(crate::integrity::DigestReq { key, block_ids: ids.clone(), offered: ids, group_lens });
    }
    /// P with a host buffer: copy `req_id`'s blocks to their own ids in the host mirror
    /// after this step's forward (the worker's `wait_for_save`), and remember that it was.
    pub fn order_host_copy(&mut self, req_id: &str, block_ids: &[u32]) {
        let ids = block_ids.to_vec();
        self.push_stage(StageReq { req_id: req_id.to_string(), block_ids: ids.clone(), slots: ids });
        self.host_copied.insert(req_id.to_string());
    }
    /// P with a host buffer: whether a copy of `req_id` was ordered (forgotten here; call
    /// once, when the request finishes). A request without one must not be offered: its
    /// host-buffer blocks hold stale bytes.
    pub fn take_host_copied(&mut self, req_id: &str) -> bool {
        !self.host_copied.is_empty() && self.host_copied.remove(req_id)
    }

    /// Build this step's metadata and reset the per-step lists.
    pub fn build_connector_meta(&mut self) -> ConnectorMetadata {
        ConnectorMetadata {
            version: WIRE_VERSION,
            reqs_to_recv: std::mem::take(&mut self.step_recv),
            reqs_to_send: std::mem::take(&mut self.step_send),
            reqs_failed: std::mem::take(&mut self.step_failed),
            push_finished: std::mem::take(&mut self.step_push_finished),
            push_saves: std::mem::take(&mut self.step_push_saves),
            push_register: std::mem::take(&mut self.step_push_register),
            push_aborted: std::mem::take(&mut self.step_push_aborted),
            epoch: self.epoch,
            heartbeats: std::mem::take(&mut self.step_heartbeats),
            tracked: self.heartbeats.take_fresh(),
            stage: std::mem::take(&mut self.step_stage),
            digest: std::mem::take(&mut self.step_digest),
        }
    }

    /// Workers reported these requests done: drop their ledger entries.
    pub fn update_connector_output<'a>(
        &mut self,
        finished_sending: impl IntoIterator<Item = &'a str>,
        finished_recving: impl IntoIterator<Item = &'a str>,
    ) {
        for r in finished_sending {
            self.leased.remove(r);
            self.leased_blocks.remove(r);
        }
        for r in finished_recving {
            self.loading.remove(r);
            self.heartbeats.stop(r);
        }
    }

    /// P: true while some request's blocks are held for a remote peer.
    pub fn has_pending_block_frees(&self) -> bool {
        !self.leased.is_empty()
    }

    /// The scheduler's accounting: requests and blocks held for remote peers (P), loads
    /// in flight (D), leases being renewed (D).
    pub fn accounting(&self) -> serde_json::Value {
        serde_json::json!({
            "held_requests": self.leased.len(),
            "held_blocks": self.leased_blocks.values().map(|&b| u64::from(b)).sum::<u64>(),
            "loading_requests": self.loading.len(),
            "heartbeat_requests": self.heartbeats.tracked(),
            "epoch": self.epoch,
        })
    }
}

/// Everything a scheduler-side connector must answer, whatever the transfer mode.
pub trait SchedulerSide {
    /// The connector's configuration.
    fn config(&self) -> &ConnectorConfig;
    /// The ledgers every mode shares.
    fn base(&self) -> &SchedulerBase;
    /// A request entered the engine (vLLM's `on_new_request`): D starts renewing the
    /// lease P holds for it, even while it waits in D's queue. `kv_transfer_params` is
    /// JSON text (see [`on_new_request_parsed`](Self::on_new_request_parsed)).
    fn on_new_request(&mut self, req_id: &str, kv_transfer_params: Option<&str>) {
        let params = kv_transfer_params.map(|t| Arc::new(ReqParams::from_json(t)));
        self.on_new_request_parsed(req_id, params.as_ref());
    }
    /// [`on_new_request`](Self::on_new_request) with the params already decoded.
    fn on_new_request_parsed(&mut self, _req_id: &str, _params: Option<&Arc<ReqParams>>) {}
    /// Time passes (call before `build_connector_meta`): heartbeats fall due.
    fn tick(&mut self, _now_unix: f64) {}
    /// vLLM's `get_num_new_matched_tokens`: how many of `req_id`'s `num_prompt_tokens` tokens,
    /// beyond the `num_computed_tokens` computed locally, the connector will load, and
    /// whether asynchronously. D matches a remote prefill from `kv_transfer_params` (JSON);
    /// P notes a request to produce for a remote decode and matches nothing. Malformed
    /// params, or params this engine cannot serve, reject the request (see [`SchedulerBase::reject`]).
    fn get_num_new_matched_tokens(
        &mut self,
        req_id: &str,
        num_prompt_tokens: u64,
        num_computed_tokens: u64,
        kv_transfer_params: Option<&str>,
    ) -> Matched {
        let params = kv_transfer_params.map(|t| Arc::new(ReqParams::from_json(t)));
        self.get_num_new_matched_tokens_parsed(req_id, num_prompt_tokens, num_computed_tokens, params.as_ref())
    }
    /// [`get_num_new_matched_tokens`](Self::get_num_new_matched_tokens) with the params
    /// already decoded.
    fn get_num_new_matched_tokens_parsed(
        &mut self,
        req_id: &str,
        num_prompt_tokens: u64,
        num_computed_tokens: u64,
        params: Option<&Arc<ReqParams>>,
    ) -> Matched;
    /// vLLM's `update_state_after_alloc`: `req_id`'s blocks are allocated, and the
    /// connector is to fill `num_external_tokens` tokens into `unhashed_block_ids` (the
    /// blocks past the local prefix-cache hit). D queues the load (push: the registration
    /// with P) for the next metadata; with nothing to load it still tells P to free its
    /// blocks. A request rejected at matching is failed here.
    fn update_state_after_alloc(&mut self, req_id: &str, unhashed_block_ids: &[u32], num_external_tokens: u64) {
        self.update_state_after_alloc_groups(req_id, &[unhashed_block_ids.to_vec()], num_external_tokens);
    }
    /// [`update_state_after_alloc`](Self::update_state_after_alloc) with the blocks of
    /// each KV-cache group (vLLM's hybrid allocator: `get_unhashed_block_ids_all_groups`).
    fn update_state_after_alloc_groups(&mut self, req_id: &str, unhashed_block_ids: &[Vec<u32>], num_external_tokens: u64);
    /// vLLM's `request_finished`: `req_id` ended for `reason`, holding `block_ids`, with
    /// `num_computed_tokens` computed. P, for a remote decode: its blocks are held under a
    /// lease (`delay_free`) and the returned `kv_transfer_params` tell D where to get the
    /// KV. D: P is told to free what it holds for a request that will not load, and push
    /// mode holds blocks P may still write into.
    fn request_finished(
        &mut self,
        req_id: &str,
        block_ids: &[u32],
        reason: FinishReason,
        num_computed_tokens: u64,
        kv_transfer_params: Option<&str>,
        now_unix: f64,
    ) -> Finished {
        let params = kv_transfer_params.map(|t| Arc::new(ReqParams::from_json(t)));
        self.request_finished_parsed(req_id, block_ids, reason, num_computed_tokens, params.as_ref(), now_unix)
    }
    /// [`request_finished`](Self::request_finished) with the params already decoded.
    fn request_finished_parsed(
        &mut self,
        req_id: &str,
        block_ids: &[u32],
        reason: FinishReason,
        num_computed_tokens: u64,
        params: Option<&Arc<ReqParams>>,
        now_unix: f64,
    ) -> Finished {
        self.request_finished_groups(req_id, &[block_ids.to_vec()], reason, num_computed_tokens, params, now_unix)
    }
    /// [`request_finished_parsed`](Self::request_finished_parsed) with the blocks of each
    /// KV-cache group (vLLM's `request_finished_all_groups`). P offers a sliding-window
    /// group's blocks inside the window only.
    fn request_finished_groups(
        &mut self,
        req_id: &str,
        block_ids: &[Vec<u32>],
        reason: FinishReason,
        num_computed_tokens: u64,
        params: Option<&Arc<ReqParams>>,
        now_unix: f64,
    ) -> Finished;
    /// P: a producing request's prefill completes in the step being built, with these
    /// blocks. Layer-wise push writes each layer as it is computed; pull with staging or a
    /// host buffer copies the blocks out after the forward. Otherwise it is ignored.
    fn prefill_completing(&mut self, req_id: &str, block_ids: &[u32], num_tokens: u64) {
        self.prefill_completing_groups(req_id, &[block_ids.to_vec()], num_tokens);
    }
    /// [`prefill_completing`](Self::prefill_completing) with the blocks of each KV-cache group.
    fn prefill_completing_groups(&mut self, _req_id: &str, _block_ids: &[Vec<u32>], _num_tokens: u64) {}
    /// vLLM's `build_connector_meta`: this step's metadata for the workers (it resets the
    /// per-step lists).
    fn build_connector_meta(&mut self) -> ConnectorMetadata;
    /// Workers reported these requests done. Returns the ids of `finished_sending` that
    /// vLLM must not see: staged requests, whose blocks vLLM already freed.
    fn update_connector_output(&mut self, finished_sending: &[String], finished_recving: &[String]) -> Vec<String>;
    /// True while blocks are held for a remote peer and not yet reported free by the
    /// workers.
    fn has_pending_block_frees(&self) -> bool;
    /// The scheduler's accounting (see [`SchedulerBase::accounting`]).
    fn accounting(&self) -> serde_json::Value {
        self.base().accounting()
    }
    /// Staging slots this scheduler hands out (0: staging off).
    fn staging_slots(&self) -> u32 {
        0
    }
}

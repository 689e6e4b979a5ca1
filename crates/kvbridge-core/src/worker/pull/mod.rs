//! Pull mode on the worker side: handshake once per P engine (single-flight) with every P
//! rank this rank reads from, build the plan, then READ each request's blocks from those
//! ranks, each READ carrying a notification with P's request id. Ranks with nothing to
//! read (deduplicated heads, MLA) get a plain notification, so each P rank hears from
//! every D rank that depends on it.
use std::collections::HashMap;

use super::WorkerBase;
use crate::error::{Error, HandshakeError, PlanError, TransportError};
use crate::layout::KvLayout;
use crate::plan::{GroupBlocks, Piece, TpMapping, TransferPlan};
use crate::wire::{
    self, AgentMetadata, ConnectorMetadata, HandshakePayload, HeartbeatReply, Notif, RecvReq, MAX_HANDSHAKE_BYTES, WIRE_VERSION,
};

mod handshake;
mod leases;
mod warm;

/// What the driver must do next. `key` names one remote rank's transport connection:
/// [`remote_key`]`(peer, rank)`.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fetch the handshake payload of remote rank `rank` of `peer` from `host:port`, then
    /// call [`PullWorker::on_handshake_payload`]. Rank 0's comes first: it also says where
    /// the other ranks listen ([`crate::ranks`]).
    Handshake {
        /// The remote engine, as [`peer_key`] names it.
        peer: String,
        /// The remote TP rank.
        rank: u32,
        /// The side channel's host.
        host: String,
        /// The side channel port of that rank.
        port: u16,
    },
    /// Load the remote rank's transport metadata, then call [`PullWorker::on_remote_added`].
    AddRemote {
        /// The remote engine, as [`peer_key`] names it.
        peer: String,
        /// The remote TP rank.
        rank: u32,
        /// The name to load it under: [`remote_key`]`(peer, rank)`.
        key: String,
        /// The rank's metadata from its handshake payload.
        md: AgentMetadata,
    },
    /// Forget a remote rank's connection.
    RemoveRemote {
        /// The connection to forget.
        key: String,
    },
    /// Post a READ of `pieces` from `key`, with `notif` delivered on completion; then
    /// report its end with [`PullWorker::on_read_done`].
    Read {
        /// The local (D) request the READ loads.
        req_id: String,
        /// The remote rank's connection.
        key: String,
        /// The byte ranges to read.
        pieces: Vec<Piece>,
        /// The encoded [`Notif`] P receives when the READ completes.
        notif: Vec<u8>,
        /// Bytes the pieces cover.
        bytes: u64,
    },
    /// Send a notification with no transfer (nothing to read from that rank, or a failure).
    Notify {
        /// The remote rank's connection.
        key: String,
        /// The encoded [`Notif`].
        msg: Vec<u8>,
    },
}

// One per remote engine, kept in a map and rarely moved: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Engine {
    Handshaking {
        engine_id: String,
        tp: TpMapping,
        /// Rank 0's address while its answer, the directory of the other ranks'
        /// addresses, is awaited (None: not needed, or answered).
        directory: Option<(String, u16)>,
        /// The remote ranks handshaken, as `pp * remote TP size + tp` (pipeline stage 0's
        /// `tp.sources` until the directory names more stages); `mds`/`added` follow it.
        sources: Vec<u32>,
        mds: Vec<Option<AgentMetadata>>,
        added: Vec<bool>,
        queued: Vec<RecvReq>,
        plan: Option<TransferPlan>,
        /// The plan for P's staging buffer, when every rank advertised one.
        staged: Option<TransferPlan>,
        /// From the payloads: the peer's incarnation (first nonzero) and clock offset.
        epoch: u64,
        clock_offset: Option<f64>,
        /// When the first handshake request went out (for the handshake-time stat).
        started_unix: f64,
    },
    Ready {
        plan: TransferPlan,
        /// For requests whose KV P staged (`remote_staged`); None: P has no staging.
        staged: Option<TransferPlan>,
        /// The peer's incarnation (0: it did not say).
        epoch: u64,
        /// The peer's clock minus ours, estimated at handshake (seconds).
        clock_offset: f64,
    },
}

/// Renewal margin: a READ is not started on a lease ending sooner than this.
const LEASE_MARGIN_SECS: f64 = 0.5;
/// Bound on remembered peers for first-contact timing.
const CONTACTED_CAP: usize = 4096;
/// Bound on remembered lease facts (heartbeat answers not yet used by a READ).
const LEASE_FACTS_CAP: usize = 65_536;

/// A peer is a remote engine *at an address*: `engine_id@host:port`. A request naming a
/// known engine at another address gets its own handshake, which checks the claim.
pub fn peer_key(r: &crate::wire::RemoteRef) -> String {
    peer_key_at(&r.engine_id, &r.host, r.port)
}

/// [`peer_key`] of engine `engine_id` whose side channel is at `host:port`.
pub fn peer_key_at(engine_id: &str, host: &str, port: u16) -> String {
    format!("{engine_id}@{host}:{port}")
}

/// The plan for `r`: the peer's cache plan, or its staging plan when P staged the KV
/// (`remote_staged`); an error if P staged it but advertised no staging buffer.
fn plan_for<'a>(r: &RecvReq, peer: &str, plan: &'a TransferPlan, staged: Option<&'a TransferPlan>) -> Result<&'a TransferPlan, Error> {
    match (r.remote.staged, staged) {
        (false, _) => Ok(plan),
        (true, Some(s)) => Ok(s),
        (true, None) => Err(HandshakeError::Rejected {
            addr: peer.to_string(),
            reason: "the request's KV is staged (remote_staged) but the prefill engine advertised no staging buffer".into(),
        }
        .into()),
    }
}

/// The transport connection to remote rank `rank` of `peer`.
pub fn remote_key(peer: &str, rank: u32) -> String {
    format!("{peer}#{rank}")
}

/// A load in flight on this rank.
#[derive(Debug, Clone)]
pub(crate) struct Loading {
    pub req_id: String,
    pub peer: String,
    pub remote_request_id: String,
    pub local_block_ids: Vec<u32>,
    pub bytes: u64,
    pub descriptors: u64,
    pub started_unix: f64,
    /// Time spent in the post calls (all ranks).
    pub post_secs: f64,
    /// READs still in flight (one per remote rank read from).
    pub pending: usize,
    pub error: Option<TransportError>,
}

/// Counters kept by the worker, exported as stats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullStats {
    /// Loads whose READs all completed (one per request).
    pub reads_ok: u64,
    /// Loads that failed, whatever the cause (handshake, plan, lease, transport).
    pub reads_failed: u64,
    /// Bytes read by the successful loads.
    pub bytes_read: u64,
    /// Seconds spent by the successful loads, from post to completion, summed.
    pub read_secs_total: f64,
    /// Seconds the last successful load took.
    pub last_read_secs: f64,
    /// Bytes the last successful load read.
    pub last_read_bytes: u64,
    /// Handshakes completed: a remote engine's ranks all answered and were loaded.
    pub handshakes_ok: u64,
    /// Handshakes that failed (payload rejected, no plan, or the transport refused a rank).
    pub handshakes_failed: u64,
    /// Heartbeat requests sent (one per P rank per batch).
    pub heartbeats_sent: u64,
    /// Heartbeat requests that failed (no usable reply).
    pub heartbeats_failed: u64,
    /// Requests failed because P's lease on their blocks ended before the READ.
    pub leases_lost: u64,
    /// Remote engines forgotten after `engine_ttl` of silence.
    pub engines_evicted: u64,
    /// Descriptors posted (after coalescing), in all.
    pub descriptors: u64,
    /// Descriptors posted (after coalescing) for the last request.
    pub last_descriptors: u64,
    /// Descriptors a per-block scheme would have posted for the same requests.
    pub descriptors_uncoalesced: u64,
    /// READs that went through receive staging (whole remote blocks, then local copies).
    pub staged_reads: u64,
}

/// The pull-mode worker state machine (one per TP rank): D's handshakes, plans and
/// READs, and through [`WorkerBase`] P's leases on the blocks it serves.
#[derive(Debug)]
pub struct PullWorker {
    engine_id: String,
    tp_rank: u32,
    tp_size: u32,
    block_size: u32,
    compat_hash: String,
    enforce_compat: bool,
    /// The facts behind the hash and the transfer mode (to name differing fields).
    pub compat: crate::config::CompatInfo,
    /// This engine's transfer mode name (`"pull"` or `"push"`), compared with a peer's.
    pub mode: String,
    /// Merge contiguous pieces into one descriptor (off only for comparisons).
    pub coalesce: bool,
    /// The engine's null block id (vLLM: 0), never transferred.
    pub null_block: Option<u32>,
    layout: Option<KvLayout>,
    engines: HashMap<String, Engine>,
    loading: HashMap<String, Loading>,
    /// Per peer: the incarnations seen (by handshake) and replaced since.
    retired: HashMap<String, Vec<u64>>,
    /// Lease facts from heartbeats, by [`lease_key`]: a local deadline for held leases,
    /// or the reason a lease ended early.
    deadlines: HashMap<String, f64>,
    lost: HashMap<String, String>,
    /// When each peer was last heard from (handshake, READ, heartbeat).
    last_active: HashMap<String, f64>,
    /// How long a posted READ may take before it fails (the driver sets it: vLLM's
    /// `kv_lease_duration`).
    pub read_timeout_secs: f64,
    /// Remote engines not heard from this long are forgotten (`engine_ttl`).
    pub engine_ttl_secs: f64,
    /// When idle engines are next looked for.
    next_evict: f64,
    /// Peers some request has been routed to (the first one times first contact).
    contacted: std::collections::HashSet<String>,
    /// First requests to a peer, and when they were routed (until their READ is posted).
    first_contact: HashMap<String, f64>,
    /// Each peer's rank table from its directory (rank 0), for heartbeats and releases.
    rank_addrs: HashMap<String, Vec<crate::ranks::RankAddr>>,
    /// Pipeline parallel: every local stage's layer names ([`Self::set_stage_layers`]).
    stage_layers: Vec<Vec<String>>,
    /// Leases, notifications and the finished sets shared with the other modes.
    pub base: WorkerBase,
    /// Counters, exported as stats.
    pub stats: PullStats,
}

/// A P request's lease, as D names it: `peer|remote request id`.
pub fn lease_key(peer: &str, remote_request_id: &str) -> String {
    format!("{peer}|{remote_request_id}")
}

impl PullWorker {
    /// A worker for rank `tp_rank` of `tp_size` of engine `engine_id`. Handshakes compare
    /// peers' compatibility hash with `compat_hash`; a mismatch fails them only when
    /// `enforce_compat` is set.
    pub fn new(engine_id: String, tp_rank: u32, tp_size: u32, compat_hash: String, enforce_compat: bool) -> Self {
        Self {
            engine_id,
            tp_rank,
            tp_size,
            block_size: 0,
            compat_hash,
            enforce_compat,
            compat: Default::default(),
            mode: String::new(),
            coalesce: true,
            null_block: None,
            layout: None,
            engines: HashMap::new(),
            loading: HashMap::new(),
            retired: HashMap::new(),
            deadlines: HashMap::new(),
            lost: HashMap::new(),
            last_active: HashMap::new(),
            read_timeout_secs: 480.0,
            engine_ttl_secs: 600.0,
            next_evict: 0.0,
            contacted: Default::default(),
            first_contact: HashMap::new(),
            rank_addrs: HashMap::new(),
            stage_layers: Vec::new(),
            base: WorkerBase::default(),
            stats: PullStats::default(),
        }
    }

    /// This engine's compatibility hash, as advertised in handshakes.
    pub fn compat_hash(&self) -> &str {
        &self.compat_hash
    }

    /// The local caches are registered; `block_size` is the scheduler's (logical) one.
    pub fn on_registered(&mut self, layout: KvLayout, block_size: u32) {
        self.layout = Some(layout);
        self.block_size = block_size;
    }

    /// The local KV layout, once registered.
    pub fn layout(&self) -> Option<&KvLayout> {
        self.layout.as_ref()
    }

    /// True once `peer` (a [`peer_key`]) is handshaken and has a transfer plan.
    pub fn is_peer_ready(&self, peer: &str) -> bool {
        matches!(self.engines.get(peer), Some(Engine::Ready { .. }))
    }

    fn notif(&self, request_id: &str, ok: bool, expected: u32) -> Vec<u8> {
        Notif {
            version: WIRE_VERSION,
            request_id: request_id.to_string(),
            from_engine: self.engine_id.clone(),
            from_tp_rank: self.tp_rank,
            ok,
            expected,
        }
        .to_bytes()
        .unwrap_or_default()
    }

    fn fail(&mut self, req_id: &str, local_block_ids: &[Vec<u32>], notify_only: bool, err: &Error) {
        tracing::error!(request_id = %req_id, error = %err, "kvbridge: KV load failed");
        self.first_contact.remove(req_id);
        if notify_only {
            return;
        }
        self.stats.reads_failed += 1;
        self.base.out.recving.push(req_id.to_string());
        self.base.out.failed_recving.push(req_id.to_string());
        for g in local_block_ids {
            self.base.out.invalid_block_ids.extend(g.iter().filter(|&&b| Some(b) != self.null_block));
        }
    }

    /// A step's metadata from the scheduler.
    pub fn on_metadata(&mut self, md: ConnectorMetadata, now_unix: f64) -> Vec<Action> {
        self.base.on_leases(&md.reqs_to_send);
        for f in &md.reqs_failed {
            self.fail(&f.req_id, &[], false, &Error::Other(f.reason.clone()));
        }
        let mut actions = Vec::new();
        for r in md.reqs_to_recv {
            self.route(r, now_unix, &mut actions);
        }
        actions
    }

    fn route(&mut self, r: RecvReq, now_unix: f64, actions: &mut Vec<Action>) {
        let peer = peer_key(&r.remote);
        if !r.notify_only && self.contacted.len() < CONTACTED_CAP && self.contacted.insert(peer.clone()) {
            self.first_contact.insert(r.req_id.clone(), now_unix);
        }
        if let Some(Engine::Ready { epoch, .. }) = self.engines.get(&peer) {
            let (have, want) = (*epoch, r.remote.epoch);
            if have != 0 && want != 0 && have != want {
                let busy = self.loading.values().any(|l| l.peer == peer);
                if busy || self.retired.get(&peer).is_some_and(|v| v.contains(&want)) {
                    // Retired: that P is gone. Busy: the live plan is serving READs (a P
                    // that restarted under them fails them, and the next request then
                    // re-handshakes); never tear it down under them for one odd request.
                    let e = Error::Other(format!(
                        "this request's KV was prefilled by incarnation {want} of the engine at {peer}, which is now incarnation {have} (it restarted): the KV is gone"
                    ));
                    return self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e);
                }
                // A request from an incarnation we have not met: the peer may have
                // restarted. Forget it and handshake again; the request waits for that.
                tracing::warn!(%peer, have, want, "kvbridge: request names another incarnation of the prefill engine; re-handshaking");
                actions.extend(self.forget(&peer));
            }
        }
        match self.engines.get_mut(&peer) {
            Some(Engine::Ready { plan, staged, .. }) => {
                let plan = match plan_for(&r, &peer, plan, staged.as_ref()) {
                    Ok(p) => p,
                    Err(e) => return self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e),
                };
                if plan.tp.remote_tp_size != r.remote.tp_size {
                    let e = HandshakeError::Rejected {
                        addr: peer.clone(),
                        reason: format!("request says remote TP size {}, handshake said {}", r.remote.tp_size, plan.tp.remote_tp_size),
                    };
                    self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e.into());
                    return;
                }
                let plan = plan.clone();
                self.start(r, &peer, &plan, now_unix, actions);
            }
            Some(Engine::Handshaking { queued, .. }) => queued.push(r),
            None => {
                // Single-flight: the first request for an engine starts the handshakes
                // (one per remote rank this rank reads from); the rest queue behind them.
                let (tp, hs, directory) = match self.handshake_actions(&peer, &r.remote.host, r.remote.port, r.remote.tp_size) {
                    Ok(x) => x,
                    Err(e) => return self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e),
                };
                actions.extend(hs);
                let engine_id = r.remote.engine_id.clone();
                self.insert_handshaking(peer, engine_id, (tp, directory), vec![r], now_unix);
            }
        }
    }

    fn start(&mut self, r: RecvReq, peer: &str, plan: &TransferPlan, now_unix: f64, actions: &mut Vec<Action>) {
        let keys: Vec<String> = plan.sources.iter().map(|&q| remote_key(peer, q)).collect();
        let expected = |i: usize| plan.expected.get(i).copied().unwrap_or(1);
        let notify_all = |this: &Self, ok: bool, actions: &mut Vec<Action>| {
            for (i, k) in keys.iter().enumerate() {
                actions.push(Action::Notify { key: k.clone(), msg: this.notif(&r.remote.request_id, ok, expected(i)) });
            }
        };
        self.last_active.insert(peer.to_string(), now_unix);
        let lk = lease_key(peer, &r.remote.request_id);
        let hb_deadline = self.deadlines.remove(&lk);
        let lost = self.lost.remove(&lk);
        if !r.notify_only {
            let (epoch, offset) = match self.engines.get(peer) {
                Some(Engine::Ready { epoch, clock_offset, .. }) => (*epoch, *clock_offset),
                _ => (0, 0.0),
            };
            let problem = if r.remote.epoch != 0 && epoch != 0 && r.remote.epoch != epoch {
                Some(format!(
                    "the prefill engine at {peer} restarted after it prefilled this request (incarnation {}, now {epoch}): its KV is gone",
                    r.remote.epoch
                ))
            } else if let Some(why) = lost {
                Some(why)
            } else {
                // P's own expiry (moved to our clock), or a later one a heartbeat got.
                let p_deadline = (r.remote.expiry_unix > 0.0).then_some(r.remote.expiry_unix - offset);
                let deadline = match (p_deadline, hb_deadline) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                deadline.filter(|d| now_unix > d - LEASE_MARGIN_SECS).map(|d| {
                    format!(
                        "P's lease on this request's blocks ended {:.1} s ago (kv_lease_duration; was D too slow, or did heartbeats fail?)",
                        now_unix - d
                    )
                })
            };
            if let Some(why) = problem {
                self.stats.leases_lost += 1;
                notify_all(self, false, actions);
                return self.fail(&r.req_id, &r.local_block_ids, false, &Error::Other(why));
            }
        }
        let groups: Vec<GroupBlocks<'_>> = r
            .local_block_ids
            .iter()
            .enumerate()
            .map(|(g, l)| GroupBlocks { local: l, remote: r.remote.block_ids.get(g).map(Vec::as_slice).unwrap_or(&[]) })
            .collect();
        let nothing = r.local_block_ids.iter().all(Vec::is_empty);
        let planned = if nothing { Ok(Default::default()) } else { plan.transfer(&groups, r.num_tokens, self.coalesce) };
        let t = match planned {
            Err(e) => {
                notify_all(self, false, actions);
                return self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e.into());
            }
            Ok(t) => t,
        };
        if t.reads.is_empty() {
            // Nothing to read (full local prefix hit, or aborted before allocation):
            // still tell P so it frees its blocks now rather than at lease expiry.
            notify_all(self, true, actions);
            if !r.notify_only {
                self.base.out.recving.push(r.req_id);
            }
            return;
        }
        self.stats.descriptors += t.descriptors;
        self.stats.last_descriptors = t.descriptors;
        self.stats.descriptors_uncoalesced += t.uncoalesced;
        let ok = |i: usize| self.notif(&r.remote.request_id, true, expected(i));
        for (i, k) in keys.iter().enumerate() {
            if !t.reads.iter().any(|x| x.source == i) {
                // A rank we need nothing from (deduplicated heads, MLA) still frees on our word.
                actions.push(Action::Notify { key: k.clone(), msg: ok(i) });
            }
        }
        let pending = t.reads.len();
        for read in t.reads {
            let bytes = read.pieces.iter().map(|p| p.len).sum();
            // `source` indexes the plan's own source list, which `keys` mirrors.
            let Some(key) = keys.get(read.source).cloned() else { continue };
            actions.push(Action::Read { req_id: r.req_id.clone(), key, pieces: read.pieces, notif: ok(read.source), bytes });
        }
        self.loading.insert(
            r.req_id.clone(),
            Loading {
                req_id: r.req_id,
                peer: peer.to_string(),
                remote_request_id: r.remote.request_id,
                local_block_ids: r.local_block_ids.concat(),
                bytes: t.bytes,
                descriptors: t.descriptors,
                started_unix: now_unix,
                post_secs: 0.0,
                pending,
                error: None,
            },
        );
    }

    /// A READ from `key` finished (or failed). The request is done when all its READs
    /// are. On failure, that rank is told (its notification rode on the READ) and the
    /// peer is forgotten so the next request re-handshakes.
    pub fn on_read_done(&mut self, req_id: &str, key: &str, res: Result<(), TransportError>, now_unix: f64) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(l) = self.loading.get_mut(req_id) else { return actions };
        l.pending = l.pending.saturating_sub(1);
        if let Err(e) = res {
            let expected = match self.engines.get(&l.peer) {
                Some(Engine::Ready { plan, .. }) => {
                    let i = plan.sources.iter().position(|&q| remote_key(&l.peer, q) == key);
                    i.and_then(|i| plan.expected.get(i).copied()).unwrap_or(1)
                }
                _ => 1,
            };
            let rid = l.remote_request_id.clone();
            l.error.get_or_insert(e);
            actions.push(Action::Notify { key: key.to_string(), msg: self.notif(&rid, false, expected) });
        }
        let Some(l) = self.loading.get(req_id) else { return actions };
        if l.pending > 0 {
            return actions;
        }
        let Some(l) = self.loading.remove(req_id) else { return actions };
        match l.error {
            None => {
                let secs = if l.started_unix > 0.0 { (now_unix - l.started_unix).max(0.0) } else { 0.0 };
                self.stats.reads_ok += 1;
                self.stats.bytes_read += l.bytes;
                self.stats.read_secs_total += secs;
                self.stats.last_read_secs = secs;
                self.stats.last_read_bytes = l.bytes;
                self.base.xfer.record_transfer(secs, l.post_secs, l.bytes, l.descriptors);
                let post_ms = l.post_secs * 1e3;
                tracing::info!(request_id = %l.req_id, bytes = l.bytes, descs = l.descriptors, secs, post_ms, "kvbridge-xfer");
                self.base.out.recving.push(l.req_id);
            }
            Some(e) => {
                self.base.xfer.record_failed_transfer();
                // A lost lease says nothing about the connection; a transport error may
                // mean the peer restarted: forget it, so the next request re-handshakes.
                let forget = e.kind != "lease";
                self.fail(&l.req_id, &[l.local_block_ids], false, &e.into());
                if forget {
                    actions.extend(self.forget(&l.peer));
                }
            }
        }
        actions
    }

    /// Record when a read was actually posted and how long the post call took (for the
    /// transfer-time and post-time stats).
    pub fn mark_posted(&mut self, req_id: &str, now_unix: f64, post_secs: f64) {
        if let Some(l) = self.loading.get_mut(req_id) {
            if l.started_unix <= 0.0 {
                l.started_unix = now_unix;
            }
            l.post_secs += post_secs;
        }
    }

    /// One of `req_id`'s READs went through receive staging: `direct` descriptors became
    /// `posted` (whole remote blocks). Its bytes stay the KV bytes the request needed.
    pub fn mark_staged(&mut self, req_id: &str, direct: u64, posted: u64) {
        if let Some(l) = self.loading.get_mut(req_id) {
            l.descriptors = l.descriptors.saturating_sub(direct).saturating_add(posted);
            self.stats.descriptors = self.stats.descriptors.saturating_sub(direct).saturating_add(posted);
            self.stats.last_descriptors = l.descriptors;
            self.stats.staged_reads += 1;
        }
    }

    /// Forget a ready peer: its plan and loaded ranks (the next request re-handshakes).
    fn forget(&mut self, peer: &str) -> Vec<Action> {
        match self.engines.remove(peer) {
            Some(Engine::Ready { plan, .. }) => plan.sources.iter().map(|&q| Action::RemoveRemote { key: remote_key(peer, q) }).collect(),
            Some(other) => {
                self.engines.insert(peer.to_string(), other);
                Vec::new()
            }
            None => Vec::new(),
        }
    }
}

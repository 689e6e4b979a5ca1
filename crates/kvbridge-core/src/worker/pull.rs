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
use crate::wire::{self, AgentMetadata, ConnectorMetadata, HandshakePayload, Notif, RecvReq, MAX_HANDSHAKE_BYTES, WIRE_VERSION};

/// What the driver must do next. `key` names one remote rank's transport connection:
/// [`remote_key`]`(peer, rank)`.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fetch the handshake payload of remote rank `rank` of `peer` from `host:port`, then
    /// call [`PullWorker::on_handshake_payload`].
    Handshake { peer: String, rank: u32, host: String, port: u16 },
    /// Load the remote rank's transport metadata, then call [`PullWorker::on_remote_added`].
    AddRemote { peer: String, rank: u32, key: String, md: AgentMetadata },
    /// Forget a remote rank's connection.
    RemoveRemote { key: String },
    /// Post a READ of `pieces` from `key`, with `notif` delivered on completion; then
    /// report its end with [`PullWorker::on_read_done`].
    Read { req_id: String, key: String, pieces: Vec<Piece>, notif: Vec<u8>, bytes: u64 },
    /// Send a notification with no transfer (nothing to read from that rank, or a failure).
    Notify { key: String, msg: Vec<u8> },
}

#[derive(Debug)]
enum Engine {
    Handshaking {
        engine_id: String,
        tp: TpMapping,
        mds: Vec<Option<AgentMetadata>>,
        added: Vec<bool>,
        queued: Vec<RecvReq>,
        plan: Option<TransferPlan>,
    },
    Ready {
        plan: TransferPlan,
    },
}

/// A peer is a remote engine *at an address*: `engine_id@host:port`. A request naming a
/// known engine at another address gets its own handshake, which checks the claim.
pub fn peer_key(r: &crate::wire::RemoteRef) -> String {
    format!("{}@{}:{}", r.engine_id, r.host, r.port)
}

/// The transport connection to remote rank `rank` of `peer`.
pub fn remote_key(peer: &str, rank: u32) -> String {
    format!("{peer}#{rank}")
}

#[derive(Debug, Clone)]
pub struct Loading {
    pub req_id: String,
    pub peer: String,
    pub remote_request_id: String,
    pub local_block_ids: Vec<u32>,
    pub bytes: u64,
    pub descriptors: u64,
    pub started_unix: f64,
    /// READs still in flight (one per remote rank read from).
    pub pending: usize,
    pub error: Option<TransportError>,
}

/// Counters kept by the worker, exported as stats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullStats {
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub bytes_read: u64,
    pub read_secs_total: f64,
    pub last_read_secs: f64,
    pub last_read_bytes: u64,
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    /// Descriptors posted (after coalescing), in all and for the last request.
    pub descriptors: u64,
    pub last_descriptors: u64,
    /// Descriptors a per-block scheme would have posted for the same requests.
    pub descriptors_uncoalesced: u64,
}

#[derive(Debug)]
pub struct PullWorker {
    engine_id: String,
    tp_rank: u32,
    tp_size: u32,
    block_size: u32,
    compat_hash: String,
    enforce_compat: bool,
    /// Merge contiguous pieces into one descriptor (off only for comparisons).
    pub coalesce: bool,
    /// The engine's null block id (vLLM: 0), never transferred.
    pub null_block: Option<u32>,
    layout: Option<KvLayout>,
    engines: HashMap<String, Engine>,
    loading: HashMap<String, Loading>,
    pub base: WorkerBase,
    pub stats: PullStats,
}

impl PullWorker {
    pub fn new(engine_id: String, tp_rank: u32, tp_size: u32, compat_hash: String, enforce_compat: bool) -> Self {
        Self {
            engine_id,
            tp_rank,
            tp_size,
            block_size: 0,
            compat_hash,
            enforce_compat,
            coalesce: true,
            null_block: None,
            layout: None,
            engines: HashMap::new(),
            loading: HashMap::new(),
            base: WorkerBase::default(),
            stats: PullStats::default(),
        }
    }

    pub fn compat_hash(&self) -> &str {
        &self.compat_hash
    }

    /// The local caches are registered; `block_size` is the scheduler's (logical) one.
    pub fn on_registered(&mut self, layout: KvLayout, block_size: u32) {
        self.layout = Some(layout);
        self.block_size = block_size;
    }

    pub fn layout(&self) -> Option<&KvLayout> {
        self.layout.as_ref()
    }

    /// When the READ for `req_id` was posted (Unix seconds), if it is in flight.
    pub fn read_started(&self, req_id: &str) -> Option<f64> {
        self.loading.get(req_id).map(|l| l.started_unix)
    }

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
    pub fn on_metadata(&mut self, md: ConnectorMetadata, _now_unix: f64) -> Vec<Action> {
        self.base.on_leases(&md.reqs_to_send);
        for f in &md.reqs_failed {
            self.fail(&f.req_id, &[], false, &Error::Other(f.reason.clone()));
        }
        let mut actions = Vec::new();
        for r in md.reqs_to_recv {
            self.route(r, &mut actions);
        }
        actions
    }

    fn route(&mut self, r: RecvReq, actions: &mut Vec<Action>) {
        let peer = peer_key(&r.remote);
        match self.engines.get_mut(&peer) {
            Some(Engine::Ready { plan }) => {
                if plan.tp.remote_tp_size != r.remote.tp_size {
                    let e = HandshakeError::Rejected {
                        addr: peer.clone(),
                        reason: format!("request says remote TP size {}, handshake said {}", r.remote.tp_size, plan.tp.remote_tp_size),
                    };
                    self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e.into());
                    return;
                }
                let plan = plan.clone();
                self.start(r, &peer, &plan, 0.0, actions);
            }
            Some(Engine::Handshaking { queued, .. }) => queued.push(r),
            None => {
                // Single-flight: the first request for an engine starts the handshakes
                // (one per remote rank this rank reads from); the rest queue behind them.
                let tp = match TpMapping::new(self.tp_size, self.tp_rank, r.remote.tp_size) {
                    Ok(tp) => tp,
                    Err(e) => return self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e.into()),
                };
                let mut hs = Vec::new();
                for &rank in &tp.sources {
                    let Some(port) = u16::try_from(rank).ok().and_then(|q| r.remote.port.checked_add(q)) else {
                        let e = Error::Other(format!("remote_port {} + rank {rank} overflows", r.remote.port));
                        return self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e);
                    };
                    hs.push(Action::Handshake { peer: peer.clone(), rank, host: r.remote.host.clone(), port });
                }
                actions.extend(hs);
                let n = tp.sources.len();
                self.engines.insert(
                    peer,
                    Engine::Handshaking {
                        engine_id: r.remote.engine_id.clone(),
                        tp,
                        mds: vec![None; n],
                        added: vec![false; n],
                        queued: vec![r],
                        plan: None,
                    },
                );
            }
        }
    }

    fn start(&mut self, r: RecvReq, peer: &str, plan: &TransferPlan, now_unix: f64, actions: &mut Vec<Action>) {
        let expected = plan.tp.notifs_per_remote_rank;
        let keys: Vec<String> = plan.tp.sources.iter().map(|&q| remote_key(peer, q)).collect();
        let notify_all = |this: &Self, ok: bool, actions: &mut Vec<Action>| {
            for k in &keys {
                actions.push(Action::Notify { key: k.clone(), msg: this.notif(&r.remote.request_id, ok, expected) });
            }
        };
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
        let ok = self.notif(&r.remote.request_id, true, expected);
        for (i, k) in keys.iter().enumerate() {
            if !t.reads.iter().any(|x| x.source == i) {
                // A rank we need nothing from (deduplicated heads, MLA) still frees on our word.
                actions.push(Action::Notify { key: k.clone(), msg: ok.clone() });
            }
        }
        let pending = t.reads.len();
        for read in t.reads {
            let bytes = read.pieces.iter().map(|p| p.len).sum();
            actions.push(Action::Read {
                req_id: r.req_id.clone(),
                key: keys[read.source].clone(),
                pieces: read.pieces,
                notif: ok.clone(),
                bytes,
            });
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
                pending,
                error: None,
            },
        );
    }

    /// Check a handshake reply: the hash first, then the metadata.
    pub(crate) fn check_payload(&self, engine_id: &str, addr: &str, bytes: &[u8]) -> Result<AgentMetadata, Error> {
        let p: HandshakePayload = wire::decode("HandshakePayload", bytes, MAX_HANDSHAKE_BYTES)?;
        if let Some(reason) = p.error {
            return Err(HandshakeError::Rejected { addr: addr.into(), reason }.into());
        }
        if p.compat_hash != self.compat_hash {
            if self.enforce_compat {
                return Err(
                    HandshakeError::Incompatible { addr: addr.into(), local: self.compat_hash.clone(), remote: p.compat_hash }.into()
                );
            }
            tracing::warn!(addr, "kvbridge: compatibility hash differs but enforce_handshake_compat=false; continuing");
        }
        let md: AgentMetadata = wire::decode("AgentMetadata", &p.agent_metadata, MAX_HANDSHAKE_BYTES)?;
        if md.engine_id != engine_id {
            return Err(HandshakeError::EngineMismatch { addr: addr.into(), expected: engine_id.into(), actual: md.engine_id }.into());
        }
        Ok(md)
    }

    /// Remote rank `rank`'s side channel answered (or failed). Once every rank has, the
    /// plan is built — or the handshake fails with the reason — before any transport work.
    pub fn on_handshake_payload(&mut self, peer: &str, rank: u32, addr: &str, res: Result<Vec<u8>, HandshakeError>) -> Vec<Action> {
        let Some(Engine::Handshaking { engine_id, tp, mds, .. }) = self.engines.get(peer) else { return Vec::new() };
        let Some(slot) = tp.sources.iter().position(|&q| q == rank) else { return Vec::new() };
        if mds[slot].is_some() {
            return Vec::new();
        }
        let engine_id = engine_id.clone();
        let md = match res.map_err(Error::from).and_then(|b| self.check_payload(&engine_id, addr, &b)) {
            Ok(md) => md,
            Err(e) => {
                self.stats.handshakes_failed += 1;
                return self.fail_engine(peer, &e);
            }
        };
        let Some(Engine::Handshaking { mds, .. }) = self.engines.get_mut(peer) else { return Vec::new() };
        mds[slot] = Some(md);
        if mds.iter().any(Option::is_none) {
            return Vec::new();
        }
        let all: Vec<AgentMetadata> = mds.iter().flatten().cloned().collect();
        let built = self
            .layout
            .as_ref()
            .ok_or(PlanError::NotRegistered)
            .and_then(|l| TransferPlan::build(l, self.tp_size, self.tp_rank, self.block_size, &all, self.null_block));
        match built {
            Ok(plan) => {
                let sources = plan.tp.sources.clone();
                if let Some(Engine::Handshaking { plan: p, .. }) = self.engines.get_mut(peer) {
                    *p = Some(plan);
                }
                sources
                    .into_iter()
                    .zip(all)
                    .map(|(rank, md)| Action::AddRemote { peer: peer.to_string(), rank, key: remote_key(peer, rank), md })
                    .collect()
            }
            Err(e) => {
                self.stats.handshakes_failed += 1;
                self.fail_engine(peer, &e.into())
            }
        }
    }

    /// The transport loaded remote rank `rank` (or could not).
    pub fn on_remote_added(&mut self, peer: &str, rank: u32, res: Result<(), TransportError>, now_unix: f64) -> Vec<Action> {
        if let Err(e) = res {
            self.stats.handshakes_failed += 1;
            return self.fail_engine(peer, &e.into());
        }
        let Some(Engine::Handshaking { tp, added, .. }) = self.engines.get_mut(peer) else { return Vec::new() };
        if let Some(slot) = tp.sources.iter().position(|&q| q == rank) {
            added[slot] = true;
        }
        if !added.iter().all(|&a| a) {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if let Some(Engine::Handshaking { queued, plan: Some(plan), .. }) = self.engines.remove(peer) {
            self.stats.handshakes_ok += 1;
            tracing::info!(
                peer,
                remote_ranks = ?plan.tp.sources,
                regions = plan.num_regions,
                remote_blocks = plan.remote_num_blocks,
                ranges_per_block = plan.ranges_per_block,
                "kvbridge: handshake done, transfer plan ready"
            );
            for r in queued {
                self.start(r, peer, &plan, now_unix, &mut actions);
            }
            self.engines.insert(peer.to_string(), Engine::Ready { plan });
        }
        actions
    }

    /// Fail every request queued on `peer` and forget it (and any ranks already loaded).
    fn fail_engine(&mut self, peer: &str, e: &Error) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(Engine::Handshaking { queued, tp, added, .. }) = self.engines.remove(peer) {
            for r in queued {
                self.fail(&r.req_id, &r.local_block_ids, r.notify_only, e);
            }
            for (q, a) in tp.sources.iter().zip(added) {
                if a {
                    actions.push(Action::RemoveRemote { key: remote_key(peer, *q) });
                }
            }
        }
        actions
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
                Some(Engine::Ready { plan }) => plan.tp.notifs_per_remote_rank,
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
                tracing::info!(request_id = %l.req_id, bytes = l.bytes, descs = l.descriptors, secs, "kvbridge-xfer");
                self.base.out.recving.push(l.req_id);
            }
            Some(e) => {
                self.fail(&l.req_id, &[l.local_block_ids], false, &e.into());
                if let Some(Engine::Ready { plan }) = self.engines.remove(&l.peer) {
                    for &q in &plan.tp.sources {
                        actions.push(Action::RemoveRemote { key: remote_key(&l.peer, q) });
                    }
                }
            }
        }
        actions
    }

    /// Record when a read was actually posted (for transfer-time stats).
    pub fn mark_posted(&mut self, req_id: &str, now_unix: f64) {
        if let Some(l) = self.loading.get_mut(req_id) {
            if l.started_unix <= 0.0 {
                l.started_unix = now_unix;
            }
        }
    }
}

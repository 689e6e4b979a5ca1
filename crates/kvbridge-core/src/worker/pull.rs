//! Pull mode on the worker side: handshake with P once per engine (single-flight), build
//! the plan, then READ each request's blocks with a notification carrying P's request id.
use std::collections::HashMap;

use super::WorkerBase;
use crate::error::{Error, HandshakeError, TransportError};
use crate::layout::KvLayout;
use crate::plan::TransferPlan;
use crate::wire::{self, AgentMetadata, ConnectorMetadata, HandshakePayload, Notif, RecvReq, MAX_HANDSHAKE_BYTES, WIRE_VERSION};

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fetch the handshake payload of peer `peer` from `host:port`, then call
    /// [`PullWorker::on_handshake_payload`].
    Handshake { peer: String, host: String, port: u16 },
    /// Load the peer's transport metadata and prepare its descriptors, then call
    /// [`PullWorker::on_remote_added`].
    AddRemote { peer: String, md: AgentMetadata },
    /// Forget a peer that failed.
    RemoveRemote { peer: String },
    /// Post a READ; then report its end with [`PullWorker::on_read_done`].
    Read { req_id: String, peer: String, local: Vec<i32>, remote: Vec<i32>, notif: Vec<u8>, bytes: u64 },
    /// Send a notification with no transfer (zero blocks to read, or a failed read).
    Notify { peer: String, msg: Vec<u8> },
}

#[derive(Debug)]
enum Engine {
    Handshaking { engine_id: String, queued: Vec<RecvReq>, plan: Option<TransferPlan> },
    Ready { plan: TransferPlan },
}

/// A peer is a remote engine *at an address*: `engine_id@host:port`. A request naming a
/// known engine at another address gets its own handshake, which checks the claim.
pub fn peer_key(r: &crate::wire::RemoteRef) -> String {
    format!("{}@{}:{}", r.engine_id, r.host, r.port)
}

#[derive(Debug, Clone)]
pub struct Loading {
    pub req_id: String,
    pub peer: String,
    pub remote_request_id: String,
    pub local_block_ids: Vec<u32>,
    pub bytes: u64,
    pub started_unix: f64,
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
    pub descriptors: u64,
    pub runs: u64,
}

#[derive(Debug)]
pub struct PullWorker {
    engine_id: String,
    tp_rank: u32,
    tp_size: u32,
    compat_hash: String,
    enforce_compat: bool,
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
            compat_hash,
            enforce_compat,
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

    pub fn on_registered(&mut self, layout: KvLayout) {
        self.layout = Some(layout);
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

    fn notif(&self, request_id: &str, ok: bool) -> Vec<u8> {
        Notif {
            version: WIRE_VERSION,
            request_id: request_id.to_string(),
            from_engine: self.engine_id.clone(),
            from_tp_rank: self.tp_rank,
            ok,
        }
        .to_bytes()
        .unwrap_or_default()
    }

    fn fail(&mut self, req_id: &str, local_block_ids: &[u32], notify_only: bool, err: &Error) {
        tracing::error!(request_id = %req_id, error = %err, "kvbridge: KV load failed");
        if notify_only {
            return;
        }
        self.stats.reads_failed += 1;
        self.base.out.recving.push(req_id.to_string());
        self.base.out.failed_recving.push(req_id.to_string());
        self.base.out.invalid_block_ids.extend_from_slice(local_block_ids);
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
        if r.remote.tp_size != self.tp_size {
            let e = Error::Plan(crate::error::PlanError::Layout(format!(
                "remote TP size {} differs from local {}; kvbridge currently needs equal TP",
                r.remote.tp_size, self.tp_size
            )));
            self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e);
            return;
        }
        let peer = peer_key(&r.remote);
        match self.engines.get_mut(&peer) {
            Some(Engine::Ready { plan }) => {
                let plan = plan.clone();
                self.start(r, &peer, &plan, 0.0, actions);
            }
            Some(Engine::Handshaking { queued, .. }) => queued.push(r),
            None => {
                // Single-flight: the first request for an engine starts the handshake; the
                // rest queue behind it. D rank r talks to P rank r (equal TP).
                let Some(port) = r.remote.port.checked_add(self.tp_rank as u16) else {
                    let e = Error::Other(format!("remote_port {} + rank {} overflows", r.remote.port, self.tp_rank));
                    self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e);
                    return;
                };
                actions.push(Action::Handshake { peer: peer.clone(), host: r.remote.host.clone(), port });
                self.engines.insert(peer, Engine::Handshaking { engine_id: r.remote.engine_id.clone(), queued: vec![r], plan: None });
            }
        }
    }

    fn start(&mut self, r: RecvReq, peer: &str, plan: &TransferPlan, now_unix: f64, actions: &mut Vec<Action>) {
        if r.local_block_ids.is_empty() {
            // Nothing to read (full local prefix hit, or aborted before allocation):
            // still tell P so it frees its blocks now rather than at lease expiry.
            actions.push(Action::Notify { peer: peer.to_string(), msg: self.notif(&r.remote.request_id, true) });
            if !r.notify_only {
                self.base.out.recving.push(r.req_id);
            }
            return;
        }
        match plan.indices(&r.local_block_ids, &r.remote.block_ids) {
            Err(e) => {
                actions.push(Action::Notify { peer: peer.to_string(), msg: self.notif(&r.remote.request_id, false) });
                self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e.into());
            }
            Ok(ix) => {
                self.stats.descriptors += ix.local.len() as u64;
                self.stats.runs += ix.runs as u64;
                actions.push(Action::Read {
                    req_id: r.req_id.clone(),
                    peer: peer.to_string(),
                    local: ix.local,
                    remote: ix.remote,
                    notif: self.notif(&r.remote.request_id, true),
                    bytes: ix.bytes,
                });
                self.loading.insert(
                    r.req_id.clone(),
                    Loading {
                        req_id: r.req_id,
                        peer: peer.to_string(),
                        remote_request_id: r.remote.request_id,
                        local_block_ids: r.local_block_ids,
                        bytes: ix.bytes,
                        started_unix: now_unix,
                    },
                );
            }
        }
    }

    /// Check a handshake reply: the hash first, then the metadata, then the plan.
    fn check_payload(&self, engine_id: &str, addr: &str, bytes: &[u8]) -> Result<(AgentMetadata, TransferPlan), Error> {
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
        let layout = self.layout.as_ref().ok_or(crate::error::PlanError::NotRegistered)?;
        let plan = TransferPlan::build(layout, self.tp_size, self.tp_rank, &md)?;
        Ok((md, plan))
    }

    /// The side channel answered (or failed).
    pub fn on_handshake_payload(&mut self, peer: &str, addr: &str, res: Result<Vec<u8>, HandshakeError>) -> Vec<Action> {
        let engine_id = match self.engines.get(peer) {
            Some(Engine::Handshaking { engine_id, .. }) => engine_id.clone(),
            _ => return Vec::new(),
        };
        let checked = res.map_err(Error::from).and_then(|b| self.check_payload(&engine_id, addr, &b));
        match checked {
            Ok((md, plan)) => {
                if let Some(Engine::Handshaking { plan: p, .. }) = self.engines.get_mut(peer) {
                    *p = Some(plan);
                }
                vec![Action::AddRemote { peer: peer.to_string(), md }]
            }
            Err(e) => {
                self.stats.handshakes_failed += 1;
                self.fail_engine(peer, &e);
                Vec::new()
            }
        }
    }

    /// The transport loaded the peer (or could not).
    pub fn on_remote_added(&mut self, peer: &str, res: Result<(), TransportError>, now_unix: f64) -> Vec<Action> {
        let mut actions = Vec::new();
        match (res, self.engines.remove(peer)) {
            (Ok(()), Some(Engine::Handshaking { queued, plan: Some(plan), .. })) => {
                self.stats.handshakes_ok += 1;
                tracing::info!(
                    peer,
                    regions = plan.num_regions,
                    remote_blocks = plan.remote_num_blocks,
                    "kvbridge: handshake done, transfer plan ready"
                );
                for r in queued {
                    self.start(r, peer, &plan, now_unix, &mut actions);
                }
                self.engines.insert(peer.to_string(), Engine::Ready { plan });
            }
            (Err(e), Some(state)) => {
                self.stats.handshakes_failed += 1;
                self.engines.insert(peer.to_string(), state);
                self.fail_engine(peer, &e.into());
            }
            (_, Some(state)) => {
                self.engines.insert(peer.to_string(), state);
            }
            (_, None) => {}
        }
        actions
    }

    fn fail_engine(&mut self, peer: &str, e: &Error) {
        if let Some(Engine::Handshaking { queued, .. }) = self.engines.remove(peer) {
            for r in queued {
                self.fail(&r.req_id, &r.local_block_ids, r.notify_only, e);
            }
        }
    }

    /// A READ finished (or failed). On failure, P is told so it can free its blocks, and
    /// the peer is forgotten so the next request re-handshakes.
    pub fn on_read_done(&mut self, req_id: &str, res: Result<(), TransportError>, now_unix: f64) -> Vec<Action> {
        let Some(l) = self.loading.remove(req_id) else { return Vec::new() };
        match res {
            Ok(()) => {
                let secs = if l.started_unix > 0.0 { (now_unix - l.started_unix).max(0.0) } else { 0.0 };
                self.stats.reads_ok += 1;
                self.stats.bytes_read += l.bytes;
                self.stats.read_secs_total += secs;
                self.stats.last_read_secs = secs;
                self.stats.last_read_bytes = l.bytes;
                tracing::info!(request_id = %l.req_id, bytes = l.bytes, secs, "kvbridge-xfer");
                self.base.out.recving.push(l.req_id);
                Vec::new()
            }
            Err(e) => {
                self.fail(&l.req_id, &l.local_block_ids, false, &e.into());
                self.engines.remove(&l.peer);
                vec![
                    Action::Notify { peer: l.peer.clone(), msg: self.notif(&l.remote_request_id, false) },
                    Action::RemoveRemote { peer: l.peer },
                ]
            }
        }
    }

    /// Record when a read was actually posted (for transfer-time stats).
    pub fn mark_posted(&mut self, req_id: &str, now_unix: f64) {
        if let Some(l) = self.loading.get_mut(req_id) {
            l.started_unix = now_unix;
        }
    }
}

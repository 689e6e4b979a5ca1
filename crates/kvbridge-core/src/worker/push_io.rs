//! Push mode's side of the worker driver: what P's writer thread and D's registrations
//! do with the transport and the side channel. The decisions are [`PushSender`]'s and
//! [`PushReceiver`]'s (sans-IO); this module turns them into handshakes, WRITEs and
//! notifications.
//!
//! P: a registration (side-channel thread) or a finished/computing request (engine
//! thread) queues `Work` and wakes the writer thread, which owns every NIXL call of
//! push mode: it loads D ranks (one handshake per D rank, started as soon as a D rank
//! registers, so it overlaps P's prefill), plans each write from D's advertised layout,
//! posts WRITEs (per layer while the forward runs, when layer-wise), polls them, and
//! tells [`PushSender`] when each D rank is done. The engine thread only queues work.
//!
//! D: each registration goes to every P rank this rank maps to; P's notifications (one
//! per WRITE) are counted by [`PushReceiver`].
use std::collections::{HashMap, HashSet};

use super::push::{PushAction, PushReceiver, PushSender};
use crate::error::{Error, PlanError};
use crate::layout::{KvLayout, TensorInfo};
use crate::plan::{GroupBlocks, Piece, TpMapping, TransferPlan};
use crate::transport::XferId;
use crate::wire::{AgentMetadata, Notif, PushRegistration, WIRE_VERSION};

/// Work for P's writer thread, sent over a channel (never behind a lock the engine
/// thread might wait on).
#[derive(Debug)]
pub(crate) enum Work {
    /// The caches are registered: what the writer needs to plan.
    Registered(Box<Geometry>),
    /// A D rank registered: load it now, so the handshake overlaps P's prefill.
    Connect(PushRegistration),
    /// A sender decision. `layerwise`: write layer by layer as the forward computes them.
    Action { action: PushAction, layerwise: bool },
    /// A forward with layer-wise requests starts.
    ForwardStart,
    /// Layer `i` of the running forward is computed.
    Layer(usize),
    /// The forward ended: every layer is computed; `computing` lists its requests.
    ForwardDone { computing: Vec<String> },
    /// D rank `key` answered its handshake (checked), with the write plan or why there is
    /// none; or it could not be reached or checked.
    PeerDone { key: String, res: Result<(Result<Box<TransferPlan>, Error>, AgentMetadata), Error> },
}

/// P's own registration, as the writer needs it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Geometry {
    pub own_md: Option<AgentMetadata>,
    pub tensors: Vec<TensorInfo>,
    pub num_blocks: u64,
    /// Region spans: (start, end, layer index), sorted by start.
    pub spans: Vec<(u64, u64, usize)>,
    pub num_layers: usize,
}

impl Geometry {
    /// Returns the geometry and the layer name → index map.
    pub fn new(layout: &KvLayout, tensors: &[TensorInfo], num_blocks: u64, md: AgentMetadata) -> (Self, HashMap<String, usize>) {
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut spans = Vec::new();
        for r in &layout.regions {
            let n = names.len();
            let li = *names.entry(r.layer.clone()).or_insert(n);
            let end = r.base.saturating_add(r.num_blocks.saturating_sub(1).saturating_mul(r.block_stride)).saturating_add(r.block_len);
            spans.push((r.base, end, li));
        }
        spans.sort_unstable();
        let g = Self { own_md: Some(md), tensors: tensors.to_vec(), num_blocks, spans, num_layers: names.len() };
        (g, names)
    }

    /// The metadata of P rank `q` as far as planning needs it: TP ranks of one engine
    /// share their geometry, so a sibling's layout is ours computed for its rank (its
    /// addresses are never used: each rank writes only its own pieces).
    pub fn sibling_md(&self, q: u32) -> Result<AgentMetadata, PlanError> {
        let own = self.own_md.as_ref().ok_or(PlanError::NotRegistered)?;
        if q == own.tp_rank {
            return Ok(own.clone());
        }
        let l = KvLayout::from_tensors(&self.tensors, self.num_blocks, q, own.tp_size)?;
        Ok(AgentMetadata { tp_rank: q, regions: l.regions, ..own.clone() })
    }

    /// Split pieces at P region boundaries and bucket them by layer.
    pub fn by_layer(&self, pieces: Vec<Piece>) -> Vec<Vec<Piece>> {
        let mut out = vec![Vec::new(); self.num_layers.max(1)];
        for mut p in pieces {
            loop {
                let i = self.spans.partition_point(|s| s.0 <= p.local);
                let span = self.spans[..i].iter().rev().find(|s| p.local < s.1);
                let Some(&(_, end, li)) = span else {
                    // Outside every region (cannot happen for our own plan's pieces): keep
                    // it whole in the last layer, written once the forward is done.
                    if let Some(v) = out.last_mut() {
                        v.push(p);
                    }
                    break;
                };
                if p.local + p.len <= end {
                    out[li].push(p);
                    break;
                }
                let head = end - p.local;
                out[li].push(Piece { len: head, ..p });
                p = Piece { local: p.local + head, remote: p.remote + head, len: p.len - head, ..p };
            }
        }
        out
    }
}

/// A D rank as P sees it.
#[derive(Debug)]
pub(crate) enum DPeer {
    Handshaking { pending: Vec<(PushAction, bool)> },
    Ready { plan: Box<TransferPlan> },
}

/// One WRITE job: P request → one D rank.
#[derive(Debug)]
pub(crate) struct Job {
    pub p_req: String,
    pub key: String,
    /// Pieces per layer (one entry when not layer-wise).
    pub layers: Vec<Vec<Piece>>,
    pub posted: Vec<bool>,
    pub layerwise: bool,
    pub notif_ok: Vec<u8>,
    pub notif_fail: Vec<u8>,
    pub in_flight: usize,
    pub failed: bool,
    pub bytes: u64,
    pub started: f64,
    /// Time spent in the WRITE post calls so far (for the post-time stat).
    pub post_secs: f64,
}

/// Push-mode counters of one worker, exported as stats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PushStats {
    /// P: WRITE jobs (one P request into one D rank) that completed.
    pub writes_ok: u64,
    /// P: WRITE jobs that failed (planning, loading the D rank, posting or completing).
    pub writes_failed: u64,
    /// P: WRITEs posted (one per job, or one per layer when layer-wise).
    pub write_posts: u64,
    /// P: bytes written by the completed jobs.
    pub bytes_written: u64,
    /// P: seconds the last completed job took, from its start to its completion.
    pub last_write_secs: f64,
    /// D: registrations sent to P ranks (one per P rank a request maps to).
    pub registrations_sent: u64,
    /// P: registrations refused (the D rank is answered with the reason).
    pub registrations_refused: u64,
    /// P: registrations accepted.
    pub registrations_accepted: u64,
    /// D: push loads completed (every P rank wrote).
    pub recv_ok: u64,
    /// D: push loads failed (a P rank failed or refused, a registration could not be
    /// delivered, or the deadline passed).
    pub recv_failed: u64,
}

/// Push state shared by the engine, side-channel and writer threads (one short lock).
#[derive(Debug)]
pub(crate) struct PushCtl {
    pub sender: PushSender,
    pub receiver: PushReceiver,
    /// D: local blocks of requests waiting for P's writes.
    pub d_blocks: HashMap<String, Vec<u32>>,
    /// D: requests aborted while waiting; reported as `finished_sending` when settled.
    pub d_aborted: HashSet<String>,
    /// P: requests of the running layer-wise forward.
    pub computing: Vec<String>,

    pub stats: PushStats,
    /// Observations for vLLM's stats (WRITEs on P, failed loads on D).
    pub xfer: super::stats::XferStats,
}

impl PushCtl {
    /// A push WRITE job failed (posting, planning or loading the peer): counted in the
    /// worker's counters and in vLLM's stats.
    pub fn write_failed(&mut self) {
        self.stats.writes_failed += 1;
        self.xfer.record_failed_transfer();
    }

    pub fn new(engine_id: String, tp_size: u32, registration_ttl: f64) -> Self {
        let mut sender = PushSender::new(engine_id, registration_ttl);
        sender.set_tp_size(tp_size);
        Self {
            sender,
            receiver: PushReceiver::default(),
            d_blocks: HashMap::new(),
            d_aborted: HashSet::new(),
            computing: Vec::new(),
            stats: PushStats::default(),
            xfer: Default::default(),
        }
    }
}

/// The writer thread's own state.
#[derive(Debug, Default)]
pub(crate) struct WriterState {
    pub geo: Geometry,
    pub d_peers: HashMap<String, DPeer>,
    pub jobs: HashMap<u64, Job>,
    pub next_job: u64,
    pub wxfers: HashMap<XferId, u64>,
    /// Layers computed so far in the running layer-wise forward (`None`: no such
    /// forward is running, every layer is available).
    pub layers_done: Option<Vec<bool>>,
}

/// The notification P sends D with a WRITE (or alone).
pub fn notif(reg: &PushRegistration, from_engine: &str, from_rank: u32, ok: bool, expected: u32) -> Vec<u8> {
    Notif {
        version: WIRE_VERSION,
        request_id: reg.request_id.clone(),
        from_engine: from_engine.to_string(),
        from_tp_rank: from_rank,
        ok,
        expected: expected.max(1),
    }
    .to_bytes()
    .unwrap_or_default()
}

/// The transport key of a D rank on P.
pub fn d_key(reg: &PushRegistration) -> String {
    format!("push:{}@{}:{}#{}", reg.engine_id, reg.host, reg.port, reg.tp_rank)
}

/// P's pieces for one registration: D's READ plan from P's ranks, this rank's reads,
/// swapped into WRITEs.
pub fn write_pieces(
    plan: &TransferPlan,
    my_rank: u32,
    p_blocks: &[Vec<u32>],
    reg: &PushRegistration,
    coalesce: bool,
) -> Result<Vec<Piece>, PlanError> {
    let groups: Vec<GroupBlocks<'_>> = reg
        .block_ids
        .iter()
        .enumerate()
        .map(|(g, l)| GroupBlocks { local: l, remote: p_blocks.get(g).map(Vec::as_slice).unwrap_or(&[]) })
        .collect();
    if reg.block_ids.iter().all(Vec::is_empty) {
        return Ok(Vec::new());
    }
    let t = plan.transfer(&groups, reg.num_tokens, coalesce)?;
    Ok(t.reads.into_iter().filter(|r| r.remote_rank == my_rank).flat_map(|r| r.pieces.into_iter().map(Piece::swapped)).collect())
}

/// The P ranks D rank `d_rank` registers with.
pub fn p_ranks_for(d_tp: u32, d_rank: u32, p_tp: u32) -> Result<Vec<u32>, PlanError> {
    Ok(TpMapping::new(d_tp, d_rank, p_tp)?.sources)
}

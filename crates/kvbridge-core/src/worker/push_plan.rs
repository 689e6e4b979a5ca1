//! Push mode's pure helpers for the driver (`kvbridge-driver`): P's geometry for planning
//! writes, the write pieces of one registration, the TP ranks a D rank registers with, the
//! notifications, and [`PushCtl`], the push state the engine, side-channel and writer
//! threads share. The decisions are [`PushSender`]'s and [`PushReceiver`]'s (sans-IO); the
//! driver turns them into handshakes, WRITEs and notifications.
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

use super::push::{PushReceiver, PushSender};
use crate::error::PlanError;
use crate::layout::{KvLayout, TensorInfo};
use crate::plan::{GroupBlocks, Piece, TpMapping, TransferPlan};
use crate::wire::{AgentMetadata, Notif, PushRegistration, WIRE_VERSION};

/// P's own registration, as the writer needs it.
#[derive(Debug, Clone, Default)]
pub struct Geometry {
    /// This rank's advertised metadata.
    pub own_md: Option<AgentMetadata>,
    /// The cache tensors as registered.
    pub tensors: Vec<TensorInfo>,
    /// Logical blocks in the cache.
    pub num_blocks: u64,
    /// Region spans: (start, end, layer index), sorted by start.
    pub spans: Vec<(u64, u64, usize)>,
    /// Layers in the cache.
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
                let span = self.spans.iter().take(i).rev().find(|s| p.local < s.1);
                let Some(&(_, end, li)) = span else {
                    // Outside every region (cannot happen for our own plan's pieces): keep
                    // it whole in the last layer, written once the forward is done.
                    if let Some(v) = out.last_mut() {
                        v.push(p);
                    }
                    break;
                };
                // `li` < `num_layers` by construction (`Geometry::new`).
                let Some(bucket) = out.get_mut(li) else { break };
                if p.local + p.len <= end {
                    bucket.push(p);
                    break;
                }
                let head = end - p.local;
                bucket.push(Piece { len: head, ..p });
                p = Piece { local: p.local + head, remote: p.remote + head, len: p.len - head, ..p };
            }
        }
        out
    }
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
pub struct PushCtl {
    /// P: registrations matched with requests, and what to write.
    pub sender: PushSender,
    /// D: requests waiting for P's writes.
    pub receiver: PushReceiver,
    /// D: local blocks of requests waiting for P's writes.
    pub d_blocks: HashMap<String, Vec<u32>>,
    /// D: requests aborted while waiting; reported as `finished_sending` when settled.
    pub d_aborted: HashSet<String>,
    /// P: requests of the running layer-wise forward.
    pub computing: Vec<String>,

    /// Push-mode counters.
    pub stats: PushStats,
    /// Observations for vLLM's stats (WRITEs on P, failed loads on D).
    pub xfer: super::stats::XferStats,
    /// D: P engines' rank tables, by directory address (`remote_host`, `remote_port`), so
    /// registrations reach each P rank at its own host ([`crate::ranks`]).
    pub tables: HashMap<(String, u16), Vec<crate::ranks::RankAddr>>,
}

impl PushCtl {
    /// D: what push loads ended by `now` (P's writes all notified, failed, refused or past
    /// their registration deadline), added to the step's `out`. A load aborted while P
    /// could still write is reported in `sending` (vLLM holds its blocks until then); a
    /// failed one lists its blocks (never `null_block`) as invalid. P: requests whose
    /// blocks every D rank is done with, in `sending`.
    pub fn take_finished(&mut self, now: f64, null_block: Option<u32>, out: &mut super::FinishedSets) {
        self.receiver.tick(now);
        let (ok, failed) = self.receiver.take();
        for r in ok {
            self.d_blocks.remove(&r);
            self.stats.recv_ok += 1;
            if self.d_aborted.remove(&r) {
                out.sending.push(r);
            } else {
                out.recving.push(r);
            }
        }
        for (r, reason) in failed {
            let blocks = self.d_blocks.remove(&r).unwrap_or_default();
            self.stats.recv_failed += 1;
            self.xfer.record_failed_transfer();
            if self.d_aborted.remove(&r) {
                out.sending.push(r);
                continue;
            }
            tracing::error!(request_id = %r, %reason, "kvbridge: push load failed");
            out.invalid_block_ids.extend(blocks.into_iter().filter(|&b| Some(b) != null_block));
            out.recving.push(r.clone());
            out.failed_recving.push(r);
        }
        out.sending.extend(self.sender.take_sending());
    }

    /// A push WRITE job failed (posting, planning or loading the peer): counted in the
    /// worker's counters and in vLLM's stats.
    pub fn write_failed(&mut self) {
        self.stats.writes_failed += 1;
        self.xfer.record_failed_transfer();
    }

    /// Push state for engine `engine_id` of `tp_size` ranks; registrations not matched
    /// within `registration_ttl` seconds are dropped.
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
            tables: HashMap::new(),
        }
    }
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
